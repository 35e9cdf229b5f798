"""``GraphedStep``: warm-up, capture, replay with new inputs, and the fallbacks (GPU only, except the first)."""

from __future__ import annotations

import pytest
import torch

from benchmark.graphs import GraphedStep


def test_refuses_a_cpu_device():
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedStep(lambda x: (x,), torch.device("cpu"))


class Accumulator:
    """A step that updates ``total`` in place: total += weight * x.sum(); returns (total * 1,)."""

    def __init__(self, weight=lambda: 2.0):
        self.total = torch.zeros((), device="cuda", dtype=torch.float64)
        self.weight = weight
        self.calls = 0

    def step(self, x):
        self.calls += 1
        self.total.add_(self.weight() * x.sum())
        return (self.total * 1,)


@pytest.mark.gpu
def test_replays_with_new_inputs_and_checks_once():
    acc = Accumulator()
    graphed = GraphedStep(acc.step, torch.device("cuda"), warmup=2, state=lambda: [acc.total])
    expected = 0.0
    for i in range(6):
        x = torch.full((3,), float(i + 1), device="cuda", dtype=torch.float64)
        (out,) = graphed(x)
        expected += 2.0 * 3 * (i + 1)
        assert float(out) == pytest.approx(expected) and float(acc.total) == pytest.approx(expected)
    assert graphed.captured and graphed.disabled_reason is None
    # 2 warm-up calls, the checked eager call and the capture run Python; the 2 replays do not.
    assert acc.calls == 4


@pytest.mark.gpu
def test_a_capture_that_differs_from_eager_is_dropped():
    """A host-side value baked in at capture (here it changes every call) makes the replay wrong: caught."""
    counter = iter(range(1, 100))
    acc = Accumulator(weight=lambda: float(next(counter)))
    graphed = GraphedStep(acc.step, torch.device("cuda"), warmup=1, state=lambda: [acc.total])
    x = torch.ones(2, device="cuda", dtype=torch.float64)
    graphed(x)  # weight 1
    with pytest.warns(RuntimeWarning, match="disagrees with the eager one"):
        graphed(x)  # eager check with weight 2, capture with weight 3
    assert not graphed.captured and "disagrees" in graphed.disabled_reason
    assert float(acc.total) == pytest.approx(2 * 1 + 2 * 2)  # the eager result was kept
    graphed(x)  # weight 4, eagerly
    assert float(acc.total) == pytest.approx(2 * 1 + 2 * 2 + 2 * 4)


@pytest.mark.gpu
def test_a_step_that_cannot_be_captured_runs_eagerly():
    total = torch.zeros((), device="cuda")

    def step(x):
        total.add_(x.sum())
        if total.item() < 0:  # a host synchronization: not capturable
            raise AssertionError
        return (total * 1,)

    graphed = GraphedStep(step, torch.device("cuda"), warmup=1, state=lambda: [total])
    x = torch.ones(4, device="cuda")
    graphed(x)
    with pytest.warns(RuntimeWarning, match="capture failed"):
        (out,) = graphed(x)
    assert float(out) == 8.0 and not graphed.captured
    graphed(x)
    assert float(total) == 12.0
