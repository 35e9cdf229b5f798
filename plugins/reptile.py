"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms"), as openai/supervised-reptile
runs it on Omniglot.

Meta-training: each of ``meta_batch_size`` tasks adapts a copy of the weights by ``inner_steps`` Adam steps
(``beta1=0``) on minibatches of ``inner_batch`` of its N x ``train_shot`` images, drawn without replacement
by cycling through reshuffles; the weights then move a fraction ``epsilon`` of the way to the mean of the
adapted weights, ``epsilon`` falling linearly from ``meta_step`` to ``meta_step_final`` over the run. No
second derivatives, no query set (the query loss after adaptation is logged, never used).

The inner Adam's state is not reset between tasks: in the released code one Adam runs the tasks of a
meta-batch one after another, so its moments and step count carry over from task to task and from one
meta-iteration to the next (the maintainer says Reptile needs its second moments). Processing the tasks in
parallel (``vmap``) rules out that order, so ``adam_carry`` says what carries over:

* ``"merged"`` (the default; vectorizable): every task of a meta-batch starts from the carried state, and
  the state carried on is the one that has seen all the tasks' gradients in task order, exactly what the
  sequential Adam would hold had it seen the same gradients (``plugins.gradient.chain_adam_states``). Only
  the moments a task starts from differ from the released code's: by at most (T - 1) x steps of its
  exponential average (20 of beta2's ~1000-step memory for the 5-way settings).
* ``"chained"`` (loop only): each task starts from the state the previous one ended with, as in the released
  code.

At test, every episode starts from the end-of-training state, which it never changes (the released code
saves all variables, Adam's included, before a test task and restores them after). Test-time minibatches are
drawn from a generator seeded by the episode's content, so an episode's prediction does not depend on its
neighbours in a ``predict`` call.

Batch norm uses batch statistics (the released network's ``training=True``). ``transductive=true`` classifies
an episode's queries in one batch; otherwise each query is classified in a batch with the whole support set
(support + 1 images), whose statistics it shares, as the released code's default evaluation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import torch
from torch.func import vmap

from benchmark import hookimpl
from benchmark.config import option
from benchmark.episodes import EpisodeBatch
from benchmark.errors import ConfigError
from benchmark.learner import Episodes, Learner, RunContext
from benchmark.papers import Anchor, Paper, Preset, Quick
from benchmark.toolkit.conv4 import Conv4Arch, Params, init_conv4
from benchmark.toolkit.episode_seeds import episode_generators
from benchmark.toolkit.graphs import GraphedStep
from plugins.gradient import (
    AdamSettings, InnerLoop, RuleState, chain_adam_states, inner_loop, loss_and_accuracy, network, trajectory,
)
from plugins.gradient_learner import (
    AdaptedPrediction, SpeedVariants, cuda_graph_option, eval_batch_size_option, same_way_only, validate_switches,
    vectorize_option,
)
from plugins.gradient_reference import reference_reptile_logits, reference_reptile_tasks

#: The released network: stride-2 'same' convolutions, tf.layers.batch_normalization (scale and offset, eps
#: 1e-3), ReLU, and a dense layer on the flattened 2x2x64 map.
REPTILE_ARCH = Conv4Arch(padding="same", bn_scale=True, bn_eps=1e-3, features="flatten")


@dataclass(frozen=True)
class ReptileConfig:
    """Reptile hyperparameters (defaults: the released 5-way Omniglot commands; 20-way by ``default_config``)."""

    inner_lr: float = option(1e-3, "Adam step size of the inner loop", min=0, min_inclusive=False, max=1.0)
    inner_steps: int = option(5, "inner Adam steps per training task", min=1, max=10_000)
    inner_batch: int = option(10, "images per inner minibatch in training", min=1, max=10_000)
    test_inner_steps: int = option(50, "inner Adam steps on a test episode", min=0, max=10_000)
    test_inner_batch: int = option(5, "images per inner minibatch on a test episode", min=1, max=10_000)
    meta_step: float = option(1.0, "interpolation step epsilon towards the adapted weights at the first iteration",
                              min=0, max=1.0)
    meta_step_final: float = option(0.0, "epsilon at the end of the run (linear in between)", min=0, max=1.0)
    meta_batch_size: int = option(5, "tasks per meta-iteration", min=1, max=100_000)
    transductive: bool = option(False, "classify an episode's queries in one batch (batch-norm statistics shared "
                                "by the queries); false: each query with the support set")
    inner_loss: Literal["sum", "mean"] = option("sum", "support loss: sum of the per-example cross-entropies "
                                                "(TensorFlow's minimize of the released loss) or their mean")
    adam_beta1: float = option(0.0, "inner Adam's beta1 (the released code: 0)", min=0, max=0.999999)
    adam_beta2: float = option(0.999, "inner Adam's beta2", min=0, max=0.999999)
    adam_eps: float = option(1e-8, "inner Adam's epsilon (added to sqrt(v), as TensorFlow's)", min=0, max=1.0)
    adam_carry: Literal["merged", "chained"] = option("merged", (
        "what the inner Adam state carries between the tasks of a meta-batch: merged (every task starts from the "
        "carried state; the state carried on has seen all tasks' gradients in order; vectorizable) or chained "
        "(each task starts from the previous one's, as the released code; loop only)"))
    eval_batch_size: int = eval_batch_size_option()
    vectorize: bool | None = vectorize_option("vmap unless adam_carry=chained")
    cuda_graph: bool | None = cuda_graph_option("on when the device is CUDA and the tasks are vectorized")


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to ``device`` without making the host wait: a copy to a GPU from ordinary (pageable)
    memory waits for the device's queued work, a copy from pinned memory does not."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def minibatch_schedule(generators: list[torch.Generator], set_size: int, batch: int, steps: int) -> torch.Tensor:
    """Indices [T, steps, batch] of each step's minibatch, one row per generator: the released code's
    ``_mini_batches`` without replacement (shuffle, deal out batches, reshuffle when the set runs out; a batch
    may span two shuffles)."""
    need = steps * batch
    shuffles = -(-need // set_size)
    rows = [torch.cat([torch.randperm(set_size, generator=g) for _ in range(shuffles)])[:need] for g in generators]
    return torch.stack(rows).view(len(generators), steps, batch)


def minibatches(x: torch.Tensor, y: torch.Tensor, schedule: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each task's minibatches: x [T, S, ...], y [T, S], schedule [T, steps, B] -> ([T, steps, B, ...], [T, steps, B])."""
    tasks = torch.arange(x.shape[0], device=x.device).view(-1, 1, 1)
    return x[tasks, schedule], y[tasks, schedule]


def classify(params: Params, support_x: torch.Tensor, query_x: torch.Tensor, inner: InnerLoop,
             transductive: bool) -> torch.Tensor:
    """Logits [N*Q, N] of one task's queries, in one batch or each beside the whole support set (vmapped over
    the queries): support_x [N*K, 1, 28, 28], query_x [N*Q, 1, 28, 28]."""
    if transductive:
        return network(params, query_x, inner)
    return vmap(lambda q: network(params, torch.cat([support_x, q[None]]), inner)[-1])(query_x)


def vectorized_reptile_tasks(params: Params, xs: torch.Tensor, ys: torch.Tensor, inner: InnerLoop,
                             state: RuleState) -> tuple[Params, RuleState]:
    """Same contract as ``plugins.gradient_reference.reference_reptile_tasks`` with ``carry="merged"``: the T
    tasks adapt in parallel (vmap) from ``state``. xs [T, steps, B, 1, 28, 28], ys [T, steps, B]."""
    adapted, ends = vmap(lambda x, y: inner_loop(params, x, y, inner, x.shape[0], state=state))(xs, ys)
    return adapted, chain_adam_states(state, ends, inner.adam, xs.shape[1])


def vectorized_reptile_logits(params: Params, support_x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor,
                              query_x: torch.Tensor, inner: InnerLoop, state: RuleState, transductive: bool,
                              every_step: bool = False) -> torch.Tensor:
    """Same contract as ``plugins.gradient_reference.reference_reptile_logits``, vmapped over tasks."""

    def one_task(sx_t, xs_t, ys_t, qx_t):
        per_step = [classify(params, sx_t, qx_t, inner, transductive)] if every_step else []
        fast = params
        for fast, _ in trajectory(params, xs_t, ys_t, inner, xs_t.shape[0], state=state):
            if every_step:
                per_step.append(classify(fast, sx_t, qx_t, inner, transductive))
        return torch.stack(per_step) if every_step else classify(fast, sx_t, qx_t, inner, transductive)

    out = vmap(one_task)(support_x, xs, ys, query_x)
    return out.transpose(0, 1) if every_step else out


class Reptile(SpeedVariants, AdaptedPrediction, Learner):
    """Reptile with a persistent inner Adam; see the module docstring."""

    name = "reptile"
    Config = ReptileConfig
    paper = "Nichol, Achiam & Schulman 2018, On First-Order Meta-Learning Algorithms (Reptile)"

    def __init__(self, config: ReptileConfig, context: RunContext, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(config, context)
        same_way_only(self.name, context)
        if config.adam_carry == "chained" and config.vectorize:
            raise ConfigError("adam_carry=chained runs the tasks one after another: pass -o vectorize=false, or "
                              "-o adam_carry=merged to vectorize")
        device = context.device
        self.vectorized = config.vectorize if config.vectorize is not None else config.adam_carry == "merged"
        # The per-task loop reads the inner Adam's step count on the host (gradient_reference.reference_adam_adapt),
        # so only the vectorized step can be captured.
        self.graphed = config.cuda_graph if config.cuda_graph is not None else device.type == "cuda" and self.vectorized
        validate_switches(config, context, self.vectorized, self.graphed)
        if self.graphed and not self.vectorized:
            raise ConfigError("cuda_graph=true captures the vectorized step, and the per-task loop (vectorize=false) "
                              "reads the inner Adam's step count on the host: pass -o cuda_graph=false, or "
                              "-o vectorize=true (with adam_carry=merged)")
        self.dtype = dtype
        self.inner = InnerLoop(config.inner_lr, config.inner_steps, config.inner_loss, True, REPTILE_ARCH, rule="adam",
                               adam=AdamSettings(config.adam_beta1, config.adam_beta2, config.adam_eps))
        self.params: Params = init_conv4(context.generator("init"), context.way, dtype=dtype, device=device,
                                         arch=REPTILE_ARCH, head_init="xavier")
        moving = [k for k in self.params if self.inner.adapts(k)]
        #: The inner Adam's state carried between tasks and iterations (what every test episode starts from).
        self.adam: RuleState = {"step": torch.zeros((), dtype=dtype, device=device),
                                "m": {k: torch.zeros_like(self.params[k]) for k in moving},
                                "v": {k: torch.zeros_like(self.params[k]) for k in moving}}
        #: Meta-iterations done, on the device so that a captured step can anneal epsilon from it.
        self.iteration = torch.zeros((), dtype=dtype, device=device)
        self._minibatch_generator = context.generator("reptile-minibatches")
        self._graph = GraphedStep(self._update, device, state=self._updated_tensors) if self.graphed else None

    @classmethod
    def default_config(cls, way: int, shot: int) -> ReptileConfig:
        """The released commands' settings for the way (README lines 35-56)."""
        return dataclasses.replace(cls.Config(), **_COMMANDS[way < 20])

    def training(self) -> list[Episodes]:
        return [Episodes(tasks=self.config.meta_batch_size)]

    @property
    def eval_batch_size(self) -> int:
        return self.config.eval_batch_size

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {
            "order": "first",
            "inner steps (train/test)": f"{c.inner_steps}/{c.test_inner_steps}",
            "batch norm": "transductive" if c.transductive else "support + 1 query",
            "adapts": "all",
            "inner optimizer": f"Adam (beta1 {c.adam_beta1:g}), state kept across tasks",
        }

    def implementation(self) -> dict[str, Any]:
        return {"tasks": "vmap" if self.vectorized else "loop", "cuda graph": self.graphed}

    # -- training ------------------------------------------------------------------------------------------
    def _state_tensors(self) -> list[torch.Tensor]:
        return [self.adam["step"], *self.adam["m"].values(), *self.adam["v"].values()]

    def _updated_tensors(self) -> list[torch.Tensor]:
        """What a meta-iteration changes in place: the weights, the carried Adam state and the iteration count."""
        return [*self.params.values(), *self._state_tensors(), self.iteration]

    def meta_train_step(self, batch: EpisodeBatch) -> Mapping[str, torch.Tensor]:
        batch = batch.to(self.context.device)
        tasks, size = batch.support_x.shape[:2]
        c = self.config
        schedule = minibatch_schedule([self._minibatch_generator] * tasks, size, c.inner_batch, c.inner_steps)
        inputs = (batch.support_x, batch.support_y, batch.query_x, batch.query_y, _to_device(schedule, self.context.device))
        loss, acc = self._graph(*inputs) if self._graph is not None else self._update(*inputs)
        return {"loss": loss, "accuracy": acc}

    def _update(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, query_y: torch.Tensor,
                schedule: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One meta-iteration in place: the step a CUDA graph captures.

        Args:
            support_x: [T, N*K, 1, 28, 28]; support_y: [T, N*K]; query_x: [T, N*Q, 1, 28, 28]; query_y: [T, N*Q];
            schedule: [T, steps, B] indices of each inner step's minibatch in the support set.

        Returns:
            (query loss, query accuracy) after adaptation, means over tasks (queries in one batch: a log only).
        """
        xs, ys = minibatches(support_x.to(self.dtype), support_y, schedule)
        params = {k: v.detach() for k, v in self.params.items()}
        if self.vectorized:
            adapted, carried = vectorized_reptile_tasks(params, xs, ys, self.inner, self.adam)
        else:
            adapted, carried = reference_reptile_tasks(params, xs, ys, self.inner, self.adam, self.config.adam_carry)
        losses, accs = vmap(lambda p, x, y: loss_and_accuracy(p, x, y, self.inner))(adapted, query_x.to(self.dtype),
                                                                                     query_y)
        c = self.config
        progress = self.iteration / max(self.context.iterations, 1)
        epsilon = c.meta_step + (c.meta_step_final - c.meta_step) * progress
        with torch.no_grad():
            for k, p in self.params.items():
                p.add_(epsilon * (adapted[k].mean(dim=0) - p))
            for t, value in zip(self._state_tensors(), [carried["step"], *carried["m"].values(), *carried["v"].values()]):
                t.copy_(value)
            self.iteration.add_(1)
        return losses.mean().detach(), accs.mean().detach()

    # -- testing (predict and predict_steps: AdaptedPrediction) -----------------------------------------------
    def _adapted_logits(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                        every_step: bool) -> torch.Tensor:
        c = self.config
        generators = episode_generators(self.context.generator, support_x, support_y, "reptile-test-minibatches")
        schedule = minibatch_schedule(generators, support_x.shape[1], c.test_inner_batch, c.test_inner_steps)
        support_x = support_x.to(self.dtype)
        xs, ys = minibatches(support_x, support_y, _to_device(schedule, support_x.device))
        params = {k: v.detach() for k, v in self.params.items()}
        state = {"step": self.adam["step"].clone(), "m": dict(self.adam["m"]), "v": dict(self.adam["v"])}
        fn = vectorized_reptile_logits if self.vectorized else reference_reptile_logits
        with torch.enable_grad():  # adaptation needs gradients even if a caller disabled them
            logits = fn(params, support_x, xs, ys, query_x.to(self.dtype), self.inner, state, c.transductive, every_step)
        return logits.detach()

    # -- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Weights, the carried Adam state, the iteration count and the minibatch generator, as copies."""
        return {
            "params": {k: v.detach().clone() for k, v in self.params.items()},
            "adam": {"step": self.adam["step"].clone(), "m": {k: v.clone() for k, v in self.adam["m"].items()},
                     "v": {k: v.clone() for k, v in self.adam["v"].items()}},
            "iteration": self.iteration.clone(),
            "minibatch_generator": self._minibatch_generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state["adam"]
        with torch.no_grad():  # in place: a captured step keeps reading these tensors
            for k, v in self.params.items():
                v.copy_(state["params"][k])
            self.adam["step"].copy_(saved["step"])
            for moment in ("m", "v"):
                for k, v in self.adam[moment].items():
                    v.copy_(saved[moment][k])
            self.iteration.copy_(state["iteration"])
        self._minibatch_generator.set_state(state["minibatch_generator"].cpu())


@hookimpl
def bench_register_learners(register: Callable[[type], None]) -> None:
    register(Reptile)


# --------------------------------------------------------------------------------------------------------
# The paper: Nichol et al. 2018 (arXiv v3), Omniglot (Table 2), with and without transduction
# --------------------------------------------------------------------------------------------------------

#: Per way (5-way, 20-way): the released README commands' inner and evaluation settings (README.md:35-56).
_COMMANDS = {
    True: {"inner_lr": 1e-3, "inner_steps": 5, "inner_batch": 10, "test_inner_steps": 50, "test_inner_batch": 5},
    False: {"inner_lr": 5e-4, "inner_steps": 10, "inner_batch": 20, "test_inner_steps": 50, "test_inner_batch": 10},
}

_NICHOL = ("Nichol, Achiam & Schulman 2018, On First-Order Meta-Learning Algorithms, arXiv:1803.02999v3, Table 2 "
           "(Omniglot), row '{row}', from secondary copies (the paper could not be read here)")
_RUNS = ("± over training runs (the released code computes no interval, eval.py:27-34; the paper's wording, "
         "remembered as a spread over three seeds, is unverified)")


def _nichol2018_preset(transductive: bool) -> Callable[[int, int], Preset]:
    def preset(way: int, shot: int) -> Preset:
        """The released command for the cell (README.md:35-56), evaluated with or without transduction."""
        reptile = {**_COMMANDS[way == 5], "meta_step": 1.0, "meta_step_final": 0.0, "meta_batch_size": 5,
                   "transductive": transductive, "inner_loss": "sum", "adam_beta1": 0.0, "adam_beta2": 0.999,
                   "adam_eps": 1e-8}
        return Preset(
            settings={"query": 1, "train_shot": 10, "episodes": 10000, "iterations": 100000 if way == 5 else 200000,
                      "protocol": "vinyals", "select": "last", "val_every": 10000, "val_episodes": 100},
            learners={"reptile": reptile},
            notes=NICHOL2018_NOTES,
        )

    return preset


NICHOL2018_NOTES = (
    "Follows openai/supervised-reptile at 8f2b71c (Omniglot). Commands: README.md:35 (5w1s, --transductive), 47 "
    "(5w5s), 50 (5w1s), 53 (20w1s), 56 (20w5s): --train-shots 10, --inner-batch 10/20 and --inner-iters 5/10 "
    "(5/20-way), --learning-rate 0.001/0.0005, --meta-step 1 --meta-step-final 0, --meta-batch 5, --meta-iters "
    "100000/200000, --eval-batch 5/10, --eval-iters 50. Inner optimizer: tf.train.AdamOptimizer(beta1=0) with TF's "
    "defaults otherwise (models.py:10), minimising the per-example cross-entropy vector, i.e. its sum "
    "(models.py:27-30); its state is not reset between tasks: train_step saves and restores only the trainable "
    "variables around each task (reptile.py:24, 62-74), while each test task starts from, and is rolled back to, "
    "all variables, Adam's included (reptile.py:25-26, 114-122). Meta-update: the old weights plus epsilon times "
    "(mean of the tasks' adapted weights - old) (reptile.py:73-74; variables.py:8-21), epsilon = frac * final + "
    "(1 - frac) * initial with frac = i / meta_iters (train.py:54-55). Training tasks: N classes x train_shots "
    "images (train.py:57; reptile.py:210-221) dealt into inner batches without replacement, reshuffling when the "
    "set runs out (reptile.py:223-248); no query set. Test tasks: shots + 1 images per class, one held out as the "
    "query (reptile.py:112-113, 250-275), --eval-samples 10000 tasks (args.py:35; eval.py:27-34), the final "
    "weights (run_omniglot.py:30-41). Network: 4 x [conv 3x3, 64, stride 2, 'same' -> "
    "batch_normalization(training=True) -> ReLU], flattened 2x2x64 -> dense (models.py:18-25): batch statistics "
    "always, TF's batch-norm eps 1e-3 with scale and offset, both adapted and meta-learned; Glorot-uniform "
    "kernels (TF's default). Transduction (reptile.py:125-134): all queries in one batch; without it, each query "
    "in a batch with the whole support set. Weight decay: the default rate 1 is a no-op (args.py:37; "
    "variables.py:41-48). Differences: the inner Adam runs the meta-batch's tasks in parallel from the carried "
    "state, and the state carried on has seen all their gradients in task order (adam_carry=merged; "
    "adam_carry=chained -o vectorize=false is the released order); conv biases omitted (batch norm with batch "
    "statistics subtracts them, so their gradient is zero and Adam never moves them); the dense layer reads the "
    "map in PyTorch's channel-first order (a permutation of its i.i.d. initial weights); the class split is "
    "metabench's Vinyals split (1028/172/423 characters, rotations by 90/180/270 degrees as classes of their own "
    "in every split), not the code's random 1200/423 split reseeded by --seed with rotations as classes in "
    "training only (omniglot.py:37-63; run_omniglot.py:22-26); images are ink 1 on 0, the code's are the PNG's "
    "values, ink 0 on 1 (omniglot.py:94-95), which batch norm after the first convolution makes equivalent up to "
    "the sign of its (symmetric) initial weights; test minibatches come from a generator seeded by each episode's "
    "content; the test tasks are metabench's fixed manifest; a training episode's 1 query per class is only "
    "logged; validation every 10000 iterations on 100 episodes is a log (the code evaluates one task every 10 "
    "iterations, train.py:61-73). The README has no 20-way command with --transductive (the flag only changes "
    "evaluation); its 5-shot hyper-parameters are the same with and without it (issue #15)."
)


def _nichol2018(transductive: bool) -> Paper:
    row = "Reptile + Transduction" if transductive else "Reptile"
    means = (97.68, 99.48, 89.43, 97.12) if transductive else (95.39, 98.90, 88.14, 96.65)
    cis = (0.04, 0.06, 0.14, 0.32) if transductive else (0.09, 0.10, 0.15, 0.33)
    cells = ((5, 1), (5, 5), (20, 1), (20, 5))
    return Paper(
        name="nichol2018" if transductive else "nichol2018-nt",
        title=f"Nichol, Achiam & Schulman 2018 (Reptile, {'with' if transductive else 'without'} transduction)",
        learners=("reptile",),
        cells=cells,
        preset=_nichol2018_preset(transductive),
        selection="last",
        anchors=tuple(Anchor("reptile", w, k, m, ci, _RUNS, _NICHOL.format(row=row), verified=False)
                      for (w, k), m, ci in zip(cells, means, cis)),
        notes=("Batch norm " + ("over the queries of an episode together (transduction)" if transductive else
               "over the support set plus one query (no transduction)") + "; the ± is a spread over training runs, "
               "not an interval: no cell is judged. The other row of the paper's table is "
               + ("nichol2018-nt." if transductive else "nichol2018.")),
        quick=Quick(cells=((5, 1),), settings={"iterations": 400, "val_every": 200, "val_episodes": 20,
                                               "episodes": 200, "checkpoint_every": 200},
                    description="400 iterations, 200 test episodes"),
    )


NICHOL2018 = _nichol2018(transductive=True)
NICHOL2018_NT = _nichol2018(transductive=False)


@hookimpl
def bench_register_papers(register: Callable[[object], None]) -> None:
    register(NICHOL2018)
    register(NICHOL2018_NT)
