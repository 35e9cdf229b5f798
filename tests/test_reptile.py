"""Reptile: the vectorized meta-iteration equals the plain per-task loop, and the learner follows the released code.

The inner Adam's state carries over between tasks. With the tasks of a meta-batch in parallel
(``adam_carry="merged"``), every task starts from the carried state and the state carried on must be the one
that has seen all their gradients in task order: the vectorized path computes it in closed form
(``chain_adam_states``), the loop by replaying each recorded gradient through Adam's running averages
(``replay_adam_moments``); both, and the adapted weights, agree to 1e-10 in float64. The released order
(``"chained"``: each task starts from the previous task's state) is the loop's; the test below measures how
little it differs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmark.errors import ConfigError
from benchmark.learner import RunContext
from plugins import gradient
from plugins.gradient_reference import reference_reptile_logits, reference_reptile_tasks
from plugins.reptile import (
    NICHOL2018, NICHOL2018_NT, Reptile, minibatch_schedule, minibatches, vectorized_reptile_logits,
    vectorized_reptile_tasks,
)
from cuda_checks import last_step_without_host_sync
from test_maml_gradients import FLOAT32_FACTOR, RTOL32_FLOOR, RTOL64, fake_episodes, rel_error

CPU = torch.device("cpu")


def reptile(dtype=torch.float64, iterations: int = 4, **changes) -> Reptile:
    """A small Reptile: 3 tasks of 5 classes x 2 training shots, 3 inner steps of 4 images."""
    config = dataclasses.replace(Reptile.default_config(5, 1), meta_batch_size=3, inner_steps=3, inner_batch=4,
                                 test_inner_steps=4, test_inner_batch=3, **changes)
    ctx = RunContext(way=5, shot=1, query=1, device=CPU, seed=2, iterations=iterations, train_shot=2)
    return Reptile(config, ctx, dtype=dtype)


def carried_state(learner: Reptile, seed: int = 0) -> dict:
    """A state as after some training: positive second moments, any first moments, a step count."""
    g = torch.Generator().manual_seed(seed)
    like = learner.adam
    return {"step": torch.full_like(like["step"], 7.0),
            "m": {k: 1e-3 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in like["m"].items()},
            "v": {k: 1e-6 * torch.rand(v.shape, generator=g, dtype=v.dtype) for k, v in like["v"].items()}}


def task_minibatches(learner: Reptile, seed: int, dtype=torch.float64):
    """Training minibatches [T, steps, B, ...] of 3 fake tasks (5 classes x 2 shots)."""
    batch = fake_episodes(torch.Generator().manual_seed(seed), tasks=3, shot=2, query=1, dtype=dtype)
    c = learner.config
    schedule = minibatch_schedule([torch.Generator().manual_seed(seed)] * 3, 10, c.inner_batch, c.inner_steps)
    return minibatches(batch.support_x, batch.support_y, schedule)


def state_error(a: dict, b: dict) -> float:
    return max(rel_error(a["m"], b["m"]) if any(float(v.abs().sum()) for v in b["m"].values()) else 0.0,
               rel_error(a["v"], b["v"]))


@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_vectorized_tasks_equal_the_loop_float64(beta1):
    l = reptile(adam_beta1=beta1)
    state = carried_state(l)
    xs, ys = task_minibatches(l, seed=1)
    adapted_v, carried_v = vectorized_reptile_tasks(l.params, xs, ys, l.inner, state)
    adapted_r, carried_r = reference_reptile_tasks(l.params, xs, ys, l.inner, state, "merged")
    assert rel_error(adapted_v, adapted_r) <= RTOL64
    assert state_error(carried_v, carried_r) <= RTOL64
    assert float(carried_v["step"]) == float(carried_r["step"]) == 7 + 3 * 3
    # The carried state moved, and is not any single task's: every task's gradients are in it.
    assert rel_error(carried_v["v"], state["v"]) > 1e-2
    delta = {k: adapted_v[k].mean(0) - l.params[k] for k in l.params}
    assert rel_error({k: v * 1.005 for k, v in delta.items()},
                     {k: adapted_r[k].mean(0) - l.params[k] for k in l.params}) > RTOL64


def test_vectorized_float32_is_as_accurate_as_the_loop():
    """The meta-update direction (mean adapted weights - weights) and the carried state, against float64."""
    l64, l32 = reptile(), reptile(torch.float32)
    state64 = carried_state(l64)
    state32 = {"step": state64["step"].float(), "m": {k: v.float() for k, v in state64["m"].items()},
               "v": {k: v.float() for k, v in state64["v"].items()}}
    xs, ys = task_minibatches(l64, seed=2)
    params32 = {k: v.float() for k, v in l64.params.items()}

    def update(adapted, params):
        return {k: (adapted[k].mean(0) - params[k]).float() for k in params}

    exact_adapted, exact_state = reference_reptile_tasks(l64.params, xs, ys, l64.inner, state64, "merged")
    exact = update(exact_adapted, l64.params)
    loop_adapted, loop_state = reference_reptile_tasks(params32, xs.float(), ys, l32.inner, state32, "merged")
    fast_adapted, fast_state = vectorized_reptile_tasks(params32, xs.float(), ys, l32.inner, state32)
    loop, fast = rel_error(update(loop_adapted, params32), exact), rel_error(update(fast_adapted, params32), exact)
    assert fast <= max(FLOAT32_FACTOR * loop, RTOL32_FLOOR), (fast, loop)
    exact_v = {k: v.float() for k, v in exact_state["v"].items()}
    assert rel_error(fast_state["v"], exact_v) <= max(FLOAT32_FACTOR * rel_error(loop_state["v"], exact_v), RTOL32_FLOOR)


def test_the_released_chained_order_differs_little_once_adam_has_a_history():
    """Each task starting from the previous task's Adam state (the released code) against every task starting
    from the carried state. From an empty state the two differ much (bias-corrected Adam: a task that starts
    from its predecessors' moments takes other steps); once Adam has seen some 20 meta-iterations, the
    meta-update direction differs by a few percent and the carried second moments by far less."""

    def difference(l: Reptile) -> tuple[float, float]:
        xs, ys = task_minibatches(l, seed=3)
        state = {"step": l.adam["step"], "m": dict(l.adam["m"]), "v": dict(l.adam["v"])}
        merged, merged_state = reference_reptile_tasks(l.params, xs, ys, l.inner, state, "merged")
        chained, chained_state = reference_reptile_tasks(l.params, xs, ys, l.inner, state, "chained")
        assert float(merged_state["step"]) == float(chained_state["step"])
        direction = {k: merged[k].mean(0) - l.params[k] for k in l.params}
        released = {k: chained[k].mean(0) - l.params[k] for k in l.params}
        return rel_error(direction, released), rel_error(merged_state["v"], chained_state["v"])

    l = reptile(iterations=10**6)
    at_start, _ = difference(l)
    g = torch.Generator().manual_seed(11)
    for _ in range(20):
        l.meta_train_step(fake_episodes(g, tasks=3, shot=2, query=1))
    direction, moments = difference(l)
    assert at_start > 0.2 and 0 < direction < 0.05 and moments < 0.01


@pytest.mark.parametrize("transductive", [True, False], ids=["transductive", "support+1"])
def test_adapted_logits_agree(transductive):
    l = reptile()
    state = carried_state(l, seed=4)
    batch = fake_episodes(torch.Generator().manual_seed(4), tasks=2, shot=2, query=2)
    schedule = minibatch_schedule([torch.Generator().manual_seed(4)] * 2, 10, 3, 4)
    xs, ys = minibatches(batch.support_x, batch.support_y, schedule)
    args = (l.params, batch.support_x, xs, ys, batch.query_x, l.inner, state, transductive, True)
    lv, lr = vectorized_reptile_logits(*args), reference_reptile_logits(*args)
    assert lv.shape == (5, 2, 10, 5)
    torch.testing.assert_close(lv, lr, rtol=1e-10, atol=1e-10)
    if not transductive:  # a query's logits depend on the support set's statistics, not on the other queries
        alone = vectorized_reptile_logits(l.params, batch.support_x, xs, ys, batch.query_x[:, :1], l.inner, state,
                                          False)
        torch.testing.assert_close(alone[:, 0], lv[-1, :, 0], rtol=1e-10, atol=1e-12)


def test_tf_adam_step():
    """TensorFlow's Adam: bias corrections fold into the step size and eps is added to the uncorrected sqrt(v)
    (tf.train.AdamOptimizer's documented update), not torch.optim.Adam's form."""
    g = torch.Generator().manual_seed(5)
    p = torch.randn(7, generator=g, dtype=torch.float64)
    grads = [1e-7 * torch.randn(7, generator=g, dtype=torch.float64) for _ in range(3)]
    settings = gradient.AdamSettings(beta1=0.5, beta2=0.99, eps=1e-8)
    state = {"step": torch.zeros((), dtype=torch.float64), "m": {"w": torch.zeros(7, dtype=torch.float64)},
             "v": {"w": torch.zeros(7, dtype=torch.float64)}}
    moving, m, v = {"w": p}, 0.0, 0.0
    want = p.clone()
    for t, gt in enumerate(grads, start=1):
        moving, state = gradient.adam_step(moving, {"w": gt}, state, settings, 0.01)
        m, v = 0.5 * m + 0.5 * gt, 0.99 * v + 0.01 * gt * gt
        want = want - 0.01 * (1 - 0.99 ** t) ** 0.5 / (1 - 0.5 ** t) * m / (v.sqrt() + 1e-8)
    torch.testing.assert_close(moving["w"], want, rtol=1e-12, atol=1e-15)
    torched = p.clone().requires_grad_()
    opt = torch.optim.Adam([torched], lr=0.01, betas=(0.5, 0.99), eps=1e-8)
    for gt in grads:
        torched.grad = gt.clone()
        opt.step()
    assert not torch.allclose(torched.detach(), want, rtol=1e-6, atol=0)  # eps placement matters for tiny grads


def test_minibatch_schedule_deals_without_replacement_across_reshuffles():
    s = minibatch_schedule([torch.Generator().manual_seed(6)] * 2, set_size=5, batch=3, steps=4)
    assert s.shape == (2, 4, 3)
    for row in s.flatten(1):  # 12 indices: two full shuffles, then the start of a third
        assert sorted(row[:5].tolist()) == sorted(row[5:10].tolist()) == list(range(5))
        assert len(set(row[10:].tolist())) == 2
    assert not torch.equal(s[0], s[1])


def test_vectorized_and_loop_learners_take_the_same_steps():
    a, b = reptile(vectorize=True), reptile(vectorize=False)
    assert a.implementation()["tasks"] == "vmap" and b.implementation()["tasks"] == "loop"
    g = torch.Generator().manual_seed(7)
    for _ in range(2):
        batch = fake_episodes(g, tasks=3, shot=2, query=1)
        ma, mb = a.meta_train_step(batch), b.meta_train_step(batch)
        torch.testing.assert_close(ma["loss"], mb["loss"], rtol=1e-10, atol=0)
    assert rel_error(a.params, b.params) <= RTOL64 and state_error(a.adam, b.adam) <= RTOL64
    test = fake_episodes(g, tasks=2, shot=1, query=2)
    torch.testing.assert_close(a.predict_steps(test.support_x, test.support_y, test.query_x),
                               b.predict_steps(test.support_x, test.support_y, test.query_x), rtol=1e-10, atol=1e-10)


def test_meta_step_anneals_linearly_to_the_final_value():
    """Over a 2-iteration run epsilon is 1 at the first iteration (the weights become the adapted mean), then 1/2."""
    l = reptile(iterations=2)
    batches = [fake_episodes(torch.Generator().manual_seed(8 + i), tasks=3, shot=2, query=1) for i in range(2)]
    gen = RunContext(way=5, shot=1, query=1, device=CPU, seed=2).generator("reptile-minibatches")
    for i, batch in enumerate(batches):
        schedule = minibatch_schedule([gen] * 3, 10, 4, 3)
        xs, ys = minibatches(batch.support_x, batch.support_y, schedule)
        before = {k: v.clone() for k, v in l.params.items()}
        adapted, _ = reference_reptile_tasks(before, xs, ys, l.inner, {k: v for k, v in l.adam.items()}, "merged")
        l.meta_train_step(batch)
        epsilon = 1.0 - i / 2
        want = {k: before[k] + epsilon * (adapted[k].mean(0) - before[k]) for k in before}
        assert rel_error(l.params, want) <= 1e-9
    assert float(l.iteration) == 2


def test_test_episodes_start_from_the_carried_state_and_leave_it():
    l = reptile(transductive=True)
    l.meta_train_step(fake_episodes(torch.Generator().manual_seed(9), tasks=3, shot=2, query=1))
    test = fake_episodes(torch.Generator().manual_seed(10), tasks=3, query=2)
    before = l.state_dict()
    together = l.predict(test.support_x, test.support_y, test.query_x)
    after = l.state_dict()
    assert all(torch.equal(before["adam"]["v"][k], after["adam"]["v"][k]) for k in before["adam"]["v"])
    # An episode's minibatches come from its own content: alone or in another order, the same logits.
    for t in range(3):
        alone = l.predict(test.support_x[t:t + 1], test.support_y[t:t + 1], test.query_x[t:t + 1])
        torch.testing.assert_close(alone[0], together[t], rtol=1e-10, atol=1e-12)
    # The carried second moments set the test-time step sizes.
    for v in l.adam["v"].values():
        v.mul_(4.0)
    assert not torch.allclose(l.predict(test.support_x, test.support_y, test.query_x), together)


@pytest.mark.gpu
def test_cuda_graph_iterations_equal_the_loop_float64():
    """Warm-up iterations, capture and replays (new minibatch schedules copied in) against the per-task loop."""
    config = dataclasses.replace(Reptile.default_config(5, 1), meta_batch_size=3, inner_steps=3, inner_batch=4)
    ctx = RunContext(way=5, shot=1, query=1, device=torch.device("cuda"), seed=2, iterations=20, train_shot=2)
    fast = Reptile(dataclasses.replace(config, vectorize=True, cuda_graph=True), ctx, dtype=torch.float64)
    plain = Reptile(dataclasses.replace(config, vectorize=False, cuda_graph=False), ctx, dtype=torch.float64)
    g = torch.Generator().manual_seed(13)
    for _ in range(fast._graph.warmup + 4):
        batch = fake_episodes(g, tasks=3, shot=2, query=1).to("cuda")
        torch.testing.assert_close(fast.meta_train_step(batch)["loss"], plain.meta_train_step(batch)["loss"],
                                   rtol=1e-10, atol=0)
    assert fast._graph.captured, fast._graph.disabled_reason
    assert rel_error(fast.params, plain.params) <= RTOL64 and state_error(fast.adam, plain.adam) <= RTOL64


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [True, False], ids=["graph", "eager"])
def test_a_training_step_does_not_synchronize_the_host(cuda_graph):
    """After warm-up (and capture), a meta-iteration queues its work and returns: the minibatch schedule,
    drawn on the host, goes to the device from pinned memory."""
    config = dataclasses.replace(Reptile.default_config(5, 1), meta_batch_size=3, inner_steps=3, inner_batch=4,
                                 cuda_graph=cuda_graph)
    ctx = RunContext(way=5, shot=1, query=1, device=torch.device("cuda"), seed=2, iterations=20, train_shot=2)
    fast = Reptile(config, ctx)
    g = torch.Generator().manual_seed(15)
    batches = [fake_episodes(g, tasks=3, shot=2, query=1, dtype=torch.float32).to("cuda") for _ in range(6)]
    metrics = last_step_without_host_sync(fast, batches)
    assert metrics["loss"].is_cuda and (fast._graph is None or fast._graph.captured)


def test_switches_and_defaults():
    with pytest.raises(ConfigError, match="vectorize=false"):
        reptile(adam_carry="chained", vectorize=True)
    assert reptile(adam_carry="chained").implementation()["tasks"] == "loop"
    # On CUDA the loop is not graphed by default (it reads Adam's step count on the host), and asking for a
    # graph of it is refused before anything is put on the device.
    cuda = RunContext(way=5, shot=1, query=1, device=torch.device("cuda"), seed=2)
    with pytest.raises(ConfigError, match="reads the inner Adam's step count on the host"):
        Reptile(dataclasses.replace(Reptile.default_config(5, 1), adam_carry="chained", cuda_graph=True), cuda)
    five, twenty = Reptile.default_config(5, 1), Reptile.default_config(20, 5)
    assert (five.inner_lr, five.inner_steps, five.inner_batch, five.test_inner_steps, five.test_inner_batch) == (
        1e-3, 5, 10, 50, 5)
    assert (twenty.inner_lr, twenty.inner_steps, twenty.inner_batch, twenty.test_inner_steps, twenty.test_inner_batch) == (
        5e-4, 10, 20, 50, 10)
    assert (five.meta_step, five.meta_step_final, five.meta_batch_size, five.adam_beta1, five.inner_loss) == (
        1.0, 0.0, 5, 0.0, "sum")
    l = reptile()
    assert l.params["head.weight"].shape == (5, 256)  # the flattened 2x2x64 map
    assert l.describe()["inner optimizer"] == "Adam (beta1 0), state kept across tasks"


@pytest.mark.parametrize("paper, transductive", [(NICHOL2018, True), (NICHOL2018_NT, False)], ids=lambda p: getattr(p, "name", ""))
def test_presets_follow_the_released_commands(paper, transductive):
    from benchmark.harness.plan import resolve_config
    from benchmark.harness.settings import RunSettings

    for way, shot in paper.cells:
        preset = paper.preset_for(way, shot)
        s = preset.settings
        RunSettings(way=way, shot=shot, **s).check()
        assert (s["query"], s["train_shot"], s["episodes"], s["select"]) == (1, 10, 10000, "last")
        assert s["iterations"] == (100000 if way == 5 else 200000)
        config = resolve_config(Reptile, way, shot, preset.learners["reptile"], {}, (), paper.name)
        assert config.transductive is transductive and config.inner_batch == (10 if way == 5 else 20)
    assert all(not a.verified and "95%" not in a.ci_kind for a in paper.anchors)
    assert paper.anchor("reptile", 5, 1).mean == (97.68 if transductive else 95.39)
