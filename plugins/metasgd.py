"""Meta-SGD (Li, Zhou, Chen & Li 2017): MAML whose inner step size is learned, one per parameter element.

Each adapted parameter ``w`` has a step-size tensor ``lr.w`` of the same shape (``alpha`` in the paper); a
task adapts by one step ``w - alpha * grad`` (elementwise), and Adam meta-learns the weights and the step
sizes together on the query loss. The step sizes are unconstrained (they may turn negative), as in the
paper's update rule. Batch norm's offsets are meta-learned but, as in MAML's reference code, not adapted,
so they have no step size.

No official code was found; the paper built on MAML's setup, so the network, inner loss, meta-batch and
iterations are ``finn2017``'s (``plugins.maml``), and the step sizes start uniform in [0.005, 0.1] as the
paper is remembered to state (UNVERIFIED). The learner shares MAML's vectorized meta-gradient (the step
sizes are part of the parameter dict it differentiates), its per-task reference loop and its speed switches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from benchmark import hookimpl
from benchmark.config import option
from benchmark.errors import ConfigError
from benchmark.papers import Anchor, Paper, Preset, Quick
from benchmark.toolkit.conv4 import Conv4Arch, Params, init_conv4
from plugins.gradient import LR_PREFIX, InnerLoop
from plugins.gradient_learner import (
    MetaGradientLearner, compile_option, cuda_graph_option, eval_batch_size_option, vectorize_option,
)
from plugins.maml import FINN2017_NOTES, finn2017_preset

#: finn2017's reference network (cbfinn/maml: TF 'SAME' padding, offset-only batch norm with eps 1e-3).
REFERENCE_ARCH = Conv4Arch(padding="same", bn_scale=False, bn_eps=1e-3)


@dataclass(frozen=True)
class MetaSGDConfig:
    """Meta-SGD hyperparameters (defaults: the 5-way settings; 20-way by ``default_config``)."""

    lr_init_low: float = option(0.005, "lower end of the uniform initial step sizes (alpha)", min=-10.0, max=10.0)
    lr_init_high: float = option(0.1, "upper end of the uniform initial step sizes (alpha)", min=-10.0, max=10.0)
    inner_loss: Literal["sum/K", "mean"] = option("sum/K", (
        "the support loss alpha multiplies: sum/K is MAML's reference code's (N times the mean cross-entropy), "
        "mean the mean"))
    inner_steps: int = option(1, "inner steps during meta-training", min=1, max=100)
    test_inner_steps: int = option(1, "inner steps when adapting to a test episode", min=0, max=1000)
    meta_batch_size: int = option(32, "tasks per meta-update", min=1, max=100_000)
    meta_lr: float = option(1e-3, "Adam learning rate of the meta-update (weights and step sizes)", min=0,
                            min_inclusive=False, max=1.0)
    first_order: bool = option(False, "drop second derivatives (the step sizes still learn, through the update)")
    eval_batch_size: int = eval_batch_size_option()
    vectorize: bool | None = vectorize_option()
    cuda_graph: bool | None = cuda_graph_option()
    compile: bool = compile_option()


class MetaSGD(MetaGradientLearner):
    """MAML with a learned step size per parameter element; see the module docstring."""

    name = "metasgd"
    Config = MetaSGDConfig
    paper = "Li, Zhou, Chen & Li 2017, Meta-SGD: Learning to Learn Quickly for Few-Shot Learning"

    def build_inner(self) -> InnerLoop:
        c = self.config
        if c.lr_init_low > c.lr_init_high:
            raise ConfigError(f"lr_init_low ({c.lr_init_low}) must not exceed lr_init_high ({c.lr_init_high})")
        return InnerLoop(0.0, c.inner_steps, c.inner_loss, False, REFERENCE_ARCH, rule="meta-sgd")

    def init_params(self, generator: torch.Generator) -> Params:
        """finn2017's network (N(0, 1) head) plus ``lr.<name>`` for every adapted parameter, uniform in
        [lr_init_low, lr_init_high]."""
        params = init_conv4(generator, self.context.way, dtype=torch.float64, arch=REFERENCE_ARCH, head_init="normal")
        low, high = self.config.lr_init_low, self.config.lr_init_high
        for name in [k for k in params if self.inner.adapts(k)]:
            params[LR_PREFIX + name] = torch.empty_like(params[name]).uniform_(low, high, generator=generator)
        return {k: v.to(device=self.context.device, dtype=self.dtype) for k, v in params.items()}

    @classmethod
    def default_config(cls, way: int, shot: int) -> MetaSGDConfig:
        """finn2017's meta-batch per way (32 for 5-way, 16 for 20-way); one inner step in both."""
        return dataclasses.replace(cls.Config(), meta_batch_size=32 if way < 20 else 16)

    def describe(self) -> dict[str, Any]:
        return {
            "order": "first" if self.config.first_order else "second",
            "inner steps (train/test)": f"{self.config.inner_steps}/{self.config.test_inner_steps}",
            "batch norm": "transductive",
            "inner optimizer": "SGD, learned step size per element",
        }


@hookimpl
def bench_register_learners(register: Callable[[type], None]) -> None:
    register(MetaSGD)


# --------------------------------------------------------------------------------------------------------
# The paper: Li et al. 2017, Omniglot (Table 1)
# --------------------------------------------------------------------------------------------------------

_LI = "Li, Zhou, Chen & Li 2017, Meta-SGD (arXiv:1707.09835), Table 1"
_PM = "± as printed (probably an interval over test tasks; its kind is not stated in any source read)"


def li2017_preset(way: int, shot: int) -> Preset:
    """finn2017's protocol for the cell (the paper built on MAML's), with Meta-SGD's inner loop."""
    finn = finn2017_preset(way, shot)
    metasgd = {"lr_init_low": 0.005, "lr_init_high": 0.1, "inner_loss": "sum/K", "inner_steps": 1,
               "test_inner_steps": 1, "meta_batch_size": 32 if way == 5 else 16, "meta_lr": 1e-3, "first_order": False}
    return Preset(settings=finn.settings, learners={"metasgd": metasgd}, notes=LI2017_NOTES + " " + FINN2017_NOTES)


LI2017_NOTES = (
    "Meta-SGD: one inner step w - alpha * grad with alpha a learned tensor shaped like each adapted weight, "
    "unconstrained, meta-learned jointly with the weights by Adam 1e-3; one step at test too. No official code was "
    "found and the paper could not be read here: alpha's initial range U[0.005, 0.1], the single step and the "
    "joint Adam are the paper as remembered (UNVERIFIED; re-implementations differ: jik0730/Meta-SGD-pytorch "
    "src/model.py:48-52 starts alpha at a constant 1e-3, learn2learn meta_sgd.py:104-110 at a constant lr). "
    "Everything else is MAML's reference protocol, on which the paper built (UNVERIFIED): finn2017's network, "
    "inner loss (alpha multiplies N times the mean cross-entropy, sum/K; whether the paper's alpha multiplies a "
    "sum or a mean is not known), meta-batch 32 (5-way) / 16 (20-way), 60000 iterations, K queries per class, "
    "600 test tasks, the final iterate tested. Batch-norm offsets are meta-learned, not adapted, so they have no "
    "alpha. finn2017's notes follow:"
)

LI2017 = Paper(
    name="li2017",
    title="Li, Zhou, Chen & Li 2017 (Meta-SGD)",
    learners=("metasgd",),
    cells=((5, 1), (5, 5), (20, 1), (20, 5)),
    preset=li2017_preset,
    selection="last",
    anchors=(
        Anchor("metasgd", 5, 1, 99.53, 0.26, _PM, _LI + ", quoted verbatim in T-NAS (ICLR 2020) Table 2", verified=False),
        Anchor("metasgd", 5, 5, 99.93, 0.09, _PM, _LI + ", quoted verbatim in T-NAS (ICLR 2020) Table 2", verified=False),
        Anchor("metasgd", 20, 1, 95.93, 0.38, _PM, _LI + " (mean as quoted, rounded, in jik0730/Meta-SGD-pytorch "
               "README.md; the ± unverified)", verified=False),
        Anchor("metasgd", 20, 5, 98.97, 0.19, _PM, _LI + " (mean as quoted, rounded, in jik0730/Meta-SGD-pytorch "
               "README.md; the ± unverified)", verified=False),
    ),
    notes="Numbers from secondary copies of the paper's Table 1 (the paper could not be read here); what its ± "
          "is, is not stated there, so none is judged.",
    quick=Quick(cells=((5, 1),), settings={"iterations": 400, "val_every": 100, "checkpoint_every": 100},
                learners={"metasgd": {"meta_batch_size": 8}}, description="400 iterations, meta-batch 8"),
)


@hookimpl
def bench_register_papers(register: Callable[[object], None]) -> None:
    register(LI2017)
