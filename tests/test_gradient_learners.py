"""ANIL, Meta-SGD and MAML++: the vectorized meta-gradient equals the plain per-task loop, and each learner
follows its paper's released protocol.

The comparisons are those of ``test_maml_gradients.py``, with each learner's own meta-parameters (learned step
sizes, per-step batch-norm rows) and inner loop: float64 to 1e-10 relative (a 0.5% error fails), and in
float32 the vectorized path no further from the exact float64 gradient than the float32 loop (within
``FLOAT32_FACTOR``). The per-step rows and step sizes start equal in a fresh learner, so the tests perturb
them: a row or step indexed wrongly then shows.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

from benchmark.errors import ConfigError
from benchmark.learner import RunContext
from plugins import gradient, gradient_reference as reference
from plugins.anil import ANIL, RAGHU2020
from plugins.gradient import LR_PREFIX
from plugins.mamlpp import ANTONIOU2019, MAMLPP, cosine_lr, msl_weights
from plugins.metasgd import LI2017, MetaSGD
from cuda_checks import last_step_without_host_sync
from test_maml_gradients import FLOAT32_FACTOR, RTOL32_FLOOR, RTOL64, fake_episodes, rel_error

CPU = torch.device("cpu")
LEARNERS = {"anil": ANIL, "metasgd": MetaSGD, "mamlpp": MAMLPP}
#: Per learner: config changes that keep the tests small but exercise every per-step path.
SMALL = {"anil": {"inner_steps": 2}, "metasgd": {"inner_steps": 2}, "mamlpp": {"inner_steps": 3, "test_inner_steps": 3}}


def learner(name: str, dtype=torch.float64, way: int = 5, query: int = 2, **changes):
    cls = LEARNERS[name]
    config = dataclasses.replace(cls.default_config(way, 1), meta_batch_size=2, **{**SMALL[name], **changes})
    return cls(config, RunContext(way=way, shot=1, query=query, device=CPU, seed=5, iterations=4), dtype=dtype)


def perturbed(params: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-step rows and learned step sizes made to differ (they start equal)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in params.items():
        if k.startswith(LR_PREFIX) or (k.startswith("bn") and v.dim() == 2):
            v = v * (1 + 0.2 * torch.rand(v.shape, generator=g, dtype=v.dtype))
        out[k] = v
    return out


def weights_for(name: str, dtype=torch.float64):
    """MAML++'s multi-step weights at a middle epoch (None: the last step's loss alone)."""
    return torch.tensor(msl_weights(4, 3, 10), dtype=dtype) if name == "mamlpp" else None


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("name", list(LEARNERS))
def test_vectorized_equals_loop_float64(name, first_order):
    l = learner(name)
    params, batch = perturbed(l.params), fake_episodes(torch.Generator().manual_seed(1), tasks=2, query=2)
    weights = weights_for(name)
    gv, lv, av = gradient.vectorized_meta_gradient(params, batch, l.inner, first_order, weights)
    gr, lr, ar = reference.reference_meta_gradient(params, batch, l.inner, first_order, weights)
    assert rel_error(gv, gr) <= RTOL64
    torch.testing.assert_close(lv, lr, rtol=1e-12, atol=0)
    torch.testing.assert_close(av, ar, rtol=0, atol=0)
    assert rel_error({k: v * 1.005 for k, v in gv.items()}, gr) > RTOL64
    # Every meta-parameter learns: learned step sizes and per-step rows included (all rows: the weights
    # score every step).
    assert all(float(g.abs().sum()) > 0 for g in gv.values())


@pytest.mark.parametrize("name", list(LEARNERS))
def test_vectorized_float32_is_as_accurate_as_the_loop(name):
    l = learner(name)
    params64, batch64 = perturbed(l.params, 1), fake_episodes(torch.Generator().manual_seed(2), tasks=3, query=2)
    params32, batch32 = {k: v.float() for k, v in params64.items()}, batch64.to("cpu", dtype=torch.float32)
    w64, w32 = weights_for(name), weights_for(name, torch.float32)
    exact = reference.reference_meta_gradient(params64, batch64, l.inner, False, w64)[0]
    exact = {k: v.float() for k, v in exact.items()}
    loop = rel_error(reference.reference_meta_gradient(params32, batch32, l.inner, False, w32)[0], exact)
    fast = rel_error(gradient.vectorized_meta_gradient(params32, batch32, l.inner, False, w32)[0], exact)
    assert fast <= max(FLOAT32_FACTOR * loop, RTOL32_FLOOR), (fast, loop)


@pytest.mark.parametrize("name", list(LEARNERS))
def test_adapted_logits_agree(name):
    l = learner(name)
    params, batch = perturbed(l.params, 2), fake_episodes(torch.Generator().manual_seed(3), tasks=2, query=2)
    steps = l.config.test_inner_steps + 1 if name != "mamlpp" else 3
    args = (params, batch.support_x, batch.support_y, batch.query_x, l.inner, steps, True)
    lv, lr = gradient.vectorized_adapted_logits(*args), reference.reference_adapted_logits(*args)
    assert lv.shape == (steps + 1, 2, 10, 5)
    torch.testing.assert_close(lv, lr, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(LEARNERS))
def test_vectorized_and_loop_learners_take_the_same_steps(name):
    """Two meta-updates (for MAML++ across an epoch boundary: the multi-step loss ends and the learning rate
    falls between them), then a prediction."""
    changes = {"iterations_per_epoch": 1, "msl_epochs": 1} if name == "mamlpp" else {}
    a, b = learner(name, vectorize=True, **changes), learner(name, vectorize=False, **changes)
    g = torch.Generator().manual_seed(4)
    for _ in range(2):
        batch = fake_episodes(g, tasks=2, query=2)
        ma, mb = a.meta_train_step(batch), b.meta_train_step(batch)
        torch.testing.assert_close(ma["loss"], mb["loss"], rtol=1e-12, atol=0)
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=1e-10, atol=1e-12)
    test = fake_episodes(g, tasks=2, query=2)
    torch.testing.assert_close(a.predict(test.support_x, test.support_y, test.query_x),
                               b.predict(test.support_x, test.support_y, test.query_x), rtol=1e-10, atol=1e-10)


# -- ANIL --------------------------------------------------------------------------------------------------
def test_anil_adapts_the_head_only_and_its_meta_gradient_reaches_the_body():
    l = learner("anil")
    batch = fake_episodes(torch.Generator().manual_seed(5), tasks=1)
    adapted = gradient.adapt(l.params, batch.support_x[0], batch.support_y[0], l.inner, 2)
    moved = {k for k in l.params if not torch.equal(adapted[k], l.params[k])}
    assert moved == {"head.weight", "head.bias"}
    grads = gradient.vectorized_meta_gradient(l.params, batch, l.inner, False)[0]
    assert float(grads["conv1.weight"].abs().sum()) > 0 and float(grads["bn4.bias"].abs().sum()) > 0
    assert l.describe()["adapts"] == "head only"
    with pytest.raises(ConfigError, match="head only"):
        learner("anil", adapt_bn=True)


# -- Meta-SGD ----------------------------------------------------------------------------------------------
def test_metasgd_step_sizes_are_per_element_and_learned():
    l = learner("metasgd", dtype=torch.float32)
    rates = {k: v for k, v in l.params.items() if k.startswith(LR_PREFIX)}
    assert set(rates) == {LR_PREFIX + k for k in l.params if not k.startswith(("bn", LR_PREFIX))}
    for k, v in rates.items():
        assert v.shape == l.params[k[len(LR_PREFIX):]].shape
        assert 0.005 <= float(v.min()) and float(v.max()) <= 0.1 and float(v.std()) > 0.01
    before = {k: v.clone() for k, v in rates.items()}
    l.meta_train_step(fake_episodes(torch.Generator().manual_seed(6), tasks=2, query=2, dtype=torch.float32))
    assert all(not torch.equal(before[k], l.params[k]) for k in rates)
    # One step w - alpha * grad, elementwise (here against a hand-made alpha).
    batch = fake_episodes(torch.Generator().manual_seed(7), tasks=1)
    params = {k: v.double() for k, v in l.params.items()}
    grads = torch.func.grad(lambda p: gradient.task_loss(gradient.network({**params, **p}, batch.support_x[0], l.inner),
                                                         batch.support_y[0], "sum/K"))(
        {k: params[k] for k in ("conv2.weight", "head.bias")})
    stepped = gradient.adapt(params, batch.support_x[0], batch.support_y[0], l.inner, 1)
    for k in grads:
        torch.testing.assert_close(stepped[k], params[k] - params[LR_PREFIX + k] * grads[k], rtol=1e-12, atol=1e-14)


# -- MAML++ ------------------------------------------------------------------------------------------------
def released_msl_weights(epoch: int, steps: int = 5, msl_epochs: int = 10) -> list[float]:
    """HowToTrainYourMAMLPytorch few_shot_learning_system.py:83-103, transcribed step by step."""
    w = [1.0 / steps] * steps
    decay_rate = 1.0 / steps / msl_epochs
    minimum = 0.03 / steps
    for i in range(steps - 1):
        w[i] = max(w[i] - epoch * decay_rate, minimum)
    w[-1] = min(w[-1] + epoch * (steps - 1) * decay_rate, 1.0 - (steps - 1) * minimum)
    return w


@pytest.mark.parametrize("epoch", [0, 1, 4, 9, 10, 60])
def test_mamlpp_msl_weights_follow_the_released_code(epoch):
    assert msl_weights(epoch, 5, 10) == pytest.approx(released_msl_weights(epoch), rel=1e-12, abs=1e-15)
    assert msl_weights(0, 5, 10) == pytest.approx([0.2] * 5) and msl_weights(9, 5, 10)[0] == pytest.approx(0.02)
    assert msl_weights(50, 5, 10) == pytest.approx([0.006] * 4 + [0.976])


def test_mamlpp_cosine_learning_rate_is_torchs_per_epoch():
    """CosineAnnealingLR(T_max=100, eta_min=1e-5) stepped once per epoch (the released code steps it with the
    epoch at every iteration, which changes it once per epoch)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100, eta_min=1e-5)
    for epoch in range(100):
        assert cosine_lr(epoch, 100, 1e-3, 1e-5) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        sched.step()
    l = learner("mamlpp", dtype=torch.float32, iterations_per_epoch=2)  # 4 iterations: 2 epochs
    g = torch.Generator().manual_seed(8)
    for it in range(3):
        l.meta_train_step(fake_episodes(g, tasks=2, query=1, dtype=torch.float32))
        assert l.optimizer.param_groups[0]["lr"] == pytest.approx(cosine_lr(it // 2, 2, 1e-3, 1e-5))


def test_mamlpp_network_and_parameters():
    l = learner("mamlpp", dtype=torch.float64)
    p = l.params
    assert p["bn1.weight"].shape == (3, 64) and p["bn3.bias"].shape == (3, 64)
    assert p[LR_PREFIX + "conv1.weight"].shape == (3,) and float(p[LR_PREFIX + "head.bias"][0]) == pytest.approx(0.1)
    assert set(k for k in p if k.startswith(LR_PREFIX)) == {LR_PREFIX + k for k in p if l.inner.adapts(k)}
    assert p["head.weight"].shape == (5, 64) and 0.05 < float(p["head.weight"].std()) < 0.3  # Glorot, not N(0, 1)
    params = perturbed(p, 3)
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    h = x
    for i in range(1, 5):  # conv (stride 1, padding 1) -> batch norm (row 2) -> leaky ReLU -> max-pool
        h = torch.nn.functional.conv2d(h, params[f"conv{i}.weight"], padding=1)
        var, mean = torch.var_mean(h, dim=(0, 2, 3), unbiased=False)
        h = (h - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5)
        h = h * params[f"bn{i}.weight"][2][:, None, None] + params[f"bn{i}.bias"][2][:, None, None]
        h = torch.nn.functional.max_pool2d(torch.where(h > 0, h, 0.01 * h), 2)
    assert h.shape == (6, 64, 1, 1)
    want = h.flatten(1) @ params["head.weight"].T + params["head.bias"]
    torch.testing.assert_close(gradient.network(params, x, l.inner, 2), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference.reference_forward(params, x, l.inner.arch, 2), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ConfigError, match="test_inner_steps to at most 3"):
        learner("mamlpp", test_inner_steps=4)


def test_mamlpp_schedules_switch_once_per_epoch():
    l = learner("mamlpp", dtype=torch.float32, iterations_per_epoch=2, msl_epochs=1, first_order_epochs=1)
    assert l.step_weights().shape == (3,) and l.first_order
    l.iteration = 2  # epoch 1: the multi-step loss has ended, second order has begun
    assert l.step_weights().tolist() == [1.0] and not l.first_order
    state = l.state_dict()
    fresh = learner("mamlpp", dtype=torch.float32, iterations_per_epoch=2, msl_epochs=1, first_order_epochs=1)
    fresh.load_state_dict(state)
    assert fresh.iteration == 2 and fresh.epoch == 1


@pytest.fixture
def capturable_adam_on_the_cpu(monkeypatch):
    """Adam with ``capturable=True`` on the CPU (PyTorch allows it on accelerators only; same arithmetic)."""
    import torch.optim.adam as adam

    supported = getattr(adam, "_get_capturable_supported_devices", None)
    if supported is None:
        pytest.skip("this PyTorch has no _get_capturable_supported_devices to relax")
    monkeypatch.setattr(adam, "_get_capturable_supported_devices", lambda *a, **k: [*supported(*a, **k), "cpu"])


def test_mamlpp_device_learning_rate_matches_the_float_one(capturable_adam_on_the_cpu):
    """What a CUDA graph replays, eagerly on the CPU: capturable Adam reading the annealed learning rate from a
    tensor (as with cuda_graph=true). The vectorized learner against the loop with the same Adam (1e-10), and
    against the loop with float rates (Adam's tensor-rate arithmetic rounds differently: 1e-7)."""
    changes = {"iterations_per_epoch": 1, "msl_epochs": 1}
    fast, same, floats = (learner("mamlpp", vectorize=v, **changes) for v in (True, False, False))
    for l in (fast, same, floats):
        for group in l.optimizer.param_groups:
            group["capturable"] = True
            if l is not floats:
                group["lr"] = torch.tensor(1e-3, dtype=torch.float64)
    g = torch.Generator().manual_seed(10)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*capturable=True.*")
        for _ in range(3):  # epochs 0, 1, 2: the rate falls and the multi-step loss ends after the first
            batch = fake_episodes(g, tasks=2, query=1)
            losses = [float(l.meta_train_step(batch)["loss"]) for l in (fast, same, floats)]
            assert losses[0] == pytest.approx(losses[1], rel=1e-10) and losses[0] == pytest.approx(losses[2], rel=1e-7)
    assert float(fast.optimizer.param_groups[0]["lr"]) == pytest.approx(cosine_lr(2, 4, 1e-3, 1e-5), rel=1e-12)
    assert rel_error(fast.params, same.params) <= RTOL64 and rel_error(fast.params, floats.params) <= 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(LEARNERS))
def test_cuda_graph_steps_equal_the_loop_float64(name):
    """Warm-up steps, capture and replays against the per-task loop with the same (capturable) Adam; for MAML++
    across the end of the multi-step loss, whose shorter weight vector captures the step anew."""
    cls = LEARNERS[name]
    changes = {**SMALL[name], "meta_batch_size": 2}
    if name == "mamlpp":
        changes.update(iterations_per_epoch=4, msl_epochs=1)
    config = dataclasses.replace(cls.default_config(5, 1), **changes)
    ctx = RunContext(way=5, shot=1, query=2, device=torch.device("cuda"), seed=5, iterations=16)
    fast = cls(dataclasses.replace(config, vectorize=True, cuda_graph=True), ctx, dtype=torch.float64)
    plain = cls(dataclasses.replace(config, vectorize=False, cuda_graph=False), ctx, dtype=torch.float64)
    for group in plain.optimizer.param_groups:
        group["capturable"] = True
        if name == "mamlpp":
            group["lr"] = torch.tensor(1e-3, dtype=torch.float64, device="cuda")
    g = torch.Generator().manual_seed(12)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*capturable=True.*")
        for _ in range(fast._graph.warmup + 6):
            batch = fake_episodes(g, tasks=2, query=2).to("cuda")
            torch.testing.assert_close(fast.meta_train_step(batch)["loss"], plain.meta_train_step(batch)["loss"],
                                       rtol=1e-10, atol=0)
    assert fast._graph.captured, fast._graph.disabled_reason
    assert rel_error(fast.params, plain.params) <= RTOL64


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(LEARNERS))
@pytest.mark.parametrize("cuda_graph", [True, False], ids=["graph", "eager"])
def test_a_training_step_does_not_synchronize_the_host(name, cuda_graph):
    """After warm-up (and capture), a meta-train step queues its work and returns: no copy from pageable host
    memory (MAML++'s step weights are made once per epoch), no value read back."""
    cls = LEARNERS[name]
    config = dataclasses.replace(cls.default_config(5, 1), **SMALL[name], meta_batch_size=2, vectorize=True,
                                 cuda_graph=cuda_graph)
    fast = cls(config, RunContext(way=5, shot=1, query=2, device=torch.device("cuda"), seed=5, iterations=100))
    g = torch.Generator().manual_seed(14)
    batches = [fake_episodes(g, tasks=2, query=2, dtype=torch.float32).to("cuda") for _ in range(6)]
    metrics = last_step_without_host_sync(fast, batches)
    assert metrics["loss"].is_cuda and (fast._graph is None or fast._graph.captured)


# -- defaults and presets ----------------------------------------------------------------------------------
def test_defaults_follow_the_papers():
    five, twenty = ANIL.default_config(5, 1), ANIL.default_config(20, 1)
    assert (five.inner_lr, five.inner_steps, five.meta_batch_size, five.test_inner_steps) == (0.4, 1, 32, 3)
    assert (twenty.inner_lr, twenty.inner_steps, twenty.meta_batch_size, twenty.test_inner_steps) == (0.1, 5, 16, 5)
    sgd5, sgd20 = MetaSGD.default_config(5, 1), MetaSGD.default_config(20, 5)
    assert (sgd5.inner_steps, sgd5.test_inner_steps, sgd5.meta_batch_size, sgd20.meta_batch_size) == (1, 1, 32, 16)
    assert (sgd5.lr_init_low, sgd5.lr_init_high, sgd5.inner_loss, sgd5.meta_lr) == (0.005, 0.1, "sum/K", 1e-3)
    pp = MAMLPP.default_config(20, 5)
    assert (pp.inner_steps, pp.test_inner_steps, pp.meta_batch_size, pp.msl_epochs, pp.first_order_epochs) == (5, 5, 8, 10, 0)
    assert (pp.inner_lr_init, pp.meta_lr, pp.min_meta_lr, pp.iterations_per_epoch) == (0.1, 1e-3, 1e-5, 500)
    ctx = RunContext(way=5, shot=1, query=1, device=CPU)
    assert MAMLPP(pp, ctx).describe() == {"order": "second", "inner steps (train/test)": "5/5", "batch norm": "transductive",
                                          "inner optimizer": "SGD, learned step size per layer and step"}
    assert MetaSGD(sgd5, ctx).describe()["inner optimizer"] == "SGD, learned step size per element"
    reference_config = MAMLPP.reference_config(pp)
    assert (reference_config.vectorize, reference_config.cuda_graph, reference_config.compile) == (False, False, False)


@pytest.mark.parametrize("paper", [RAGHU2020, LI2017, ANTONIOU2019], ids=lambda p: p.name)
def test_presets_resolve_for_every_cell(paper):
    from benchmark.harness.plan import resolve_config
    from benchmark.harness.settings import RunSettings
    from benchmark.harness.plugins import load_registry

    registry = load_registry()
    for way, shot in paper.cells:
        preset = paper.preset_for(way, shot)
        RunSettings(way=way, shot=shot, **preset.settings).check()
        for name, values in preset.learners.items():
            config = resolve_config(registry.get(name), way, shot, values, {}, (), paper.name)
            assert all(getattr(config, k) == v for k, v in values.items())
        assert all(a.verified is False and "95%" not in a.ci_kind for a in paper.anchors)
    assert paper.quick is not None and paper.quick.cells


def test_antoniou2019_preset_is_the_released_protocol():
    preset = ANTONIOU2019.preset_for(20, 1)
    s = preset.settings
    assert (s["query"], s["episodes"], s["iterations"], s["select"], s["ensemble"], s["val_every"], s["val_episodes"]) == (
        1, 600, 50000, "best-val", 5, 500, 600)
    assert math.isclose(ANTONIOU2019.anchor("mamlpp", 20, 1).ci, 0.05)
