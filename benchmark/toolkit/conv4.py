"""The conv4 network of the few-shot papers as a pure function of a parameter dict.

Four blocks of ``3x3 conv (C filters) -> batch norm -> ReLU`` that shrink 28x28 images to a C-dimensional
feature, then a linear head. The papers differ in a few details, which ``Conv4Arch`` names:

* ``downsample="stride"`` (Finn et al. 2017, MAML): stride-2 convolutions, 28 -> 14 -> 7 -> 4 -> 2, and the
  final 2x2 map averaged; ``"maxpool"`` (Vinyals et al. 2016, Snell et al. 2017, Chen et al. 2019):
  stride-1 convolutions each followed by 2x2 max-pooling, 28 -> 14 -> 7 -> 3 -> 1.
* ``padding="symmetric"`` pads one pixel on every side (PyTorch's ``padding=1``); ``"same"`` is
  TensorFlow's 'SAME', which for a stride-2 convolution of an even-sized input pads only the bottom and
  right (the MAML reference code's network).
* ``bn_scale``: whether batch norm has a learned per-channel scale (gamma); the MAML reference code's
  ``tf.contrib.layers.batch_norm`` keeps its default ``scale=False`` (offset only). ``bn_eps``: 1e-5 in
  PyTorch, 1e-3 in that TensorFlow layer.
* ``activation``: ``"relu"``, or ``"leaky_relu"`` (slope 0.01, PyTorch's default; MAML++'s network).
* ``features``: ``"mean"`` averages the last block's map into a C-dimensional feature (MAML's Omniglot
  head); ``"flatten"`` keeps every position, C x 2 x 2 = 256 values for the stride-2 network (Reptile's
  ``tf.reshape`` before its dense layer). With max-pooling the map is 1x1 and both are the same.

Writing the network as functions of a ``dict[str, Tensor]`` rather than an ``nn.Module`` lets MAML take
gradients with respect to the dict and ``vmap`` over tasks without cloning modules, and lets baselines pair
the same features with a head of their own.

Batch norm uses the statistics of the batch it is given by default ("transductive", as in the MAML papers);
a learner chooses which images form that batch. Learners that test with running statistics (inductive)
pass a ``RunningStats`` dict: ``track`` it while training, ``use`` it at test time. Batch statistics are
computed with ``torch.var_mean`` rather than ``F.batch_norm`` because ``vmap`` of second-order gradients
through the native batch-norm kernel is off by about 0.5% (pytorch/functorch issue 534); ``var_mean``
matches a plain per-task loop to ~1e-14 in float64.

Parameter names (shapes with ``C`` channels, ``I`` input channels, ``N`` classes):

    conv{i}.weight [C, I or C, 3, 3]   (i = 1..4; no conv bias: batch norm subtracts it away exactly)
    bn{i}.weight   [C]  (scale, init 1; absent when ``bn_scale`` is false)
    bn{i}.bias     [C]  (shift, init 0)
    head.weight    [N, D]  (D = C, or C x 2 x 2 with ``features="flatten"`` on the stride-2 network)
    head.bias      [N]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

#: Number of conv blocks.
DEPTH = 4
#: Added to the batch variance, as in ``nn.BatchNorm2d``.
BN_EPS = 1e-5

Params = dict[str, torch.Tensor]
#: Running batch-norm statistics: ``bn{i}.running_mean`` and ``bn{i}.running_var`` [C] per block.
RunningStats = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Conv4Arch:
    """The details in which the papers' conv4 networks differ (see the module docstring)."""

    channels: int = 64
    downsample: Literal["stride", "maxpool"] = "stride"
    padding: Literal["symmetric", "same"] = "symmetric"
    bn_scale: bool = True
    bn_eps: float = BN_EPS
    activation: Literal["relu", "leaky_relu"] = "relu"
    features: Literal["mean", "flatten"] = "mean"

    def positions(self, image_size: int = 28) -> int:
        """Values per channel in the feature the head sees: 1 for ``mean``, the last map's area for ``flatten``
        (so D = C x positions)."""
        if self.features == "mean":
            return 1
        size = image_size
        for _ in range(DEPTH):
            size = -(-size // 2) if self.downsample == "stride" else size // 2
        return size * size


#: The network metabench used before it followed the MAML reference code (PyTorch conventions).
TORCH_STYLE = Conv4Arch()


def glorot_uniform_(t: torch.Tensor, fan_in: int, fan_out: int, generator: torch.Generator) -> torch.Tensor:
    """Fill ``t`` in place from U(-a, a), a = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010)."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return t.uniform_(-bound, bound, generator=generator)


def init_conv4(
    generator: torch.Generator,
    num_classes: int,
    channels: int | None = None,
    in_channels: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    arch: Conv4Arch = TORCH_STYLE,
    head_init: Literal["xavier", "normal"] = "xavier",
    conv_init: Literal["glorot", "he"] = "glorot",
) -> Params:
    """Fresh parameters of the conv4 network.

    Conv weights are Glorot-uniform (TensorFlow's ``xavier_initializer``, as in Finn et al.'s reference
    code) or, with ``conv_init="he"``, N(0, 2 / (9 C)) (He's fan-out normal, as in Chen et al.'s code),
    batch-norm scale 1 and shift 0; the head is Glorot-uniform (``head_init="xavier"``) or drawn
    from N(0, 1) (``"normal"``: the MAML reference code's Omniglot head), with zero bias. Values are drawn on
    the CPU from ``generator`` and then moved, so the same generator gives the same weights on every device.

    Args:
        generator: a CPU ``torch.Generator`` (e.g. ``context.generator("init")``).
        num_classes: outputs of the linear head (N).
        channels: filters per conv layer (C; default ``arch.channels``).
        in_channels: image channels (I).

    Returns:
        the parameter dict described in the module docstring; tensors do not require grad.
    """
    channels = channels or arch.channels
    params: Params = {}
    fan_out = channels * 9
    for i in range(1, DEPTH + 1):
        cin = in_channels if i == 1 else channels
        w = torch.empty(channels, cin, 3, 3, dtype=torch.float64)
        params[f"conv{i}.weight"] = (w.normal_(0.0, math.sqrt(2.0 / fan_out), generator=generator) if conv_init == "he"
                                     else glorot_uniform_(w, cin * 9, fan_out, generator))
        if arch.bn_scale:
            params[f"bn{i}.weight"] = torch.ones(channels, dtype=torch.float64)
        params[f"bn{i}.bias"] = torch.zeros(channels, dtype=torch.float64)
    params.update(init_linear_head(generator, channels * arch.positions(), num_classes, head_init))
    return {k: v.to(device=device, dtype=dtype) for k, v in params.items()}


def init_linear_head(generator: torch.Generator, features: int, num_classes: int,
                     kind: Literal["xavier", "normal"] = "xavier") -> Params:
    """``head.weight`` [N, D] (Glorot-uniform, or N(0, 1) for ``"normal"``) and zero ``head.bias`` [N]
    (float64, CPU)."""
    w = torch.empty(num_classes, features, dtype=torch.float64)
    weight = w.normal_(0.0, 1.0, generator=generator) if kind == "normal" else glorot_uniform_(
        w, features, num_classes, generator)
    return {"head.weight": weight, "head.bias": torch.zeros(num_classes, dtype=torch.float64)}


def init_running_stats(channels: int = 64, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu") -> RunningStats:
    """Running statistics as ``nn.BatchNorm2d`` starts them: mean 0, variance 1."""
    stats = {}
    for i in range(1, DEPTH + 1):
        stats[f"bn{i}.running_mean"] = torch.zeros(channels, dtype=dtype, device=device)
        stats[f"bn{i}.running_var"] = torch.ones(channels, dtype=dtype, device=device)
    return stats


def batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor, eps: float = BN_EPS,
               mean: torch.Tensor | None = None, var: torch.Tensor | None = None) -> torch.Tensor:
    """Batch norm with the statistics of this batch (biased variance, as in training-mode BatchNorm2d), or
    with the given ``mean`` and ``var`` (running statistics, as in eval mode).

    Args:
        x: [B, C, H, W]; weight (None: no scale), bias: [C]; mean, var: [C] or None

    Returns:
        [B, C, H, W]
    """
    if mean is None or var is None:
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    # Fold the normalisation into one per-channel scale and shift, so the full-size activation is touched
    # by a single fused multiply-add (forward and backward): elementwise passes over [B, C, H, W] dominate
    # the CPU cost of batch norm, especially vmapped over tasks.
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = weight * scale
    shift = bias - mean * scale
    return torch.addcmul(shift[:, None, None], x, scale[:, None, None])


def same_padding(size: int, stride: int = 2, kernel: int = 3) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) of one spatial dimension: the output is ceil(size/stride),
    and an odd total puts the extra pixel after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv(h: torch.Tensor, weight: torch.Tensor, arch: Conv4Arch) -> torch.Tensor:
    stride = 2 if arch.downsample == "stride" else 1
    if arch.padding == "same":
        top, bottom = same_padding(h.shape[-2], stride)
        left, right = same_padding(h.shape[-1], stride)
        return F.conv2d(F.pad(h, (left, right, top, bottom)), weight, stride=stride)
    return F.conv2d(h, weight, stride=stride, padding=1)


def _track(stats: RunningStats, i: int, h: torch.Tensor, momentum: float) -> None:
    """Update block ``i``'s running statistics in place, as ``nn.BatchNorm2d`` does (unbiased variance)."""
    with torch.no_grad():
        var, mean = torch.var_mean(h.detach(), dim=(0, 2, 3), unbiased=True)
        stats[f"bn{i}.running_mean"].lerp_(mean, momentum)
        stats[f"bn{i}.running_var"].lerp_(var, momentum)


def conv4_features(params: Params, x: torch.Tensor, arch: Conv4Arch = TORCH_STYLE, *,
                   use: RunningStats | None = None, track: RunningStats | None = None,
                   momentum: float = 0.1) -> torch.Tensor:
    """The C-dimensional features of a batch of images (head parameters, if present, are ignored).

    Args:
        params: a conv4 parameter dict.
        x: [B, I, 28, 28]
        arch: the network's details.
        use: normalise with these running statistics instead of the batch's (inductive, at test time).
        track: update these running statistics in place from the batch (training).

    Returns:
        [B, D]: the fourth block's activations, averaged over its spatial map (D = C) or flattened
        (``arch.features == "flatten"``).
    """
    h = x
    for i in range(1, DEPTH + 1):
        h = _conv(h, params[f"conv{i}.weight"], arch)
        if track is not None:
            _track(track, i, h, momentum)
        mean, var = (use[f"bn{i}.running_mean"], use[f"bn{i}.running_var"]) if use is not None else (None, None)
        h = batch_norm(h, params.get(f"bn{i}.weight"), params[f"bn{i}.bias"], arch.bn_eps, mean, var)
        h = F.leaky_relu(h) if arch.activation == "leaky_relu" else F.relu(h)
        if arch.downsample == "maxpool":
            h = F.max_pool2d(h, 2)
    return h.flatten(1) if arch.features == "flatten" else h.mean(dim=(2, 3))


def linear_head(params: Params, features: torch.Tensor) -> torch.Tensor:
    """Logits [B, N] of features [B, D] under ``head.weight`` [N, D] and ``head.bias`` [N]."""
    return F.linear(features, params["head.weight"], params["head.bias"])


def conv4_forward(params: Params, x: torch.Tensor, arch: Conv4Arch = TORCH_STYLE) -> torch.Tensor:
    """Logits of the full network (batch statistics).

    Args:
        params: a conv4 parameter dict with a ``head``.
        x: [B, I, 28, 28]

    Returns:
        [B, N]
    """
    return linear_head(params, conv4_features(params, x, arch))


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
