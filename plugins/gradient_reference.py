"""The gradient-based meta-learners as a plain per-task loop: ``torch.autograd`` and native batch norm.

An independent implementation of what ``plugins.gradient`` computes with ``torch.func`` under ``vmap``: the
network is written again with ``F.batch_norm`` (training mode, no running statistics), adaptation takes
``torch.autograd.grad`` of each step's support loss (``create_graph`` for second order), Reptile's inner
Adam is written out step by step, and tasks are processed one at a time. The tests compare the two paths in
float64; learners run this one with ``vectorize=false`` and ``bench perf`` times it as the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmark.episodes import EpisodeBatch
from benchmark.toolkit.conv4 import DEPTH, Conv4Arch, Params
from plugins.gradient import LR_PREFIX, InnerLoop, RuleState


def reference_forward(params: Params, x: torch.Tensor, arch: Conv4Arch, step: int = 0) -> torch.Tensor:
    """conv4 logits [B, N] of x [B, 1, 28, 28] with native training-mode ``F.batch_norm`` (no running stats).

    An independent implementation of ``benchmark.toolkit.conv4.conv4_forward``. TF 'SAME' padding of a
    stride-2 3x3 convolution pads one pixel after an even size and one on each side of an odd size.
    Batch-norm parameters of shape [steps, C] (per-step batch norm) contribute their row ``step``.
    """
    h = x
    for i in range(1, DEPTH + 1):
        weight = params[f"conv{i}.weight"]
        if arch.downsample == "maxpool":
            h = F.conv2d(h, weight, padding=1)
        elif arch.padding == "same":
            odd = h.shape[-1] % 2
            h = F.conv2d(F.pad(h, (odd, 1, odd, 1)), weight, stride=2)
        else:
            h = F.conv2d(h, weight, stride=2, padding=1)
        scale, shift = params.get(f"bn{i}.weight"), params[f"bn{i}.bias"]
        if shift.dim() == 2:
            scale, shift = (None if scale is None else scale[step]), shift[step]
        h = F.batch_norm(h, None, None, scale, shift, training=True, eps=arch.bn_eps)
        h = F.leaky_relu(h, 0.01) if arch.activation == "leaky_relu" else F.relu(h)
        if arch.downsample == "maxpool":
            h = F.max_pool2d(h, 2)
    feature = h.reshape(h.shape[0], -1) if arch.features == "flatten" else h.mean(dim=(2, 3))
    return F.linear(feature, params["head.weight"], params["head.bias"])


def _support_loss(params: Params, x: torch.Tensor, y: torch.Tensor, inner: InnerLoop, step: int) -> torch.Tensor:
    logits = reference_forward(params, x, inner.arch, step)
    per_example = F.cross_entropy(logits, y, reduction="none")
    if inner.loss == "sum/K":  # each example's loss divided by K, summed over the N*K examples (cbfinn/maml utils.py:58)
        return per_example.sum() / (y.shape[0] / logits.shape[-1])
    return per_example.sum() if inner.loss == "sum" else per_example.mean()


def reference_adapt(params: Params, x: torch.Tensor, y: torch.Tensor, inner: InnerLoop, steps: int,
                    create_graph: bool, start: int = 0) -> Params:
    """``steps`` stateless steps with ``torch.autograd.grad`` on one task's whole support set; ``params``
    must require grad. Without ``create_graph`` the gradients are constants (first order)."""
    for j in range(steps):
        step = start + j
        moving = [k for k in params if inner.adapts(k)]
        g = torch.autograd.grad(_support_loss(params, x, y, inner, step), [params[k] for k in moving],
                                create_graph=create_graph)
        updated = {}
        for k, gk in zip(moving, g):
            if inner.rule == "meta-sgd":
                lr = params[LR_PREFIX + k]
            elif inner.rule == "lslr":
                lr = params[LR_PREFIX + k][step]
            else:
                lr = inner.lr
            updated[k] = params[k] - lr * gk
        params = {**params, **updated}
    return params


def reference_meta_gradient(
    params: Params, batch: EpisodeBatch, inner: InnerLoop, first_order: bool,
    step_weights: torch.Tensor | None = None,
) -> tuple[Params, torch.Tensor, torch.Tensor]:
    """Same contract as ``plugins.gradient.vectorized_meta_gradient``, one task at a time."""
    scored = 1 if step_weights is None else step_weights.shape[0]
    with torch.enable_grad():
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        total = {k: torch.zeros_like(v) for k, v in params.items()}
        loss_sum = torch.zeros((), dtype=batch.query_x.dtype, device=batch.device)
        acc_sum = torch.zeros_like(loss_sum)
        for t in range(batch.num_tasks):
            sx, sy, qx, qy = batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]
            fast = reference_adapt(leaves, sx, sy, inner, inner.steps - scored, not first_order)
            objective = torch.zeros_like(loss_sum)
            for j in range(scored):
                step = inner.steps - scored + j
                fast = reference_adapt(fast, sx, sy, inner, 1, not first_order, start=step)
                logits = reference_forward(fast, qx, inner.arch, step)
                loss = F.cross_entropy(logits, qy)
                objective = objective + (loss if step_weights is None else step_weights[j] * loss)
            # First order: the inner gradients carry no graph, so this differentiates the query losses through
            # the updates alone (identity for weights, the gradients themselves for learned step sizes).
            for k, g in zip(leaves, torch.autograd.grad(objective, list(leaves.values()), allow_unused=True)):
                if g is not None:
                    total[k] += g
            loss_sum += loss.detach()
            acc_sum += (logits.argmax(dim=-1) == qy).to(loss_sum.dtype).mean()
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
            per_step = [reference_forward(fast, query_x[t], inner.arch, 0).detach()]
            for s in range(steps if every_step else 0):
                fast = reference_adapt(fast, support_x[t], support_y[t], inner, 1, create_graph=False, start=s)
                per_step.append(reference_forward(fast, query_x[t], inner.arch, s).detach())
            if not every_step:
                fast = reference_adapt(fast, support_x[t], support_y[t], inner, steps, create_graph=False)
                per_step = [reference_forward(fast, query_x[t], inner.arch, max(steps - 1, 0)).detach()]
            out.append(torch.stack(per_step))
    logits = torch.stack(out, dim=1)  # [S+1 or 1, T, N*Q, N]
    return logits if every_step else logits[0]


# --------------------------------------------------------------------------------------------------------
# Reptile: Adam steps on minibatches, the state passed on between tasks
# --------------------------------------------------------------------------------------------------------


def reference_adam_adapt(params: Params, xs: torch.Tensor, ys: torch.Tensor, inner: InnerLoop,
                         state: RuleState) -> tuple[Params, RuleState, list[Params]]:
    """One task's inner loop with TensorFlow's Adam, step by step.

    Args:
        xs: [steps, B, 1, 28, 28] minibatches; ys: [steps, B]
        state: Adam's state at the start (not changed).

    Returns:
        (adapted parameters, Adam's state at the end, each step's gradients in order)
    """
    b1, b2, eps = inner.adam.beta1, inner.adam.beta2, inner.adam.eps
    m = {k: v.clone() for k, v in state["m"].items()}
    v = {k: t.clone() for k, t in state["v"].items()}
    count = float(state["step"])
    current = {k: t.detach() for k, t in params.items()}
    history = []
    for j in range(xs.shape[0]):
        with torch.enable_grad():
            leaves = {k: t.detach().requires_grad_() for k, t in current.items()}
            moving = [k for k in leaves if inner.adapts(k)]
            loss = _support_loss(leaves, xs[j], ys[j], inner, 0)
            grads = dict(zip(moving, torch.autograd.grad(loss, [leaves[k] for k in moving])))
        history.append(grads)
        count += 1
        corrected_lr = inner.lr * (1 - b2 ** count) ** 0.5 / (1 - b1 ** count)
        for k, g in grads.items():
            m[k] = m[k] * b1 + g * (1 - b1)
            v[k] = v[k] * b2 + g.square() * (1 - b2)
            current[k] = current[k] - corrected_lr * m[k] / (v[k].sqrt() + eps)
    end = {"step": torch.full_like(state["step"], count), "m": m, "v": v}
    return current, end, history


def replay_adam_moments(state: RuleState, gradients: list[Params], inner: InnerLoop) -> RuleState:
    """Adam's state after it has seen ``gradients`` in order, starting from ``state`` (the moments are
    running averages of the gradients and their squares; the parameters play no part)."""
    b1, b2 = inner.adam.beta1, inner.adam.beta2
    m = {k: t.clone() for k, t in state["m"].items()}
    v = {k: t.clone() for k, t in state["v"].items()}
    for grads in gradients:
        for k, g in grads.items():
            m[k] = m[k] * b1 + g * (1 - b1)
            v[k] = v[k] * b2 + g.square() * (1 - b2)
    return {"step": state["step"] + len(gradients), "m": m, "v": v}


def reference_reptile_tasks(params: Params, xs: torch.Tensor, ys: torch.Tensor, inner: InnerLoop,
                            state: RuleState, carry: str) -> tuple[Params, RuleState]:
    """Adapt to T tasks one at a time; returns (the adapted parameters stacked over tasks [T, ...], the Adam
    state carried on).

    Args:
        xs: [T, steps, B, 1, 28, 28] each task's minibatches; ys: [T, steps, B]
        carry: ``"chained"``: each task starts from the Adam state the previous one ended with (the released
            code's order); ``"merged"``: every task starts from ``state``, and the state carried on is the one
            that has seen all tasks' gradients in task order.
    """
    adapted, seen = [], []
    start = state
    for t in range(xs.shape[0]):
        fast, end, history = reference_adam_adapt(params, xs[t], ys[t], inner, start)
        adapted.append(fast)
        seen.extend(history)
        if carry == "chained":
            start = end
    carried = start if carry == "chained" else replay_adam_moments(state, seen, inner)
    return {k: torch.stack([a[k] for a in adapted]) for k in params}, carried


def reference_classify(params: Params, support_x: torch.Tensor, query_x: torch.Tensor, arch: Conv4Arch,
                       transductive: bool) -> torch.Tensor:
    """Logits [N*Q, N] of one task's queries: all in one batch (transductive), or each in a batch of its own
    with the whole support set, whose statistics it then shares (Reptile's non-transductive mode)."""
    if transductive:
        return reference_forward(params, query_x, arch)
    return torch.stack([reference_forward(params, torch.cat([support_x, q[None]]), arch)[-1] for q in query_x])


def reference_reptile_logits(params: Params, support_x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor,
                             query_x: torch.Tensor, inner: InnerLoop, state: RuleState, transductive: bool,
                             every_step: bool = False) -> torch.Tensor:
    """Adapt to each of T tasks with Adam from ``state`` (the same start for every task) and classify its
    queries: -> logits [T, N*Q, N], or [steps+1, T, N*Q, N] after 0..steps steps with ``every_step``.

    Args:
        support_x: [T, N*K, 1, 28, 28] (the set that non-transductive batches share)
        xs: [T, steps, B, 1, 28, 28] the minibatches; ys: [T, steps, B]
    """
    out = []
    for t in range(support_x.shape[0]):
        fast, start = params, state
        per_step = [reference_classify(fast, support_x[t], query_x[t], inner.arch, transductive)]
        for j in range(xs.shape[1]):
            fast, start, _ = reference_adam_adapt(fast, xs[t, j:j + 1], ys[t, j:j + 1], inner, start)
            if every_step or j == xs.shape[1] - 1:
                per_step.append(reference_classify(fast, support_x[t], query_x[t], inner.arch, transductive))
        out.append(torch.stack(per_step if every_step else per_step[-1:]))
    logits = torch.stack(out, dim=1).detach()
    return logits if every_step else logits[0]
