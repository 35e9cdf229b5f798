"""Prototypical, Matching and Relation Networks: the batched learners against a plain per-episode loop of
torch.nn modules, their batch-norm modes, and their learning-rate schedule.

The reference below is written independently of ``plugins.metric``: native ``nn.Conv2d``/``nn.BatchNorm2d``
modules (``as_modules``), one episode per forward, classes found by boolean masks, pairs built in Python
loops, ``torch.optim.Adam`` with one parameter group per module and ``clip_grad_norm_`` per module.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmark.learner import RunContext
from benchmark.testing import fake_episode_batch
from benchmark.toolkit.convblocks import as_modules
from plugins.matchingnet import MatchingNet
from plugins.metric import EMBEDDING, learning_rate
from plugins.protonet import ProtoNet
from plugins.relationnet import RELATION_BLOCKS, RELATION_DIM, RelationNet
from plugins.relationnet import EMBEDDING as RN_EMBEDDING

LEARNERS = {"protonet": ProtoNet, "matchingnet": MatchingNet, "relationnet": RelationNet}


def _context(way=5, shot=2, query=3, **kw) -> RunContext:
    return RunContext(way, shot, query, torch.device("cpu"), seed=3, **kw)


# -- the plain reference -----------------------------------------------------------------------------------
class Reference:
    """One learner's network as nn modules, trained one episode at a time."""

    def __init__(self, learner) -> None:
        self.name = learner.name
        self.config = learner.config
        p, b = learner.params, learner.buffers
        blocks = RN_EMBEDDING if self.name == "relationnet" else EMBEDDING
        self.encoder = as_modules(blocks, p, b, prefix="encoder.block")
        modules = [self.encoder]
        if self.name == "relationnet":
            self.relation = as_modules(RELATION_BLOCKS, p, b, prefix="relation.block")
            self.fc1, self.fc2 = nn.Linear(64, RELATION_DIM), nn.Linear(RELATION_DIM, 1)
            for name, fc in (("fc1", self.fc1), ("fc2", self.fc2)):
                fc.to(p[f"relation.{name}.weight"].dtype)
                with torch.no_grad():
                    fc.weight.copy_(p[f"relation.{name}.weight"])
                    fc.bias.copy_(p[f"relation.{name}.bias"])
            modules.append(nn.ModuleList([self.relation, self.fc1, self.fc2]))
        self.modules = modules
        self.optimizer = torch.optim.Adam([{"params": list(m.parameters())} for m in modules], lr=self.config.lr)
        self.steps = 0

    def train(self, mode: bool) -> None:
        for m in self.modules:
            m.train(mode)

    def episode_scores(self, sx, sy, qx, way):
        """Scores [M, N] of one episode."""
        classes = range(way)
        if self.name == "relationnet":
            raise AssertionError("relationnet episodes are scored by relation_scores")
        f = self.encoder(torch.cat([sx, qx])).flatten(1)
        fs, fq = f[: len(sx)], f[len(sx):]
        if self.name == "protonet":
            protos = torch.stack([fs[sy == c].mean(0) for c in classes])
            return -((fq[:, None, :] - protos[None]) ** 2).sum(-1)
        cos = F.cosine_similarity(fq[:, None, :], fs[None, :, :], dim=-1, eps=1e-300)
        attention = torch.softmax(self.config.scale * cos, dim=-1)
        return torch.stack([attention[:, sy == c].sum(-1) for c in classes], dim=-1).log()

    def relation_scores(self, sx, sy, qx, way):
        """Scores [T, M, N] of T episodes: the T support passes, then the T query passes, then the pairs."""
        support = [self.encoder(s) for s in sx]
        query = [self.encoder(q) for q in qx]
        out = []
        for fs, y, fq in zip(support, sy, query):
            sums = [fs[y == c].sum(0) for c in range(way)]
            pairs = torch.stack([torch.cat([sums[c], q]) for q in fq for c in range(way)])
            r = self.relation(pairs).flatten(1)
            out.append(self.fc2(F.relu(self.fc1(r))).view(len(fq), way))
        return torch.stack(out)

    def scores(self, sx, sy, qx, way):
        if self.name == "relationnet":
            return self.relation_scores(sx, sy, qx, way)
        return torch.stack([self.episode_scores(s, y, q, way) for s, y, q in zip(sx, sy, qx)])

    def loss(self, scores, qy):
        per_episode = []
        for s, y in zip(scores, qy):
            if self.name == "protonet":
                per_episode.append(F.cross_entropy(s, y))
            elif self.name == "matchingnet":
                per_episode.append(F.nll_loss(s, y))
            else:
                per_episode.append(F.mse_loss(torch.sigmoid(s), F.one_hot(y, s.shape[-1]).to(s.dtype)))
        return torch.stack(per_episode).mean()

    def step(self, batch):
        self.train(True)
        lr = self.config.lr * self.config.lr_decay ** (self.steps // self.config.lr_decay_every)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.loss(self.scores(batch.support_x, batch.support_y, batch.query_x, batch.way), batch.query_y)
        self.optimizer.zero_grad()
        loss.backward()
        if self.config.grad_clip is not None:
            for m in self.modules:
                nn.utils.clip_grad_norm_(list(m.parameters()), self.config.grad_clip)
        self.optimizer.step()
        self.steps += 1
        return loss.detach()

    def state(self) -> dict[str, torch.Tensor]:
        """Parameters and running statistics under the learner's names."""
        out = {}
        stacks = [("encoder.block", self.encoder)] + ([("relation.block", self.relation)] if self.name == "relationnet" else [])
        for prefix, seq in stacks:
            convs = [m for m in seq if isinstance(m, nn.Conv2d)]
            bns = [m for m in seq if isinstance(m, nn.BatchNorm2d)]
            for i, (conv, bn) in enumerate(zip(convs, bns), start=1):
                out.update({f"{prefix}{i}.conv.weight": conv.weight, f"{prefix}{i}.conv.bias": conv.bias,
                            f"{prefix}{i}.bn.weight": bn.weight, f"{prefix}{i}.bn.bias": bn.bias,
                            f"{prefix}{i}.bn.running_mean": bn.running_mean, f"{prefix}{i}.bn.running_var": bn.running_var})
        if self.name == "relationnet":
            for name, fc in (("fc1", self.fc1), ("fc2", self.fc2)):
                out[f"relation.{name}.weight"], out[f"relation.{name}.bias"] = fc.weight, fc.bias
        return {k: v.detach() for k, v in out.items()}


def _config(name, **changes):
    cls = LEARNERS[name]
    # A short schedule and, for every learner, clipping: both paths of the step are exercised.
    base = {"lr_decay_every": 1, "lr_decay": 0.5, "grad_clip": 0.5, "tasks": 3}
    return dataclasses.replace(cls.default_config(5, 2), **{**base, **changes})


# -- equivalence -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_batched_training_equals_a_per_episode_loop_in_float64(name):
    """Two steps of three episodes each: losses, parameters, running statistics and predictions agree."""
    cls = LEARNERS[name]
    learner = cls(_config(name), _context(), dtype=torch.float64)
    reference = Reference(learner)
    for step in range(2):
        batch = fake_episode_batch(5, 2, 3, tasks=3, seed=10 + step).to("cpu", torch.float64)
        ours = learner.meta_train_step(batch)["loss"]
        theirs = reference.step(batch)
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    state = {**learner.params, **learner.buffers}
    expected = reference.state()
    assert state.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(state[key].detach(), expected[key], rtol=1e-9, atol=1e-11, msg=key)

    test = fake_episode_batch(5, 2, 3, tasks=2, seed=99).to("cpu", torch.float64)
    reference.train(name == "relationnet")  # relationnet's default test batch norm is transductive
    with torch.no_grad():
        want = reference.scores(test.support_x, test.support_y, test.query_x, 5)
    got = learner.predict(test.support_x, test.support_y, test.query_x)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_float32_predictions_match_float64_closely(name):
    """The shipped dtype: logits within 1e-4 (relative to their largest) of a float64 twin with the same weights."""
    cls = LEARNERS[name]
    learner = cls(_config(name, tasks=1), _context())
    learner.meta_train_step(fake_episode_batch(5, 2, 3, tasks=1, seed=5))
    twin = cls(_config(name, tasks=1), _context(), dtype=torch.float64)
    twin.load_state_dict(learner.state_dict())  # the float32 weights and statistics, widened
    test = fake_episode_batch(5, 2, 3, tasks=3, seed=6)
    got = learner.predict(test.support_x, test.support_y, test.query_x)
    want = twin.predict(test.support_x, test.support_y, test.query_x)
    scale = want.abs().max().item()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * scale)


# -- batch norm at test ------------------------------------------------------------------------------------
def _other_queries_changed(learner) -> bool:
    """Whether query 0's logits change when the episode's other queries change (transductive batch norm)."""
    test = fake_episode_batch(5, 1, 3, tasks=1, seed=7)
    first = learner.predict(test.support_x, test.support_y, test.query_x)[0, 0]
    other = test.query_x.clone()
    other[:, 1:] = fake_episode_batch(5, 1, 3, tasks=1, seed=8).query_x[:, 1:]
    second = learner.predict(test.support_x, test.support_y, other)[0, 0]
    return not torch.allclose(first, second, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("name", "overrides", "transductive"), [
    ("protonet", {}, False), ("matchingnet", {}, False),
    ("relationnet", {}, True), ("relationnet", {"bn": "running"}, False),
])
def test_test_time_batch_norm_mode(name, overrides, transductive):
    cls = LEARNERS[name]
    learner = cls(dataclasses.replace(cls.default_config(5, 1), **overrides), _context(5, 1, 3))
    for seed in range(3):  # move the running statistics away from their init
        learner.meta_train_step(fake_episode_batch(5, 1, 3, tasks=1, seed=seed))
    assert _other_queries_changed(learner) is transductive
    assert ("non-transductive" not in learner.describe()["batch norm"]) is transductive


def test_predict_does_not_depend_on_the_batch_it_is_in():
    """Running-statistics batch norm: an episode scores the same alone or beside others."""
    learner = ProtoNet(ProtoNet.Config(), _context(5, 1, 3))
    learner.meta_train_step(fake_episode_batch(5, 1, 3, tasks=1, seed=0))
    test = fake_episode_batch(5, 1, 3, tasks=4, seed=1)
    together = learner.predict(test.support_x, test.support_y, test.query_x)
    alone = learner.predict(test.support_x[2:3], test.support_y[2:3], test.query_x[2:3])
    torch.testing.assert_close(together[2:3], alone, rtol=1e-5, atol=1e-5)


# -- the schedule --------------------------------------------------------------------------------------------
def test_learning_rate_halves_on_schedule_and_resumes_from_the_counter():
    config = ProtoNet.Config()
    assert [learning_rate(config, i) for i in (0, 1999, 2000, 3999, 4000)] == [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4]
    assert learning_rate(RelationNet.Config(), 99_999) == 1e-3 and learning_rate(RelationNet.Config(), 100_000) == 5e-4
    learner = ProtoNet(dataclasses.replace(config, lr_decay_every=2), _context(5, 1, 3))
    for seed in range(3):
        learner.meta_train_step(fake_episode_batch(5, 1, 3, tasks=1, seed=seed))
    assert learner.state_dict()["iteration"] == 3
    resumed = ProtoNet(dataclasses.replace(config, lr_decay_every=2), _context(5, 1, 3))
    resumed.load_state_dict(learner.state_dict())
    resumed.meta_train_step(fake_episode_batch(5, 1, 3, tasks=1, seed=3))
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4) and resumed.iteration == 4


def test_training_way_may_differ_from_the_test_way():
    """The Prototypical Networks protocol: 60-way (here 7-way) training, 5-way testing."""
    learner = ProtoNet(ProtoNet.Config(), _context(5, 1, 3, train_way=7, train_query=2))
    metrics = learner.meta_train_step(fake_episode_batch(7, 1, 2, tasks=1, seed=0))
    assert torch.isfinite(metrics["loss"])
    test = fake_episode_batch(5, 1, 3, tasks=2, seed=1)
    assert learner.predict(test.support_x, test.support_y, test.query_x).shape == (2, 15, 5)
