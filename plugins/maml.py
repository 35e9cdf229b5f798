"""MAML (Finn et al. 2017) and first-order MAML on the conv4 network.

Meta-training: for each task, take ``inner_steps`` SGD steps (lr ``inner_lr`` on the support loss named by
``inner_loss``) from the meta-parameters, measure the query loss of the adapted parameters, and update the
meta-parameters with Adam (``meta_lr``) on the mean query loss over ``meta_batch_size`` tasks.

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
  graph and replayed (``benchmark.toolkit.graphs.GraphedStep``); Adam runs with ``capturable=True``.
* ``compile`` (default off): ``torch.compile`` of the vmapped meta-gradient. Compilation costs minutes once
  per process (the README's performance section has the measurements), so it only pays for long runs.

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
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

import torch
import torch.nn.functional as F
from torch.func import grad, grad_and_value, vmap

from benchmark import hookimpl
from benchmark.papers import Anchor, Paper, Preset, Quick
from benchmark.config import option
from benchmark.episodes import EpisodeBatch
from benchmark.errors import ConfigError
from benchmark.toolkit.graphs import GraphedStep
from benchmark.learner import Episodes, Learner, RunContext
from benchmark.toolkit.conv4 import (
    DEPTH, Conv4Arch, Params, conv4_forward, init_conv4, load_training_state, training_state,
)

# --------------------------------------------------------------------------------------------------------
# Shared pieces (one task, pure functions)
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InnerLoop:
    """How a task adapts: SGD with step ``lr`` on the support loss, ``steps`` times.

    Attributes:
        loss: what ``lr`` multiplies: ``"sum/K"`` is the MAML reference code's support loss (the per-example
            cross-entropies divided by K and summed, i.e. N times their mean; cbfinn/maml ``utils.py:58``,
            ``maml.py:90``), ``"mean"`` the mean cross-entropy.
        adapt_bn: whether batch-norm parameters move in the inner loop (in the reference code they are
            meta-learned only).
        arch: the network.
    """

    lr: float
    steps: int
    loss: str = "sum/K"
    adapt_bn: bool = False
    arch: Conv4Arch = Conv4Arch()

    def adapts(self, name: str) -> bool:
        return self.adapt_bn or not name.startswith("bn")


def task_loss(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """One task's loss: logits [B, N], y [B] -> 0-dim; ``"sum/K"`` is N times the mean (B = N*K)."""
    mean = F.cross_entropy(logits, y)
    return mean * logits.shape[-1] if kind == "sum/K" else mean


def loss_and_accuracy(params: Params, x: torch.Tensor, y: torch.Tensor, arch: Conv4Arch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and accuracy of one task's batch: x [B, 1, 28, 28], y [B] -> (0-dim, 0-dim)."""
    logits = conv4_forward(params, x, arch)
    accuracy = (logits.argmax(dim=-1) == y).to(logits.dtype).mean()
    return F.cross_entropy(logits, y), accuracy


def adapt(params: Params, support_x: torch.Tensor, support_y: torch.Tensor, inner: InnerLoop, steps: int) -> Params:
    """``steps`` SGD steps on one task's support loss (functional: differentiable w.r.t. ``params``
    under an outer ``torch.func`` transform). Parameters that ``inner`` does not adapt stay as they are.

    Args:
        support_x: [N*K, 1, 28, 28]; support_y: [N*K]
    """
    fixed = {k: v for k, v in params.items() if not inner.adapts(k)}

    def support_loss(moving: Params) -> torch.Tensor:
        return task_loss(conv4_forward({**fixed, **moving}, support_x, inner.arch), support_y, inner.loss)

    moving = {k: v for k, v in params.items() if inner.adapts(k)}
    support_grad = grad(support_loss)
    for _ in range(steps):
        g = support_grad(moving)
        moving = {k: v - inner.lr * g[k] for k, v in moving.items()}
    return {**params, **moving}


# --------------------------------------------------------------------------------------------------------
# Vectorized path: vmap over tasks
# --------------------------------------------------------------------------------------------------------


def vectorized_meta_gradient(
    params: Params, batch: EpisodeBatch, inner: InnerLoop, first_order: bool
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
    query = lambda p, x, y: loss_and_accuracy(p, x, y, inner.arch)  # noqa: E731
    if first_order:
        # Adapted parameters per task (batched along dim 0); nothing outside records a graph.
        adapted = vmap(lambda sx_t, sy_t: adapt(params, sx_t, sy_t, inner, inner.steps))(sx, sy)
        task_grads, (losses, accs) = vmap(grad_and_value(query, has_aux=True))(adapted, qx, qy)
        return {k: g.mean(dim=0) for k, g in task_grads.items()}, losses.mean(), accs.mean()

    def task_query_loss(p: Params, sx_t, sy_t, qx_t, qy_t) -> tuple[torch.Tensor, torch.Tensor]:
        return query(adapt(p, sx_t, sy_t, inner, inner.steps), qx_t, qy_t)

    def meta_loss(p: Params) -> tuple[torch.Tensor, torch.Tensor]:
        losses, accs = vmap(task_query_loss, in_dims=(None, 0, 0, 0, 0))(p, sx, sy, qx, qy)
        return losses.mean(), accs.mean()

    grads, (loss, acc) = grad_and_value(meta_loss, has_aux=True)(params)
    return grads, loss, acc


def vectorized_adapted_logits(
    params: Params, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, inner: InnerLoop,
    steps: int, every_step: bool = False,
) -> torch.Tensor:
    """Adapt to each of T support sets for ``steps`` steps and classify its query set: -> logits [T, N*Q, N],
    or with ``every_step`` the logits after 0..steps steps, [steps+1, T, N*Q, N]."""

    def one_task(sx_t, sy_t, qx_t):
        if not every_step:
            return conv4_forward(adapt(params, sx_t, sy_t, inner, steps), qx_t, inner.arch)
        p, logits = params, [conv4_forward(params, qx_t, inner.arch)]
        for _ in range(steps):
            p = adapt(p, sx_t, sy_t, inner, 1)
            logits.append(conv4_forward(p, qx_t, inner.arch))
        return torch.stack(logits)

    out = vmap(one_task)(support_x, support_y, query_x)
    return out.transpose(0, 1) if every_step else out


# --------------------------------------------------------------------------------------------------------
# Reference path: a plain per-task loop with autograd and native batch norm
# --------------------------------------------------------------------------------------------------------


def reference_forward(params: Params, x: torch.Tensor, arch: Conv4Arch) -> torch.Tensor:
    """conv4 logits [B, N] of x [B, 1, 28, 28] with native training-mode ``F.batch_norm`` (no running stats).

    An independent implementation of ``benchmark.toolkit.conv4.conv4_forward`` for the stride-2 network, for
    tests and the loop path; TF 'SAME' padding of a stride-2 3x3 convolution pads one pixel after an even
    size and one on each side of an odd size.
    """
    h = x
    for i in range(1, DEPTH + 1):
        if arch.padding == "same":
            odd = h.shape[-1] % 2
            h = F.conv2d(F.pad(h, (odd, 1, odd, 1)), params[f"conv{i}.weight"], stride=2)
        else:
            h = F.conv2d(h, params[f"conv{i}.weight"], stride=2, padding=1)
        h = F.batch_norm(h, None, None, params.get(f"bn{i}.weight"), params[f"bn{i}.bias"], training=True,
                         eps=arch.bn_eps)
        h = F.relu(h)
    return F.linear(h.mean(dim=(2, 3)), params["head.weight"], params["head.bias"])


def reference_adapt(params: Params, x: torch.Tensor, y: torch.Tensor, inner: InnerLoop, steps: int,
                    create_graph: bool) -> Params:
    """``steps`` SGD steps with ``torch.autograd.grad`` on one task; ``params`` must require grad."""
    for _ in range(steps):
        loss = task_loss(reference_forward(params, x, inner.arch), y, inner.loss)
        moving = [k for k in params if inner.adapts(k)]
        g = torch.autograd.grad(loss, [params[k] for k in moving], create_graph=create_graph)
        params = {**params, **{k: params[k] - inner.lr * gk for k, gk in zip(moving, g)}}
    return params


def reference_meta_gradient(
    params: Params, batch: EpisodeBatch, inner: InnerLoop, first_order: bool
) -> tuple[Params, torch.Tensor, torch.Tensor]:
    """Same contract as ``vectorized_meta_gradient``, one task at a time."""
    with torch.enable_grad():
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        total = {k: torch.zeros_like(v) for k, v in params.items()}
        loss_sum = torch.zeros((), dtype=batch.query_x.dtype, device=batch.device)
        acc_sum = torch.zeros_like(loss_sum)
        for t in range(batch.num_tasks):
            fast = reference_adapt(leaves, batch.support_x[t], batch.support_y[t], inner, inner.steps,
                                   create_graph=not first_order)
            if first_order:
                # Differentiate w.r.t. the adapted weights themselves: no path back through the inner steps.
                fast = {k: v.detach().requires_grad_() for k, v in fast.items()}
            logits = reference_forward(fast, batch.query_x[t], inner.arch)
            loss = F.cross_entropy(logits, batch.query_y[t])
            wrt = fast if first_order else leaves
            for k, g in zip(wrt, torch.autograd.grad(loss, list(wrt.values()))):
                total[k] += g
            loss_sum += loss.detach()
            acc_sum += (logits.argmax(dim=-1) == batch.query_y[t]).to(loss_sum.dtype).mean()
    n = batch.num_tasks
    return {k: g / n for k, g in total.items()}, loss_sum / n, acc_sum / n


def reference_adapted_logits(
    params: Params, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, inner: InnerLoop,
    steps: int, every_step: bool = False,
) -> torch.Tensor:
    """Loop counterpart of ``vectorized_adapted_logits``: -> logits [T, N*Q, N] (or [steps+1, T, N*Q, N])."""
    out = []
    with torch.enable_grad():
        for t in range(support_x.shape[0]):
            fast = {k: v.detach().requires_grad_() for k, v in params.items()}
            per_step = [reference_forward(fast, query_x[t], inner.arch).detach()]
            for _ in range(steps if every_step else 0):
                fast = reference_adapt(fast, support_x[t], support_y[t], inner, 1, create_graph=False)
                per_step.append(reference_forward(fast, query_x[t], inner.arch).detach())
            if not every_step:
                fast = reference_adapt(fast, support_x[t], support_y[t], inner, steps, create_graph=False)
                per_step = [reference_forward(fast, query_x[t], inner.arch).detach()]
            out.append(torch.stack(per_step))
    logits = torch.stack(out, dim=1)  # [S+1 or 1, T, N*Q, N]
    return logits if every_step else logits[0]


# --------------------------------------------------------------------------------------------------------
# The learners
# --------------------------------------------------------------------------------------------------------


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


GradientFn = Callable[[Params, EpisodeBatch, InnerLoop, bool], tuple[Params, torch.Tensor, torch.Tensor]]


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
        self.arch = Conv4Arch(padding=config.padding, bn_scale=config.bn_scale, bn_eps=config.bn_eps)
        self.inner = InnerLoop(config.inner_lr, config.inner_steps, config.inner_loss, config.adapt_bn, self.arch)
        self.params: Params = init_conv4(context.generator("init"), context.way, dtype=dtype, device=context.device,
                                         arch=self.arch, head_init=config.head_init)
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
        """Finn et al.'s Omniglot settings (their released code's network and inner loss, the paper's steps):
        20-way uses a smaller inner lr, more inner steps, a smaller meta-batch and 5 test-time steps."""
        return dataclasses.replace(cls.Config(), **_PAPER_STEPS[way < 20])

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
        grads, loss, acc = self._gradient_fn(self._frozen_params(), batch, self.inner, self.config.first_order)
        for k, p in self.params.items():
            p.grad = grads[k]
        try:
            self.optimizer.step()
        finally:  # also when a CUDA-graph capture fails inside step(): drop gradients from its memory pool
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), acc.detach()

    def predict(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        return self._adapted_logits(support_x, support_y, query_x, every_step=False)

    def predict_steps(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """Logits [S+1, T, N*Q, N] after 0..S test-time steps (``benchmark.learner.AdaptationSteps``)."""
        return self._adapted_logits(support_x, support_y, query_x, every_step=True)

    def _adapted_logits(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                        every_step: bool) -> torch.Tensor:
        fn = vectorized_adapted_logits if self.vectorized else reference_adapted_logits
        with torch.enable_grad():  # adaptation needs gradients even if a caller disabled them
            logits = fn(self._frozen_params(), support_x.to(self.dtype), support_y, query_x.to(self.dtype),
                        self.inner, self.config.test_inner_steps, every_step)
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
