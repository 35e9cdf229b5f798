"""The preflight's memory estimate of a whole run, from its trial steps' estimates."""

from __future__ import annotations

import types

import torch

from benchmark.harness.preflight import MemoryEstimate, _holds_cuda_graph, _run_peak
from benchmark.toolkit.graphs import GraphedStep

GIB = 2**30


def test_the_largest_step_is_the_peak():
    train, predict = MemoryEstimate(6 * GIB, "training"), MemoryEstimate(2 * GIB, "testing")
    assert _run_peak([train], predict, holds_graph=False) is train
    assert _run_peak([], predict, holds_graph=False) is predict
    assert _run_peak([], None, holds_graph=False) is None


def test_a_cuda_graph_keeps_its_step_memory_while_the_run_tests():
    """A captured step's private pool stays reserved during validation and testing, so they add up."""
    small, large, predict = MemoryEstimate(GIB, "a"), MemoryEstimate(6 * GIB, "b"), MemoryEstimate(2 * GIB, "c")
    peak = _run_peak([small, large], predict, holds_graph=True)
    assert peak.bytes == 8 * GIB and "kept by its CUDA graph" in peak.what
    assert _run_peak([large], None, holds_graph=True) is large


def test_a_learner_holds_a_graph_when_any_attribute_is_a_graphed_step():
    eager = types.SimpleNamespace(step=None)
    graphed = types.SimpleNamespace(step=GraphedStep(lambda x: (x,), torch.device("cuda")))
    assert not _holds_cuda_graph(eager) and _holds_cuda_graph(graphed)
