"""Baseline and Baseline++ of Chen et al. 2019, "A Closer Look at Few-shot Classification".

Pre-training (``Minibatches`` of labelled images): the conv4 backbone of ``benchmark.toolkit.conv4`` plus a
classifier over *all* meta-train classes (rotations counted as classes), trained with Adam (lr 1e-3) on
plain labelled minibatches. Batch norm uses the minibatch's statistics.

Testing (``predict``): the backbone is frozen and each episode's features are computed once; a fresh
classifier is trained on the support features exactly as in the authors' code: 100 epochs over the support
set in shuffled minibatches of 4 (the last one smaller), SGD lr 0.01, momentum 0.9, dampening 0.9, weight
decay 1e-3. The T episodes of a call are trained together: every head tensor carries a leading task
dimension and the loss is the sum of the per-task mean losses, so one batched SGD step equals T independent
per-task steps (SGD is elementwise, the tasks share no parameters).

Heads (``-o head=...``):

* ``linear`` (Baseline): ``W x + b``; the episode head is initialised like ``nn.Linear`` (uniform
  +-1/sqrt(D)), the pre-training head with Glorot weights and zero bias.
* ``cosine`` (Baseline++): ``scale * g_c * cos(x, v_c)``, the weight-normalised linear layer of the
  authors' ``distLinear`` (direction ``v`` and a learnable per-class norm ``g`` initialised to ``|v|``,
  no bias). Their code fixes the scale at 10 for more than 200 classes (pre-training, "in omniglot a larger
  scale factor is required") and 2 otherwise (the episode head); so do we (``pretrain_scale``,
  ``episode_scale``).

Batch norm at test time (``describe()["batch norm"]``): ``bn=separate`` (default) normalises the support
set and the query set each with their own batch statistics, exactly as MAML does ("transductive"); with
``bn=episode`` an episode's support and query images share one set of statistics.

Randomness: each test episode's head initialisation and minibatch order come from a generator seeded by
the run's seed (``context.generator("finetune-head")``) and the episode's own content, so an episode's
prediction depends only on the weights and that episode, not on ``eval_batch_size`` or its neighbours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import torch
import torch.nn.functional as F
from torch.func import vmap

from benchmark import hookimpl
from benchmark.config import option
from benchmark.episodes import LabeledBatch
from benchmark.errors import ProtocolError
from benchmark.learner import Learner, Minibatches, RunContext
from benchmark.papers import Paper, Preset, Quick
from benchmark.toolkit import episode_seeds
from benchmark.toolkit.conv4 import (
    Conv4Arch, Params, conv4_features, init_conv4, init_running_stats, load_training_state, training_state,
)

#: Added to feature norms in the cosine head, as in the authors' code.
NORM_EPS = 1e-5


@dataclass(frozen=True)
class FinetuneConfig:
    """Baseline hyperparameters (defaults: Chen et al. 2019 and their released code)."""

    head: Literal["linear", "cosine"] = option("linear", "classifier: linear (Baseline) or cosine (Baseline++)")
    batch_size: int = option(64, "images per pre-training minibatch", min=1, max=100_000)
    lr: float = option(1e-3, "Adam learning rate of pre-training", min=0, min_inclusive=False, max=1.0)
    head_epochs: int = option(100, "passes over the support set when fitting a test head", min=1, max=10_000)
    head_batch_size: int = option(4, "support examples per test-head SGD step", min=1)
    head_lr: float = option(0.01, "SGD learning rate of the test head", min=0, min_inclusive=False, max=10.0)
    head_momentum: float = option(0.9, "SGD momentum of the test head", min=0, max=1)
    head_dampening: float = option(0.9, "SGD momentum dampening of the test head", min=0, max=1)
    head_weight_decay: float = option(1e-3, "SGD weight decay of the test head", min=0)
    pretrain_scale: float = option(10.0, "cosine head scale over the meta-train classes", min=0, min_inclusive=False)
    episode_scale: float = option(2.0, "cosine head scale of the test-episode head", min=0, min_inclusive=False)
    bn: Literal["separate", "episode", "running"] = option(
        "separate", "test batch norm: separate (support and query each with their own statistics), episode "
        "(support+query statistics), or running (statistics tracked during pre-training: inductive, as Chen et "
        "al.'s code)")
    network: Literal["strided", "maxpool"] = option(
        "strided", "conv4 downsampling: strided (MAML's stride-2 network) or maxpool (Chen et al.'s Conv4S)")
    conv_init: Literal["glorot", "he"] = option(
        "glorot", "conv weight init: glorot (uniform) or he (fan-out normal, as Chen et al.'s code)")
    eval_batch_size: int = option(25, "test episodes fitted at once in predict", min=1, max=10_000)


# --------------------------------------------------------------------------------------------------------
# Heads: pure functions of a parameter dict; a leading task dimension is optional
# --------------------------------------------------------------------------------------------------------


def init_head(kind: str, generator: torch.Generator, num_classes: int, features: int, tasks: int | None,
              dtype: torch.dtype, device: torch.device | str) -> Params:
    """Head parameters, uniform +-1/sqrt(D) as ``nn.Linear`` (drawn on the CPU from ``generator``).

    Returns ``head.weight`` [(T,) N, D] and ``head.bias`` [(T,) N] (linear) or ``head.direction``
    [(T,) N, D] and ``head.norm`` [(T,) N] (cosine; norm = |direction| as in weight norm).
    """
    lead = () if tasks is None else (tasks,)
    bound = 1.0 / math.sqrt(features)
    w = torch.empty(*lead, num_classes, features, dtype=torch.float64).uniform_(-bound, bound, generator=generator)
    if kind == "cosine":
        params = {"head.direction": w, "head.norm": w.norm(dim=-1)}
    else:
        b = torch.empty(*lead, num_classes, dtype=torch.float64).uniform_(-bound, bound, generator=generator)
        params = {"head.weight": w, "head.bias": b}
    return {k: v.to(device=device, dtype=dtype) for k, v in params.items()}


def head_logits(kind: str, params: Params, features: torch.Tensor, scale: float) -> torch.Tensor:
    """Logits [(T,) B, N] of features [(T,) B, D]."""
    if kind == "cosine":
        x = features / (features.norm(dim=-1, keepdim=True) + NORM_EPS)
        v = params["head.direction"]
        w = v * (params["head.norm"] / v.norm(dim=-1)).unsqueeze(-1)
        return scale * x @ w.transpose(-1, -2)
    return features @ params["head.weight"].transpose(-1, -2) + params["head.bias"].unsqueeze(-2)


def episode_generators(context_generator: Callable[[str], torch.Generator], support_x: torch.Tensor,
                       support_y: torch.Tensor) -> list[torch.Generator]:
    """One generator per episode for its head's initialisation and minibatch order, seeded from the run's seed
    and the episode's own content (``benchmark.toolkit.episode_seeds``): an episode's prediction does not
    depend on ``eval_batch_size`` or on its neighbours. support_x: [T, S, 1, 28, 28]; support_y: [T, S]."""
    return episode_seeds.episode_generators(context_generator, support_x, support_y, "finetune-head")


def fit_episode_heads(config: FinetuneConfig, support_f: torch.Tensor, support_y: torch.Tensor, way: int,
                      generators: list[torch.Generator]) -> Params:
    """Train T independent heads on T support sets at once.

    Args:
        support_f: [T, S, D] frozen support features; support_y: [T, S] labels in 0..way-1.
        generators: one per episode (``episode_generators``): its head's initialisation and shuffles.

    Returns:
        head parameters with a leading task dimension.
    """
    T, S, D = support_f.shape
    per_task = [init_head(config.head, g, way, D, None, support_f.dtype, support_f.device) for g in generators]
    head = {k: torch.stack([h[k] for h in per_task]) for k in per_task[0]}
    # Every epoch's shuffle of every episode, drawn up front from that episode's generator: [T, epochs, S].
    orders = torch.stack([torch.rand(config.head_epochs, S, generator=g).argsort(dim=1) for g in generators])
    orders = orders.to(support_f.device)
    for p in head.values():
        p.requires_grad_(True)
    opt = torch.optim.SGD(list(head.values()), lr=config.head_lr, momentum=config.head_momentum,
                          dampening=config.head_dampening, weight_decay=config.head_weight_decay)
    rows = torch.arange(T, device=support_f.device)[:, None]
    for epoch in range(config.head_epochs):
        order = orders[:, epoch]  # [T, S]: one shuffle per task
        for start in range(0, S, config.head_batch_size):
            idx = order[:, start:start + config.head_batch_size]  # [T, b]
            logits = head_logits(config.head, head, support_f[rows, idx], config.episode_scale)  # [T, b, N]
            # Sum over tasks of each task's mean loss: task t's gradient is exactly its own.
            loss = F.cross_entropy(logits.flatten(0, 1), support_y[rows, idx].flatten(), reduction="sum") / idx.shape[1]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {k: v.detach() for k, v in head.items()}


# --------------------------------------------------------------------------------------------------------
# The learner
# --------------------------------------------------------------------------------------------------------


class Finetune(Learner):
    """Pre-train on all meta-train classes, then fit a linear (or cosine) head per test episode."""

    name = "finetune"
    Config = FinetuneConfig
    paper = "Chen et al. 2019, A Closer Look at Few-shot Classification (Baseline, Baseline++)"

    def __init__(self, config: FinetuneConfig, context: RunContext, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(config, context)
        if context.num_train_classes < 1:
            raise ProtocolError("finetune pre-trains over all meta-train classes but the run context has "
                                "num_train_classes=0: build the RunContext from the training ClassPool")
        self.dtype = dtype
        self.arch = Conv4Arch(downsample="maxpool" if config.network == "maxpool" else "stride")
        gen = context.generator("init")
        # The conv4 network with a Glorot linear head over all meta-train classes; Baseline++ swaps the head.
        params = init_conv4(gen, context.num_train_classes, dtype=dtype, device=context.device, arch=self.arch,
                            conv_init=config.conv_init)
        if config.head == "cosine":
            params = {k: v for k, v in params.items() if not k.startswith("head.")}
            params.update(init_head("cosine", gen, context.num_train_classes, params["bn4.bias"].numel(), None,
                                    dtype, context.device))
        self.params: Params = {k: v.requires_grad_(True) for k, v in params.items()}
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=config.lr)
        #: Running batch-norm statistics, tracked while pre-training when the test uses them (``bn=running``).
        self.running = (init_running_stats(self.arch.channels, dtype, context.device) if config.bn == "running"
                        else None)

    def training(self) -> list[Minibatches]:
        return [Minibatches(images=self.config.batch_size)]

    @property
    def eval_batch_size(self) -> int:
        return self.config.eval_batch_size

    def describe(self) -> dict[str, Any]:
        steps = self.config.head_epochs * -(-self.context.way * self.context.shot // self.config.head_batch_size)
        batch_norm = {"separate": "transductive", "episode": "transductive (support+query)",
                      "running": "inductive (running statistics)"}[self.config.bn]
        return {
            "batch norm": batch_norm,
            "embedding": f"conv4, {'max-pool' if self.config.network == 'maxpool' else 'stride 2'}",
            "head": f"{self.config.head}, {steps} SGD steps",
        }

    def meta_train_step(self, batch: LabeledBatch) -> Mapping[str, torch.Tensor]:
        x, y = batch.x.to(self.context.device, self.dtype), batch.y.to(self.context.device)
        with torch.enable_grad():
            features = conv4_features(self.params, x, self.arch, track=self.running)
            logits = head_logits(self.config.head, self.params, features, self.config.pretrain_scale)
            loss = F.cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        accuracy = (logits.argmax(dim=-1) == y).to(self.dtype).mean()
        return {"loss": loss.detach(), "accuracy": accuracy.detach()}

    def features(self, support_x: torch.Tensor, query_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen-backbone features: [T, S, D] and [T, Q, D] under the configured batch-norm mode."""
        S = support_x.shape[1]
        params = {k: v.detach() for k, v in self.params.items() if not k.startswith("head.")}
        if self.running is not None:  # inductive: every image on its own, so all of them in one batch
            with torch.no_grad():
                images = torch.cat([support_x, query_x], dim=1)
                f = conv4_features(params, images.flatten(0, 1), self.arch, use=self.running)
                f = f.view(*images.shape[:2], -1)
            return f[:, :S], f[:, S:]
        # vmap over episodes: one conv over all images, batch statistics per episode.
        per_episode = vmap(lambda p, x: conv4_features(p, x, self.arch), in_dims=(None, 0))
        with torch.no_grad():
            if self.config.bn == "episode":
                f = per_episode(params, torch.cat([support_x, query_x], dim=1))
                return f[:, :S], f[:, S:]
            return per_episode(params, support_x), per_episode(params, query_x)

    def predict(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        support_f, query_f = self.features(support_x.to(self.dtype), query_x.to(self.dtype))
        with torch.enable_grad():
            generators = episode_generators(self.context.generator, support_x, support_y)
            head = fit_episode_heads(self.config, support_f, support_y, self.context.way, generators)
        return head_logits(self.config.head, head, query_f, self.config.episode_scale).detach()

    def state_dict(self) -> dict[str, Any]:
        """``{"params": {name: tensor}, "optimizer": Adam state, "running": statistics}`` as independent copies."""
        state = training_state(self.params, self.optimizer)
        if self.running is not None:
            state["running"] = {k: v.clone() for k, v in self.running.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_training_state(self.params, self.optimizer, state)
        if self.running is not None:
            for k, v in self.running.items():
                v.copy_(state["running"][k])


@hookimpl
def bench_register_learners(register: Callable[[type], None]) -> None:
    register(Finetune)


# --------------------------------------------------------------------------------------------------------
# The paper: Chen et al. 2019, Baseline on Omniglot
# --------------------------------------------------------------------------------------------------------

#: 5 epochs over the 4112 meta-train classes x 20 drawings in minibatches of 16 (train.py:80-83, 100).
CHEN2019_ITERATIONS = 5 * 4112 * 20 // 16

CHEN2019_NOTES = (
    "Follows wyharveychen/CloserLookFewShot at e03aca8 (Omniglot). Network: Conv4S, 4 x [3x3 conv 64, pad 1, "
    "BatchNorm2d, ReLU, 2x2 max-pool] -> 64-d (backbone.py:105-132, 287-306; train.py:74-76), conv weights He "
    "fan-out normal (backbone.py:13-20); the conv biases are omitted (batch norm cancels them in training, "
    "their gradient is zero). Pre-training: Adam 1e-3 (train.py:22-24), batches of 16 (train.py:100), 5 epochs "
    "(train.py:80-83; here 25700 iterations drawn with replacement rather than epochs), all 4112 meta-train "
    "classes of the Vinyals split with rotations (write_omniglot_filelist.py:20-36), a zero-bias linear head "
    "(Baseline; Baseline++ is -o head=cosine: scale 10 over 4112 classes, 2 per episode, backbone.py:30-33). "
    "Test: the last epoch's weights (no validation for Baseline: baselinetrain.py:51-55, io_utils.py:52-68), "
    "running batch-norm statistics (model.eval(), save_features.py:120: inductive), a new head per episode "
    "trained 100 epochs over the support set in batches of 4 with SGD lr 0.01, momentum 0.9, dampening 0.9, "
    "weight decay 1e-3 (baselinefinetune.py:15-52), 15 queries per class, 600 episodes, 1.96 s/sqrt(n) "
    "(test.py:52, 151, 156-166). Differences: their images are rescaled to 32 and centre-cropped to 28 and "
    "normalised with ImageNet statistics, not inverted (datamgr.py:13-39); we use the harness's 28x28 images "
    "(ink 1). Published Omniglot numbers: not found in any source we could read, so none are shown."
)


def chen2019_preset(way: int, shot: int) -> Preset:
    """Chen et al.'s Baseline protocol for one cell (see ``CHEN2019_NOTES``)."""
    return Preset(
        settings={"query": 15, "episodes": 600, "iterations": CHEN2019_ITERATIONS, "protocol": "vinyals",
                  "select": "last"},
        learners={"finetune": {"network": "maxpool", "bn": "running", "conv_init": "he", "head": "linear",
                               "batch_size": 16, "lr": 1e-3, "head_epochs": 100, "head_batch_size": 4,
                               "head_lr": 0.01, "head_momentum": 0.9, "head_dampening": 0.9,
                               "head_weight_decay": 1e-3, "pretrain_scale": 10.0, "episode_scale": 2.0}},
        notes=CHEN2019_NOTES,
    )


CHEN2019 = Paper(
    name="chen2019",
    title="Chen et al. 2019 (A Closer Look at Few-shot Classification: Baseline)",
    learners=("finetune",),
    cells=((5, 1), (5, 5), (20, 1), (20, 5)),
    preset=chen2019_preset,
    selection="last",
    notes="No published Omniglot number could be verified: ours are shown alone.",
    quick=Quick(cells=((5, 1),), settings={"iterations": 600, "val_every": 300, "checkpoint_every": 300},
                description="600 pre-training iterations"),
)


@hookimpl
def bench_register_papers(register: Callable[[object], None]) -> None:
    register(CHEN2019)
