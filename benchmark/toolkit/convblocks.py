"""Stacks of ``3x3 conv -> batch norm -> ReLU [-> 2x2 max-pool]`` blocks as pure functions of dicts, with
batch norm that keeps running statistics, applied to many episodes at once.

The metric learners (Snell et al. 2017, Vinyals et al. 2016, Sung et al. 2018) build their networks from
such blocks. Unlike ``benchmark.toolkit.conv4`` (MAML's stride-2 network, batch statistics only), these
blocks max-pool, keep a conv bias, and track running statistics as ``nn.BatchNorm2d`` does, so a learner
can test with them (non-transductive) or with each episode's own statistics (transductive).

Inputs carry a leading episode dimension: ``x`` is ``[T, B, C, H, W]``, T episodes of B images each. The
convolutions run on all T*B images at once; batch norm in batch-statistics mode normalises each episode
with its own statistics, exactly as T separate ``nn.BatchNorm2d`` forwards would (one episode per forward
is what the papers' code does). Running statistics are updated as if those T forwards ran one after another
(``update_running``), and are *returned*, never written in place: a learner decides whether to keep them
(training) or drop them (testing), so predicting can never change its buffers.

Parameter and buffer names for block ``i`` (1-based) under a ``prefix``::

    {prefix}{i}.conv.weight [O, I, 3, 3]    {prefix}{i}.conv.bias [O]
    {prefix}{i}.bn.weight [O] (init 1)      {prefix}{i}.bn.bias [O] (init 0)
    {prefix}{i}.bn.running_mean [O] (buffer, init 0)    {prefix}{i}.bn.running_var [O] (buffer, init 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

#: Added to the variance, as in ``nn.BatchNorm2d``.
BN_EPS = 1e-5
#: ``nn.BatchNorm2d``'s default running-average momentum.
BN_MOMENTUM = 0.1

Params = dict[str, torch.Tensor]
Init = Literal["pytorch", "he-fan-out"]


@dataclass(frozen=True)
class ConvBlock:
    """One block: 3x3 conv (stride 1) with bias, batch norm, ReLU, then an optional 2x2 max-pool (floor)."""

    in_channels: int
    out_channels: int
    padding: int = 1
    pool: bool = True


def conv4_pool(in_channels: int = 1, channels: int = 64) -> tuple[ConvBlock, ...]:
    """The four-block embedding of Vinyals et al. and Snell et al.: padding 1, every block pooled.

    On 28x28 images the maps go 28 -> 14 -> 7 -> 3 -> 1, so the flattened output has ``channels`` features.
    """
    return tuple(ConvBlock(in_channels if i == 0 else channels, channels) for i in range(4))


def init_blocks(blocks: Sequence[ConvBlock], generator: torch.Generator, *, prefix: str, init: Init = "pytorch",
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> tuple[Params, Params]:
    """Fresh parameters and running-statistics buffers of a block stack (named as in the module docstring).

    Values are drawn on the CPU from ``generator`` (so they do not depend on the device) and then moved.

    Args:
        init: ``"pytorch"``: ``nn.Conv2d``'s default, weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in));
            ``"he-fan-out"``: weight N(0, sqrt(2 / (9 * out_channels))), bias 0 (Sung et al.'s
            ``weights_init``). Batch norm scale 1, shift 0 either way.

    Returns:
        (params, buffers); no tensor requires grad.
    """
    params: Params = {}
    buffers: Params = {}
    for i, block in enumerate(blocks, start=1):
        name = f"{prefix}{i}"
        weight = torch.empty(block.out_channels, block.in_channels, 3, 3, dtype=torch.float64)
        bias = torch.empty(block.out_channels, dtype=torch.float64)
        if init == "pytorch":
            bound = 1.0 / math.sqrt(block.in_channels * 9)
            weight.uniform_(-bound, bound, generator=generator)
            bias.uniform_(-bound, bound, generator=generator)
        elif init == "he-fan-out":
            weight.normal_(0.0, math.sqrt(2.0 / (9 * block.out_channels)), generator=generator)
            bias.zero_()
        else:
            raise ValueError(f"unknown init {init!r}; use 'pytorch' or 'he-fan-out'")
        params.update({f"{name}.conv.weight": weight, f"{name}.conv.bias": bias,
                       f"{name}.bn.weight": torch.ones(block.out_channels, dtype=torch.float64),
                       f"{name}.bn.bias": torch.zeros(block.out_channels, dtype=torch.float64)})
        buffers.update({f"{name}.bn.running_mean": torch.zeros(block.out_channels, dtype=torch.float64),
                        f"{name}.bn.running_var": torch.ones(block.out_channels, dtype=torch.float64)})

    def move(d: Params) -> Params:
        return {k: v.to(device=device, dtype=dtype) for k, v in d.items()}

    return move(params), move(buffers)


def update_running(running: torch.Tensor, stats: torch.Tensor, momentum: float) -> torch.Tensor:
    """Running average after T updates ``r <- (1 - m) r + m s_t``, t = 1..T, in closed form.

    Args:
        running: [C]; stats: [T, C] (one row per episode, in order).

    Returns:
        [C]: ``(1 - m)^T r + sum_t m (1 - m)^(T - t) s_t``.
    """
    t = stats.shape[0]
    powers = torch.arange(t - 1, -1, -1, dtype=stats.dtype, device=stats.device)
    weights = momentum * (1.0 - momentum) ** powers  # [T]: the last episode weighs most
    return (1.0 - momentum) ** t * running + weights @ stats


def episode_batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                       running_var: torch.Tensor, *, batch_stats: bool,
                       momentum: float = BN_MOMENTUM) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch norm of T episodes at once.

    Args:
        x: [T, B, C, H, W]
        weight, bias, running_mean, running_var: [C]
        batch_stats: True: normalise each episode with its own (biased) statistics over B*H*W and return the
            running statistics updated as T consecutive ``nn.BatchNorm2d`` training forwards would (unbiased
            variance); False: normalise with the running statistics and return them unchanged.

    Returns:
        (y [T, B, C, H, W], running_mean [C], running_var [C])
    """
    t, b, c, h, w = x.shape
    if not batch_stats:
        y = F.batch_norm(x.reshape(t * b, c, h, w), running_mean, running_var, weight, bias, training=False,
                         eps=BN_EPS)
        return y.view(t, b, c, h, w), running_mean, running_var
    # Episode t's channel c becomes channel t*C + c of one native call, so each episode gets its own
    # statistics from the fused kernel (a free view when T = 1). Fresh buffers with momentum 1 come back
    # holding exactly those statistics (mean and unbiased variance), which the closed form then folds in.
    per_episode = x.transpose(0, 1).reshape(b, t * c, h, w)
    means = torch.zeros(t * c, dtype=x.dtype, device=x.device)
    variances = torch.ones(t * c, dtype=x.dtype, device=x.device)
    y = F.batch_norm(per_episode, means, variances, weight.repeat(t), bias.repeat(t), training=True, momentum=1.0,
                     eps=BN_EPS)
    y = y.view(b, t, c, h, w).transpose(0, 1)
    new_mean = update_running(running_mean, means.view(t, c), momentum)
    new_var = update_running(running_var, variances.view(t, c), momentum)
    return y, new_mean, new_var


def blocks_forward(blocks: Sequence[ConvBlock], params: Params, buffers: Params, x: torch.Tensor, *, prefix: str,
                   batch_stats: bool, momentum: float = BN_MOMENTUM) -> tuple[torch.Tensor, Params]:
    """Run T episodes through a block stack.

    Args:
        x: [T, B, I, H, W]
        batch_stats: batch norm mode (see ``episode_batch_norm``).

    Returns:
        (maps [T, B, O, H', W'], the stack's buffers after this forward: updated when ``batch_stats``).
    """
    t, b = x.shape[:2]
    h = x
    new_buffers: Params = {}
    for i, block in enumerate(blocks, start=1):
        name = f"{prefix}{i}"
        h = F.conv2d(h.flatten(0, 1), params[f"{name}.conv.weight"], params[f"{name}.conv.bias"],
                     padding=block.padding)
        h, mean, var = episode_batch_norm(
            h.unflatten(0, (t, b)), params[f"{name}.bn.weight"], params[f"{name}.bn.bias"],
            buffers[f"{name}.bn.running_mean"], buffers[f"{name}.bn.running_var"],
            batch_stats=batch_stats, momentum=momentum)
        new_buffers[f"{name}.bn.running_mean"], new_buffers[f"{name}.bn.running_var"] = mean, var
        h = F.relu(h)
        if block.pool:
            h = F.max_pool2d(h.flatten(0, 1), 2).unflatten(0, (t, b))
    return h, new_buffers


def as_modules(blocks: Sequence[ConvBlock], params: Params, buffers: Params, *, prefix: str,
               momentum: float = BN_MOMENTUM) -> torch.nn.Sequential:
    """The same stack as ``torch.nn`` modules holding copies of ``params`` and ``buffers`` (for checks against
    the native layers, or to hand a trained network to code that expects a module). Same dtype and device.

    One episode at a time: a training-mode forward of ``[B, I, H, W]`` equals ``blocks_forward`` of that
    episode with batch statistics, and updates the module's running statistics as the returned buffers are.
    """
    layers: list[torch.nn.Module] = []
    for i, block in enumerate(blocks, start=1):
        name = f"{prefix}{i}"
        weight = params[f"{name}.conv.weight"]
        conv = torch.nn.Conv2d(block.in_channels, block.out_channels, 3, padding=block.padding)
        bn = torch.nn.BatchNorm2d(block.out_channels, eps=BN_EPS, momentum=momentum)
        conv.to(device=weight.device, dtype=weight.dtype)
        bn.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(params[f"{name}.conv.bias"])
            bn.weight.copy_(params[f"{name}.bn.weight"])
            bn.bias.copy_(params[f"{name}.bn.bias"])
            bn.running_mean.copy_(buffers[f"{name}.bn.running_mean"])
            bn.running_var.copy_(buffers[f"{name}.bn.running_var"])
        layers += [conv, bn, torch.nn.ReLU()] + ([torch.nn.MaxPool2d(2)] if block.pool else [])
    return torch.nn.Sequential(*layers)
