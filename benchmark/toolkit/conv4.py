"""The MAML Omniglot network ("conv4") as a pure function of a parameter dict.

Finn et al. 2017 (and Vinyals et al. 2016 before them) use four blocks of

    3x3 conv, 64 filters, stride 2, padding 1  ->  batch norm  ->  ReLU

on 28x28 images (28 -> 14 -> 7 -> 4 -> 2), then average the 2x2 map to a 64-d feature and classify it
linearly. Writing it as functions of a ``dict[str, Tensor]`` rather than an ``nn.Module`` lets MAML take
gradients with respect to the dict and ``vmap`` over tasks without cloning modules, and lets the fine-tuning
baseline pair the same features with a head of its own.

Batch norm always uses the statistics of the batch it is given (no running averages): "transductive" batch
norm, as in the MAML papers. A learner chooses which images form that batch (e.g. the support set alone and
the query set alone). The statistics are computed with ``torch.var_mean`` rather than ``F.batch_norm``
because ``vmap`` of second-order gradients through the native batch-norm kernel is off by about 0.5%
(pytorch/functorch issue 534); ``var_mean`` matches a plain per-task loop to ~1e-14 in float64.

Parameter names (shapes with ``C`` channels, ``I`` input channels, ``N`` classes):

    conv{i}.weight [C, I or C, 3, 3]   (i = 1..4; no conv bias: batch norm subtracts it away exactly)
    bn{i}.weight   [C]  (scale, init 1)
    bn{i}.bias     [C]  (shift, init 0)
    head.weight    [N, C]
    head.bias      [N]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Number of conv blocks.
DEPTH = 4
#: Added to the batch variance, as in ``nn.BatchNorm2d``.
BN_EPS = 1e-5

Params = dict[str, torch.Tensor]


def glorot_uniform_(t: torch.Tensor, fan_in: int, fan_out: int, generator: torch.Generator) -> torch.Tensor:
    """Fill ``t`` in place from U(-a, a), a = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010)."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return t.uniform_(-bound, bound, generator=generator)


def init_conv4(
    generator: torch.Generator,
    num_classes: int,
    channels: int = 64,
    in_channels: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Params:
    """Fresh parameters of the conv4 network.

    Initialisation follows Finn et al.'s reference code (``xavier_initializer`` for conv and linear weights,
    zero biases) with batch-norm scale 1 and shift 0. Values are drawn on the CPU from ``generator`` and then
    moved, so the same generator gives the same weights on every device.

    Args:
        generator: a CPU ``torch.Generator`` (e.g. ``context.generator("init")``).
        num_classes: outputs of the linear head (N).
        channels: filters per conv layer (C).
        in_channels: image channels (I).

    Returns:
        the parameter dict described in the module docstring; tensors do not require grad.
    """
    params: Params = {}
    fan_out = channels * 9
    for i in range(1, DEPTH + 1):
        cin = in_channels if i == 1 else channels
        w = torch.empty(channels, cin, 3, 3, dtype=torch.float64)
        params[f"conv{i}.weight"] = glorot_uniform_(w, cin * 9, fan_out, generator)
        params[f"bn{i}.weight"] = torch.ones(channels, dtype=torch.float64)
        params[f"bn{i}.bias"] = torch.zeros(channels, dtype=torch.float64)
    params.update(init_linear_head(generator, channels, num_classes))
    return {k: v.to(device=device, dtype=dtype) for k, v in params.items()}


def init_linear_head(generator: torch.Generator, features: int, num_classes: int) -> Params:
    """A Glorot-uniform ``head.weight`` [N, D] and zero ``head.bias`` [N] (float64, CPU)."""
    w = torch.empty(num_classes, features, dtype=torch.float64)
    return {
        "head.weight": glorot_uniform_(w, features, num_classes, generator),
        "head.bias": torch.zeros(num_classes, dtype=torch.float64),
    }


def batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Batch norm with the statistics of this batch (biased variance, as in training-mode BatchNorm2d).

    Args:
        x: [B, C, H, W]; weight, bias: [C]

    Returns:
        [B, C, H, W]
    """
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    # Fold the normalisation into one per-channel scale and shift, so the full-size activation is touched
    # by a single fused multiply-add (forward and backward): elementwise passes over [B, C, H, W] dominate
    # the CPU cost of batch norm, especially vmapped over tasks.
    scale = weight * torch.rsqrt(var + BN_EPS)
    shift = bias - mean * scale
    return torch.addcmul(shift[:, None, None], x, scale[:, None, None])


def conv4_features(params: Params, x: torch.Tensor) -> torch.Tensor:
    """The 64-d features of a batch of images (head parameters, if present, are ignored).

    Args:
        params: a conv4 parameter dict.
        x: [B, I, 28, 28]

    Returns:
        [B, C] globally average-pooled activations of the fourth block.
    """
    h = x
    for i in range(1, DEPTH + 1):
        h = F.conv2d(h, params[f"conv{i}.weight"], stride=2, padding=1)
        h = F.relu(batch_norm(h, params[f"bn{i}.weight"], params[f"bn{i}.bias"]))
    return h.mean(dim=(2, 3))


def linear_head(params: Params, features: torch.Tensor) -> torch.Tensor:
    """Logits [B, N] of features [B, D] under ``head.weight`` [N, D] and ``head.bias`` [N]."""
    return F.linear(features, params["head.weight"], params["head.bias"])


def conv4_forward(params: Params, x: torch.Tensor) -> torch.Tensor:
    """Logits of the full network.

    Args:
        params: a conv4 parameter dict with a ``head``.
        x: [B, I, 28, 28]

    Returns:
        [B, N]
    """
    return linear_head(params, conv4_features(params, x))


def training_state(params: Params, optimizer: torch.optim.Optimizer) -> dict:
    """``{"params": {name: tensor}, "optimizer": optimizer state}`` as independent copies: a learner's
    ``state_dict`` for a parameter dict trained by one optimizer (loadable with ``weights_only=True``)."""
    opt = optimizer.state_dict()
    return {
        "params": {k: v.detach().clone() for k, v in params.items()},
        "optimizer": {
            "state": {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                      for i, s in opt["state"].items()},
            "param_groups": [dict(g) for g in opt["param_groups"]],
        },
    }


def load_training_state(params: Params, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Copy a ``training_state`` back into ``params`` (in place) and ``optimizer``."""
    with torch.no_grad():
        for k, v in params.items():
            v.copy_(state["params"][k])
    optimizer.load_state_dict(state["optimizer"])
