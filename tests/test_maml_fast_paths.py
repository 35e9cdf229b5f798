"""MAML's speed switches (``compile``, ``cuda_graph``) compute what the plain per-task loop computes.

Same optimizer settings on both sides: a graphed learner's Adam runs with ``capturable=True``, which keeps
its step count on the device in float32 and computes the bias corrections there, while ``capturable=False``
computes them in double precision on the host. That difference alone (no graph involved) gives a 2e-8
relative loss difference at the second step in float64, growing to 6e-3 after 6 steps (measured on the CPU,
where capturable Adam runs once its device check is relaxed), far above the 1e-10 below. So a graphed
learner is compared with an eager one whose Adam is capturable too (``_same_adam``); with that, the
float64 loop matches to 3e-15.

Tolerances:

* float64: the same 1e-10 relative bound as the vmap-versus-loop test; a fast path that changed the
  algorithm (a dropped second-order term, a stale captured buffer) is off by orders of magnitude more.
* float32 on the GPU: 1e-3 relative on the whole parameter vector after 6 Adam steps, with TF32 off and
  cuDNN deterministic. One wrong step (stale inputs, a missed update) moves every element by ~lr: ~1e-3 x
  sqrt(112k parameters) = 0.33 against a parameter norm of ~14, i.e. 2.4e-2 relative, 24x the tolerance.
  Paths that launch different kernels (batched versus per-task convolutions) differ by ~1e-6 in their
  gradients, and Adam amplifies that: an element whose gradient is within rounding of zero may move by up
  to 2 x lr differently. Measured on the CPU over the 6 steps below: vmap against the loop, both with
  non-capturable Adam, 2e-7; both with capturable Adam, 1.3e-3 (the trajectory passes such elements). So
  the graphed step is compared in float32 with the same step run eagerly (vmap, capturable Adam: the
  kernels the graph replays), and the compiled step, whose Adam is not capturable, with the loop; the
  float64 tests compare the graphed step with the loop.

The CUDA-graph tests need a GPU and are skipped elsewhere (``python -m pytest -m gpu`` on a GPU machine).
Everything that compiles with inductor (on the CPU minutes of it, so on a GPU too) runs only with
``BENCH_TEST_INDUCTOR=1`` (measured on the CPU: float64 gradients within 5e-15 of the loop, both orders);
CI runs the same comparison through the aot_eager backend, which checks everything compile captures except
the generated kernels.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import plugins.maml as maml
from plugins import gradient, gradient_learner, gradient_reference as reference
from benchmark.toolkit.conv4 import Conv4Arch, init_conv4
from benchmark.errors import ConfigError
from benchmark.learner import RunContext
from cuda_checks import last_step_without_host_sync
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
    inner = gradient.InnerLoop(0.4, 2, "sum/K", False, Conv4Arch(padding="same", bn_scale=False, bn_eps=1e-3))
    params = init_conv4(g, 5, dtype=torch.float64, arch=inner.arch)
    batch = fake_episodes(g, tasks=2, query=1)
    compiled = gradient_learner.compiled(gradient.vectorized_meta_gradient, backend=backend)
    gc, lc, ac = compiled(params, batch, inner, first_order)
    gr, lr, ar = reference.reference_meta_gradient(params, batch, inner, first_order)
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
def exact_float32():
    """Full float32 convolutions and matmuls (no TF32) and deterministic cuDNN algorithms for a test."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.deterministic)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    yield
    (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.deterministic) = saved


def _same_adam(reference, fast):
    """Give ``reference`` the Adam settings of ``fast`` (``capturable``, see the module docstring), before
    either has stepped: Adam creates its state, the step count included, at the first step. Test-only: a
    learner decides ``capturable`` from its own ``cuda_graph`` switch."""
    assert not reference.optimizer.state, "set the Adam settings before the first step"
    for ref_group, fast_group in zip(reference.optimizer.param_groups, fast.optimizer.param_groups):
        ref_group["capturable"] = fast_group["capturable"]
    return reference


def _learners(learner_cls, dtype, reference="loop", device="cuda", **switches):
    """(fast learner with ``switches``, reference learner with the same Adam settings), same seed.

    ``reference``: "loop" (the plain per-task loop) or "eager" (the fast learner's own configuration with
    ``cuda_graph`` off: the step that a graph captures, run eagerly).
    """
    ctx = RunContext(way=5, shot=1, query=3, device=torch.device(device), seed=11)
    config = dataclasses.replace(learner_cls.default_config(5, 1), meta_batch_size=4)
    fast_config = dataclasses.replace(config, vectorize=True, **switches)
    ref_config = (learner_cls.reference_config(config) if reference == "loop"
                  else dataclasses.replace(fast_config, cuda_graph=False))
    fast = learner_cls(fast_config, ctx, dtype=dtype)
    return fast, _same_adam(learner_cls(ref_config, ctx, dtype=dtype), fast)


def _batches(count: int, dtype=torch.float32, device="cuda"):
    g = torch.Generator().manual_seed(21)
    return [fake_episodes(g, tasks=4, dtype=dtype).to(device) for _ in range(count)]


@pytest.fixture
def capturable_adam_on_the_cpu(monkeypatch):
    """Let Adam run with ``capturable=True`` on the CPU (PyTorch allows it on accelerators only; the
    arithmetic is the same, which is what the CPU test below needs)."""
    import torch.optim.adam as adam

    supported = getattr(adam, "_get_capturable_supported_devices", None)
    if supported is None:
        pytest.skip("this PyTorch has no _get_capturable_supported_devices to relax")
    monkeypatch.setattr(adam, "_get_capturable_supported_devices", lambda *a, **k: [*supported(*a, **k), "cpu"])


@pytest.mark.parametrize("learner_cls", [maml.MAML, maml.FOMAML], ids=["maml", "fomaml"])
def test_same_adam_settings_make_the_graph_comparison_exact_on_the_cpu(capturable_adam_on_the_cpu, learner_cls):
    """The CPU stand-in for the float64 CUDA-graph test: the eager vmap step with capturable Adam (what a
    correct graph replays) against the loop given the same Adam settings by ``_same_adam``, 6 steps."""
    fast, plain = _learners(learner_cls, torch.float64, device="cpu", cuda_graph=False)
    for group in fast.optimizer.param_groups:  # as cuda_graph=True would set it on a GPU
        group["capturable"] = True
    _same_adam(plain, fast)
    assert all(group["capturable"] for group in plain.optimizer.param_groups)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*capturable=True.*")
        for batch in _batches(6, torch.float64, device="cpu"):
            mf, mp = fast.meta_train_step(batch), plain.meta_train_step(batch)
            torch.testing.assert_close(mf["loss"], mp["loss"], rtol=1e-10, atol=0)
    assert rel_error(fast.state_dict()["params"], plain.state_dict()["params"]) <= RTOL64


@pytest.mark.gpu
@pytest.mark.parametrize("learner_cls", [maml.MAML, maml.FOMAML], ids=["maml", "fomaml"])
def test_cuda_graph_steps_equal_the_loop_float64(learner_cls):
    """Warm-up steps, the captured step and replays (new inputs copied in) all match the plain loop (whose
    Adam is capturable too)."""
    fast, plain = _learners(learner_cls, torch.float64, cuda_graph=True)
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
@pytest.mark.parametrize("switches, reference", [
    ({"cuda_graph": True}, "eager"),
    pytest.param({"cuda_graph": False, "compile": True}, "loop", marks=pytest.mark.inductor),
    pytest.param({"cuda_graph": True, "compile": True}, "eager", marks=pytest.mark.inductor),
], ids=["graph", "compile", "both"])
def test_fast_paths_float32_within_tolerance(exact_float32, switches, reference):
    """A graphed step against the same step run eagerly, the compiled one against the loop (see the
    module docstring for why)."""
    fast, plain = _learners(maml.MAML, torch.float32, reference, **switches)
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
    uninterrupted, _ = _learners(maml.MAML, torch.float64, cuda_graph=True)
    batches = _batches(10, torch.float64)
    for batch in batches:
        uninterrupted.meta_train_step(batch)
    first, _ = _learners(maml.MAML, torch.float64, cuda_graph=True)
    for batch in batches[:5]:  # past capture
        first.meta_train_step(batch)
    resumed, _ = _learners(maml.MAML, torch.float64, cuda_graph=True)
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
    fast, _ = _learners(maml.MAML, torch.float32, cuda_graph=cuda_graph)
    batches = _batches(5)
    metrics = last_step_without_host_sync(fast, batches)
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
