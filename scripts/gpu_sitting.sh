#!/usr/bin/env bash
# One GPU sitting for the checks a CPU cannot make: the CUDA tests, then `bench perf` for the speed targets
# (README "Performance"), each in the same interleaved run as its per-task-loop reference.
#
#   OUT=gpu-out BENCH_DATA_DIR=/path/to/omniglot bash scripts/gpu_sitting.sh
#
# Writes under $OUT: nvidia-smi.txt, pytest-gpu.txt, perf-*.json (raw `bench perf --json`) and log.txt.
# DEVICE=cpu SMALL=1 runs the same steps with tiny settings, to check the script itself without a GPU.
set -u -o pipefail
OUT=${OUT:-gpu-out}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1

if [ "${SMALL:-0}" = 1 ]; then
  ITER=(--iterations 2 --warmup 1 --reference-iterations 1)
  EVAL=(--eval-episodes 5)
  SMALL_CFG=(-o meta_batch_size=2 -o test_inner_steps=1)
else
  ITER=(--iterations 30 --warmup 5 --reference-iterations 5)
  EVAL=(--eval-episodes 600)
  SMALL_CFG=()
fi

echo "== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null) device=$DEVICE"
command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT/nvidia-smi.txt"
bench data || exit 1

if [ "$DEVICE" != cpu ]; then
  echo "== CUDA tests (CUDA graphs, compile, equivalence)"
  python -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.txt" | tail -3
fi

perf() {  # perf NAME ARGS...: one bench perf report as JSON, with its wall time
  local name=$1; shift
  echo "== bench perf $* --device $DEVICE"
  local start=$SECONDS
  bench perf "$@" --device "$DEVICE" "${SMALL_CFG[@]}" --json > "$OUT/perf-$name.json" \
    || echo "bench perf $name failed (exit $?)"
  echo "   $((SECONDS - start)) s"
}
# The targets' configurations, each with the ablation ladder (vmap, + CUDA graph, + compile).
perf maml-20w1s --learner maml --way 20 --shot 1 "${ITER[@]}" "${EVAL[@]}" --ablation
perf maml-5w1s --learner maml --way 5 --shot 1 "${ITER[@]}" --eval-episodes 0 --ablation
perf fomaml-20w1s --learner fomaml --way 20 --shot 1 "${ITER[@]}" --eval-episodes 0 --ablation
# Memory: 20-way 5-shot second order must fit in 16 GB (peak_memory_mb of the shipped row).
perf maml-20w5s --learner maml --way 20 --shot 5 --iterations 5 --warmup 4 --no-reference --eval-episodes 0
# torch.compile last: its compilation takes minutes, and the figures above do not depend on it.
if [ "${COMPILE:-1}" = 1 ]; then
  perf maml-5w1s-compile --learner maml --way 5 --shot 1 "${ITER[@]}" --eval-episodes 0 --ablation -o compile=true
fi
echo "== done $(date -u +%FT%TZ)"
