"""Timing a learner's meta-training step against its plain per-task-loop reference, in one process.

Each variant is timed after warm-up, with the device synchronized around every step so that a step's time
is its own; the median is reported (robust to the odd slow step), with iterations per second and peak
memory. The ratio reference/shipped says how much faster the shipped learner is on this machine, measured
in the same run, so it holds whatever the hardware.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from benchmark.harness.protocol import EpisodeSpec, Manifest, make_sampler
from benchmark.harness.protocol import draw as draw_batch
from benchmark.harness.runtime import (
    peak_memory_mb, peak_reserved_mb, private_pool_mb, reset_peak_memory, synchronize,
)
from benchmark.learner import Learner


def graph_status(learner: Learner) -> dict[str, Any] | None:
    """Whether the learner's CUDA graph was captured, or why it runs eagerly; None if it holds no
    ``GraphedStep``. Looks at every attribute, so it names no learner (several graphs: captured only if
    all are, their reasons joined)."""
    from benchmark.toolkit.graphs import GraphedStep

    steps = {name: value for name, value in vars(learner).items() if isinstance(value, GraphedStep)}
    if not steps:
        return None
    reasons = [(name, g.disabled_reason) for name, g in steps.items() if g.disabled_reason is not None]
    if len(steps) > 1:
        reasons = [(name, f"{name}: {why}") for name, why in reasons]
    return {"captured": all(g.captured for g in steps.values()),
            "disabled_reason": "; ".join(why for _, why in reasons) or None,
            "warmup": max(g.warmup for g in steps.values())}


@dataclass
class StepTiming:
    """Per-step times of one learner variant (milliseconds)."""

    label: str
    times_ms: list[float]
    peak_memory_mb: float
    sampling_ms: list[float]
    batch_size: int
    warmup_steps: int = 0
    warmup_s: float = 0.0
    peak_reserved_mb: float | None = None
    #: CUDA: peak reserved over this variant's warm-up, CUDA-graph capture included (the 16 GB question).
    warmup_peak_reserved_mb: float | None = None
    #: CUDA: memory its CUDA graph's private pool holds (growth of private pools over its warm-up).
    graph_pool_mb: float | None = None
    #: ``graph_status`` of the learner after the timed steps; None for a learner without a CUDA graph.
    graph: dict[str, Any] | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    def as_dict(self) -> dict[str, Any]:
        return {
            "variant": self.label,
            "median_ms": round(self.median_ms, 3),
            "min_ms": round(min(self.times_ms), 3),
            "iterations_per_s": round(1000.0 / self.median_ms, 3),
            "timed_iterations": len(self.times_ms),
            "peak_memory_mb": round(self.peak_memory_mb, 1),
            "peak_reserved_mb": _round(self.peak_reserved_mb),
            "warmup_peak_reserved_mb": _round(self.warmup_peak_reserved_mb),
            "graph_pool_mb": _round(self.graph_pool_mb),
            # Drawing the meta-batch on the device, included in median_ms (as in a run).
            "sampling_ms": round(statistics.median(self.sampling_ms), 3),
            "sampling_share": round(statistics.median(self.sampling_ms) / self.median_ms, 4),
            "batch_size": self.batch_size,
            # Episodes (or images, for minibatch learners) the sampler draws per second.
            "sampled_per_s": round(1000 * self.batch_size / max(statistics.median(self.sampling_ms), 1e-6), 1),
            # The untimed first steps, compilation and CUDA-graph capture included: a run's one-time cost.
            "warmup_steps": self.warmup_steps,
            "warmup_s": round(self.warmup_s, 3),
            "graph": self.graph,
        }


def _round(mb: float | None) -> float | None:
    return None if mb is None else round(mb, 1)


def time_training(variants: list[tuple[str, Learner]], pool, spec: EpisodeSpec, iterations: list[int], warmup: int,
                  seed: int) -> list[StepTiming]:
    """Time meta-training steps of several learner variants, interleaved step by step.

    Interleaving (A B, B A, A B, ...) exposes every variant to the same machine conditions (clock changes,
    other processes, warm caches), so the ratio of their medians is fair. Each variant draws its own episodes from an
    identically seeded sampler; sampling is included in the step time, as in a run, and reported apart.

    Args:
        variants: (label, learner) pairs, e.g. the shipped learner and its per-task-loop reference.
        iterations: timed steps per variant (a slow reference may take fewer).
    """
    device = pool.device
    draws = []
    for _, learner in variants:
        phase = list(learner.training())[-1]  # the phase a run spends most of its iterations in
        sampler = make_sampler(phase, pool, spec, seed)
        draws.append(lambda s=sampler, p=phase: draw_batch(s, p))
    # One-time costs (compilation at the first step, CUDA-graph capture after the eager warm-up steps) land
    # in the warm-up; their total is reported, since a run pays it once.
    warmup_s, warmup_reserved, graph_pools = _warm_up(variants, draws, warmup, device)
    times: list[list[float]] = [[] for _ in variants]
    sampling: list[list[float]] = [[] for _ in variants]
    peaks = [0.0 for _ in variants]
    reserved: list[float | None] = [None for _ in variants]
    for step in range(max(iterations)):
        # Alternate the order (A B, B A, ...) too: whoever runs second would otherwise always find warm caches.
        order = range(len(variants)) if step % 2 == 0 else reversed(range(len(variants)))
        for i in order:
            (_, learner), draw = variants[i], draws[i]
            if step >= iterations[i]:
                continue
            if device.type == "cuda":  # per-variant peaks; no empty_cache here, it would slow the next step
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            batch = draw()
            synchronize(device)
            sampled = time.perf_counter()
            learner.meta_train_step(batch)
            synchronize(device)
            times[i].append(1000 * (time.perf_counter() - start))
            sampling[i].append(1000 * (sampled - start))
            peaks[i] = max(peaks[i], peak_memory_mb(device))
            if (r := peak_reserved_mb(device)) is not None:
                reserved[i] = max(reserved[i] or 0.0, r)
    return [StepTiming(label, t, peak, s, _batch_size(learner), warmup, w, r, wr, gp, graph_status(learner))
            for (label, learner), t, s, peak, w, r, wr, gp
            in zip(variants, times, sampling, peaks, warmup_s, reserved, warmup_reserved, graph_pools)]


def _warm_up(variants: list[tuple[str, Learner]], draws: list[Any], warmup: int, device: torch.device
             ) -> tuple[list[float], list[float | None], list[float | None]]:
    """Run each variant's untimed first steps: (seconds, peak reserved MB, CUDA-graph pool MB) per variant.

    A replayed graph allocates nothing, so its memory shows here (eager steps and capture): each variant's
    warm-up starts from an emptied cache and reset peaks. Reserved memory still counts what earlier variants
    hold (their parameters, graph pools): exact for the first variant, or one alone.
    """
    seconds, reserved, pools = [], [], []
    for (_, learner), draw in zip(variants, draws):
        reset_peak_memory(device)
        pools_before = private_pool_mb(device)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(warmup):
            learner.meta_train_step(draw())
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        reserved.append(peak_reserved_mb(device))
        pools_after = private_pool_mb(device)
        pools.append(None if pools_before is None or pools_after is None else pools_after - pools_before)
    return seconds, reserved, pools


def _batch_size(learner: Learner) -> int:
    phase = list(learner.training())[-1]
    return getattr(phase, "tasks", None) or getattr(phase, "images")


def time_evaluation(learner: Learner, pool, spec: EpisodeSpec, episodes: int) -> dict[str, Any]:
    """Wall time of scoring ``episodes`` test episodes (one untimed batch first, to warm up).

    ``seconds`` times ``predict`` alone. For a learner that adapts by steps, a run's test also reads the
    accuracy after every step (``steps.csv``): ``run_seconds`` times that too, which is what a run's test takes.
    """
    from benchmark.harness.runner import evaluate, evaluate_by_step
    from benchmark.learner import AdaptationSteps

    device = pool.device
    manifest = Manifest.build(pool, spec, seed=0, episodes=episodes)
    warm = Manifest.build(pool, spec, seed=1, episodes=min(episodes, learner.eval_batch_size))
    evaluate(learner, warm, pool, learner.eval_batch_size)
    reset_peak_memory(device)
    seconds = _timed(lambda: evaluate(learner, manifest, pool, learner.eval_batch_size), device)
    result = {"episodes": episodes, "seconds": round(seconds, 3), "episodes_per_s": round(episodes / seconds, 2),
              "peak_memory_mb": round(peak_memory_mb(device), 1)}
    if isinstance(learner, AdaptationSteps):
        evaluate_by_step(learner, warm, pool, learner.eval_batch_size)
        result["run_seconds"] = round(
            _timed(lambda: evaluate_by_step(learner, manifest, pool, learner.eval_batch_size), device), 3)
    return result


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds ``fn`` takes, with the device synchronized before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def variants_to_time(learner_cls: type, config: Any, context: Any, shipped: Learner, *, reference: bool,
                     ablation: bool) -> tuple[list[tuple[str, Learner]], dict[str, str]]:
    """The learners ``bench perf`` times: the shipped one, its per-task-loop reference (when the learner class
    offers one through ``benchmark.learner.PerfVariants``) and, with ``ablation``, each intermediate variant.

    Returns:
        (label, learner) pairs in timing order, and the variants skipped with the reason.
    """
    from benchmark.errors import ConfigError
    from benchmark.learner import PerfVariants

    variants: list[tuple[str, Learner]] = [("shipped", shipped)]
    skipped: dict[str, str] = {}
    if not isinstance(learner_cls, PerfVariants):
        return variants, skipped
    ref_config = learner_cls.reference_config(config) if reference else None
    if ref_config is not None:
        variants.append(("per-task loop", learner_cls(ref_config, context)))
    if not ablation:
        return variants, skipped
    for label, ablation_config in learner_cls.ablation_configs(config).items():
        try:
            learner = learner_cls(ablation_config, context)
        except ConfigError as exc:  # e.g. a CUDA graph on the CPU
            skipped[label] = str(exc)
            continue
        if learner.implementation() == shipped.implementation():
            skipped[label] = "the same as shipped on this device"
            continue
        variants.append((label, learner))
    return variants, skipped


def speedups(rows: list[dict[str, Any]], timings: list[StepTiming]) -> float | None:
    """Add ``speedup_vs_loop`` to every row when the second variant is the per-task loop; returns the
    shipped learner's speed-up (None without a reference)."""
    if len(rows) < 2 or rows[1]["variant"] != "per-task loop":
        return None
    loop_ms = timings[1].median_ms
    for row, timing in zip(rows, timings):
        row["speedup_vs_loop"] = round(loop_ms / timing.median_ms, 2)
    return rows[0]["speedup_vs_loop"]
