"""MAML (Finn et al. 2017) and first-order MAML on the conv4 network.

Meta-training: for each task, take ``inner_steps`` SGD steps (lr ``inner_lr``) from the meta-parameters
on the support loss, measure the query loss of the adapted parameters, and update the meta-parameters with
Adam (``meta_lr``) on the mean query loss over ``meta_batch_size`` tasks.

* second order (``maml``): the meta-gradient differentiates through the inner SGD steps.
* first order (``fomaml``): the meta-gradient is the query-loss gradient with respect to the *adapted*
  parameters, averaged over tasks; no second derivatives are ever formed.

Two implementations share the learner:

* ``vectorized_meta_gradient`` (``vectorize=True``; the default on CUDA and for small tasks on the CPU): ``torch.func.grad`` for the inner loop and ``vmap``
  over the task dimension (the network is already a pure function of its parameter dict).
* ``reference_meta_gradient`` (``vectorize=False``; the default for large tasks on the CPU): a plain Python loop over tasks with
  ``torch.autograd.grad(create_graph=True)`` and the native ``F.batch_norm``, written independently so
  tests can compare the two and ``bench perf`` can time the vectorized path against it.

Speed switches (config fields; each is covered by the gradient-equivalence tests):

* ``cuda_graph`` (default on CUDA): the whole meta-update, Adam step included, is captured once in a CUDA
  graph and replayed (``benchmark.graphs.GraphedStep``); Adam runs with ``capturable=True``.
* ``compile`` (default off): ``torch.compile`` of the vmapped meta-gradient. Compilation costs minutes once
  per process (the README's performance section has the measurements), so it only pays for long runs.

Paper defaults (``default_config``): 5-way: inner lr 0.4, 1 inner step, meta-batch 32; 20-way: inner lr
0.1, 5 inner steps, meta-batch 16; Adam 1e-3. At test time we adapt for 10 steps: the paper's text says
3 (5-way) / 5 (20-way) test steps, but the authors' released code (``test_num_updates``) uses 10 for its
reported Omniglot results, and more steps at the train lr do not hurt on Omniglot. Batch norm is
transductive: the support set and the query set are each normalised with their own batch statistics, as in
the reference code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch.func import grad, grad_and_value, vmap

from benchmark import hookimpl
from benchmark.papers import Anchor, Paper, Preset, Quick
from benchmark.config import option
from benchmark.episodes import EpisodeBatch
from benchmark.errors import ConfigError
from benchmark.graphs import GraphedStep
from benchmark.learner import Episodes, Learner, RunContext
from benchmark.toolkit.conv4 import (
    BN_EPS, DEPTH, Params, conv4_forward, init_conv4, load_training_state, training_state,
)

# --------------------------------------------------------------------------------------------------------
# Shared pieces (one task, pure functions)
# --------------------------------------------------------------------------------------------------------


def loss_and_accuracy(params: Params, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and accuracy of one task's batch: x [B, 1, 28, 28], y [B] -> (0-dim, 0-dim)."""
    logits = conv4_forward(params, x)
    accuracy = (logits.argmax(dim=-1) == y).to(logits.dtype).mean()
    return F.cross_entropy(logits, y), accuracy


def adapt(params: Params, support_x: torch.Tensor, support_y: torch.Tensor, lr: float, steps: int) -> Params:
    """``steps`` SGD steps on one task's support loss (functional: differentiable w.r.t. ``params``
    under an outer ``torch.func`` transform).

    Args:
        support_x: [N*K, 1, 28, 28]; support_y: [N*K]
    """
    support_grad = grad(lambda p: loss_and_accuracy(p, support_x, support_y)[0])
    for _ in range(steps):
        g = support_grad(params)
        params = {k: v - lr * g[k] for k, v in params.items()}
    return params


# --------------------------------------------------------------------------------------------------------
# Vectorized path: vmap over tasks
# --------------------------------------------------------------------------------------------------------


def vectorized_meta_gradient(
    params: Params, batch: EpisodeBatch, inner_lr: float, inner_steps: int, first_order: bool
) -> tuple[Params, torch.Tensor, torch.Tensor]:
    """The meta-gradient of the mean query loss over the batch's T tasks, vmapped over tasks.

    Args:
        params: meta-parameters (plain tensors; they need not require grad).
        batch: T episodes in the params' dtype and device.

    Returns:
        (gradient dict shaped like ``params``, mean query loss 0-dim, mean query accuracy 0-dim); loss and
        accuracy are measured after adaptation.
    """
    sx, sy, qx, qy = batch.support_x, batch.support_y, batch.query_x, batch.query_y
    if first_order:
        # Adapted parameters per task (batched along dim 0); nothing outside records a graph.
        adapted = vmap(lambda sx_t, sy_t: adapt(params, sx_t, sy_t, inner_lr, inner_steps))(sx, sy)
        task_grads, (losses, accs) = vmap(grad_and_value(loss_and_accuracy, has_aux=True))(adapted, qx, qy)
        return {k: g.mean(dim=0) for k, g in task_grads.items()}, losses.mean(), accs.mean()

    def task_query_loss(p: Params, sx_t, sy_t, qx_t, qy_t) -> tuple[torch.Tensor, torch.Tensor]:
        return loss_and_accuracy(adapt(p, sx_t, sy_t, inner_lr, inner_steps), qx_t, qy_t)

    def meta_loss(p: Params) -> tuple[torch.Tensor, torch.Tensor]:
        losses, accs = vmap(task_query_loss, in_dims=(None, 0, 0, 0, 0))(p, sx, sy, qx, qy)
        return losses.mean(), accs.mean()

    grads, (loss, acc) = grad_and_value(meta_loss, has_aux=True)(params)
    return grads, loss, acc


def vectorized_adapted_logits(
    params: Params, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, lr: float, steps: int
) -> torch.Tensor:
    """Adapt to each of T support sets and classify its query set: -> logits [T, N*Q, N]."""

    def one_task(sx_t, sy_t, qx_t):
        return conv4_forward(adapt(params, sx_t, sy_t, lr, steps), qx_t)

    return vmap(one_task)(support_x, support_y, query_x)


# --------------------------------------------------------------------------------------------------------
# Reference path: a plain per-task loop with autograd and native batch norm
# --------------------------------------------------------------------------------------------------------


def reference_forward(params: Params, x: torch.Tensor) -> torch.Tensor:
    """conv4 logits [B, N] of x [B, 1, 28, 28] with native training-mode ``F.batch_norm`` (no running stats).

    An independent implementation of ``benchmark.toolkit.conv4.conv4_forward``, for tests and the loop path.
    """
    h = x
    for i in range(1, DEPTH + 1):
        h = F.conv2d(h, params[f"conv{i}.weight"], stride=2, padding=1)
        h = F.batch_norm(h, None, None, params[f"bn{i}.weight"], params[f"bn{i}.bias"], training=True, eps=BN_EPS)
        h = F.relu(h)
    return F.linear(h.mean(dim=(2, 3)), params["head.weight"], params["head.bias"])


def reference_adapt(params: Params, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int, create_graph: bool) -> Params:
    """``steps`` SGD steps with ``torch.autograd.grad`` on one task; ``params`` must require grad."""
    for _ in range(steps):
        loss = F.cross_entropy(reference_forward(params, x), y)
        g = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        params = {k: v - lr * gk for (k, v), gk in zip(params.items(), g)}
    return params


def reference_meta_gradient(
    params: Params, batch: EpisodeBatch, inner_lr: float, inner_steps: int, first_order: bool
) -> tuple[Params, torch.Tensor, torch.Tensor]:
    """Same contract as ``vectorized_meta_gradient``, one task at a time."""
    with torch.enable_grad():
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        total = {k: torch.zeros_like(v) for k, v in params.items()}
        loss_sum = torch.zeros((), dtype=batch.query_x.dtype, device=batch.device)
        acc_sum = torch.zeros_like(loss_sum)
        for t in range(batch.num_tasks):
            fast = reference_adapt(leaves, batch.support_x[t], batch.support_y[t], inner_lr, inner_steps,
                                   create_graph=not first_order)
            if first_order:
                # Differentiate w.r.t. the adapted weights themselves: no path back through the inner steps.
                fast = {k: v.detach().requires_grad_() for k, v in fast.items()}
            logits = reference_forward(fast, batch.query_x[t])
            loss = F.cross_entropy(logits, batch.query_y[t])
            wrt = fast if first_order else leaves
            for k, g in zip(wrt, torch.autograd.grad(loss, list(wrt.values()))):
                total[k] += g
            loss_sum += loss.detach()
            acc_sum += (logits.argmax(dim=-1) == batch.query_y[t]).to(loss_sum.dtype).mean()
    n = batch.num_tasks
    return {k: g / n for k, g in total.items()}, loss_sum / n, acc_sum / n


def reference_adapted_logits(
    params: Params, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, lr: float, steps: int
) -> torch.Tensor:
    """Loop counterpart of ``vectorized_adapted_logits``: -> logits [T, N*Q, N]."""
    out = []
    with torch.enable_grad():
        for t in range(support_x.shape[0]):
            leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
            fast = reference_adapt(leaves, support_x[t], support_y[t], lr, steps, create_graph=False)
            out.append(reference_forward(fast, query_x[t]).detach())
    return torch.stack(out)


# --------------------------------------------------------------------------------------------------------
# The learners
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MAMLConfig:
    """MAML hyperparameters (defaults: the paper's 5-way Omniglot settings)."""

    inner_lr: float = option(0.4, "SGD step size of the inner (adaptation) loop", min=0, min_inclusive=False)
    inner_steps: int = option(1, "inner SGD steps during meta-training", min=1, max=100)
    test_inner_steps: int = option(10, "inner SGD steps when adapting to a test episode", min=0, max=1000)
    meta_batch_size: int = option(32, "tasks per meta-update", min=1, max=100_000)
    meta_lr: float = option(1e-3, "Adam learning rate of the meta-update", min=0, min_inclusive=False, max=1.0)
    first_order: bool = option(False, "drop second derivatives (first-order MAML)")
    eval_batch_size: int = option(25, "test episodes adapted at once in predict", min=1, max=10_000)
    vectorize: bool | None = option(None, (
        "true: vmap over tasks; false: the per-task loop; none (default): vmap on CUDA, and on the CPU for tasks "
        "of at most 20 images (larger ones run faster in the loop)"))
    cuda_graph: bool | None = option(None, (
        "capture the whole meta-update (Adam step included) in a CUDA graph and replay it; none (default): "
        "on when the device is CUDA"))
    compile: bool = option(False, (
        "torch.compile the vmapped meta-gradient (needs vectorize); compilation costs minutes once per process "
        "(see the README's performance section)"))


@dataclass(frozen=True)
class FOMAMLConfig(MAMLConfig):
    """First-order MAML: the same hyperparameters with ``first_order`` on."""

    first_order: bool = option(True, "drop second derivatives (first-order MAML)")


GradientFn = Callable[[Params, EpisodeBatch, float, int, bool], tuple[Params, torch.Tensor, torch.Tensor]]


class MAML(Learner):
    """Second-order MAML with transductive batch norm; see the module docstring."""

    name = "maml"
    Config = MAMLConfig
    paper = "Finn, Abbeel & Levine 2017, Model-Agnostic Meta-Learning"

    def __init__(self, config: MAMLConfig, context: RunContext, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(config, context)
        if context.train_way != context.way:
            raise ConfigError(f"{self.name} has one output per class, so it trains and tests with the same way: "
                              f"drop --train-way (got train way {context.train_way}, test way {context.way})")
        self.dtype = dtype
        self.params: Params = init_conv4(context.generator("init"), context.way, dtype=dtype, device=context.device)
        self.vectorized = config.vectorize if config.vectorize is not None else _vmap_is_faster(context)
        self.graphed = config.cuda_graph if config.cuda_graph is not None else context.device.type == "cuda"
        _validate_switches(config, context, self.vectorized, self.graphed)
        # capturable: Adam keeps its step count on the device, so its update can be replayed from a graph.
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=config.meta_lr, capturable=self.graphed)
        self._gradient_fn: GradientFn = vectorized_meta_gradient if self.vectorized else reference_meta_gradient
        if config.compile:
            self._gradient_fn = _compiled(vectorized_meta_gradient)
        self._graph = GraphedStep(self._update, context.device, state=self._updated_tensors) if self.graphed else None
        self._shape = (context.way, context.shot, context.query)  # (N, K, Q) of the batches _update receives

    @classmethod
    def default_config(cls, way: int, shot: int) -> MAMLConfig:
        """Finn et al.'s Omniglot settings: 20-way uses a smaller inner lr, more steps, smaller meta-batch."""
        if way >= 20:
            return cls.Config(inner_lr=0.1, inner_steps=5, meta_batch_size=16)
        return cls.Config(inner_lr=0.4, inner_steps=1, meta_batch_size=32)

    def training(self) -> list[Episodes]:
        return [Episodes(tasks=self.config.meta_batch_size)]

    @property
    def eval_batch_size(self) -> int:
        return self.config.eval_batch_size

    def describe(self) -> dict[str, Any]:
        return {
            "order": "first" if self.config.first_order else "second",
            "inner steps (train/test)": f"{self.config.inner_steps}/{self.config.test_inner_steps}",
            "batch norm": "transductive",
        }

    def implementation(self) -> dict[str, Any]:
        return {"tasks": "vmap" if self.vectorized else "loop", "cuda graph": self.graphed,
                "compiled": self.config.compile}

    @classmethod
    def reference_config(cls, config: MAMLConfig) -> MAMLConfig:
        """The plain per-task loop of the same algorithm, which ``bench perf`` times beside the shipped one."""
        return dataclasses.replace(config, vectorize=False, cuda_graph=False, compile=False)

    @classmethod
    def ablation_configs(cls, config: MAMLConfig) -> dict[str, MAMLConfig]:
        """For ``bench perf --ablation``: plain vmap, then vmap with each speed switch that ``config`` turns on
        (or leaves to the device), one at a time, so each switch's share of the speed-up is measured."""
        plain = dataclasses.replace(config, vectorize=True, cuda_graph=False, compile=False)
        variants = {"vmap": plain}
        if config.cuda_graph is not False:
            variants["vmap + cuda graph"] = dataclasses.replace(plain, cuda_graph=True)
        if config.compile:
            variants["vmap + compile"] = dataclasses.replace(plain, compile=True)
        return variants

    def _updated_tensors(self) -> list[torch.Tensor]:
        """What a meta-update changes in place: the parameters and Adam's state (moments, step count)."""
        state = [t for p in self.params.values() for t in self.optimizer.state.get(p, {}).values()
                 if isinstance(t, torch.Tensor)]
        return list(self.params.values()) + state

    def _frozen_params(self) -> Params:
        return {k: v.detach() for k, v in self.params.items()}

    def meta_train_step(self, batch: EpisodeBatch) -> Mapping[str, torch.Tensor]:
        batch = batch.to(self.context.device)
        self._shape = (batch.way, batch.shot, batch.query)
        inputs = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        loss, acc = self._graph(*inputs) if self._graph is not None else self._update(*inputs)
        return {"loss": loss, "accuracy": acc}

    def _update(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                query_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One meta-update in place (parameters and Adam state): the step a CUDA graph captures.

        Args:
            support_x: [T, N*K, 1, 28, 28]; support_y: [T, N*K]; query_x: [T, N*Q, 1, 28, 28]; query_y: [T, N*Q]
                (images in any float dtype; they are cast to the learner's).

        Returns:
            (mean query loss, mean query accuracy) over the T tasks, 0-dim, after adaptation.
        """
        batch = EpisodeBatch(support_x.to(self.dtype), support_y, query_x.to(self.dtype), query_y, *self._shape)
        grads, loss, acc = self._gradient_fn(self._frozen_params(), batch, self.config.inner_lr,
                                             self.config.inner_steps, self.config.first_order)
        for k, p in self.params.items():
            p.grad = grads[k]
        try:
            self.optimizer.step()
        finally:  # also when a CUDA-graph capture fails inside step(): drop gradients from its memory pool
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), acc.detach()

    def predict(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        fn = vectorized_adapted_logits if self.vectorized else reference_adapted_logits
        with torch.enable_grad():  # adaptation needs gradients even if a caller disabled them
            logits = fn(self._frozen_params(), support_x.to(self.dtype), support_y, query_x.to(self.dtype),
                        self.config.inner_lr, self.config.test_inner_steps)
        return logits.detach()

    def state_dict(self) -> dict[str, Any]:
        """``{"params": {name: tensor}, "optimizer": Adam state}`` as independent copies."""
        return training_state(self.params, self.optimizer)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_training_state(self.params, self.optimizer, state)
        for group in self.optimizer.param_groups:  # loading copies the saved groups' flags: keep ours
            group["capturable"] = self.graphed
        if self._graph is not None:  # the optimizer's state tensors were replaced: capture them anew
            self._graph.reset()


class FOMAML(MAML):
    """First-order MAML: the same code path with ``first_order=True`` by default."""

    name = "fomaml"
    Config = FOMAMLConfig


#: On the CPU, vmap wins only while a task is small; above this the loop's fused native batch norm wins
#: (`bench perf --ablation` measures both; the README's performance section has the figures).
CPU_VMAP_MAX_IMAGES_PER_TASK = 20


def _vmap_is_faster(context: RunContext) -> bool:
    """The default of ``vectorize``: vmap on CUDA (batched kernels win by far), on the CPU only for small tasks."""
    if context.device.type == "cuda":
        return True
    return context.way * (context.shot + context.query) <= CPU_VMAP_MAX_IMAGES_PER_TASK


def _compiled(fn: GradientFn, backend: str = "inductor") -> GradientFn:
    """``torch.compile(fn)`` (static shapes), with a failure turned into an error that names the switch.

    Compilation happens at the first call, so that is where an unsupported PyTorch build shows up.
    ``backend="aot_eager"`` (tests) traces exactly as inductor does but runs the traced ops eagerly.
    """
    compiled = torch.compile(fn, dynamic=False, backend=backend)
    from torch._dynamo.exc import TorchDynamoException  # tracing and backend failures (not OOM, not bugs)

    def call(*args: Any) -> tuple[Params, torch.Tensor, torch.Tensor]:
        try:
            return compiled(*args)
        except TorchDynamoException as exc:
            raise ConfigError(
                f"torch.compile failed on torch {torch.__version__} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}): run with -o compile=false"
            ) from exc

    return call


def _validate_switches(config: MAMLConfig, context: RunContext, vectorized: bool, graphed: bool) -> None:
    if graphed and context.device.type != "cuda":
        raise ConfigError(f"cuda_graph=true needs a CUDA device, not {context.device.type}: run with --device cuda "
                          "or pass -o cuda_graph=false")
    if config.compile and not vectorized:
        raise ConfigError("compile=true compiles the vectorized path: pass -o vectorize=true as well, or drop "
                          "-o compile=true")


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
    """The paper's Omniglot settings for one cell (see ``FINN2017_NOTES``)."""
    maml = ({"inner_lr": 0.4, "inner_steps": 1, "meta_batch_size": 32} if way == 5 else
            {"inner_lr": 0.1, "inner_steps": 5, "meta_batch_size": 16})
    maml["test_inner_steps"] = 10
    return Preset(
        settings={"query": shot, "episodes": 600, "iterations": 60000, "protocol": "vinyals"},
        learners={"maml": dict(maml), "fomaml": dict(maml)},
        notes=FINN2017_NOTES,
    )


FINN2017_NOTES = (
    "Class split: the Vinyals et al. split shipped with metabench (1028/172/423 characters), not the reference "
    "code's random 1100/100/423 split; rotations by 90/180/270 degrees are classes of their own. Test tasks: a "
    "fixed, hashed manifest of 600 episodes, identical for every learner."
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
