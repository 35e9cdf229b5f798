"""Replaying a whole training step as one CUDA graph.

A second-order MAML step on Omniglot launches thousands of small kernels; on a fast GPU the host cannot
launch them as quickly as the device runs them, so the step is bound by Python and launch latency, not by
arithmetic. Capturing the step once in a CUDA graph and replaying it removes that cost: a replay is one
launch.

What a captured step must respect (and ``GraphedStep`` arranges):

* Static inputs: replay reads the input tensors captured at their addresses, so each call copies its inputs
  into buffers allocated once (``copy_`` also converts dtype, e.g. uint8 images to float).
* Everything the step updates (parameters, optimizer state) must be updated in place at fixed addresses.
  Adam needs ``capturable=True`` so that its step count and bias corrections live on the device.
  Replacing such a tensor (``optimizer.load_state_dict``) invalidates the graph: call ``reset()``.
* No host synchronization inside the step (no ``.item()``, no data-dependent shapes).
* Warm-up: the first ``warmup`` calls run eagerly on a side stream (as PyTorch's CUDA-graph notes advise),
  which initialises lazily created state (cuBLAS/cuDNN handles, optimizer state) before capture. They are
  real steps, not discarded ones, so a run's sequence of updates does not depend on where capture happens.
  One side stream serves every warm-up, the eager check and the capture of a ``GraphedStep``: the caching
  allocator keeps freed blocks per stream, so a new stream per call would strand each earlier call's
  blocks and hold several steps' worth of memory until capture (when ``torch.cuda.graph`` empties the cache).
* Outputs are overwritten by the next replay, so they are returned as clones.

If capture fails (an operation that cannot be captured on this PyTorch build), or the first replay
disagrees with the same update done eagerly (checked once per capture when the caller names the state the
step updates), the step warns once and runs eagerly from then on: slower, never wrong. A failed capture's
memory pool stays reserved for the rest of the process (see ``_end_failed_capture``).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, Sequence

import torch

StepFn = Callable[..., Sequence[torch.Tensor]]


class GraphedStep:
    """Call ``step(*inputs)`` eagerly for the first ``warmup`` calls, then capture it once and replay it.

    Args:
        step: a function of tensors that performs the whole update in place and returns a tuple of tensors
            (e.g. the loss and accuracy, 0-dim). It must not synchronize with the host.
        device: the CUDA device the step runs on.
        warmup: eager calls before capture (at least 1: the optimizer state must exist before capture).
        state: returns the tensors ``step`` updates in place (parameters, optimizer state). When given, the
            captured step is checked once against the eager step on the same inputs: the call that
            captures runs the update eagerly, undoes it, checks that capturing changed nothing, replays
            the graph and compares the state with the eager result; a disagreement keeps the eager
            result and turns the graph off with a warning.
    """

    def __init__(self, step: StepFn, device: torch.device, warmup: int = 3,
                 state: Callable[[], Sequence[torch.Tensor]] | None = None) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.step = step
        self.device = device
        self.warmup = max(1, warmup)
        self.state = state
        self._stream: torch.cuda.Stream | None = None  # the side stream, made at the first call (see module doc)
        #: Why capture was given up (the step then always runs eagerly); None while capture is allowed.
        self.disabled_reason: str | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the captured graph (after a tensor it captured was replaced); warm up and capture anew."""
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: list[torch.Tensor] = []
        self.static_outputs: tuple[torch.Tensor, ...] = ()
        self.eager_calls = 0

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Every CUDA call below runs with the step's device current: torch.cuda.graph's default capture
        # stream, current_stream() and replay() all follow the current device, and on cuda:N a capture on
        # device 0's stream would record nothing while the step's kernels ran immediately.
        with torch.cuda.device(self.device):
            if self.graph is not None and self._matches(inputs):
                for static, x in zip(self.static_inputs, inputs):
                    static.copy_(x, non_blocking=True)
                self.graph.replay()
                return tuple(o.clone() for o in self.static_outputs)
            if self.disabled_reason is not None:
                return tuple(self.step(*inputs))
            if self.graph is not None:  # the input shapes changed: capture again for the new ones
                self.reset()
            if self.eager_calls < self.warmup:
                self.eager_calls += 1
                return self._eager_on_side_stream(inputs)
            return self._capture_and_replay(inputs)

    def _matches(self, inputs: Sequence[torch.Tensor]) -> bool:
        return len(inputs) == len(self.static_inputs) and all(
            x.shape == s.shape and x.dtype == s.dtype and x.device == s.device
            for x, s in zip(inputs, self.static_inputs))

    def _side_stream(self) -> torch.cuda.Stream:
        """The one stream this step's warm-ups, eager checks and captures run on (kept across ``reset``)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def _eager_on_side_stream(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        side = self._side_stream()
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), _capturable_warning_ignored():
            outputs = tuple(self.step(*inputs))
        torch.cuda.current_stream(self.device).wait_stream(side)
        return outputs

    def _capture_and_replay(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        # The reference for the check below: this call's update done eagerly, then undone.
        check = self.state is not None
        if check:
            before = _clones(self.state())
            eager_outputs = self._eager_on_side_stream(inputs)
            eager_state = _clones(self.state())
            _restore(self.state(), before)
        # Static buffers keep the inputs' dtype: callers pass what the step expects (the learner converts).
        self.static_inputs = [x.detach().clone() for x in inputs]
        graph = torch.cuda.CUDAGraph()
        capture_stream = self._side_stream()
        pool = torch.cuda.graph_pool_handle()  # named, so that a failed capture can be unwound (below)
        try:
            # The outer stream context restores the current stream even when a failed capture makes
            # torch.cuda.graph's exit raise before it restores the stream itself.
            with torch.cuda.stream(capture_stream), \
                    torch.cuda.graph(graph, pool=pool, stream=capture_stream), _capturable_warning_ignored():
                self.static_outputs = tuple(self.step(*self.static_inputs))
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to the eager step
            # A capture invalidated by a forbidden call surfaces as capture_end's error; the cause is the context.
            cause = exc.__context__ if exc.__context__ is not None else exc
            _end_failed_capture(self.device, pool)
            self._give_up(f"capture failed: {type(cause).__name__}: {cause}")
            torch.cuda.synchronize(self.device)
            if check:  # capture records without executing: the state is still `before`; redo the update
                _restore(self.state(), eager_state)
                return eager_outputs
            return tuple(self.step(*inputs))
        if check and _disagreement(self.state(), before, before) is not None:
            # Capture must record, not run: a state that moved means kernels escaped the capture.
            self._give_up("capture ran the step instead of recording it")
            _restore(self.state(), eager_state)
            return eager_outputs
        graph.replay()
        outputs = tuple(o.clone() for o in self.static_outputs)
        if check:
            problem = _disagreement(self.state(), eager_state, before)
            if problem is not None:
                self._give_up(f"the replayed step disagrees with the eager one ({problem})")
                _restore(self.state(), eager_state)
                return eager_outputs
        self.graph = graph
        return outputs

    def _give_up(self, reason: str) -> None:
        self.disabled_reason = reason.splitlines()[0]
        self.graph, self.static_inputs, self.static_outputs = None, [], ()
        warnings.warn(f"CUDA graph {self.disabled_reason}; running the step eagerly from now on. "
                      "Pass -o cuda_graph=false to skip the attempt.", RuntimeWarning, stacklevel=4)


def _end_failed_capture(device: torch.device, pool) -> None:
    """Tell the caching allocator that the failed capture into ``pool`` is over.

    Before pytorch/pytorch#180395, ``CUDAGraph.capture_end`` raised on the capture's error before it ended
    the allocator's routing into the graph's pool, so the allocator went on believing a capture was under
    way and the next ``torch.cuda.empty_cache()`` (``bench perf`` calls it between variants) failed an
    internal assertion. Where capture_end already ended it, this call raises "not currently recording",
    which is the state we want. The pool itself (about one step's memory) stays reserved until the process
    ends: releasing it here could release it twice on versions whose graph releases it too.
    """
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch._C._cuda_endAllocateToPool(index, pool)
    except (RuntimeError, AttributeError):  # already ended, or a build without this private hook
        pass


#: The replayed step may round differently from the eager one (atomics, algorithm choice), far below this
#: fraction of what the step changed; a wrong capture (stale inputs, an update not replayed) is off by
#: about the whole change.
AGREEMENT_RTOL = 1e-2


@contextlib.contextmanager
def _capturable_warning_ignored() -> Iterator[None]:
    """Silence the warning of optimizers built with capturable=True that step outside a capture: here the
    eager warm-up and check steps are the plan, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*capturable=True.*")
        yield


def _clones(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def _restore(tensors: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for t, v in zip(tensors, values):
            t.copy_(v)


def _disagreement(state: Sequence[torch.Tensor], expected: Sequence[torch.Tensor],
                  before: Sequence[torch.Tensor]) -> str | None:
    """None if ``state`` matches ``expected`` within AGREEMENT_RTOL of the change from ``before`` to
    ``expected`` (exactly, where nothing changed), else what differs.

    Only the state is compared: it carries the step's effect (for Adam, the moments record the gradient),
    while outputs such as an accuracy can flip on a rounding-level tie. Synchronizes the host (once per
    tensor; this runs once per capture).
    """
    for i, (now, eager, old) in enumerate(zip(state, expected, before)):
        if not now.is_floating_point():
            if not torch.equal(now, eager):
                return f"state tensor {i} differs"
            continue
        change = (eager.double() - old.double()).norm()
        error = (now.double() - eager.double()).norm()
        if error > AGREEMENT_RTOL * change + 1e-12:
            return f"state tensor {i}: error {float(error):.3g} for a change of {float(change):.3g}"
    return None
