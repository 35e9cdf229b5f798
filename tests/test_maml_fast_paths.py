"""MAML's speed switches (``compile``, ``cuda_graph``) compute what the plain per-task loop computes.

Tolerances:

* float64: the same 1e-10 relative bound as the vmap-versus-loop test; a fast path that changed the
  algorithm (a dropped second-order term, a stale captured buffer) is off by orders of magnitude more.
* float32 on the GPU: 1e-3 relative on the whole parameter vector after 6 Adam steps, with TF32 turned
  off. The paths launch different kernels (batched versus per-task convolutions, fused versus unfused
  element-wise work), so gradients differ by ~1e-6 relative; Adam normalises each step, so an element whose
  gradient is within rounding of zero may still move by up to 2 x lr differently. One wrong step (stale
  inputs, a missed update) moves every element by ~lr: ~1e-3 x sqrt(112k parameters) = 0.33 against a
  parameter norm of ~14, i.e. 2.4e-2 relative, 24x the tolerance. TF32 (cuDNN's default for convolutions)
  keeps 10 mantissa bits, which would blur differences of that size, so the comparison runs without it.

The CUDA-graph tests need a GPU and are skipped elsewhere (``python -m pytest -m gpu`` on a GPU machine).
The inductor test on the CPU spends minutes compiling, so it runs only with ``BENCH_TEST_INDUCTOR=1``
(measured: float64 gradients within 5e-15 of the loop, both orders); CI runs the same comparison through
the aot_eager backend, which checks everything compile captures except the generated kernels.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import plugins.maml as maml
from benchmark.toolkit.conv4 import init_conv4
from benchmark.errors import ConfigError
from benchmark.learner import RunContext
from test_maml_gradients import RTOL64, fake_episodes, rel_error

CPU = torch.device("cpu")


def test_cuda_graph_on_the_cpu_is_a_clear_error():
    ctx = RunContext(way=5, shot=1, query=1, device=CPU)
    with pytest.raises(ConfigError, match="cuda_graph=true needs a CUDA device.*-o cuda_graph=false"):
        maml.MAML(dataclasses.replace(maml.MAML.default_config(5, 1), cuda_graph=True), ctx)


def test_compile_needs_the_vectorized_path():
    ctx = RunContext(way=5, shot=1, query=1, device=CPU)
    config = dataclasses.replace(maml.MAML.default_config(5, 1), vectorize=False, compile=True)
    with pytest.raises(ConfigError, match="vectorize=true"):
        maml.MAML(config, ctx)


def test_cuda_graph_defaults_to_the_device():
    config = maml.MAML.default_config(5, 1)
    assert maml.MAML(config, RunContext(way=5, shot=1, query=1, device=CPU)).implementation()["cuda graph"] is False


def _compiled_against_loop(backend: str, first_order: bool) -> None:
    g = torch.Generator().manual_seed(3)
    params, batch = init_conv4(g, 5, dtype=torch.float64), fake_episodes(g, tasks=2, query=1)
    compiled = maml._compiled(maml.vectorized_meta_gradient, backend=backend)
    gc, lc, ac = compiled(params, batch, 0.4, 2, first_order)
    gr, lr, ar = maml.reference_meta_gradient(params, batch, 0.4, 2, first_order)
    assert rel_error(gc, gr) <= RTOL64
    torch.testing.assert_close(lc, lr, rtol=1e-12, atol=0)
    torch.testing.assert_close(ac, ar, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_compiled_trace_equals_loop_float64(first_order):
    """What torch.compile captures (dynamo + AOTAutograd, run by the aot_eager backend: ~20 s on 2 cores)."""
    _compiled_against_loop("aot_eager", first_order)


@pytest.mark.inductor
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_inductor_compiled_meta_gradient_equals_loop_float64(first_order):
    """The generated kernels too (about 3 minutes of compilation on 2 CPU cores: BENCH_TEST_INDUCTOR=1)."""
    _compiled_against_loop("inductor", first_order)


# --------------------------------------------------------------------------------------------------------
# CUDA graphs (GPU only)
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_tf32():
    """Full float32 convolutions and matmuls for the duration of a test."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _gpu_learners(learner_cls, dtype, **switches):
    """(fast learner with ``switches``, plain-loop learner), same seed, on the GPU."""
    ctx = RunContext(way=5, shot=1, query=3, device=torch.device("cuda"), seed=11)
    config = dataclasses.replace(learner_cls.default_config(5, 1), meta_batch_size=4)
    fast = learner_cls(dataclasses.replace(config, vectorize=True, **switches), ctx, dtype=dtype)
    plain = learner_cls(learner_cls.reference_config(config), ctx, dtype=dtype)
    return fast, plain


def _batches(count: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(21)
    return [fake_episodes(g, tasks=4, dtype=dtype).to("cuda") for _ in range(count)]


@pytest.mark.gpu
@pytest.mark.parametrize("learner_cls", [maml.MAML, maml.FOMAML], ids=["maml", "fomaml"])
def test_cuda_graph_steps_equal_the_loop_float64(learner_cls):
    """Warm-up steps, the captured step and replays (new inputs copied in) all match the plain loop."""
    fast, plain = _gpu_learners(learner_cls, torch.float64, cuda_graph=True)
    batches = _batches(fast._graph.warmup + 3, torch.float64)
    for batch in batches:
        mf, mp = fast.meta_train_step(batch), plain.meta_train_step(batch)
        torch.testing.assert_close(mf["loss"], mp["loss"], rtol=1e-10, atol=0)
    assert fast._graph.captured, fast._graph.disabled_reason
    # Replays really update (an empty capture would leave the parameters where they are).
    between = fast.state_dict()["params"]
    fast.meta_train_step(batches[0]), plain.meta_train_step(batches[0])
    assert not torch.equal(fast.state_dict()["params"]["conv1.weight"], between["conv1.weight"])
    pf, pp = fast.state_dict()["params"], plain.state_dict()["params"]
    for k in pp:
        torch.testing.assert_close(pf[k], pp[k], rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("switches", [{"cuda_graph": True}, {"cuda_graph": False, "compile": True},
                                      {"cuda_graph": True, "compile": True}], ids=["graph", "compile", "both"])
def test_fast_paths_float32_within_tolerance(no_tf32, switches):
    fast, plain = _gpu_learners(maml.MAML, torch.float32, **switches)
    before = fast.state_dict()["params"]
    for batch in _batches(6):
        mf, mp = fast.meta_train_step(batch), plain.meta_train_step(batch)
        torch.testing.assert_close(mf["loss"], mp["loss"], rtol=1e-3, atol=0)
    pf, pp = fast.state_dict()["params"], plain.state_dict()["params"]
    assert rel_error(pf, pp) <= 1e-3 < rel_error(pf, before)
    assert not switches.get("cuda_graph") or fast._graph.captured


@pytest.mark.gpu
def test_cuda_graph_resumes_from_a_state_dict():
    """Loading a state replaces Adam's state tensors; the graph must be captured anew, not replayed stale."""
    uninterrupted, _ = _gpu_learners(maml.MAML, torch.float64, cuda_graph=True)
    batches = _batches(10, torch.float64)
    for batch in batches:
        uninterrupted.meta_train_step(batch)
    first, _ = _gpu_learners(maml.MAML, torch.float64, cuda_graph=True)
    for batch in batches[:5]:  # past capture
        first.meta_train_step(batch)
    resumed, _ = _gpu_learners(maml.MAML, torch.float64, cuda_graph=True)
    for batch in batches[:resumed._graph.warmup + 1]:  # a graph of its own state, which loading must drop
        resumed.meta_train_step(batch)
    assert resumed._graph.captured
    resumed.load_state_dict(first.state_dict())
    for batch in batches[5:]:
        resumed.meta_train_step(batch)
    a, b = resumed.state_dict()["params"], uninterrupted.state_dict()["params"]
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [True, False], ids=["graph", "eager"])
def test_a_training_step_does_not_synchronize_the_host(cuda_graph):
    """A whole meta-train step (eager vmap, or the input copies, replay and output clones around a graph)
    leaves the host free: metrics come back as device tensors, read later."""
    fast, _ = _gpu_learners(maml.MAML, torch.float32, cuda_graph=cuda_graph)
    batches = _batches(5)
    for batch in batches[:-1]:
        fast.meta_train_step(batch)
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        metrics = fast.meta_train_step(batches[-1])
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert metrics["loss"].is_cuda and (fast._graph is None or fast._graph.captured)


@pytest.mark.gpu
@pytest.mark.realdata
def test_sampling_on_the_device_does_not_synchronize_the_host(omniglot):
    from benchmark.harness.protocol import ClassPool, EpisodeSampler, EpisodeSpec, get_protocol

    pool = ClassPool(omniglot, get_protocol("vinyals"), "train", torch.device("cuda"))
    sampler = EpisodeSampler(pool, EpisodeSpec(20, 1, 15), seed=0)
    sampler.sample(16)  # first use: lazy initialisation may synchronize
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = sampler.sample(16)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert batch.support_x.is_cuda and batch.support_x.shape == (16, 20, 1, 28, 28)
