"""The Learner API: what a plugin implements and what the harness calls.

A learner is a class with a ``name``, a frozen dataclass ``Config`` and the methods below. The harness
builds it as ``LearnerClass(config, context)``, calls ``meta_train_step`` once per training iteration, then
``predict`` on the fixed test episodes. Per-step work is a plain method call, never a hook.

Rules the harness keeps (so learners can rely on them):

* It never wraps ``predict`` in ``torch.no_grad`` and never calls ``.train()``/``.eval()`` on learner
  modules: MAML and fine-tuning adapt with gradients at test time, and the batch-norm mode is the learner's
  documented choice (``describe()["batchnorm"]``), reported in every result row.
* ``predict`` never sees query labels; the harness scores the logits.
* Every random choice inside a learner must come from ``context.generator(purpose)``, never global RNG state.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping

import torch

from benchmark.episodes import EpisodeBatch, LabeledBatch


@dataclass(frozen=True)
class NoConfig:
    """A learner without hyperparameters."""


@dataclass(frozen=True)
class RunContext:
    """What a learner may know about the run it is part of.

    Attributes:
        way, shot, query: the episode shape (N, K, Q) used for training and testing.
        device: where batches arrive and where the learner must keep its tensors.
        seed: the run's seed; derive generators with ``generator()``.
        num_train_classes: classes in the meta-train split, rotations counted (for pre-trained baselines).
        image_shape: (C, H, W) of one image.
    """

    way: int
    shot: int
    query: int
    device: torch.device
    seed: int = 0
    num_train_classes: int = 0
    image_shape: tuple[int, int, int] = (1, 28, 28)

    def generator(self, purpose: str, device: torch.device | str | None = None) -> torch.Generator:
        """A fresh generator seeded from (seed, purpose): independent streams with no global state.

        Args:
            purpose: a short label, e.g. "init" or "head-init"; different labels give independent streams.
            device: where the generator lives (default CPU, which is reproducible across devices).
        """
        digest = hashlib.sha256(f"{self.seed}:{purpose}".encode()).digest()
        g = torch.Generator(device=device or "cpu")
        g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return g


class Learner:
    """Base class of every learner plugin.

    Subclasses set ``name``, ``Config`` (a frozen dataclass whose fields carry defaults and a help line in
    ``field(metadata={"help": ...})``), and implement ``meta_train_step``, ``predict``, ``state_dict`` and
    ``load_state_dict``.
    """

    #: The name used on the command line (``bench run --learner NAME``).
    name: ClassVar[str] = ""
    #: Hyperparameters: a frozen dataclass; ``-o key=value`` overrides a field.
    Config: ClassVar[type] = NoConfig
    #: What ``meta_train_step`` receives: ``"episodes"`` (an EpisodeBatch of ``train_batch_size`` tasks) or
    #: ``"minibatches"`` (a LabeledBatch of ``train_batch_size`` images over all meta-train classes).
    train_data: ClassVar[Literal["episodes", "minibatches"]] = "episodes"

    def __init__(self, config: Any, context: RunContext) -> None:
        self.config = config
        self.context = context

    # -- configuration -------------------------------------------------------------------------------------
    @classmethod
    def default_config(cls, way: int, shot: int) -> Any:
        """The defaults for an episode shape (papers tune by way); ``-o`` overrides apply on top."""
        return cls.Config()

    @property
    def train_batch_size(self) -> int:
        """Tasks per meta-step (``episodes``) or images per minibatch (``minibatches``)."""
        return int(getattr(self.config, "meta_batch_size", getattr(self.config, "batch_size", 1)))

    @property
    def eval_batch_size(self) -> int:
        """How many test episodes ``predict`` receives at once."""
        return int(getattr(self.config, "eval_batch_size", 25))

    @classmethod
    def reference_config(cls, config: Any) -> Any | None:
        """The config of a plain, unoptimized implementation of the same algorithm (e.g. a Python loop over
        tasks), which ``bench perf`` times beside the shipped one; ``None`` when there is none."""
        return None

    @classmethod
    def ablation_configs(cls, config: Any) -> dict[str, Any]:
        """Labelled configs between the reference and the shipped learner (e.g. each speed switch on its
        own), which ``bench perf --ablation`` times too; empty when there are none."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Protocol facts reported in every result row and table, e.g. ``{"order": "second",
        "inner_steps_train": 1, "inner_steps_test": 10, "batchnorm": "transductive"}``."""
        return {}

    # -- the work ------------------------------------------------------------------------------------------
    def meta_train_step(self, batch: EpisodeBatch | LabeledBatch) -> Mapping[str, torch.Tensor | float]:
        """One training iteration.

        Returns:
            metrics such as ``{"loss": ..., "accuracy": ...}``. Values may be 0-dim tensors on the device: the
            harness reads them back only every few steps, so returning tensors keeps the GPU unsynchronized.
        """
        raise NotImplementedError

    def predict(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """Classify query images of T episodes after seeing their labelled support sets.

        Args:
            support_x: [T, N*K, 1, 28, 28] float32
            support_y: [T, N*K] int64 in 0..N-1
            query_x: [T, N*Q, 1, 28, 28] float32

        Returns:
            logits [T, N*Q, N]. Meta-parameters must be unchanged afterwards.
        """
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume training (weights, optimizer state): tensors and plain values only."""
        raise NotImplementedError

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError


def config_as_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a plain, JSON-friendly dict."""
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}
