"""``GraphedStep``: warm-up, capture, replay with new inputs, and the fallbacks.

On a CPU: the device check, the stream discipline and the failed-capture fallback against a stand-in for
``torch.cuda`` (``fake_cuda``), and ``benchmark.harness.perf.graph_status``. The rest needs a GPU (``-m gpu``).

The test whose capture fails on purpose runs in a child process: on torch 2.11 a failed capture leaves
the caching allocator believing the capture is still under way (pytorch/pytorch#180395, fixed later);
``GraphedStep`` ends it itself, and the child checks that ``empty_cache`` and another capture still work
afterwards. Should that go wrong, the child keeps it from failing the graph tests after it for a reason that
is not theirs. A child process isolates it whatever the order or
selection of tests (``-k``, ``-x``, xdist), and turns a crash inside the allocator into one failed test
that shows the child's output, rather than the end of the whole session.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from benchmark.toolkit.graphs import GraphedStep
from benchmark.harness.runtime import private_pool_mb
from benchmark.harness.perf import graph_status

REPO = Path(__file__).resolve().parents[1]


def test_refuses_a_cpu_device():
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedStep(lambda x: (x,), torch.device("cpu"))


@pytest.fixture
def fake_cuda(monkeypatch):
    """Just enough of ``torch.cuda`` for GraphedStep's eager and capture paths on a CPU: streams are tokens
    that record which one is current, and a capture runs its body, then fails at exit as the capture of an
    uncapturable step does (after a real failed capture the state is undone from the eager check anyway)."""
    class Token:
        def wait_stream(self, other):
            pass

    class Stream(Token):
        def __init__(self, device=None):
            fake.made.append(self)

    fake = types.SimpleNamespace(made=[], default=Token(), captured_on=[], pools=[], ended=[])
    fake.current = fake.default

    @contextlib.contextmanager
    def stream(s):
        saved, fake.current = fake.current, s
        try:
            yield
        finally:
            fake.current = saved

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None):
        fake.captured_on.append(stream)
        yield
        raise RuntimeError("operation not permitted when stream is capturing")

    def graph_pool_handle():
        fake.pools.append((0, len(fake.pools) + 1))
        return fake.pools[-1]

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", graph_pool_handle)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", lambda index, pool: fake.ended.append((index, pool)),
                        raising=False)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: fake.current)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return fake


def test_one_side_stream_for_the_warmups_the_check_and_the_capture(fake_cuda):
    """Memory the allocator caches on one stream is not reused on another: a new stream per warm-up call
    would hold several steps' worth of memory until capture."""
    total = torch.zeros((), dtype=torch.float64)
    ran_on = []

    def step(x):
        ran_on.append(fake_cuda.current)
        total.add_(x.sum())
        return (total * 1,)

    graphed = GraphedStep(step, torch.device("cuda"), warmup=3, state=lambda: [total])
    x = torch.ones(2, dtype=torch.float64)
    for _ in range(3):
        graphed(x)
    with pytest.warns(RuntimeWarning, match="capture failed: RuntimeError: operation not permitted"):
        (out,) = graphed(x)  # the eager check, then a capture that fails: the eager result is kept
    assert float(out) == 8.0 and float(total) == 8.0 and not graphed.captured
    side = fake_cuda.made
    assert len(side) == 1 and side[0] is not fake_cuda.default
    assert ran_on == [side[0]] * 5 and fake_cuda.captured_on == [side[0]]  # 3 warm-ups, check, capture
    # The allocator is told that the failed capture into the graph's pool is over (torch 2.11 does not).
    assert fake_cuda.ended == [(0, fake_cuda.pools[0])] and len(fake_cuda.pools) == 1
    (out,) = graphed(x)  # eagerly from now on, on the caller's stream
    assert float(out) == 10.0 and ran_on[-1] is fake_cuda.default
    graphed.reset()  # a reset keeps the stream (and what the allocator cached on it)
    graphed.disabled_reason = None
    graphed(x)
    assert len(fake_cuda.made) == 1


def test_graph_status_finds_a_graphed_step_on_any_learner():
    class Learner:
        def __init__(self, graphed):
            self.anything = GraphedStep(lambda x: (x,), torch.device("cuda"), warmup=2) if graphed else None

    assert graph_status(Learner(graphed=False)) is None
    learner = Learner(graphed=True)
    assert graph_status(learner) == {"captured": False, "disabled_reason": None, "warmup": 2}
    learner.anything.disabled_reason = "capture failed: RuntimeError: no"
    assert graph_status(learner) == {"captured": False, "disabled_reason": "capture failed: RuntimeError: no",
                                     "warmup": 2}


def test_private_pool_mb_counts_the_graph_pools_of_the_device(monkeypatch):
    """A graph's memory lives in private pools (``segment_pool_id`` other than (0, 0)); a replay
    allocates nothing, so this, not a timed step's peak, is what a graphed step holds."""
    mb = 2**20
    segments = [{"device": 0, "total_size": 100 * mb, "segment_pool_id": (0, 0)},   # the default pool
                {"device": 0, "total_size": 30 * mb, "segment_pool_id": (1, 2)},    # a graph's pool
                {"device": 0, "total_size": 2 * mb, "segment_pool_id": [1, 3]},     # as a list, too
                {"device": 1, "total_size": 50 * mb, "segment_pool_id": (1, 4)}]    # another device
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda *a, **k: segments)
    assert private_pool_mb(torch.device("cuda:0")) == 32.0
    assert private_pool_mb(torch.device("cuda:1")) == 50.0
    assert private_pool_mb(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda *a, **k: [{"device": 0, "total_size": mb}])
    assert private_pool_mb(torch.device("cuda:0")) is None  # a PyTorch without pool ids: unknown, not 0


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


#: Run in a child process (see the module docstring); exits 0 when every check holds.
_UNCAPTURABLE_STEP = """
import warnings
import torch
from benchmark.toolkit.graphs import GraphedStep

total = torch.zeros((), device="cuda")

def step(x):
    total.add_(x.sum())
    if total.item() < 0:  # a host synchronization: not capturable
        raise AssertionError
    return (total * 1,)

graphed = GraphedStep(step, torch.device("cuda"), warmup=1, state=lambda: [total])
x = torch.ones(4, device="cuda")
graphed(x)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    (out,) = graphed(x)
assert any("capture failed" in str(w.message) for w in caught), [str(w.message) for w in caught]
assert float(out) == 8.0 and not graphed.captured, (float(out), graphed.disabled_reason)
graphed(x)
assert float(total) == 12.0, float(total)
# The process goes on allocating and computing on the GPU after the failed capture; the allocator knows
# the capture is over (empty_cache failed an internal assertion on torch 2.11 otherwise, as bench perf
# calls it between variants), and another step still captures.
y = torch.randn(256, 256, device="cuda")
assert torch.allclose((y @ y.T).diagonal(), (y * y).sum(dim=1), rtol=1e-4, atol=1e-3)
torch.cuda.empty_cache()
torch.cuda.reset_peak_memory_stats()
other = torch.zeros((), device="cuda")
def capturable(x):
    other.add_(x.sum())
    return (other * 1,)
good = GraphedStep(capturable, torch.device("cuda"), warmup=1, state=lambda: [other])
for _ in range(4):
    good(x)
assert good.captured and float(other) == 16.0, (good.disabled_reason, float(other))
torch.cuda.empty_cache()
print("ok:", graphed.disabled_reason)
"""


@pytest.mark.gpu
def test_a_step_that_cannot_be_captured_runs_eagerly():
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(_UNCAPTURABLE_STEP)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, f"exit {child.returncode}\n{child.stdout}\n{child.stderr}"
    assert "ok: capture failed" in child.stdout
