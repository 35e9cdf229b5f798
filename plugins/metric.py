"""What the metric learners share: episodic training of a network of parameter dicts with Adam, a step
learning-rate schedule, per-module gradient clipping, running batch-norm statistics; class sums of
support embeddings; and the conv4 max-pool embedding of Prototypical and Matching Networks.

Prototypical, Matching and Relation Networks (``plugins.protonet``, ``plugins.matchingnet``,
``plugins.relationnet``) subclass ``MetricLearner`` and say only how an episode is scored
(``scores``) and what the loss of those scores is (``loss``); the two on the conv4 embedding subclass
``EmbeddingLearner`` and say only how query embeddings compare with support embeddings (``compare``).

Everything runs on T episodes at once (``[T, ...]`` tensors): one forward of the network per call, batch
norm per episode (``benchmark.toolkit.convblocks``). The papers train on one episode per step, the default
(``tasks=1``); with more, each episode is still normalised with its own statistics and the running
statistics are updated as if the episodes had been seen one after another, but the gradient step is one
step on the mean loss, which the papers never did.

State (``state_dict``): parameters, running statistics, Adam's moments and the iteration counter that drives
the learning-rate schedule, so a resumed run continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from benchmark.config import option
from benchmark.episodes import EpisodeBatch
from benchmark.learner import Episodes, Learner, RunContext
from benchmark.papers import Anchor, Quick
from benchmark.toolkit.conv4 import load_training_state, training_state
from benchmark.toolkit.convblocks import Params, blocks_forward, conv4_pool, init_blocks


#: The test cells of the papers' Omniglot tables, in their column order.
OMNIGLOT_CELLS = ((5, 1), (5, 5), (20, 1), (20, 5))

#: The metric papers' ``--quick`` CPU protocol (a paper adds its own training-episode settings on top).
METRIC_QUICK = Quick(cells=((5, 1),), settings={"iterations": 300, "val_every": 100, "val_episodes": 50,
                                               "checkpoint_every": 100, "episodes": 200},
                     description="300 iterations, validation every 100 on 50 episodes, 200 test episodes")


def table_anchors(learner: str, means: tuple[float, ...], cis: tuple[float | None, ...], ci_kind: str, source: str,
                  verified: bool, protocol: str = "") -> tuple[Anchor, ...]:
    """One published number per cell of ``OMNIGLOT_CELLS`` (``means`` and ``cis`` in that order); ``protocol``:
    see :class:`benchmark.papers.Anchor` (set, the numbers are shown but never judged against ours)."""
    return tuple(Anchor(learner, way, shot, mean, ci, ci_kind, source, verified=verified, protocol=protocol)
                 for (way, shot), mean, ci in zip(OMNIGLOT_CELLS, means, cis, strict=True))


@dataclass(frozen=True)
class MetricConfig:
    """Training knobs every metric learner has (a learner's Config subclasses this with its paper's values)."""

    lr: float = option(1e-3, "Adam learning rate at the start", min=0, min_inclusive=False, max=1.0)
    lr_decay_every: int = option(2000, "multiply the learning rate by lr_decay every this many training steps",
                                 min=1)
    lr_decay: float = option(0.5, "learning-rate factor applied every lr_decay_every steps", min=0,
                             min_inclusive=False, max=1.0)
    grad_clip: float | None = option(None, "clip each module's gradient norm to this (none: no clipping)", min=0,
                                     min_inclusive=False)
    tasks: int = option(1, "episodes per training step (the papers: 1; each episode is batch-normalised on its own)",
                        min=1, max=10_000)
    eval_batch_size: int = option(10, "test episodes scored at once in predict (the first conv map of an image is "
                                      "64x28x28 floats)", min=1, max=10_000)


#: Four pooled blocks, padding 1, 64 filters (PN-code ``protonets/models/few_shot.py:68-82``).
EMBEDDING = conv4_pool()


def embed(params: Params, buffers: Params, x: torch.Tensor, training: bool) -> tuple[torch.Tensor, Params]:
    """The conv4 embedding of T episodes' images: x [T, B, 1, 28, 28] -> ([T, B, 64], buffers).

    Batch statistics (and updated running statistics) when ``training``, else the running statistics.
    """
    maps, buffers = blocks_forward(EMBEDDING, params, buffers, x, prefix="encoder.block", batch_stats=training)
    return maps.flatten(2), buffers


def init_embedding(generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> tuple[Params, Params]:
    """The conv4 embedding with PyTorch's default initialisation (what PN-code gets: it sets none)."""
    return init_blocks(EMBEDDING, generator, prefix="encoder.block", init="pytorch", dtype=dtype, device=device)


def embed_episodes(params: Params, buffers: Params, support_x: torch.Tensor, query_x: torch.Tensor,
                   training: bool) -> tuple[torch.Tensor, torch.Tensor, Params]:
    """Support and query of T episodes embedded as one batch per episode (PN-code ``few_shot.py:39-42``).

    Returns:
        (support [T, S, 64], query [T, M, 64], buffers).
    """
    s = support_x.shape[1]
    features, buffers = embed(params, buffers, torch.cat([support_x, query_x], dim=1), training)
    return features[:, :s], features[:, s:], buffers


def class_sums(features: torch.Tensor, labels: torch.Tensor, way: int) -> torch.Tensor:
    """Per-class sums of support features, for T episodes at once.

    Args:
        features: [T, S, D]; labels: [T, S] in 0..way-1.

    Returns:
        [T, N, D]: row n sums the features labelled n.
    """
    onehot = F.one_hot(labels, way).to(features.dtype)  # [T, S, N]
    return onehot.transpose(1, 2) @ features


def class_means(features: torch.Tensor, labels: torch.Tensor, way: int) -> torch.Tensor:
    """Per-class means of support features: [T, S, D], [T, S] -> [T, N, D] (every class needs a support)."""
    counts = F.one_hot(labels, way).sum(dim=1).to(features.dtype)  # [T, N]
    return class_sums(features, labels, way) / counts.unsqueeze(-1)


def learning_rate(config: MetricConfig, iteration: int) -> float:
    """The step schedule: ``lr * lr_decay ** (iteration // lr_decay_every)`` (iteration 0-based)."""
    return config.lr * config.lr_decay ** (iteration // config.lr_decay_every)


class MetricLearner(Learner):
    """Base of the metric learners: see the module docstring. Subclasses define ``init_network``,
    ``scores`` and ``loss`` (and ``name``, ``Config``, ``paper``, ``describe``)."""

    Config = MetricConfig

    def __init__(self, config: MetricConfig, context: RunContext, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(config, context)
        self.dtype = dtype
        params, buffers = self.init_network(context.generator("init"), dtype, context.device)
        self.params: Params = {k: v.requires_grad_(True) for k, v in params.items()}
        self.buffers: Params = buffers
        # One parameter group per module (the part of a name before its first dot): clipping is per module.
        modules: dict[str, list[torch.Tensor]] = {}
        for name, p in self.params.items():
            modules.setdefault(name.split(".")[0], []).append(p)
        self.optimizer = torch.optim.Adam([{"params": ps} for ps in modules.values()], lr=config.lr)
        self.iteration = 0

    # -- what a subclass defines -------------------------------------------------------------------------
    def init_network(self, generator: torch.Generator, dtype: torch.dtype,
                     device: torch.device) -> tuple[Params, Params]:
        """(parameters, running-statistics buffers), drawn from ``generator``; names are ``module.rest``."""
        raise NotImplementedError

    def scores(self, params: Params, buffers: Params, support_x: torch.Tensor, support_y: torch.Tensor,
               query_x: torch.Tensor, way: int, training: bool) -> tuple[torch.Tensor, Params]:
        """Scores of T episodes' queries against their classes.

        Args:
            support_x: [T, N*K, 1, 28, 28]; support_y: [T, N*K]; query_x: [T, M, 1, 28, 28]
            training: a training step (batch statistics, buffers updated) or a prediction (the learner's
                test batch-norm mode).

        Returns:
            (scores [T, M, N]: larger is more likely, buffers after this forward).
        """
        raise NotImplementedError

    def loss(self, scores: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        """The training loss of ``scores`` [T, M, N] against ``query_y`` [T, M]: a 0-dim tensor."""
        raise NotImplementedError

    # -- the harness's calls -----------------------------------------------------------------------------
    def training(self) -> list[Episodes]:
        return [Episodes(tasks=self.config.tasks)]

    @property
    def eval_batch_size(self) -> int:
        return self.config.eval_batch_size

    def meta_train_step(self, batch: EpisodeBatch) -> Mapping[str, torch.Tensor]:
        batch = batch.to(self.context.device, self.dtype)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.config, self.iteration)
        with torch.enable_grad():
            scores, buffers = self.scores(self.params, self.buffers, batch.support_x, batch.support_y,
                                          batch.query_x, batch.way, training=True)
            loss = self.loss(scores, batch.query_y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if self.config.grad_clip is not None:
            for group in self.optimizer.param_groups:
                torch.nn.utils.clip_grad_norm_(group["params"], self.config.grad_clip)
        self.optimizer.step()
        self.buffers = buffers
        self.iteration += 1
        accuracy = (scores.argmax(dim=-1) == batch.query_y).to(self.dtype).mean()
        return {"loss": loss.detach(), "accuracy": accuracy.detach()}

    def predict(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scores, _ = self.scores(self.params, self.buffers, support_x.to(self.dtype), support_y,
                                    query_x.to(self.dtype), self.context.way, training=False)
        return scores

    def state_dict(self) -> dict[str, Any]:
        """Parameters and Adam state (``training_state``), running statistics and the iteration counter."""
        return {**training_state(self.params, self.optimizer),
                "buffers": {k: v.clone() for k, v in self.buffers.items()}, "iteration": self.iteration}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_training_state(self.params, self.optimizer, dict(state))
        self.buffers = {k: state["buffers"][k].to(device=v.device, dtype=v.dtype) for k, v in self.buffers.items()}
        self.iteration = int(state["iteration"])


class EmbeddingLearner(MetricLearner):
    """A metric learner on the conv4 embedding (``EMBEDDING``, PyTorch's default init) that compares query
    embeddings with support embeddings: support and query go through the network as one batch per episode
    in training, and test with the running statistics (non-transductive). Subclasses define ``compare``."""

    def init_network(self, generator: torch.Generator, dtype: torch.dtype,
                     device: torch.device) -> tuple[Params, Params]:
        return init_embedding(generator, dtype, device)

    def compare(self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, way: int) -> torch.Tensor:
        """Scores [T, M, N] of query embeddings [T, M, D] given support embeddings [T, S, D] and labels [T, S]."""
        raise NotImplementedError

    def scores(self, params: Params, buffers: Params, support_x: torch.Tensor, support_y: torch.Tensor,
               query_x: torch.Tensor, way: int, training: bool) -> tuple[torch.Tensor, Params]:
        support, query, buffers = embed_episodes(params, buffers, support_x, query_x, training)
        return self.compare(support, support_y, query, way), buffers

    def describe(self) -> dict[str, Any]:
        return {"batch norm": "running statistics (non-transductive)", "embedding": "conv4 max-pool, 64-d"}
