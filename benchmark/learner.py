"""The Learner API: what a plugin implements and what the harness calls.

A learner is a class with a ``name``, a frozen dataclass ``Config`` and the methods below. The harness
builds it once per run as ``LearnerClass(config, context)``, asks ``training()`` what ``meta_train_step``
wants to receive, calls ``meta_train_step`` once per training iteration, then ``predict`` on the fixed test
episodes. Per-step work is a plain method call, never a hook.

Rules the harness keeps (so learners can rely on them):

* It never wraps ``predict`` in ``torch.no_grad`` and never calls ``.train()``/``.eval()`` on learner
  modules: MAML and fine-tuning adapt with gradients at test time, and the batch-norm mode is the learner's
  documented choice (``describe()["batch norm"]``), reported in every table.
* ``predict`` never sees query labels; the harness scores the logits.

Rules a learner keeps (``benchmark.testing.check_learner`` and the run's preflight check them):

* Every random choice comes from ``context.generator(purpose)``, never from global RNG state
  (``torch.manual_seed``, ``torch.nn`` layers initialised without a generator).
* ``predict`` changes nothing the learner holds: parameters, optimizer state, buffers such as batch-norm
  running statistics.
* ``state_dict()`` holds tensors and plain values only (it is saved with ``torch.save`` and read back with
  ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Protocol, Sequence, Union, runtime_checkable

import torch

from benchmark.episodes import EpisodeBatch, LabeledBatch


@dataclass(frozen=True)
class NoConfig:
    """A learner without hyperparameters."""


# -- what meta_train_step receives ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Episodes:
    """Training on episodes: ``meta_train_step`` receives an ``EpisodeBatch`` of ``tasks`` episodes of the
    run's training shape (``context.train_way``, ``train_shot``, ``train_query``).

    Attributes:
        tasks: episodes per training iteration (the meta-batch size).
        iterations: how many iterations this phase lasts; ``None`` for the rest of the run (last phase only).
    """

    tasks: int
    iterations: int | None = None


@dataclass(frozen=True)
class Minibatches:
    """Training on plain labelled images: ``meta_train_step`` receives a ``LabeledBatch`` of ``images``
    drawings over every class of the meta-train split (``context.num_train_classes``, rotations counted).

    Attributes:
        images: images per training iteration.
        iterations: how many iterations this phase lasts; ``None`` for the rest of the run (last phase only).
    """

    images: int
    iterations: int | None = None


TrainingPhase = Union[Episodes, Minibatches]


@dataclass(frozen=True)
class RunContext:
    """What a learner may know about the run it is part of.

    Attributes:
        way, shot, query: the test cell's episode shape (N, K, Q): what ``predict`` receives.
        device: where batches arrive and where the learner must keep its tensors.
        seed: the run's training seed; derive generators with ``generator()``.
        num_train_classes: classes in the meta-train split, rotations counted (for minibatch training).
        image_shape: (C, H, W) of one image.
        iterations: meta-training iterations of the whole run (to schedule a learning rate).
        train_way, train_shot, train_query: the shape of training episodes; ``None`` (the default) means
            the test cell's, and is resolved to it, so a learner can always read them.
    """

    way: int
    shot: int
    query: int
    device: torch.device
    seed: int = 0
    num_train_classes: int = 0
    image_shape: tuple[int, int, int] = (1, 28, 28)
    iterations: int = 0
    train_way: int | None = None
    train_shot: int | None = None
    train_query: int | None = None

    def __post_init__(self) -> None:
        for name, test_value in (("train_way", self.way), ("train_shot", self.shot), ("train_query", self.query)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, test_value)  # frozen: resolve the default once, here

    def generator(self, purpose: str, device: torch.device | str | None = None) -> torch.Generator:
        """A fresh generator seeded from (seed, purpose): independent streams with no global state.

        Args:
            purpose: a short label, e.g. "init" or "head-init"; different labels give independent streams.
            device: where the generator lives (default CPU, which is reproducible across devices).
        """
        g = torch.Generator(device=device or "cpu")
        g.manual_seed(seed_from(self.seed, purpose))
        return g


def seed_from(*parts: object) -> int:
    """A 63-bit seed from any parts: stable across runs, processes and platforms (no Python ``hash()``)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Learner:
    """Base class of every learner plugin.

    Subclasses set ``name``, ``Config`` (a frozen dataclass whose fields carry defaults and a help line,
    e.g. ``benchmark.config.option(0.4, "inner learning rate", min=0)``), and implement ``training``,
    ``meta_train_step``, ``predict``, ``state_dict`` and ``load_state_dict``.
    """

    #: The name used on the command line (``bench run --learner NAME``).
    name: ClassVar[str] = ""
    #: Hyperparameters: a frozen dataclass; ``-o key=value`` overrides a field.
    Config: ClassVar[type] = NoConfig
    #: The paper the learner implements, shown by ``bench learners`` (e.g. "Finn, Abbeel & Levine 2017").
    paper: ClassVar[str] = ""

    def __init__(self, config: Any, context: RunContext) -> None:
        self.config = config
        self.context = context

    # -- configuration -------------------------------------------------------------------------------------
    @classmethod
    def default_config(cls, way: int, shot: int) -> Any:
        """The defaults for a test cell (papers tune by way); ``-o`` overrides apply on top."""
        return cls.Config()

    def training(self) -> Sequence[TrainingPhase]:
        """What ``meta_train_step`` receives, in order: e.g. ``[Episodes(tasks=self.config.meta_batch_size)]``,
        or ``[Minibatches(images=64, iterations=1000), Episodes(tasks=32)]`` for pre-training followed by
        episodic training. Every phase but the last needs ``iterations``."""
        raise NotImplementedError(
            f"{type(self).__qualname__} does not say what it trains on: define training() returning e.g. "
            "[Episodes(tasks=self.config.meta_batch_size)] (from benchmark.learner import Episodes)"
        )

    @property
    def eval_batch_size(self) -> int:
        """How many test episodes ``predict`` receives at once (override to tune memory against speed)."""
        return 25

    def describe(self) -> dict[str, Any]:
        """Protocol facts shown in tables and recorded in ``config.json``, keyed by the label a table shows,
        e.g. ``{"order": "second", "inner steps (train/test)": "1/10", "batch norm": "transductive"}``.

        Use the common labels where they apply ("batch norm", "order", "inner steps (train/test)",
        "adapts", "distance", "embedding") so that learners share table columns. Values must be JSON
        scalars. Runs whose facts differ are never averaged together."""
        return {}

    def implementation(self) -> dict[str, Any]:
        """How the learner computes (e.g. ``{"tasks": "vmap", "cuda graph": True}``): recorded with each run
        and shown by ``bench perf``, but never part of the experiment (it must not change the results
        beyond floating-point rounding)."""
        return {}

    # -- the work ------------------------------------------------------------------------------------------
    def meta_train_step(self, batch: EpisodeBatch | LabeledBatch) -> Mapping[str, torch.Tensor | float]:
        """One training iteration.

        Returns:
            metrics such as ``{"loss": ..., "accuracy": ...}`` (each becomes a column of ``train_log.csv``).
            Values may be 0-dim tensors on the device: the harness reads them back only every few steps, so
            returning tensors keeps the GPU unsynchronized. A non-finite ``loss`` stops the run.
        """
        raise NotImplementedError

    def predict(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """Classify query images of T episodes after seeing their labelled support sets.

        Args:
            support_x: [T, N*K, 1, 28, 28] float32
            support_y: [T, N*K] int64 in 0..N-1
            query_x: [T, N*Q, 1, 28, 28] float32

        Returns:
            logits [T, N*Q, N]. Nothing the learner holds may change (parameters, buffers, optimizer state).
        """
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume training (weights, optimizer state): tensors and plain values only."""
        raise NotImplementedError

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError


@runtime_checkable
class PerfVariants(Protocol):
    """Optional, for ``bench perf``: a learner class that also has a plain reference implementation of the
    same algorithm (e.g. a Python loop over tasks) and intermediate variants (each speed switch on its own).
    ``bench perf`` times them beside the shipped learner, in one interleaved run."""

    @classmethod
    def reference_config(cls, config: Any) -> Any | None:
        """The config of the plain, unoptimized implementation; ``None`` when there is none."""

    @classmethod
    def ablation_configs(cls, config: Any) -> dict[str, Any]:
        """Labelled configs between the reference and the shipped learner (``bench perf --ablation``)."""


@runtime_checkable
class AdaptationSteps(Protocol):
    """Optional, for learners that adapt to an episode by gradient steps: the logits after each step, so
    the harness can record test accuracy against adaptation steps (as the MAML reference code logs it) and
    ``bench plot`` can draw it. The last step's logits must be exactly what ``predict`` returns."""

    def predict_steps(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """Logits [S+1, T, N*Q, N] after 0, 1, ..., S adaptation steps (same inputs as ``predict``)."""


def config_as_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a plain, JSON-friendly dict (Enum members become their values)."""
    if not dataclasses.is_dataclass(config):
        return {}
    from benchmark.config import json_value

    return {f.name: json_value(getattr(config, f.name)) for f in dataclasses.fields(config) if f.init}
