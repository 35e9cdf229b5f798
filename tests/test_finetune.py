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
