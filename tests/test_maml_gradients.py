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
from benchmark.toolkit.conv4 import init_conv4
from benchmark.episodes import EpisodeBatch
from benchmark.learner import RunContext

RTOL64 = 1e-10
#: float32: both paths round differently (conv algorithms, reductions); measured ~1e-6, so 1e-4 is loose
#: enough to be stable and still 50x below the native-batch-norm error.
RTOL32 = 1e-4


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


@pytest.fixture(scope="module")
def setup64():
    g = torch.Generator().manual_seed(1234)
    return init_conv4(g, 5, dtype=torch.float64), fake_episodes(g, tasks=3, shot=2)


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("steps", [1, 3])
def test_vectorized_equals_loop_float64(setup64, first_order, steps):
    params, batch = setup64
    gv, lv, av = maml.vectorized_meta_gradient(params, batch, 0.4, steps, first_order)
    gr, lr, ar = maml.reference_meta_gradient(params, batch, 0.4, steps, first_order)
    assert rel_error(gv, gr) <= RTOL64
    torch.testing.assert_close(lv, lr, rtol=1e-12, atol=0)
    torch.testing.assert_close(av, ar, rtol=0, atol=0)
    # A 0.5% error in the gradient must fail the same comparison.
    assert rel_error({k: v * 1.005 for k, v in gv.items()}, gr) > RTOL64


def test_first_and_second_order_differ(setup64):
    """Guards against the two orders silently sharing one code path."""
    params, batch = setup64
    g2 = maml.vectorized_meta_gradient(params, batch, 0.4, 1, False)[0]
    g1 = maml.vectorized_meta_gradient(params, batch, 0.4, 1, True)[0]
    assert rel_error(g1, g2) > 1e-3


def test_tolerance_catches_native_batchnorm_under_vmap(setup64, monkeypatch):
    """With native batch norm inside vmap, second-order gradients are off by far more than RTOL64."""
    params, batch = setup64
    gr = maml.reference_meta_gradient(params, batch, 0.4, 2, False)[0]
    monkeypatch.setattr(maml, "conv4_forward", maml.reference_forward)
    gv = maml.vectorized_meta_gradient(params, batch, 0.4, 2, False)[0]
    assert rel_error(gv, gr) > 1e-5


def test_vectorized_equals_loop_float32():
    g = torch.Generator().manual_seed(99)
    params, batch = init_conv4(g, 5), fake_episodes(g, tasks=4, dtype=torch.float32)
    for first_order in (False, True):
        gv = maml.vectorized_meta_gradient(params, batch, 0.4, 2, first_order)[0]
        gr = maml.reference_meta_gradient(params, batch, 0.4, 2, first_order)[0]
        assert rel_error(gv, gr) <= RTOL32


def test_adapted_logits_agree(setup64):
    params, batch = setup64
    lv = maml.vectorized_adapted_logits(params, batch.support_x, batch.support_y, batch.query_x, 0.4, 3)
    lr = maml.reference_adapted_logits(params, batch.support_x, batch.support_y, batch.query_x, 0.4, 3)
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
    assert five.test_inner_steps == twenty.test_inner_steps == 10
    assert not five.first_order and maml.FOMAML.default_config(20, 5).first_order
    ctx = RunContext(way=5, shot=1, query=15, device=torch.device("cpu"))
    learner = maml.FOMAML(maml.FOMAML.default_config(5, 1), ctx)
    assert learner.describe() == {"order": "first", "inner steps (train/test)": "1/10", "batch norm": "transductive"}
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
    _, batch = setup64
    before = learner.state_dict()
    with torch.no_grad():  # adaptation must still work when a caller disables gradients
        logits = learner.predict(batch.support_x.float(), batch.support_y, batch.query_x.float())
    assert logits.shape == (3, 15, 5)
    after = learner.state_dict()
    assert all(torch.equal(before["params"][k], after["params"][k]) for k in before["params"])
