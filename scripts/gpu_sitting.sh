#!/usr/bin/env bash
# One GPU sitting for the checks a CPU cannot make: the CUDA tests, then `bench perf` for the speed and
# memory targets (README "Performance"), each in the same interleaved run as its per-task-loop reference,
# then a one-screen summary (scripts/gpu_summary.py); optionally paper cells after them or instead.
#
#   OUT=gpu-out bash scripts/gpu_sitting.sh                      # on the GPU machine (data in data/omniglot)
#   DEVICE=cpu SMALL=1 OUT=/tmp/gpuout BENCH_DATA_DIR=/work/shared/data/omniglot \
#     BENCH_CACHE_DIR=/tmp/gpucache bash scripts/gpu_sitting.sh  # dry run of the script itself (~1 min)
#
# Before a sitting: copy the two Omniglot zips into data/omniglot (git-ignored) and fetch the wheels the GPU
# image lacks (bash scripts/fetch_gpu_wheels.sh: .whl/), commit, then, with the device tool (about 15 min of
# device time, ~1.5 min of it the start; this call leaves ~4.5 min for a rerun while the machine is warm):
#   run(command='OUT="$OUT" BENCH_GIT_COMMIT=<HEAD sha> CHECKS=1 BUDGET_S=480 CELLS="finn2017:maml:5w1s" \
#       bash scripts/gpu_sitting.sh', carry=["data/omniglot", ".whl"], timeout_s=540)
#   (the checks take about 3-5 min; the cell gets the rest of the 480 s).
#
# Settings (environment):
#   OUT            where the files go (at most 8 come back from a sitting; this writes 4):
#                  log.txt (everything), pytest-gpu.txt, perf.jsonl (one `bench perf --json` report a line,
#                  see scripts/gpu_summary.py) and summary.txt (the targets, measured, pass/fail).
#   DEVICE         cuda (default) or cpu.      SMALL=1: tiny settings, to check the script.
#   COMPILE        0 (default): no torch.compile anywhere (its tests need BENCH_TEST_INDUCTOR, which this
#                  sets to $COMPILE; its perf run is skipped): compilation takes minutes a configuration.
#   BUDGET_S       480: seconds for the whole script. Each step runs under `timeout` with its own limit,
#                  cut to what is left of the budget; a step that no longer fits is skipped, and the
#                  summary always runs. Give the `run` call a timeout_s of BUDGET_S + 60.
#   INSTALL        1 on cuda, 0 on cpu: install offline (carried .whl/*.whl, then this checkout with
#                  `pip install --no-index --no-deps --no-build-isolation -e .`).
#   CELLS          paper cells instead of the checks (issue 16 part B), e.g. "finn2017:maml:5w1s finn2017:maml:20w1s",
#                  or after them with CHECKS=1 (one call, one machine start: the cells get the budget left):
#                  each `bench reproduce PAPER --learner L --cells C` runs (several at once with PARALLEL=N)
#                  under --time-limit, so it stops cleanly (checkpointed) before the budget; the next sitting
#                  resumes it: results/<paper>/ is not git-ignored, so its run directories travel with the
#                  checkout. results.tar.gz (results/<paper>: run directories with their checkpoints, table.md)
#                  comes back: untar it and commit it. With CHECKS=1 the cells get what the checks leave.
#   BENCH_GIT_COMMIT  the commit the checkout was copied from (its .git does not travel): give it in the call,
#                  e.g. BENCH_GIT_COMMIT=$(git rev-parse HEAD) expanded here, so config.json records it.
#   BENCH_DATA_DIR data/omniglot (carried: the two zips).  BENCH_CACHE_DIR /tmp/bench-cache (so
#                  platformdirs is not needed).  BENCH_TEST_OMNIGLOT defaults to BENCH_DATA_DIR, so the
#                  real-data GPU test does not skip.
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-gpu-out}
DEVICE=${DEVICE:-cuda}
SMALL=${SMALL:-0}
COMPILE=${COMPILE:-0}
BUDGET_S=${BUDGET_S:-480}
if [ "$DEVICE" = cpu ]; then INSTALL=${INSTALL:-0}; else INSTALL=${INSTALL:-1}; fi
PY=${PYTHON:-python3}
export BENCH_DATA_DIR=${BENCH_DATA_DIR:-data/omniglot}
export BENCH_CACHE_DIR=${BENCH_CACHE_DIR:-/tmp/bench-cache}
export BENCH_TEST_OMNIGLOT=${BENCH_TEST_OMNIGLOT:-$BENCH_DATA_DIR}
export BENCH_TEST_INDUCTOR=$COMPILE
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# `bench` without relying on PATH: the entry point itself, run by the interpreter that was installed into.
BENCH=("$PY" -c 'import sys; from benchmark.cli import main; sys.exit(main())')
RESERVE_S=20  # kept back for the summary

mkdir -p "$OUT" || exit 1
WORK=$(mktemp -d)
exec > >(tee -a "$OUT/log.txt") 2>&1
TEE_PID=$!
finish() {  # the summary and the cells' tarball happen whatever happened before; then let tee write the last lines
  local rc=${1:-$?}
  if declare -F bundle_cells >/dev/null; then
    stop_cells  # cells still running (the sitting itself was stopped): SIGTERM makes them checkpoint first
    bundle_cells
  fi
  if [ -s "$OUT/perf.jsonl" ]; then
    echo "== summary"
    "$PY" scripts/gpu_summary.py summary "$OUT/perf.jsonl" > "$OUT/summary.txt" 2>&1
    cat "$OUT/summary.txt"
  fi
  echo "== end $(date -u +%FT%TZ) after ${SECONDS} s (budget ${BUDGET_S} s), exit $rc; files in $OUT: $(ls "$OUT" | wc -l) (8 come back at most)"
  rm -rf "$WORK"
  exec >&- 2>&-
  wait "$TEE_PID" 2>/dev/null
  exit "$rc"
}
trap finish EXIT
trap 'finish 143' TERM  # bash runs the EXIT trap with status 0 after a SIGTERM: say it was stopped
die() { echo "FATAL: $*"; exit 1; }

# step NAME LIMIT_S COMMAND...: run under `timeout`, its limit cut to the budget left; logs the time and
# sets STEP_RC (124: timed out, 125: skipped for lack of budget) and STEP_S. STEP_STDOUT=FILE sends the
# command's stdout there (and its stderr too with STEP_MERGE=1); otherwise both go to the log.
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - SECONDS - RESERVE_S))
  if [ "$left" -lt 15 ]; then
    echo "== $name: SKIPPED, ${left} s of the budget left"; STEP_RC=125; STEP_S=0; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s)"
  local start=$SECONDS
  if [ -z "${STEP_STDOUT:-}" ]; then
    timeout -k 10 "$limit" "$@"
  elif [ "${STEP_MERGE:-0}" = 1 ]; then
    timeout -k 10 "$limit" "$@" > "$STEP_STDOUT" 2>&1
  else
    timeout -k 10 "$limit" "$@" > "$STEP_STDOUT"
  fi
  STEP_RC=$?
  STEP_S=$((SECONDS - start))
  case $STEP_RC in
    0) echo "   $name: ok, ${STEP_S} s" ;;
    124|137) echo "   $name: TIMED OUT after ${STEP_S} s" ;;
    *) echo "   $name: exit $STEP_RC after ${STEP_S} s" ;;
  esac
}

echo "== $(date -u +%FT%TZ) device=$DEVICE small=$SMALL compile=$COMPILE budget=${BUDGET_S}s install=$INSTALL"
echo "   data=$BENCH_DATA_DIR cache=$BENCH_CACHE_DIR python=$(command -v "$PY")"
command -v nvidia-smi >/dev/null && nvidia-smi
[ -f "$BENCH_DATA_DIR/images_background.zip" ] && [ -f "$BENCH_DATA_DIR/images_evaluation.zip" ] \
  || die "no Omniglot zips in BENCH_DATA_DIR=$BENCH_DATA_DIR: copy images_background.zip and images_evaluation.zip there and name the folder in the run call's carry"
"$PY" -c 'import sys, torch; print("   python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' \
  || die "$PY cannot import torch"
if [ "$DEVICE" != cpu ]; then
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || die "DEVICE=$DEVICE but torch sees no CUDA device"
fi

if [ "$INSTALL" = 1 ]; then
  echo "== install (offline)"
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "   carried wheels: $(cd .whl && echo *.whl)"
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile .whl/*.whl \
      || die "pip could not install the carried wheels in .whl/"
  fi
  # --no-build-isolation: an isolated build would fetch setuptools from an index the GPU machine cannot reach.
  "$PY" - <<'PYEOF' || die "the build backend is missing or too old (see above)"
import importlib.metadata as md, re, sys
fix = "carry its wheel: SETUPTOOLS=1 bash scripts/fetch_gpu_wheels.sh, and name .whl in carry"
try:
    version = md.version("setuptools")
except md.PackageNotFoundError:
    sys.exit(f"   setuptools is not installed: {fix}")
major_minor = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
if major_minor < (64, 0):
    sys.exit(f"   setuptools {version} < 64 cannot install in editable mode (PEP 660): {fix}")
if major_minor < (70, 1):  # bdist_wheel moved into setuptools in 70.1
    try:
        print(f"   setuptools {version} (< 70.1) with wheel {md.version('wheel')}")
    except md.PackageNotFoundError:
        sys.exit(f"   setuptools {version} < 70.1 needs the wheel package for bdist_wheel: carry setuptools>=70.1 "
                 f"or wheel ({fix})")
else:
    print(f"   setuptools {version} (has bdist_wheel)")
PYEOF
  timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || die "pip install --no-index --no-deps --no-build-isolation -e . failed (output above)"
fi

echo "== dependencies (pyproject.toml)"
"$PY" - <<'PYEOF' || die "a dependency the sitting needs is missing (see above)"
import importlib, importlib.metadata as md, os, sys
try:
    import tomllib
    deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
except ImportError:
    sys.exit("   python < 3.11 has no tomllib: cannot read pyproject.toml")
try:
    from packaging.requirements import Requirement
except ImportError:
    Requirement = None
MODULE = {"pillow": "PIL"}
# Not on the sitting's path (it fails only when used); anything else missing is fatal.
OPTIONAL = {"tabulate": "bench table (pandas to_markdown)", "jinja2": "bench table --latex (pandas to_latex)"}
if os.environ.get("BENCH_CACHE_DIR"):
    OPTIONAL["platformdirs"] = "the default cache folder, and BENCH_CACHE_DIR is set"
missing = []
for spec in deps + ["pytest>=7"]:
    if Requirement and Requirement(spec).marker and not Requirement(spec).marker.evaluate():
        continue  # e.g. tomli, only for Python < 3.11
    if not Requirement and ";" in spec:
        continue  # without `packaging` the environment marker cannot be read: such deps are backports
    name = Requirement(spec).name if Requirement else spec.split(">")[0].split("=")[0].split("<")[0].strip()
    try:
        importlib.import_module(MODULE.get(name.lower(), name.lower()))
        version = md.version(name)
        ok = Requirement is None or Requirement(spec).specifier.contains(version, prereleases=True)
        print(f"   {'ok  ' if ok else 'OLD '} {name} {version} ({spec})")
        if not ok and name.lower() not in OPTIONAL:
            missing.append(name)
    except Exception as exc:  # ImportError, or metadata missing
        why = OPTIONAL.get(name.lower())
        print(f"   {'warn' if why else 'MISSING'} {name}: {type(exc).__name__}: {exc}"
              + (f" (needed only for {why})" if why else "")
              + f"; to have it, carry its wheel: bash scripts/fetch_gpu_wheels.sh {name}, and name .whl in carry")
        if not why:
            missing.append(name)
sys.exit(f"   missing or too old: {', '.join(missing)}" if missing else 0)
PYEOF
"${BENCH[@]}" learners maml >/dev/null 2>&1 || die "bench does not find the maml learner: is metabench installed (INSTALL=1)?"

step "bench data (verify, decode into BENCH_CACHE_DIR)" 120 "${BENCH[@]}" data --no-download
[ "$STEP_RC" = 0 ] || die "bench data failed: the perf runs need the data"

# Part B: paper cells in time-limited pieces, then back with the run directories (results.tar.gz).
# One deadline for all the cells: each gets the time left until it (cells run one after another unless
# PARALLEL says otherwise), as its --time-limit, so it checkpoints and stops cleanly, and under a `timeout`
# a little longer as a backstop (SIGTERM also checkpoints). The tarball is also made by `finish`, so what
# the cells wrote comes back whatever happened.
CELL_PAPERS=() CELL_PIDS=() BUNDLED=0
run_cells() {
  local deadline=$((BUDGET_S - RESERVE_S - 30))  # 30 s: the tables, the tarball, a last checkpoint
  echo "== paper cells: $CELLS (until ${deadline} s into the sitting, ${PARALLEL:-1} at once)"
  local cell paper learner cellname left
  for cell in $CELLS; do
    IFS=: read -r paper learner cellname <<< "$cell"
    left=$((deadline - SECONDS))
    if [ "$left" -lt 60 ]; then
      echo "   $cell: SKIPPED, ${left} s left (a cell needs a minute to start and checkpoint)"
      continue
    fi
    CELL_PAPERS+=("$paper")
    echo "   $cell: --time-limit ${left}s"
    timeout -s TERM -k 20 $((left + 15)) \
      "${BENCH[@]}" reproduce "$paper" --learner "$learner" --cells "$cellname" --device "$DEVICE" -q \
      --time-limit "${left}s" > "$WORK/cell-$paper-$learner-$cellname.log" 2>&1 &
    CELL_PIDS+=($!)
    # At most PARALLEL at once. Wait only for our own cells: a bare `wait` would also wait for the log's tee.
    while [ "$(running_cells | wc -l)" -ge "${PARALLEL:-1}" ]; do
      sleep 1
    done
  done
  local pid
  for pid in "${CELL_PIDS[@]}"; do
    wait "$pid"
    echo "   cell process $pid: exit $? (0 finished, 3 its time limit, 124/137 stopped by the backstop)"
  done
  CELL_PIDS=()
  for log in "$WORK"/cell-*.log; do [ -f "$log" ] && { echo "-- $(basename "$log")"; tail -n 40 "$log"; }; done
  for paper in $(printf '%s\n' "${CELL_PAPERS[@]}" | sort -u); do
    "${BENCH[@]}" reproduce "$paper" --table-only > /dev/null 2>&1 && cat "results/$paper/table.md"
  done
  bundle_cells
}
running_cells() {  # one line per cell process still running
  local pid
  for pid in "${CELL_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && echo "$pid"; done
}
stop_cells() {  # SIGTERM to the cells still running, then up to 30 s for their checkpoints
  local pids
  pids=$(running_cells)
  [ -n "$pids" ] || return 0
  echo "   stopping cells $pids (SIGTERM: they checkpoint)"
  kill -TERM $pids 2>/dev/null
  for _ in $(seq 30); do [ -n "$(running_cells)" ] || break; sleep 1; done
}
bundle_cells() {  # results/<paper> of every cell started, as $OUT/results.tar.gz (once)
  [ ${#CELL_PAPERS[@]} -gt 0 ] && [ "$BUNDLED" = 0 ] || return 0
  BUNDLED=1
  local dirs=() paper
  for paper in $(printf '%s\n' "${CELL_PAPERS[@]}" | sort -u); do
    [ -d "results/$paper" ] && dirs+=("results/$paper")
  done
  [ ${#dirs[@]} -gt 0 ] || { echo "   no results/<paper> folder to bundle"; return 0; }
  tar -czf "$OUT/results.tar.gz" "${dirs[@]}" && echo "   results.tar.gz: $(du -h "$OUT/results.tar.gz" | cut -f1)"
}
if [ -n "${CELLS:-}" ] && [ "${CHECKS:-0}" != 1 ]; then
  run_cells
  exit 0
fi

PYTEST_TIMEOUT=()
"$PY" -c 'import pytest_timeout' 2>/dev/null && PYTEST_TIMEOUT=(--timeout 120)  # one hung test cannot take the rest
# 240 s: 25 tests, three of them starting training processes; the perf steps after it fit the rest.
STEP_STDOUT="$OUT/pytest-gpu.txt" STEP_MERGE=1 step "CUDA tests: pytest -m gpu (inductor ones only with COMPILE=1)" 240 \
  "$PY" -m pytest -m gpu -q -rfEs -p no:cacheprovider --durations=8 "${PYTEST_TIMEOUT[@]}" tests
tail -n 25 "$OUT/pytest-gpu.txt"

if [ "$SMALL" = 1 ]; then
  ITER=(--iterations 2 --warmup 1 --reference-iterations 1)
  EVAL=(--eval-episodes 5)
  MEM=(--iterations 2 --warmup 1 --query 1)
  SMALL_CFG=(-o meta_batch_size=2 -o inner_steps=1 -o test_inner_steps=1)
else
  ITER=(--iterations 30 --warmup 5 --reference-iterations 5)
  EVAL=(--eval-episodes 600)
  # warm-up 5 = 3 eager steps, the capture, a replay: the peak reserved over the warm-up covers the capture.
  MEM=(--iterations 5 --warmup 5)
  SMALL_CFG=()
fi
perf() {  # perf NAME LIMIT_S ARGS...: one `bench perf --json` report, appended to perf.jsonl
  local name=$1 limit=$2; shift 2
  STEP_STDOUT="$WORK/$name.json" step "bench perf $name: $*" "$limit" \
    "${BENCH[@]}" perf "$@" --device "$DEVICE" "${SMALL_CFG[@]}" --json
  "$PY" scripts/gpu_summary.py collect "$OUT/perf.jsonl" "$name" "$WORK/$name.json" --exit "$STEP_RC" --seconds "$STEP_S"
}
# The targets' configurations, each with the ablation ladder (vmap alone, vmap + CUDA graph).
perf maml-20w1s 150 --learner maml --way 20 --shot 1 "${ITER[@]}" "${EVAL[@]}" --ablation
perf maml-5w1s 120 --learner maml --way 5 --shot 1 "${ITER[@]}" --eval-episodes 0 --ablation
perf fomaml-20w1s 120 --learner fomaml --way 20 --shot 1 "${ITER[@]}" --eval-episodes 0 --ablation
# Memory: 20-way 5-shot second order alone in its process, so reserved memory is its own.
perf maml-20w5s 120 --learner maml --way 20 --shot 5 "${MEM[@]}" --no-reference --eval-episodes 0
if [ "$COMPILE" = 1 ]; then  # minutes of compilation: not in a first sitting
  perf maml-5w1s-compile 300 --learner maml --way 5 --shot 1 "${ITER[@]}" --eval-episodes 0 --ablation -o compile=true
fi
if [ -n "${CELLS:-}" ]; then  # CHECKS=1: the cells get what is left of the budget after the checks
  run_cells
fi
