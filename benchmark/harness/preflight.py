"""A cheap check of a learner on the run's real shapes, before the first training step.

A mistake in a plugin should cost seconds, not an hour of training that ends in a traceback. Before a run
starts (and before anything is written), ``preflight`` builds a *twin* of the learner and checks on one
or two tiny batches of the run's own shapes what the harness relies on:

* ``training()`` declares its phases properly (types, batch sizes, phase lengths that fit the run);
* the learner draws nothing from global RNG state (a twin built under a different ``torch.manual_seed``
  must hold the same tensors);
* ``meta_train_step`` runs on each phase's batch type and returns finite scalar metrics;
* ``predict`` returns finite logits ``[T, N*Q, N]`` and changes nothing the learner holds (state-dict
  tensors and the buffers of any ``torch.nn.Module`` it owns, e.g. batch-norm running statistics);
* the memory a full training step and a full evaluation batch will take, extrapolated from the trial
  steps, fits on the device.

Each problem is a ``PluginError`` (or ``BenchError`` for memory) with one line naming the fix.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from benchmark.errors import BenchError, PluginError
from benchmark.learner import Episodes, Learner, Minibatches, RunContext
from benchmark.testing import changed_tensors, module_buffers, state_tensors

#: Headroom kept free of a run's estimated peak: estimates come from one or two tiny trial steps.
MEMORY_SAFETY = 1.25


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of the run's largest step, in bytes, and how it was measured."""

    bytes: float
    what: str


def check_phases(learner: Learner, iterations: int) -> list[Episodes | Minibatches]:
    """The learner's training phases, checked: a non-empty list of Episodes/Minibatches with positive sizes,
    every phase but the last with a length, the fixed lengths within the run's iterations."""
    name = learner.name
    try:
        phases = list(learner.training())
    except NotImplementedError as exc:
        raise PluginError(f"learner {name!r}: {exc}") from None
    if not phases:
        raise PluginError(f"learner {name!r}: training() returned no phase; return e.g. [Episodes(tasks=32)]")
    for i, phase in enumerate(phases):
        if not isinstance(phase, (Episodes, Minibatches)):
            raise PluginError(f"learner {name!r}: training() phase {i} is {phase!r}; use benchmark.learner.Episodes "
                              "or Minibatches")
        size = phase.tasks if isinstance(phase, Episodes) else phase.images
        if not isinstance(size, int) or size < 1:
            raise PluginError(f"learner {name!r}: training() phase {i} has batch size {size!r}; it must be a "
                              "positive int")
        last = i == len(phases) - 1
        if phase.iterations is None and not last:
            raise PluginError(f"learner {name!r}: training() phase {i} has no iterations; only the last phase "
                              "may run to the end")
    fixed = sum(p.iterations or 0 for p in phases)
    if fixed > iterations and iterations > 0:
        raise PluginError(f"learner {name!r}: its training phases need {fixed} iterations but the run has "
                          f"{iterations}; pass --iterations {fixed} or more")
    return phases


def preflight(learner_cls: type[Learner], config: Any, context: RunContext, learner: Learner, pools: Any,
              phases: Sequence[Episodes | Minibatches], eval_batch_size: int) -> MemoryEstimate | None:
    """Run the checks of the module docstring; returns the memory estimate.

    Args:
        learner: the run's learner (read only: the trials run on a twin).
        pools: the run's class pools (the trial batches are real images of the run's shapes).
    """
    twin = _twin_under_other_global_seed(learner_cls, config, context)
    _check_same_state(learner, twin)
    training = [_check_training_step(twin, phase, index, pools, context) for index, phase in enumerate(phases)]
    predicting = _check_predict(twin, pools, context, eval_batch_size)
    return _run_peak([e for e in training if e is not None], predicting, holds_graph=_holds_cuda_graph(learner))


def _run_peak(training: list[MemoryEstimate], predicting: MemoryEstimate | None, *,
              holds_graph: bool) -> MemoryEstimate | None:
    """The run's peak from its steps' estimates: the largest step, or, for a learner whose training step is
    a CUDA graph, the largest training step plus a predict call: the graph's private memory pool keeps a
    step's worth of memory reserved while the run validates and tests."""
    if holds_graph and training and predicting is not None:
        held = max(training, key=lambda e: e.bytes)
        return MemoryEstimate(held.bytes + predicting.bytes,
                              f"{held.what}, kept by its CUDA graph while testing, plus {predicting.what}")
    known = training + ([predicting] if predicting is not None else [])
    return max(known, key=lambda e: e.bytes) if known else None


def _holds_cuda_graph(learner: Learner) -> bool:
    from benchmark.harness.perf import graph_status

    return graph_status(learner) is not None


def check_memory(estimate: MemoryEstimate | None, available: int | None, device: torch.device) -> None:
    """Refuse a run whose estimated peak does not fit in the memory the device has left."""
    if estimate is None or available is None:
        return
    if estimate.bytes * MEMORY_SAFETY > available:
        raise BenchError(
            f"this run would need about {_gib(estimate.bytes)} on {device} ({estimate.what}) but only "
            f"{_gib(available)} are available; lower the batch size (e.g. -o meta_batch_size or "
            "eval_batch_size) or run on a device with more memory"
        )


# -- the checks ----------------------------------------------------------------------------------------------
def _twin_under_other_global_seed(learner_cls: type[Learner], config: Any, context: RunContext) -> Learner:
    """A second learner built while torch's global generator is in another state (restored afterwards)."""
    state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        torch.manual_seed(int(time.time_ns() % (2**31)) | 1)
        return learner_cls(config, context)
    finally:
        torch.random.set_rng_state(state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _check_same_state(learner: Learner, twin: Learner) -> None:
    a, b = state_tensors(learner.state_dict()), state_tensors(twin.state_dict())
    differ = [k for k in a if k in b and (a[k].shape != b[k].shape or not torch.equal(a[k], b[k]))]
    if differ or a.keys() != b.keys():
        raise PluginError(
            f"learner {learner.name!r} draws from global random state: two learners built with the same seed hold "
            f"different {(differ or sorted(a.keys() ^ b.keys()))[0]!r}; draw initial weights from "
            "self.context.generator('init') (torch.nn layers use the global generator unless you re-initialise "
            "them from it)"
        )


def _check_training_step(twin: Learner, phase: Episodes | Minibatches, index: int, pools: Any,
                         context: RunContext) -> MemoryEstimate | None:
    from benchmark.harness.protocol import EpisodeSpec, make_sampler

    spec = EpisodeSpec(context.train_way, context.train_shot, context.train_query)
    sampler = make_sampler(phase, pools.train, spec, seed=0, index=1000 + index)
    full = phase.tasks if isinstance(phase, Episodes) else phase.images
    small = min(full, 2 if isinstance(phase, Episodes) else 16)

    def trial() -> Mapping[str, Any]:
        batch = sampler.sample(small) if isinstance(phase, Episodes) else _minibatch(sampler, small)
        return twin.meta_train_step(batch)

    metrics, peak = _measure(trial, context.device)
    if not isinstance(metrics, Mapping):
        raise PluginError(f"learner {twin.name!r}: meta_train_step returned {type(metrics).__name__}; return a dict of "
                          "metrics such as {'loss': loss}")
    for key, value in metrics.items():
        number = _scalar(value)
        if number is None:
            raise PluginError(f"learner {twin.name!r}: metric {key!r} of meta_train_step is {type(value).__name__} "
                              f"{getattr(value, 'shape', '')}; return a float or a 0-dim tensor")
        if not math.isfinite(number):
            raise PluginError(f"learner {twin.name!r}: metric {key!r} is {number} after one trial step on real data; "
                              "check the learner's initialisation and learning rates")
    unit = "task" if isinstance(phase, Episodes) else "image"
    if peak is None:
        return None
    return MemoryEstimate(peak / small * full, f"{full} {unit}s per step at {_gib(peak / small)} per {unit}, "
                                               f"measured on a {small}-{unit} trial step")


def _minibatch(sampler: Any, images: int) -> Any:
    """A smaller minibatch from a minibatch sampler (its batch size is the phase's)."""
    batch = sampler.sample()
    from benchmark.episodes import LabeledBatch

    return LabeledBatch(batch.x[:images], batch.y[:images], batch.num_classes)


def _check_predict(twin: Learner, pools: Any, context: RunContext, eval_batch_size: int) -> MemoryEstimate | None:
    from benchmark.harness.protocol import EpisodeSpec, Manifest

    spec = EpisodeSpec(context.way, context.shot, context.query)
    _, batch = next(Manifest.build(pools.val, spec, seed=12345, episodes=1).batches(pools.val, 1))
    before = state_tensors(twin.state_dict())
    buffers = module_buffers(twin)
    logits, peak = _measure(lambda: twin.predict(batch.support_x, batch.support_y, batch.query_x), context.device)
    want = (1, spec.way * spec.query, spec.way)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != want:
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise PluginError(f"learner {twin.name!r}: predict returned logits of shape {shape} for one episode, "
                          f"expected {list(want)} ([tasks, way*query, way])")
    if not logits.is_floating_point() or not bool(torch.isfinite(logits).all()):
        raise PluginError(f"learner {twin.name!r}: predict returned non-finite or non-float logits on a real episode")
    changed = changed_tensors(before, state_tensors(twin.state_dict())) + changed_tensors(buffers, module_buffers(twin))
    if changed:
        raise PluginError(f"learner {twin.name!r}: predict changed {changed[0]!r}; predict must leave parameters and "
                          "buffers alone (batch-norm running statistics included: run such modules in eval mode "
                          "or with functional calls)")
    if peak is None:
        return None
    return MemoryEstimate(peak * eval_batch_size, f"{eval_batch_size} test episodes per predict call at "
                                                  f"{_gib(peak)} each")


# -- helpers ------------------------------------------------------------------------------------------------
def _measure(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float | None]:
    """Call ``fn``; return its result and the extra memory its call took at its peak (bytes, or None)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, float(max(torch.cuda.max_memory_allocated(device) - base, 0))
    sampler = _RssSampler()
    with sampler:
        result = fn()
    return result, sampler.peak_growth


class _RssSampler:
    """The peak growth of this process's heap over a call, sampled every millisecond.

    Reads the C allocator's bytes in use (glibc ``mallinfo2``: unlike the resident set size, it falls when
    memory is freed and ignores memory the allocator keeps cached), else the resident set size (Linux).
    """

    def __init__(self) -> None:
        self.peak_growth: float | None = None
        self._stop = threading.Event()
        self._read = _heap_in_use if _MALLINFO2 is not None else _rss
        self._base = self._read()
        self._peak = self._base

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self._read()
            if now is not None and self._peak is not None:
                self._peak = max(self._peak, now)
            time.sleep(0.001)

    def __enter__(self) -> _RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        now = self._read()
        if self._base is not None and self._peak is not None:
            self.peak_growth = float(max(max(self._peak, now or 0) - self._base, 0))


def _load_mallinfo2():
    """glibc's ``mallinfo2`` through ctypes (glibc 2.33+), or None."""
    import ctypes
    import ctypes.util

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        function = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = MallInfo2
    return function


_MALLINFO2 = _load_mallinfo2()


def _heap_in_use() -> int:
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)  # allocated from the heap arenas + in mmapped blocks


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


try:
    import os

    _PAGE = os.sysconf("SC_PAGE_SIZE")
except (ValueError, OSError, AttributeError):
    _PAGE = 4096


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().cpu()) if value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"
