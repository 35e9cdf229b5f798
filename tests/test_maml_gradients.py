"""The vectorized MAML meta-gradient equals the plain per-task loop (float64, to ~1e-14).

The reference loop (``reference_meta_gradient``) uses ``torch.autograd.grad`` and native ``F.batch_norm``;
the vectorized path uses ``torch.func.grad`` + ``vmap`` and batch norm from ``torch.var_mean``. The
tolerance is tight enough to catch the ~0.5% error of vmapped second-order gradients through native batch
norm (pytorch/functorch issue 534), which ``test_tolerance_catches_native_batchnorm_under_vmap`` shows.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import plugins.maml as maml
from plugins import gradient, gradient_reference as reference
from benchmark.episodes import EpisodeBatch
from benchmark.learner import RunContext
from benchmark.toolkit.conv4 import Conv4Arch, init_conv4

RTOL64 = 1e-10
#: float32: both paths round differently (conv algorithms, reductions), and large inner steps amplify
#: rounding; so the vectorized float32 gradient must be as close to the exact (float64) one as the plain
#: float32 loop is, within this factor, and not further than RTOL32_FLOOR where both are tiny.
FLOAT32_FACTOR = 3.0
RTOL32_FLOOR = 1e-4


def fake_episodes(generator: torch.Generator, tasks: int, way: int = 5, shot: int = 1, query: int = 3,
                  dtype: torch.dtype = torch.float64) -> EpisodeBatch:
    """Random images with random label orders."""
    def images(n):
        return torch.rand(tasks, n, 1, 28, 28, generator=generator, dtype=dtype)

    def labels(per_class):
        base = torch.arange(way).repeat_interleave(per_class)
        return torch.stack([torch.randperm(way, generator=generator)[base] for _ in range(tasks)])

    return EpisodeBatch(images(way * shot), labels(shot), images(way * query), labels(query), way, shot, query)


def rel_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """|a - b| / |b| over all parameters together."""
    num = sum(((a[k] - b[k]) ** 2).sum() for k in b).sqrt()
    return float(num / sum((b[k] ** 2).sum() for k in b).sqrt())


#: The MAML reference code's network and inner loop (the default), and PyTorch-style conventions.
REFERENCE = Conv4Arch(padding="same", bn_scale=False, bn_eps=1e-3)
TORCH_STYLE = Conv4Arch()
NETWORKS = {"reference": (REFERENCE, "sum/K", False), "torch-style": (TORCH_STYLE, "mean", True)}


def inner(network: str = "reference", steps: int = 1, lr: float = 0.4) -> gradient.InnerLoop:
    arch, loss, adapt_bn = NETWORKS[network]
    return gradient.InnerLoop(lr, steps, loss, adapt_bn, arch)


@pytest.fixture(scope="module", params=list(NETWORKS))
def setup64(request):
    g = torch.Generator().manual_seed(1234)
    arch = NETWORKS[request.param][0]
    return request.param, init_conv4(g, 5, dtype=torch.float64, arch=arch), fake_episodes(g, tasks=3, shot=2)


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("steps", [1, 3])
def test_vectorized_equals_loop_float64(setup64, first_order, steps):
    network, params, batch = setup64
    gv, lv, av = gradient.vectorized_meta_gradient(params, batch, inner(network, steps), first_order)
    gr, lr, ar = reference.reference_meta_gradient(params, batch, inner(network, steps), first_order)
    assert rel_error(gv, gr) <= RTOL64
    torch.testing.assert_close(lv, lr, rtol=1e-12, atol=0)
    torch.testing.assert_close(av, ar, rtol=0, atol=0)
    # A 0.5% error in the gradient must fail the same comparison.
    assert rel_error({k: v * 1.005 for k, v in gv.items()}, gr) > RTOL64


def test_first_and_second_order_differ(setup64):
    """Guards against the two orders silently sharing one code path."""
    network, params, batch = setup64
    g2 = gradient.vectorized_meta_gradient(params, batch, inner(network), False)[0]
    g1 = gradient.vectorized_meta_gradient(params, batch, inner(network), True)[0]
    assert rel_error(g1, g2) > 1e-3


def test_tolerance_catches_native_batchnorm_under_vmap(setup64, monkeypatch):
    """With native batch norm inside vmap, second-order gradients are off by far more than RTOL64 (when the
    inner loop adapts a batch-norm scale: the reference network has none and adapts no batch-norm parameter,
    and there the native kernel happens to agree)."""
    network, params, batch = setup64
    if network == "reference":
        pytest.skip("the native kernel's error needs an adapted batch-norm scale; the torch-style case shows it")
    gr = reference.reference_meta_gradient(params, batch, inner(network, 2), False)[0]
    monkeypatch.setattr(gradient, "conv4_forward", reference.reference_forward)
    gv = gradient.vectorized_meta_gradient(params, batch, inner(network, 2), False)[0]
    assert rel_error(gv, gr) > 1e-5


@pytest.mark.parametrize("network", list(NETWORKS))
def test_vectorized_float32_is_as_accurate_as_the_loop(network):
    """float32 against the exact float64 gradient: the vectorized path errs no more than the plain loop."""
    g = torch.Generator().manual_seed(99)
    params64 = init_conv4(g, 5, arch=NETWORKS[network][0], dtype=torch.float64)
    batch64 = fake_episodes(g, tasks=4, dtype=torch.float64)
    params32 = {k: v.float() for k, v in params64.items()}
    batch32 = batch64.to("cpu", dtype=torch.float32)
    for first_order in (False, True):
        exact = reference.reference_meta_gradient(params64, batch64, inner(network, 2), first_order)[0]
        exact = {k: v.float() for k, v in exact.items()}
        loop = rel_error(reference.reference_meta_gradient(params32, batch32, inner(network, 2), first_order)[0], exact)
        fast = rel_error(gradient.vectorized_meta_gradient(params32, batch32, inner(network, 2), first_order)[0], exact)
        assert fast <= max(FLOAT32_FACTOR * loop, RTOL32_FLOOR), (fast, loop)


def test_adapted_logits_agree(setup64):
    network, params, batch = setup64
    lv = gradient.vectorized_adapted_logits(params, batch.support_x, batch.support_y, batch.query_x, inner(network), 3)
    lr = reference.reference_adapted_logits(params, batch.support_x, batch.support_y, batch.query_x, inner(network), 3)
    assert lv.shape == (3, 15, 5)
    torch.testing.assert_close(lv, lr, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("learner_cls", [maml.MAML, maml.FOMAML], ids=["maml", "fomaml"])
def test_vectorized_and_loop_learners_take_the_same_step(learner_cls):
    ctx = RunContext(way=5, shot=1, query=3, device=torch.device("cpu"), seed=7)
    cfg = dataclasses.replace(learner_cls.default_config(5, 1), meta_batch_size=3)
    a = learner_cls(dataclasses.replace(cfg, vectorize=True), ctx, dtype=torch.float64)
    b = learner_cls(dataclasses.replace(cfg, vectorize=False), ctx, dtype=torch.float64)
    batch = fake_episodes(torch.Generator().manual_seed(5), tasks=3)
    before = a.state_dict()["params"]
    for _ in range(2):
        ma, mb = a.meta_train_step(batch), b.meta_train_step(batch)
        torch.testing.assert_close(ma["loss"], mb["loss"], rtol=1e-12, atol=0)
    pa, pb = a.state_dict()["params"], b.state_dict()["params"]
    assert not torch.equal(pa["conv1.weight"], before["conv1.weight"])
    # Adam normalises the step, so compare the parameters (not the tiny differences of gradients).
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-10, atol=1e-12)


def test_defaults_follow_the_paper():
    five, twenty = maml.MAML.default_config(5, 1), maml.MAML.default_config(20, 1)
    assert (five.inner_lr, five.inner_steps, five.meta_batch_size) == (0.4, 1, 32)
    assert (twenty.inner_lr, twenty.inner_steps, twenty.meta_batch_size) == (0.1, 5, 16)
    assert (five.test_inner_steps, twenty.test_inner_steps) == (3, 5)  # the paper's appendix A.1
    assert (five.inner_loss, five.bn_scale, five.bn_eps, five.adapt_bn, five.padding, five.head_init) == (
        "sum/K", False, 1e-3, False, "same", "normal")  # the reference code's network and inner loss
    assert not five.first_order and maml.FOMAML.default_config(20, 5).first_order
    ctx = RunContext(way=5, shot=1, query=15, device=torch.device("cpu"))
    learner = maml.FOMAML(maml.FOMAML.default_config(5, 1), ctx)
    assert learner.describe() == {"order": "first", "inner steps (train/test)": "1/3", "batch norm": "transductive"}
    assert learner.implementation() == {"tasks": "loop", "cuda graph": False, "compiled": False}
    # vmap by default on CUDA and for small CPU tasks; bench perf's reference is always the plain loop.
    reference = maml.MAML.reference_config(five)
    assert (reference.vectorize, reference.cuda_graph, reference.compile) == (False, False, False)
    assert five.vectorize is None and five.cuda_graph is None and five.compile is False
    small = RunContext(way=5, shot=1, query=1, device=torch.device("cpu"))
    assert maml.MAML(five, small).implementation()["tasks"] == "vmap"


def test_predict_leaves_meta_parameters_unchanged(setup64):
    ctx = RunContext(way=5, shot=2, query=3, device=torch.device("cpu"), seed=1)
    learner = maml.MAML(maml.MAML.default_config(5, 2), ctx)
    _, _, batch = setup64
    before = learner.state_dict()
    with torch.no_grad():  # adaptation must still work when a caller disables gradients
        logits = learner.predict(batch.support_x.float(), batch.support_y, batch.query_x.float())
    assert logits.shape == (3, 15, 5)
    after = learner.state_dict()
    assert all(torch.equal(before["params"][k], after["params"][k]) for k in before["params"])


# -- the finn2017 preset takes the reference code's inner step ---------------------------------------------
def reference_code_step(params, x, y, lr: float, shot: int):
    """One inner step as cbfinn/maml computes it: ``xent`` returns the per-example cross-entropies divided by
    K (utils.py:58), ``tf.gradients`` differentiates their sum (maml.py:90), batch-norm variables are not in
    ``weights`` and do not move, and every other weight takes ``w - update_lr * grad`` (maml.py:94)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    logits = reference.reference_forward(leaves, x, REFERENCE)
    per_example = torch.nn.functional.cross_entropy(logits, y, reduction="none") / shot
    moving = [k for k in leaves if not k.startswith("bn")]
    grads = torch.autograd.grad(per_example.sum(), [leaves[k] for k in moving])
    stepped = {k: leaves[k] - lr * g for k, g in zip(moving, grads)}
    return {k: stepped.get(k, leaves[k]).detach() for k in leaves}


@pytest.mark.parametrize("way, shot", [(5, 1), (5, 5), (20, 1), (20, 5)])
def test_the_finn2017_preset_takes_the_reference_codes_inner_step(way, shot):
    from benchmark.harness.plan import resolve_config

    config = resolve_config(maml.MAML, way, shot, maml.FINN2017.preset_for(way, shot).learners["maml"], {}, (), "finn2017")
    ctx = RunContext(way=way, shot=shot, query=shot, device=torch.device("cpu"), seed=3)
    learner = maml.MAML(config, ctx, dtype=torch.float64)
    g = torch.Generator().manual_seed(way * 10 + shot)
    batch = fake_episodes(g, tasks=1, way=way, shot=shot)
    params = learner.state_dict()["params"]
    ours = gradient.adapt(params, batch.support_x[0], batch.support_y[0], learner.inner, steps=1)
    want = reference_code_step(params, batch.support_x[0], batch.support_y[0], config.inner_lr, shot)
    for k in params:
        torch.testing.assert_close(ours[k], want[k], rtol=1e-10, atol=1e-12)
    # On the mean cross-entropy that step is inner_lr * N: 2.0 for both 5-way (0.4) and 20-way (0.1).
    assert config.inner_lr * way == pytest.approx(2.0)
    mean_step = gradient.adapt(params, batch.support_x[0], batch.support_y[0],
                           dataclasses.replace(learner.inner, loss="mean", lr=config.inner_lr * way), steps=1)
    for k in params:
        torch.testing.assert_close(mean_step[k], want[k], rtol=1e-10, atol=1e-12)


def test_the_reference_network_follows_the_reference_code():
    """Offset-only batch norm with eps 1e-3, TF 'SAME' padding, an N(0, 1) head: checked against a direct
    transcription of cbfinn/maml's forward pass (utils.py:26-41, maml.py:205-225)."""
    ctx = RunContext(way=5, shot=1, query=1, device=torch.device("cpu"), seed=0)
    learner = maml.MAML(maml.MAML.default_config(5, 1), ctx, dtype=torch.float64)
    params = learner.state_dict()["params"]
    assert not any(k.startswith("bn") and k.endswith(".weight") for k in params)  # no scale (gamma)
    assert 0.8 < float(params["head.weight"].std()) < 1.2  # N(0, 1), not Glorot (std ~0.17 for 64 -> 5)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = x
    for i in range(1, 5):
        size = h.shape[-1]
        pad = (0, 1) if size % 2 == 0 else (1, 1)  # TF 'SAME' for a stride-2 3x3 conv
        h = torch.nn.functional.conv2d(torch.nn.functional.pad(h, (*pad, *pad)), params[f"conv{i}.weight"], stride=2)
        var, mean = torch.var_mean(h, dim=(0, 2, 3), unbiased=False)
        h = torch.relu((h - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-3) + params[f"bn{i}.bias"][:, None, None])
    want = h.mean(dim=(2, 3)) @ params["head.weight"].T + params["head.bias"]
    torch.testing.assert_close(gradient.conv4_forward(params, x, learner.arch), want, rtol=1e-12, atol=1e-12)


def test_conv_biases_would_change_nothing():
    """The reference code's conv biases (b1..b4, zero-initialised, adapted) feed batch norm with batch
    statistics, which subtracts every per-channel constant: their gradient is zero and they never move, so the
    network omits them. Shown here in float64: a bias leaves the output unchanged and gets no gradient."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 8, 7, 7, generator=g, dtype=torch.float64)
    w = torch.randn(8, 8, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    from benchmark.toolkit.conv4 import batch_norm

    beta = torch.zeros(8, dtype=torch.float64)
    with_bias = batch_norm(torch.nn.functional.conv2d(x, w, bias, padding=1), None, beta, 1e-3)
    without = batch_norm(torch.nn.functional.conv2d(x, w, padding=1), None, beta, 1e-3)
    torch.testing.assert_close(with_bias, without, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad((with_bias ** 3).sum(), bias)
    assert float(grad.abs().max()) < 1e-9
