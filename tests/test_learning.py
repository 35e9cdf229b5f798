"""End-to-end learning on the real Omniglot (vinyals protocol, 5-way 1-shot, 100 test episodes, seed 0).

Budgets are cut to fit a few minutes on 2 CPU cores per learner: smaller meta-batches, a
larger meta learning rate and 5 training queries per class (tests still use 15). Thresholds leave a margin
below what each learner reaches (the README's "learning tests" table has the measured numbers); chance is
20%.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

WAY, SHOT, TEST_QUERY, TRAIN_QUERY = 5, 1, 15, 5


@pytest.fixture(scope="module")
def pools(omniglot):
    from benchmark.harness.protocol import ClassPool, EpisodeSpec, Manifest, get_protocol

    protocol = get_protocol("vinyals")
    train, test = ClassPool(omniglot, protocol, "train"), ClassPool(omniglot, protocol, "test")
    manifest = Manifest.build(test, EpisodeSpec(WAY, SHOT, TEST_QUERY), seed=0, episodes=100)
    return train, test, manifest


def train_and_score(learner_cls, pools, steps: int, *, train_shot: int | None = None,
                    **overrides) -> tuple[float, float, float]:
    """(test accuracy, training seconds, evaluation seconds); ``train_shot``: support drawings per class of the
    training episodes (default: the test cell's)."""
    from benchmark.harness.protocol import EpisodeSpec, draw, make_sampler
    from benchmark.learner import RunContext

    train, test, manifest = pools
    ctx = RunContext(WAY, SHOT, TEST_QUERY, torch.device("cpu"), seed=0, num_train_classes=train.num_classes,
                     iterations=steps, train_shot=train_shot, train_query=TRAIN_QUERY)
    learner = learner_cls(dataclasses.replace(learner_cls.default_config(WAY, SHOT), **overrides), ctx)
    phases = list(learner.training())
    spec = EpisodeSpec(WAY, ctx.train_shot, TRAIN_QUERY)
    samplers = [make_sampler(p, train, spec, seed=0, index=i) for i, p in enumerate(phases)]
    bounds = [sum(p.iterations or steps for p in phases[: i + 1]) for i in range(len(phases))]
    start = time.perf_counter()
    for step in range(steps):
        index = next(i for i, end in enumerate(bounds) if step < end or i == len(bounds) - 1)
        learner.meta_train_step(draw(samplers[index], phases[index]))
    train_s = time.perf_counter() - start
    start, correct = time.perf_counter(), []
    for _, batch in manifest.batches(test, learner.eval_batch_size):
        logits = learner.predict(batch.support_x, batch.support_y, batch.query_x)
        correct.append((logits.argmax(dim=-1) == batch.query_y).float().mean(dim=1))
    return torch.cat(correct).mean().item(), train_s, time.perf_counter() - start


def _report(record_property, name, steps, acc, train_s, eval_s):
    record_property(f"{name}_accuracy", round(acc, 4))
    record_property(f"{name}_train_seconds", round(train_s, 1))
    print(f"\n{name}: {steps} steps, accuracy {acc:.2%} on 100 episodes, train {train_s:.1f} s, eval {eval_s:.1f} s")


@pytest.mark.parametrize(
    "name, steps, threshold, overrides",
    [
        # Glorot's head for the MAML family's short runs: the reference code's N(0, 1) head (the default) needs
        # thousands of outer steps to shrink before the inner step's logits move (59% at 600 steps). First order
        # with the reference's inner step (2.0 on the mean loss) learns more slowly in 200 steps.
        ("maml", 300, 0.75, {"meta_batch_size": 8, "meta_lr": 3e-3, "head_init": "xavier"}),
        ("fomaml", 200, 0.50, {"meta_batch_size": 8, "meta_lr": 3e-3, "head_init": "xavier"}),
        ("finetune", 1000, 0.60, {}),
        # The metric learners with their paper defaults (one episode per step, Adam 1e-3).
        ("protonet", 300, 0.70, {}),
        ("matchingnet", 500, 0.58, {}),
        ("relationnet", 300, 0.65, {}),
        # Glorot's head: with the reference code's N(0, 1) head the head-only inner step barely moves the logits
        # until the outer loop has shrunk the head, which takes longer than this run (54% after 500 steps).
        ("anil", 300, 0.65, {"meta_batch_size": 8, "meta_lr": 3e-3, "head_init": "xavier"}),
        ("metasgd", 150, 0.55, {"meta_batch_size": 8, "meta_lr": 3e-3}),
        # Two inner steps instead of five: a MAML++ step (full-resolution max-pool network, second order through
        # every step) is the most expensive here.
        ("mamlpp", 100, 0.50, {"meta_batch_size": 2, "inner_steps": 2, "test_inner_steps": 2, "meta_lr": 3e-3,
                               "iterations_per_epoch": 10}),
        # The released protocol's 10 training shots; transductive test, a larger inner Adam step for the short run.
        ("reptile", 120, 0.55, {"train_shot": 10, "transductive": True, "inner_lr": 3e-3}),
    ],
)
def test_learner_learns(pools, record_property, name, steps, threshold, overrides):
    from plugins.anil import ANIL
    from plugins.finetune import Finetune
    from plugins.maml import FOMAML, MAML
    from plugins.mamlpp import MAMLPP
    from plugins.matchingnet import MatchingNet
    from plugins.metasgd import MetaSGD
    from plugins.protonet import ProtoNet
    from plugins.relationnet import RelationNet
    from plugins.reptile import Reptile

    learner_cls = {"maml": MAML, "fomaml": FOMAML, "finetune": Finetune, "protonet": ProtoNet,
                   "matchingnet": MatchingNet, "relationnet": RelationNet, "anil": ANIL, "metasgd": MetaSGD,
                   "mamlpp": MAMLPP, "reptile": Reptile}[name]
    acc, train_s, eval_s = train_and_score(learner_cls, pools, steps, **overrides)
    _report(record_property, name, steps, acc, train_s, eval_s)
    assert acc >= threshold
