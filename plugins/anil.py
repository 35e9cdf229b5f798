"""ANIL (Raghu, Raghu, Bengio & Vinyals 2020, "Rapid Learning or Feature Reuse?"): MAML whose inner loop
adapts the classifier head only.

The body (convolutions and batch norm) is meta-learned by the outer loop alone; each task adapts only
``head.weight`` and ``head.bias``. The meta-gradient is second order through the head's updates, and it
reaches the body through the features, both the support features the head adapts on and the query
features it classifies. Because the body does not move in the inner loop, its support features are
computed once per task (``plugins.gradient.trajectory``), which makes an inner step nearly free.

Everything else is MAML's reference protocol (``plugins.maml``): no official ANIL code was found and the
paper's appendix (not readable here) is said to follow MAML's hyper-parameters, so the defaults are
``finn2017``'s network, inner loss and steps. The learner shares MAML's vectorized meta-gradient, its
per-task reference loop and its speed switches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from benchmark import hookimpl
from benchmark.errors import ConfigError
from benchmark.papers import Anchor, Paper, Preset, Quick
from benchmark.toolkit.conv4 import Conv4Arch
from plugins.gradient import InnerLoop
from plugins.maml import MAML, MAMLConfig, finn2017_preset


@dataclass(frozen=True)
class ANILConfig(MAMLConfig):
    """ANIL hyperparameters: MAML's (defaults: ``finn2017``'s 5-way settings; 20-way by ``default_config``).
    ``adapt_bn`` must stay false: only the head adapts."""


class ANIL(MAML):
    """MAML with a head-only inner loop; see the module docstring."""

    name = "anil"
    Config = ANILConfig
    paper = "Raghu, Raghu, Bengio & Vinyals 2020, Rapid Learning or Feature Reuse? (ANIL)"

    def build_inner(self) -> InnerLoop:
        c = self.config
        if c.adapt_bn:
            raise ConfigError("anil adapts the classifier head only: drop -o adapt_bn=true (use maml to adapt more)")
        arch = Conv4Arch(padding=c.padding, bn_scale=c.bn_scale, bn_eps=c.bn_eps)
        return InnerLoop(c.inner_lr, c.inner_steps, c.inner_loss, False, arch, adapt="head")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "adapts": "head only"}


@hookimpl
def bench_register_learners(register: Callable[[type], None]) -> None:
    register(ANIL)


# --------------------------------------------------------------------------------------------------------
# The paper: Raghu et al. 2020, Omniglot 20-way (their results table)
# --------------------------------------------------------------------------------------------------------

_RAGHU = ("Raghu, Raghu, Bengio & Vinyals 2020, Rapid Learning or Feature Reuse? (arXiv:1909.09157, ICLR), "
          "results table, as reproduced in learnables/learn2learn docs/tutorials/anil_tutorial/ANIL_tutorial.md:60-63")
_PM = "± as printed (its kind is not stated in any source read: a spread over runs or an interval over tasks)"


def raghu2020_preset(way: int, shot: int) -> Preset:
    """``finn2017``'s protocol for the cell, for ANIL and for MAML beside it (the paper compares the two)."""
    finn = finn2017_preset(way, shot)
    return Preset(settings=finn.settings, learners={"anil": dict(finn.learners["maml"]), "maml": dict(finn.learners["maml"])},
                  notes=RAGHU2020_NOTES + " " + finn.notes)


RAGHU2020_NOTES = (
    "ANIL adapts the classifier head only (head.weight, head.bias; learn2learn's tutorial "
    "docs/tutorials/anil_tutorial/ANIL_tutorial.md:45-52 paraphrasing the paper; its FC100 example wraps only the "
    "head, examples/vision/anil_fc100.py:135). No official ANIL code was found, and the paper's appendix could not "
    "be read: its Omniglot hyper-parameters (inner lr, steps, meta-batch, iterations, network, batch norm) are "
    "taken from MAML's reference protocol, finn2017's preset, which is said to be what the paper follows "
    "(UNVERIFIED). The meta-gradient is second order through the head's updates. The paper reports Omniglot "
    "20-way cells only, and its MAML numbers are its own rerun (93.7 / 96.4), below Finn et al.'s. "
    "finn2017's notes follow:"
)

RAGHU2020 = Paper(
    name="raghu2020",
    title="Raghu, Raghu, Bengio & Vinyals 2020 (ANIL)",
    learners=("anil", "maml"),
    cells=((20, 1), (20, 5)),
    preset=raghu2020_preset,
    selection="last",
    anchors=(
        Anchor("anil", 20, 1, 96.2, 0.5, _PM, _RAGHU, verified=False),
        Anchor("anil", 20, 5, 98.0, 0.3, _PM, _RAGHU, verified=False),
        Anchor("maml", 20, 1, 93.7, 0.7, _PM, _RAGHU + " (their MAML rerun)", verified=False),
        Anchor("maml", 20, 5, 96.4, 0.1, _PM, _RAGHU + " (their MAML rerun)", verified=False),
    ),
    notes="ANIL's numbers and the paper's own MAML rerun, from a secondary copy of its table (the paper could "
          "not be read here); what its ± is, is not stated there.",
    quick=Quick(cells=((20, 1),), settings={"iterations": 300, "val_every": 100, "checkpoint_every": 100,
                                              "episodes": 200},
                learners={"anil": {"meta_batch_size": 4}, "maml": {"meta_batch_size": 2, "inner_steps": 1}},
                description="20-way 1-shot, 300 iterations, meta-batch 4 (maml: 2, one inner step), 200 test episodes"),
)


@hookimpl
def bench_register_papers(register: Callable[[object], None]) -> None:
    register(RAGHU2020)
