"""The fine-tune baseline's test-time randomness belongs to each episode, not to the batch it comes in."""

from __future__ import annotations

import dataclasses

import torch

from benchmark.learner import RunContext
from benchmark.testing import fake_episode_batch
from plugins.finetune import Finetune


def test_an_episode_is_predicted_the_same_alone_or_in_a_batch():
    ctx = RunContext(way=5, shot=1, query=3, device=torch.device("cpu"), seed=3, num_train_classes=10)
    config = dataclasses.replace(Finetune.default_config(5, 1), head_epochs=20)
    learner = Finetune(config, ctx)
    batch = fake_episode_batch(5, 1, 3, 4, seed=7)
    together = learner.predict(batch.support_x, batch.support_y, batch.query_x)
    for t in range(4):
        one = batch.tasks(t, t + 1)
        alone = learner.predict(one.support_x, one.support_y, one.query_x)
        torch.testing.assert_close(alone[0], together[t], rtol=1e-4, atol=1e-4)
    # Reversing the batch order changes nothing either.
    reverse = torch.arange(3, -1, -1)
    flipped = learner.predict(batch.support_x[reverse], batch.support_y[reverse], batch.query_x[reverse])
    torch.testing.assert_close(flipped[reverse], together, rtol=1e-4, atol=1e-4)
    # And different episodes get different head initialisations (the seeds come from their content).
    from plugins.finetune import episode_generators

    gens = episode_generators(ctx.generator, batch.support_x, batch.support_y)
    firsts = {torch.rand(1, generator=g).item() for g in gens}
    assert len(firsts) == 4


def test_running_batch_norm_is_inductive_and_keeps_the_contract():
    """bn=running (Chen et al.'s test-time batch norm): statistics tracked while pre-training, used at test,
    so a query image's features do not depend on the other images of its episode."""
    from benchmark.testing import check_learner

    config = dataclasses.replace(Finetune.default_config(5, 1), bn="running", network="maxpool", conv_init="he",
                                 head_epochs=2, batch_size=16)
    check_learner(Finetune, config=config)
    ctx = RunContext(5, 1, 3, torch.device("cpu"), seed=0, num_train_classes=10)
    learner = Finetune(config, ctx)
    from benchmark.testing import fake_labeled_batch

    before = {k: v.clone() for k, v in learner.running.items()}
    learner.meta_train_step(fake_labeled_batch(16, 10, seed=1))
    assert not torch.equal(before["bn1.running_mean"], learner.running["bn1.running_mean"])  # tracked
    batch = fake_episode_batch(5, 1, 3, tasks=1, seed=4)
    support_f, query_f = learner.features(batch.support_x, batch.query_x)
    other = batch.query_x.clone()
    other[:, 1:] = 1.0 - other[:, 1:]  # change every query image but the first
    _, query_f2 = learner.features(batch.support_x, other)
    torch.testing.assert_close(query_f[:, 0], query_f2[:, 0])
    assert learner.describe()["batch norm"] == "inductive (running statistics)"
    assert learner.describe()["embedding"] == "conv4, max-pool"


def test_chen2019_preset_is_their_protocol():
    from benchmark.harness.plan import resolve_config
    from plugins.finetune import CHEN2019

    preset = CHEN2019.preset_for(5, 1)
    assert preset.settings["select"] == "last" and preset.settings["query"] == 15
    assert preset.settings["iterations"] == 5 * 4112 * 20 // 16
    config = resolve_config(Finetune, 5, 1, preset.learners["finetune"], {}, (), "chen2019")
    assert (config.network, config.bn, config.conv_init, config.batch_size) == ("maxpool", "running", "he", 16)
