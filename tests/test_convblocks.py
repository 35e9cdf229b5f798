"""The functional conv-block stacks of the metric learners against torch.nn modules (``as_modules``) run one
episode at a time."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from benchmark.toolkit.convblocks import (
    ConvBlock, as_modules, blocks_forward, conv4_pool, episode_batch_norm, init_blocks, update_running,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _shift_bn(params, prefix, count):
    """Batch-norm scales and shifts away from their init (1, 0), so the test sees them act."""
    out = dict(params)
    for i in range(1, count + 1):
        out[f"{prefix}{i}.bn.weight"] = params[f"{prefix}{i}.bn.weight"] + 0.1 * i
        out[f"{prefix}{i}.bn.bias"] = params[f"{prefix}{i}.bn.bias"] - 0.05 * i
    return out


# Sung et al.'s embedding: pad 0, 0, 1, 1; pooled after the first two blocks only (28 -> 5).
RN_EMBEDDING = (ConvBlock(1, 64, 0, True), ConvBlock(64, 64, 0, True), ConvBlock(64, 64, 1, False),
                ConvBlock(64, 64, 1, False))


@pytest.mark.parametrize(("blocks", "out_hw", "momentum"), [(conv4_pool(), 1, 0.1), (RN_EMBEDDING, 5, 1.0)])
def test_episodes_at_once_equal_one_module_forward_per_episode(blocks, out_hw, momentum):
    params, buffers = init_blocks(blocks, _gen(1), prefix="b", dtype=torch.float64)
    params = _shift_bn(params, "b", len(blocks))
    net = as_modules(blocks, params, buffers, prefix="b", momentum=momentum)
    x = torch.rand(3, 6, 1, 28, 28, generator=_gen(2), dtype=torch.float64)

    out, new_buffers = blocks_forward(blocks, params, buffers, x, prefix="b", batch_stats=True, momentum=momentum)
    net.train()
    expected = torch.stack([net(x[t]) for t in range(3)])  # one training forward per episode, in order
    assert out.shape == (3, 6, 64, out_hw, out_hw)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    bns = [m for m in net if isinstance(m, nn.BatchNorm2d)]
    for i, bn in enumerate(bns, start=1):
        torch.testing.assert_close(new_buffers[f"b{i}.bn.running_mean"], bn.running_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(new_buffers[f"b{i}.bn.running_var"], bn.running_var, rtol=1e-10, atol=1e-12)
    # The inputs' buffers are untouched: the caller decides whether to keep the new ones.
    assert torch.equal(buffers["b1.bn.running_var"], torch.ones(64, dtype=torch.float64))

    # Running-statistics mode equals eval-mode modules and returns the buffers unchanged.
    out_eval, same = blocks_forward(blocks, params, new_buffers, x, prefix="b", batch_stats=False)
    net.eval()
    torch.testing.assert_close(out_eval, net(x.flatten(0, 1)).unflatten(0, (3, 6)), rtol=1e-10, atol=1e-12)
    assert all(same[k] is new_buffers[k] for k in same)


def test_float32_matches_the_modules_closely():
    blocks = conv4_pool()
    params, buffers = init_blocks(blocks, _gen(3), prefix="e")
    params = _shift_bn(params, "e", 4)
    net = as_modules(blocks, params, buffers, prefix="e")
    x = torch.rand(2, 10, 1, 28, 28, generator=_gen(4))
    out, _ = blocks_forward(blocks, params, buffers, x, prefix="e", batch_stats=True)
    net.train()
    expected = torch.stack([net(x[t]) for t in range(2)])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_init_is_seeded_and_follows_the_named_scheme():
    blocks = conv4_pool()
    a, _ = init_blocks(blocks, _gen(5), prefix="e")
    b, _ = init_blocks(blocks, _gen(5), prefix="e")
    assert all(torch.equal(a[k], b[k]) for k in a)
    bound = 1 / math.sqrt(64 * 9)
    w = a["e2.conv.weight"]
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound and a["e2.conv.bias"].abs().max() <= bound
    assert torch.equal(a["e1.bn.weight"], torch.ones(64)) and torch.equal(a["e1.bn.bias"], torch.zeros(64))
    he, he_buffers = init_blocks(blocks, _gen(5), prefix="e", init="he-fan-out", dtype=torch.float64)
    assert torch.equal(he["e3.conv.bias"], torch.zeros(64, dtype=torch.float64))
    assert he["e3.conv.weight"].std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.05)
    assert torch.equal(he_buffers["e4.bn.running_var"], torch.ones(64, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown init"):
        init_blocks(blocks, _gen(5), prefix="e", init="xavier")


def test_running_update_in_closed_form_equals_the_sequence():
    running = torch.randn(4, generator=_gen(6), dtype=torch.float64)
    stats = torch.randn(5, 4, generator=_gen(7), dtype=torch.float64)
    for m in (0.1, 0.5, 1.0):
        r = running.clone()
        for s in stats:
            r = (1 - m) * r + m * s
        torch.testing.assert_close(update_running(running, stats, m), r, rtol=1e-14, atol=1e-14)


def test_batch_statistics_have_no_grad_path_into_the_buffers():
    x = torch.randn(2, 4, 3, 2, 2, generator=_gen(8), requires_grad=True)
    y, mean, var = episode_batch_norm(x, torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3), batch_stats=True)
    assert y.requires_grad and not mean.requires_grad and not var.requires_grad
