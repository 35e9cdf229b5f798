"""MAML (Finn et al. 2017) and first-order MAML on the conv4 network.

Meta-training: for each task, take ``inner_steps`` SGD steps (lr ``inner_lr`` on the support loss named by
``inner_loss``) from the meta-parameters, measure the query loss of the adapted parameters, and update the
meta-parameters with Adam (``meta_lr``) on the mean query loss over ``meta_batch_size`` tasks.

* second order (``maml``): the meta-gradient differentiates through the inner SGD steps.
* first order (``fomaml``): the meta-gradient is the query-loss gradient with respect to the *adapted*
  parameters, averaged over tasks; no second derivatives are ever formed.

The machinery is shared with the other gradient-based learners: the inner loop and its vectorized
meta-gradient (``plugins.gradient``: ``torch.func.grad`` for the inner loop, ``vmap`` over tasks), an
independent per-task loop with autograd and native batch norm (``plugins.gradient_reference``; what
``vectorize=false`` runs, and what ``bench perf`` times the shipped learner against), and the learner with
its speed switches (``plugins.gradient_learner``: ``vectorize``, ``cuda_graph``, ``compile``).

Defaults (``default_config``) follow Finn et al.'s released code (cbfinn/maml) and paper: its network
(stride-2 convolutions with TensorFlow 'SAME' padding, batch norm with an offset but no scale and eps 1e-3,
offsets meta-learned but not adapted, an N(0, 1) classifier), its inner loss (per-example cross-entropy
summed and divided by K, so ``inner_lr`` multiplies N times the mean: ``inner_loss="sum/K"``), and the
paper's steps: 5-way: inner lr 0.4, 1 inner step, meta-batch 32, 3 test steps; 20-way: inner lr 0.1, 5
inner steps, meta-batch 16, 5 test steps; Adam 1e-3. ``FINN2017_NOTES`` cites the lines. Every point is a
config field, so PyTorch-style variants (``-o inner_loss=mean -o bn_scale=true ...``) stay one option away.
Batch norm is transductive: the support set and the query set are each normalised with their own batch
statistics, as in the reference code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from benchmark import hookimpl
from benchmark.config import option
from benchmark.papers import Anchor, Paper, Preset, Quick
from benchmark.toolkit.conv4 import Conv4Arch, Params, init_conv4
from plugins.gradient import InnerLoop
from plugins.gradient_learner import (
    MetaGradientLearner, compile_option, cuda_graph_option, eval_batch_size_option, vectorize_option,
)


@dataclass(frozen=True)
class MAMLConfig:
    """MAML hyperparameters (defaults: the paper's 5-way Omniglot settings)."""

    inner_lr: float = option(0.4, "SGD step size of the inner (adaptation) loop; it multiplies the gradient of "
                             "the loss that inner_loss names", min=0, min_inclusive=False, max=100.0)
    inner_loss: Literal["sum/K", "mean"] = option("sum/K", (
        "the support loss inner_lr multiplies: sum/K is the reference code's (per-example cross-entropy summed "
        "over the N*K support images and divided by K, i.e. N times the mean), mean the mean cross-entropy"))
    inner_steps: int = option(1, "inner SGD steps during meta-training", min=1, max=100)
    test_inner_steps: int = option(3, "inner SGD steps when adapting to a test episode", min=0, max=1000)
    meta_batch_size: int = option(32, "tasks per meta-update", min=1, max=100_000)
    meta_lr: float = option(1e-3, "Adam learning rate of the meta-update", min=0, min_inclusive=False, max=1.0)
    first_order: bool = option(False, "drop second derivatives (first-order MAML)")
    eval_batch_size: int = eval_batch_size_option()
    vectorize: bool | None = vectorize_option()
    cuda_graph: bool | None = cuda_graph_option()
    compile: bool = compile_option()
    bn_scale: bool = option(False, "batch norm with a learned scale (the reference code has an offset only)")
    bn_eps: float = option(1e-3, "added to the batch variance (the reference code's TensorFlow default; PyTorch's "
                           "is 1e-5)", min=0, min_inclusive=False, max=1.0)
    adapt_bn: bool = option(False, "adapt the batch-norm parameters in the inner loop too (the reference code "
                            "meta-learns them only)")
    padding: Literal["same", "symmetric"] = option("same", (
        "conv padding: same is TensorFlow's (stride 2 on an even size pads only bottom and right, as the "
        "reference code), symmetric pads one pixel on every side (PyTorch's padding=1)"))
    head_init: Literal["normal", "xavier"] = option("normal", (
        "classifier weight init: normal is N(0, 1) as the reference code's Omniglot head, xavier Glorot-uniform"))


@dataclass(frozen=True)
class FOMAMLConfig(MAMLConfig):
    """First-order MAML: the same hyperparameters with ``first_order`` on."""

    first_order: bool = option(True, "drop second derivatives (first-order MAML)")


class MAML(MetaGradientLearner):
    """Second-order MAML with transductive batch norm; see the module docstring."""

    name = "maml"
    Config = MAMLConfig
    paper = "Finn, Abbeel & Levine 2017, Model-Agnostic Meta-Learning"

    @property
    def arch(self) -> Conv4Arch:
        return self.inner.arch

    def build_inner(self) -> InnerLoop:
        c = self.config
        arch = Conv4Arch(padding=c.padding, bn_scale=c.bn_scale, bn_eps=c.bn_eps)
        return InnerLoop(c.inner_lr, c.inner_steps, c.inner_loss, c.adapt_bn, arch)

    def init_params(self, generator: torch.Generator) -> Params:
        return init_conv4(generator, self.context.way, dtype=self.dtype, device=self.context.device,
                          arch=self.inner.arch, head_init=self.config.head_init)

    @classmethod
    def default_config(cls, way: int, shot: int) -> MAMLConfig:
        """Finn et al.'s Omniglot settings (their released code's network and inner loss, the paper's steps):
        20-way uses a smaller inner lr, more inner steps, a smaller meta-batch and 5 test-time steps."""
        return dataclasses.replace(cls.Config(), **_PAPER_STEPS[way < 20])

    def describe(self) -> dict[str, Any]:
        return {
            "order": "first" if self.config.first_order else "second",
            "inner steps (train/test)": f"{self.config.inner_steps}/{self.config.test_inner_steps}",
            "batch norm": "transductive",
        }


class FOMAML(MAML):
    """First-order MAML: the same code path with ``first_order=True`` by default."""

    name = "fomaml"
    Config = FOMAMLConfig


@hookimpl
def bench_register_learners(register: Callable[[type], None]) -> None:
    register(MAML)
    register(FOMAML)


# --------------------------------------------------------------------------------------------------------
# The paper: Finn, Abbeel & Levine 2017, Omniglot (Table 1)
# --------------------------------------------------------------------------------------------------------

_FINN = "Finn, Abbeel & Levine 2017, Model-Agnostic Meta-Learning, arXiv:1703.03400v3, Table 1"
_NICHOL = ("Nichol, Achiam & Schulman 2018, On First-Order Meta-Learning Algorithms (arXiv:1803.02999), Omniglot "
           "table, row '1st-order MAML + Transduction'")


def finn2017_preset(way: int, shot: int) -> Preset:
    """The paper's Omniglot settings for one cell, as the released code computes them (see ``FINN2017_NOTES``)."""
    maml = dict(_REFERENCE_NETWORK, **_PAPER_STEPS[way == 5])
    return Preset(
        settings={"query": shot, "episodes": 600, "iterations": 60000, "protocol": "vinyals", "select": "last"},
        learners={"maml": dict(maml), "fomaml": dict(maml)},
        notes=FINN2017_NOTES,
    )


#: The reference code's network and inner loop (every field the preset fixes, so a change of defaults
#: cannot change the preset).
_REFERENCE_NETWORK = {"inner_loss": "sum/K", "bn_scale": False, "bn_eps": 1e-3, "adapt_bn": False, "padding": "same",
                      "head_init": "normal", "meta_lr": 1e-3}
#: Per way: (5-way, 20-way) inner lr, steps, meta-batch and test steps (main.py:10-14; paper A.1).
_PAPER_STEPS = {
    True: {"inner_lr": 0.4, "inner_steps": 1, "meta_batch_size": 32, "test_inner_steps": 3},
    False: {"inner_lr": 0.1, "inner_steps": 5, "meta_batch_size": 16, "test_inner_steps": 5},
}

FINN2017_NOTES = (
    "Follows cbfinn/maml at a7f45f1 (Omniglot). Inner loss: xent returns per-example cross-entropy / K "
    "(utils.py:56-58) and tf.gradients sums it (maml.py:87-94), so inner_lr 0.4 (5-way) / 0.1 (20-way) "
    "multiplies N times the mean (inner_loss=sum/K: an effective 2.0 on the mean, train and test). Outer loss: "
    "sum over tasks and queries / meta-batch (maml.py:136), N times our mean; Adam is invariant to that scale "
    "but for its epsilon (1e-8, effectively 1e-8/N there): we use the mean. Network: 4 x [3x3 conv, 64, stride "
    "2, TF 'SAME' padding] (utils.py:28-33), tf.contrib batch_norm with its defaults: offset only, no scale, "
    "eps 1e-3, batch statistics always (utils.py:39-41; issues #9, #37), its offsets meta-learned but not "
    "adapted (outside `weights`, maml.py:215-218); conv biases (maml.py:194-200) omitted: batch norm subtracts "
    "them exactly, so their gradient is zero; 2x2 map mean-pooled (maml.py:222-223); head N(0, 1) "
    "(tf.random_normal, maml.py:205-207); conv weights Glorot-uniform (maml.py:189). Protocol: 60000 "
    "iterations, meta-batch 32 (5-way) / 16 (20-way), 1 / 5 inner steps (main.py:10-14, a7f45f1), Adam 1e-3, "
    "K queries per class in training and test (main.py:251, 270-281), 600 test tasks with a 1.96 s/sqrt(n) "
    "interval (main.py:163, 198-201), the final iterate tested (main.py:333). Test-time steps: the code reports "
    "accuracy after each of 0..10 steps (main.py:193, 212) without choosing; the paper (appendix A.1) "
    "evaluates with 3 (5-way) / 5 (20-way) steps: we adapt for those. Differences: the class split is the "
    "Vinyals et al. split shipped with metabench (1028/172/423 characters, rotations by 90/180/270 degrees as "
    "classes of their own), not the reference code's os.listdir-ordered random 1100/100/423 split with a random "
    "rotation per class per task (data_generator.py:42-54, 135-151); the 600 test tasks are a fixed, hashed "
    "manifest, identical for every learner."
)

FINN2017 = Paper(
    name="finn2017",
    title="Finn, Abbeel & Levine 2017 (MAML)",
    learners=("maml", "fomaml", "finetune"),
    cells=((5, 1), (5, 5), (20, 1), (20, 5)),
    preset=finn2017_preset,
    selection="last",
    anchors=(
        Anchor("maml", 5, 1, 98.7, 0.4, "95% CI over 600 test tasks", _FINN),
        Anchor("maml", 5, 5, 99.9, 0.1, "95% CI over 600 test tasks", _FINN),
        Anchor("maml", 20, 1, 95.8, 0.3, "95% CI over 600 test tasks", _FINN),
        Anchor("maml", 20, 5, 98.9, 0.2, "95% CI over 600 test tasks", _FINN),
        *(Anchor("fomaml", w, k, m, c, "± as printed (its kind is not stated where we could read it)", _NICHOL,
                 verified=False, protocol="run by Nichol et al., not by the MAML reference code")
          for (w, k), m, c in zip(((5, 1), (5, 5), (20, 1), (20, 5)), (98.3, 99.2, 89.4, 97.9), (0.5, 0.2, 0.5, 0.1))),
    ),
    notes="The fine-tune baseline has no published number on this protocol: we report ours.",
    quick=Quick(cells=((5, 1),), settings={"iterations": 600, "val_every": 100, "checkpoint_every": 100},
                learners={"maml": {"meta_batch_size": 8}, "fomaml": {"meta_batch_size": 8}},
                description="600 iterations, meta-batch 8"),
)


@hookimpl
def bench_register_papers(register: Callable[[object], None]) -> None:
    register(FINN2017)
