"""The learner contract (``benchmark.testing.check_learner``) over every installed learner, and proof that it
catches each kind of broken learner."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
import torch

from benchmark.errors import PluginError
from benchmark.learner import Episodes, Learner, Minibatches
from benchmark.testing import check_learner, fake_episode_batch, fake_labeled_batch


def _installed_learner_names() -> list[str]:
    from benchmark.harness.plugins import load_registry

    try:
        return load_registry().names()
    except PluginError:  # test_plugins.py reports plugin errors; here there is simply nothing to check
        return []


_INSTALLED = _installed_learner_names()


@pytest.mark.parametrize(
    "name", _INSTALLED or [pytest.param(None, marks=pytest.mark.skip(reason="no learners installed"))]
)
def test_installed_learner_keeps_the_contract(name):
    from benchmark.harness.plugins import load_registry

    learner_cls = load_registry().get(name)
    result = check_learner(learner_cls, way=3, shot=1, query=2, steps=2)
    assert result["logits_shape"] == (2, 6, 3)


# -- a correct learner, and broken variants of it -----------------------------------------------------------
class NearestMean(Learner):
    """Nearest class mean on raw pixels, with a trained logit scale (so there is state to save)."""

    name = "test-nearest-mean"

    @dataclass(frozen=True)
    class Config:
        lr: float = field(default=0.1, metadata={"help": "learning rate of the logit scale"})

    def __init__(self, config, context):
        super().__init__(config, context)
        self.scale = torch.ones((), device=context.device)

    def training(self):
        return [Episodes(tasks=1)]

    def _logits(self, support_x, support_y, query_x):
        way = self.context.way
        onehot = torch.nn.functional.one_hot(support_y, way).to(support_x.dtype)  # [T, N*K, N]
        flat_s = support_x.flatten(2)  # [T, N*K, D]
        means = onehot.transpose(1, 2) @ flat_s / onehot.sum(1).unsqueeze(-1)  # [T, N, D]
        return -self.scale * torch.cdist(query_x.flatten(2), means).pow(2)  # [T, N*Q, N]

    def meta_train_step(self, batch):
        loss = torch.nn.functional.cross_entropy(
            self._logits(batch.support_x, batch.support_y, batch.query_x).flatten(0, 1), batch.query_y.flatten()
        )
        self.scale = self.scale * (1 - self.config.lr)  # a deterministic "update"
        return {"loss": loss, "steps": 1}

    def predict(self, support_x, support_y, query_x):
        return self._logits(support_x, support_y, query_x)

    def state_dict(self):
        return {"scale": self.scale.clone()}

    def load_state_dict(self, state):
        self.scale = state["scale"].to(self.context.device)


def test_a_correct_learner_passes():
    result = check_learner(NearestMean)
    assert result["logits_shape"] == (2, 10, 5)
    assert len(result["metrics"]) == 2 and result["metrics"][0]["steps"] == 1.0


class MutatesParams(NearestMean):
    def predict(self, support_x, support_y, query_x):
        self.scale.add_(1.0)  # adapts the meta-parameter itself instead of a copy
        return super().predict(support_x, support_y, query_x)


class WrongShape(NearestMean):
    def predict(self, support_x, support_y, query_x):
        return super().predict(support_x, support_y, query_x).flatten(0, 1)


class NanMetric(NearestMean):
    def meta_train_step(self, batch):
        return {"loss": torch.tensor(float("nan"))}


class VectorMetric(NearestMean):
    def meta_train_step(self, batch):
        return {"loss": torch.zeros(3)}


class GlobalRng(NearestMean):
    def predict(self, support_x, support_y, query_x):
        # The bug the contract must catch: noise from the global generator, not context.generator(...).
        return super().predict(support_x, support_y, query_x) + torch.rand(())


class PickledConfig(NearestMean):
    def state_dict(self):
        return {"scale": self.scale.clone(), "config": self.config}  # a dataclass object, not plain values


class ForgetsState(NearestMean):
    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class MutatesInput(NearestMean):
    def predict(self, support_x, support_y, query_x):
        query_x.mul_(2.0)
        return super().predict(support_x, support_y, query_x)


class NotFrozen(NearestMean):
    @dataclass
    class Config:
        lr: float = 0.1


class Nameless(NearestMean):
    name = ""


class NoTraining(NearestMean):
    training = Learner.training


class NoHelp(NearestMean):
    @dataclass(frozen=True)
    class Config:
        lr: float = 0.1


class BatchNormInTrainMode(NearestMean):
    """Predicts through a BatchNorm layer left in training mode: its running statistics move."""

    def __init__(self, config, context):
        super().__init__(config, context)
        self.norm = torch.nn.BatchNorm1d(784)

    def predict(self, support_x, support_y, query_x):
        self.norm(query_x.flatten(0, 1).flatten(1))
        return super().predict(support_x, support_y, query_x)


@pytest.mark.parametrize(
    ("learner_cls", "match"),
    [
        (MutatesParams, r"predict changed meta-parameters \['scale'\]"),
        (WrongShape, r"logits of shape \(20, 5\), expected \[T, N\*Q, N\] = \[2, 10, 5\]"),
        (NanMetric, r"metric 'loss' of meta_train_step 0 is not finite"),
        (VectorMetric, r"metric 'loss' of meta_train_step 0 has shape \(3,\)"),
        (GlobalRng, r"predict gives different logits for two learners trained with the same seed"),
        (PickledConfig, r"cannot be loaded with torch.load\(weights_only=True\)"),
        (ForgetsState, r"a fresh learner that loaded state_dict\(\) predicts different logits"),
        (MutatesInput, r"predict modified its input query_x in place"),
        (NotFrozen, r"Config must be frozen"),
        (Nameless, r"has no `name`"),
        (NoTraining, r"does not define training"),
        (NoHelp, r"Config field 'lr' has no help line"),
        (BatchNormInTrainMode, r"predict changed the buffer 'norm.running_mean'"),
        (object, r"not a subclass of benchmark.learner.Learner"),
    ],
)
def test_the_contract_catches_a_broken_learner(learner_cls, match):
    with pytest.raises(AssertionError, match=match):
        check_learner(learner_cls)


def test_config_of_the_wrong_class_is_rejected():
    @dataclass(frozen=True)
    class Other:
        lr: float = 0.1

    with pytest.raises(AssertionError, match=r"expected an instance of NearestMean.Config"):
        check_learner(NearestMean, config=Other())


# -- fake data ----------------------------------------------------------------------------------------------
def test_fake_episode_batch_layout():
    batch = fake_episode_batch(way=4, shot=2, query=3, tasks=6, seed=1)
    assert batch.support_x.shape == (6, 8, 1, 28, 28) and batch.query_x.shape == (6, 12, 1, 28, 28)
    assert batch.support_x.dtype == torch.float32 and batch.support_y.dtype == torch.int64
    assert set(batch.support_x.unique().tolist()) <= {0.0, 1.0}
    for t in range(6):
        blocks = batch.support_y[t].view(4, 2)
        assert (blocks == blocks[:, :1]).all()  # grouped by class
        assert sorted(blocks[:, 0].tolist()) == [0, 1, 2, 3]  # every label once
        assert torch.equal(batch.query_y[t].view(4, 3)[:, 0], blocks[:, 0])  # same classes in the query set
    # Label order is shuffled per task, so a learner cannot assume support_y == [0, 0, 1, 1, ...].
    assert any(batch.support_y[t].view(4, 2)[:, 0].tolist() != [0, 1, 2, 3] for t in range(6))
    # Drawings of one class are closer to each other than to other classes' (nearest mean can learn).
    logits = NearestMean(NearestMean.Config(), _context(4, 2, 3)).predict(batch.support_x, batch.support_y, batch.query_x)
    accuracy = (logits.argmax(-1) == batch.query_y).float().mean().item()
    assert accuracy > 0.9


def test_fake_batches_are_seeded():
    a, b, c = (fake_episode_batch(seed=s) for s in (0, 0, 1))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)
    assert not torch.equal(a.support_x, c.support_x)
    minibatch = fake_labeled_batch(batch_size=12, num_classes=7, seed=3)
    assert minibatch.x.shape == (12, 1, 28, 28) and minibatch.y.shape == (12,) and minibatch.num_classes == 7
    assert int(minibatch.y.max()) < 7
    assert torch.equal(minibatch.x, fake_labeled_batch(batch_size=12, num_classes=7, seed=3).x)


def test_minibatch_learner_gets_labeled_batches():
    seen = []

    class Pretrain(NearestMean):
        def training(self):
            return [Minibatches(images=64)]

        def meta_train_step(self, batch):
            seen.append(batch)
            return {}

    check_learner(Pretrain, num_train_classes=9)
    assert seen and all(b.num_classes == 9 and b.x.shape == (20, 1, 28, 28) for b in seen)


def _context(way, shot, query):
    from benchmark.learner import RunContext

    return RunContext(way, shot, query, torch.device("cpu"))


def test_check_learner_passes_dataclasses_untouched():
    config = NearestMean.Config(lr=0.5)
    check_learner(NearestMean, config=config)
    assert dataclasses.asdict(config) == {"lr": 0.5}
