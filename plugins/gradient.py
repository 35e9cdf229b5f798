"""The functional core of the gradient-based meta-learners: one inner loop, vectorized over tasks.

MAML, ANIL, Meta-SGD, MAML++ and Reptile all adapt a copy of the conv4 network to a task by a few gradient
steps on its support set. They differ in three places, which ``InnerLoop`` names:

* which parameters move (``adapt``): all but batch norm (MAML, Meta-SGD, MAML++), every one (Reptile:
  ``adapt_bn``), or the classifier head only (ANIL);
* the per-step update (``rule``): SGD with one step size (MAML, ANIL), a learned step size per parameter
  element (Meta-SGD: ``lr.<name>`` shaped like the parameter), a learned step size per parameter tensor and
  step (MAML++: ``lr.<name>`` of shape [steps]), or Adam whose state outlives the task (Reptile);
* what a step sees: the whole support set (MAML family), or one minibatch per step (Reptile); and whether
  batch norm has one scale/shift per step (MAML++: ``bn<i>.weight`` of shape [steps, C]).

Learned step sizes live in the parameter dict under the ``lr.`` prefix, so the meta-gradient and the outer
Adam treat them like weights and no adaptation ever moves them.

Everything here is a pure function of tensors, for one task; ``torch.func.vmap`` runs it over the tasks of
a batch and ``torch.func.grad`` differentiates through it (second order). ``plugins.gradient_reference`` is
an independent per-task loop of the same algorithms (autograd, native batch norm) that the tests compare
with and that ``vectorize=false`` runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch.func import grad, grad_and_value, vmap

from benchmark.episodes import EpisodeBatch
from benchmark.toolkit.conv4 import Conv4Arch, Params, conv4_features, conv4_forward, linear_head

#: Prefix of learned inner step sizes in a parameter dict (``lr.conv1.weight``).
LR_PREFIX = "lr."
#: A rule's state: Adam's ``{"step": 0-dim count, "m": {name: first moment}, "v": {name: second moment}}``.
RuleState = dict


@dataclass(frozen=True)
class AdamSettings:
    """Adam of the inner loop (Reptile's released code: ``tf.train.AdamOptimizer(beta1=0)``).

    TensorFlow's form: the bias corrections scale the step size, and ``eps`` is added to the uncorrected
    sqrt(v) ("epsilon hat" of Kingma & Ba), not to the corrected one as in ``torch.optim.Adam``.
    """

    beta1: float = 0.0
    beta2: float = 0.999
    eps: float = 1e-8


@dataclass(frozen=True)
class InnerLoop:
    """How a task adapts.

    Attributes:
        lr: the step size (``sgd``, ``adam``); unused by the learned-step-size rules.
        steps: adaptation steps during meta-training.
        loss: what the step size multiplies: ``"sum/K"`` is the MAML reference code's support loss (the
            per-example cross-entropies divided by K and summed, i.e. N times their mean; cbfinn/maml
            ``utils.py:58``, ``maml.py:90``), ``"sum"`` their sum (TensorFlow's ``minimize`` of a per-example
            loss, as Reptile's code), ``"mean"`` the mean cross-entropy.
        adapt_bn: whether batch-norm parameters move (``adapt="all"`` only).
        arch: the network.
        adapt: ``"all"`` parameters (batch norm per ``adapt_bn``) or the classifier ``"head"`` only (ANIL).
        rule: the per-step update: ``"sgd"``, ``"meta-sgd"`` (learned per-element step sizes), ``"lslr"``
            (learned per-tensor, per-step step sizes) or ``"adam"`` (``adam``'s settings, stateful).
        per_step_bn: batch-norm scale and shift have one row per step ([steps, C]); step ``s`` uses row ``s``.
        adam: the inner Adam's settings (``rule="adam"``).
    """

    lr: float
    steps: int
    loss: str = "sum/K"
    adapt_bn: bool = False
    arch: Conv4Arch = Conv4Arch()
    adapt: Literal["all", "head"] = "all"
    rule: Literal["sgd", "meta-sgd", "lslr", "adam"] = "sgd"
    per_step_bn: bool = False
    adam: AdamSettings = AdamSettings()

    def adapts(self, name: str) -> bool:
        """Whether parameter ``name`` moves in the inner loop."""
        if name.startswith(LR_PREFIX):
            return False
        if self.adapt == "head":
            return name.startswith("head.")
        return self.adapt_bn or not name.startswith("bn")


# --------------------------------------------------------------------------------------------------------
# One task
# --------------------------------------------------------------------------------------------------------


def at_step(params: Params, inner: InnerLoop, step: int) -> Params:
    """The parameters the network uses at inner step ``step``: with per-step batch norm, row ``step`` of each
    [steps, C] scale and shift."""
    if not inner.per_step_bn:
        return params
    return {k: v[step] if k.startswith("bn") else v for k, v in params.items()}


def network(params: Params, x: torch.Tensor, inner: InnerLoop, step: int = 0) -> torch.Tensor:
    """Logits [B, N] of x [B, 1, 28, 28] at inner step ``step`` (batch statistics of x)."""
    return conv4_forward(at_step(params, inner, step), x, inner.arch)


def task_loss(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """One task's loss: logits [B, N], y [B] -> 0-dim; ``"sum/K"`` is N times the mean (B = N*K), ``"sum"``
    B times the mean."""
    mean = F.cross_entropy(logits, y)
    if kind == "sum/K":
        return mean * logits.shape[-1]
    return mean * logits.shape[0] if kind == "sum" else mean


def loss_and_accuracy(params: Params, x: torch.Tensor, y: torch.Tensor, inner: InnerLoop,
                      step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and accuracy of one task's batch at inner step ``step``: x [B, 1, 28, 28], y [B]
    -> (0-dim, 0-dim)."""
    logits = network(params, x, inner, step)
    accuracy = (logits.argmax(dim=-1) == y).to(logits.dtype).mean()
    return F.cross_entropy(logits, y), accuracy


def step_size(params: Params, inner: InnerLoop, name: str, step: int) -> torch.Tensor | float:
    """What multiplies the gradient of parameter ``name`` at step ``step`` (a number or a learned tensor)."""
    if inner.rule == "meta-sgd":
        return params[LR_PREFIX + name]
    if inner.rule == "lslr":
        return params[LR_PREFIX + name][step]
    return inner.lr


def adam_step(moving: Params, grads: Params, state: RuleState, settings: AdamSettings,
              lr: float) -> tuple[Params, RuleState]:
    """One step of TensorFlow's Adam (see ``AdamSettings``) on the moving parameters."""
    step = state["step"] + 1
    b1, b2 = settings.beta1, settings.beta2
    m = {k: b1 * state["m"][k] + (1 - b1) * g for k, g in grads.items()}
    v = {k: b2 * state["v"][k] + (1 - b2) * g * g for k, g in grads.items()}
    size = lr * torch.sqrt(1 - b2 ** step) / (1 - b1 ** step)
    moved = {k: p - size * m[k] / (v[k].sqrt() + settings.eps) for k, p in moving.items()}
    return moved, {"step": step, "m": m, "v": v}


def trajectory(params: Params, support_x: torch.Tensor, support_y: torch.Tensor, inner: InnerLoop, steps: int,
               *, start: int = 0, state: RuleState | None = None,
               stop_gradient: bool = False) -> Iterator[tuple[Params, RuleState | None]]:
    """Adapt one task step by step (functional: differentiable w.r.t. ``params`` under an outer
    ``torch.func`` transform); yields (parameters, rule state) after each of the ``steps`` steps.
    Parameters that ``inner`` does not adapt stay as they are.

    Args:
        support_x: [B, 1, 28, 28] (every step sees the whole set) or [steps, B, 1, 28, 28] (step j sees
            minibatch j); support_y: [B] or [steps, B].
        start: the index of the first step (per-step batch norm and step sizes).
        state: the rule's state (``rule="adam"``).
        stop_gradient: treat each step's gradient as a constant (first-order meta-gradients).
    """
    fixed = {k: v for k, v in params.items() if not inner.adapts(k)}
    moving = {k: v for k, v in params.items() if inner.adapts(k)}
    minibatches = support_x.dim() == 5
    features = None
    if inner.adapt == "head" and not inner.per_step_bn and not minibatches:
        # The body does not move, so its support features are the same at every step: compute them once.
        features = conv4_features(fixed, support_x, inner.arch)

    def support_loss(moving: Params, step: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = linear_head(moving, features) if features is not None else network({**fixed, **moving}, x, inner, step)
        return task_loss(logits, y, inner.loss)

    support_grad = grad(support_loss)
    for j in range(steps):
        step = start + j
        x, y = (support_x[j], support_y[j]) if minibatches else (support_x, support_y)
        g = support_grad(moving, step, x, y)
        if stop_gradient:
            g = {k: v.detach() for k, v in g.items()}
        if inner.rule == "adam":
            moving, state = adam_step(moving, g, state, inner.adam, inner.lr)
        else:
            moving = {k: v - step_size(params, inner, k, step) * g[k] for k, v in moving.items()}
        yield {**params, **moving}, state


def inner_loop(params: Params, support_x: torch.Tensor, support_y: torch.Tensor, inner: InnerLoop, steps: int,
               *, start: int = 0, state: RuleState | None = None,
               stop_gradient: bool = False) -> tuple[Params, RuleState | None]:
    """(the parameters, the rule state) after ``steps`` steps of ``trajectory`` (same arguments)."""
    result = params, state
    for result in trajectory(params, support_x, support_y, inner, steps, start=start, state=state,
                             stop_gradient=stop_gradient):
        pass
    return result


def adapt(params: Params, support_x: torch.Tensor, support_y: torch.Tensor, inner: InnerLoop, steps: int,
          start: int = 0) -> Params:
    """``steps`` stateless adaptation steps on one task's whole support set (see ``inner_loop``).

    Args:
        support_x: [N*K, 1, 28, 28]; support_y: [N*K]
    """
    return inner_loop(params, support_x, support_y, inner, steps, start=start)[0]


# --------------------------------------------------------------------------------------------------------
# Vectorized over tasks
# --------------------------------------------------------------------------------------------------------


def vectorized_meta_gradient(
    params: Params, batch: EpisodeBatch, inner: InnerLoop, first_order: bool,
    step_weights: torch.Tensor | None = None,
) -> tuple[Params, torch.Tensor, torch.Tensor]:
    """The meta-gradient of the mean query loss over the batch's T tasks, vmapped over tasks.

    Args:
        params: meta-parameters (plain tensors; they need not require grad).
        batch: T episodes in the params' dtype and device.
        first_order: treat the inner gradients as constants.
        step_weights: [W] weights of the query losses after the last W inner steps (MAML++'s multi-step
            loss); None: the query loss after the last step alone.

    Returns:
        (gradient dict shaped like ``params``, mean query loss 0-dim, mean query accuracy 0-dim); loss and
        accuracy are measured after the last step.
    """
    sx, sy, qx, qy = batch.support_x, batch.support_y, batch.query_x, batch.query_y
    last = inner.steps - 1
    if first_order and step_weights is None and inner.rule == "sgd":
        # Nothing learned in the inner update: the first-order gradient is the query gradient at the adapted
        # weights, averaged over tasks, and no outer transform needs to record the inner loop.
        query = lambda p, x, y: loss_and_accuracy(p, x, y, inner, last)  # noqa: E731
        adapted = vmap(lambda sx_t, sy_t: adapt(params, sx_t, sy_t, inner, inner.steps))(sx, sy)
        task_grads, (losses, accs) = vmap(grad_and_value(query, has_aux=True))(adapted, qx, qy)
        return {k: g.mean(dim=0) for k, g in task_grads.items()}, losses.mean(), accs.mean()

    scored = 1 if step_weights is None else step_weights.shape[0]

    def task_objective(p: Params, sx_t, sy_t, qx_t, qy_t):
        objective = None
        steps = trajectory(p, sx_t, sy_t, inner, inner.steps, stop_gradient=first_order)
        for step, (fast, _) in enumerate(steps):
            j = step - (inner.steps - scored)  # the index of this step's query loss among the scored ones
            if j < 0:
                continue
            loss, acc = loss_and_accuracy(fast, qx_t, qy_t, inner, step)
            term = loss if step_weights is None else step_weights[j] * loss
            objective = term if objective is None else objective + term
        return objective, (loss, acc)

    def meta_loss(p: Params):
        objectives, (losses, accs) = vmap(task_objective, in_dims=(None, 0, 0, 0, 0))(p, sx, sy, qx, qy)
        return objectives.mean(), (losses.mean(), accs.mean())

    grads, (loss, acc) = grad(meta_loss, has_aux=True)(params)
    return grads, loss, acc


def vectorized_adapted_logits(
    params: Params, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, inner: InnerLoop,
    steps: int, every_step: bool = False,
) -> torch.Tensor:
    """Adapt to each of T support sets for ``steps`` steps and classify its query set: -> logits [T, N*Q, N],
    or with ``every_step`` the logits after 0..steps steps, [steps+1, T, N*Q, N]. After step s the query
    set is classified with step s's batch-norm row (row 0 before adapting)."""

    def one_task(sx_t, sy_t, qx_t):
        if not every_step:
            return network(adapt(params, sx_t, sy_t, inner, steps), qx_t, inner, max(steps - 1, 0))
        logits = [network(params, qx_t, inner, 0)]
        for s, (p, _) in enumerate(trajectory(params, sx_t, sy_t, inner, steps)):
            logits.append(network(p, qx_t, inner, s))
        return torch.stack(logits)

    out = vmap(one_task)(support_x, support_y, query_x)
    return out.transpose(0, 1) if every_step else out


def chain_adam_states(start: RuleState, ends: RuleState, settings: AdamSettings, steps: int) -> RuleState:
    """Adam's state after T tasks that each took ``steps`` steps from ``start`` in parallel, defined as the state
    that has seen all their gradients in task order: what one Adam would hold had it run the tasks one after
    another (Reptile's released code) and seen the same gradients.

    Each moment is a running average, so task t's contribution ``ends[t] - beta**steps * start`` decays by
    ``beta**steps`` over each later task.

    Args:
        start: the state every task started from (moments shaped like the parameters).
        ends: each task's final state, moments batched over tasks ([T, ...]).
    """
    def chained(first: torch.Tensor, last: torch.Tensor, beta: float) -> torch.Tensor:
        tasks = last.shape[0]
        decay = beta ** steps
        later = torch.arange(tasks - 1, -1, -1, dtype=first.dtype, device=first.device)  # tasks after task t
        weights = (decay ** later).view(-1, *[1] * first.dim())
        return decay ** tasks * first + (weights * (last - decay * first)).sum(dim=0)

    tasks = next(iter(ends["v"].values())).shape[0]
    return {
        "step": start["step"] + tasks * steps,
        "m": {k: chained(start["m"][k], ends["m"][k], settings.beta1) for k in start["m"]},
        "v": {k: chained(start["v"][k], ends["v"][k], settings.beta2) for k in start["v"]},
    }
