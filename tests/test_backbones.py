"""The functional conv4 network: shapes, seeded init, and batch norm equal to the native kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmark.toolkit.conv4 import batch_norm, conv4_features, conv4_forward, init_conv4


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_parameter_shapes_and_init():
    p = init_conv4(_gen(), num_classes=5)
    assert p["conv1.weight"].shape == (64, 1, 3, 3)
    assert all(p[f"conv{i}.weight"].shape == (64, 64, 3, 3) for i in (2, 3, 4))
    assert p["head.weight"].shape == (5, 64) and p["head.bias"].shape == (5,)
    assert torch.equal(p["bn1.weight"], torch.ones(64)) and torch.equal(p["bn1.bias"], torch.zeros(64))
    # Glorot uniform bound for conv2: sqrt(6 / (64*9 + 64*9))
    bound = (6 / (2 * 64 * 9)) ** 0.5
    w = p["conv2.weight"]
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in p.values())


def test_init_is_a_function_of_the_generator():
    a, b, c = init_conv4(_gen(1), 5), init_conv4(_gen(1), 5), init_conv4(_gen(2), 5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])
    d = init_conv4(_gen(1), 5, dtype=torch.float64)
    assert d["conv3.weight"].dtype == torch.float64
    assert torch.allclose(d["conv3.weight"].float(), a["conv3.weight"])


def test_spatial_sizes_and_outputs():
    p = init_conv4(_gen(), num_classes=7)
    x = torch.rand(6, 1, 28, 28, generator=_gen(3))
    sizes = []
    h = x
    for i in range(1, 5):
        h = F.conv2d(h, p[f"conv{i}.weight"], stride=2, padding=1)
        sizes.append(h.shape[-1])
    assert sizes == [14, 7, 4, 2]
    assert conv4_features(p, x).shape == (6, 64)
    assert conv4_forward(p, x).shape == (6, 7)
    # Features ignore the head, so a baseline can pair them with a head of its own.
    no_head = {k: v for k, v in p.items() if not k.startswith("head.")}
    assert torch.equal(conv4_features(no_head, x), conv4_features(p, x))


def test_batch_norm_matches_native_training_mode():
    g = _gen(4)
    x = torch.randn(8, 16, 5, 5, generator=g, dtype=torch.float64) * 3 + 1
    w = torch.rand(16, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(16, generator=g, dtype=torch.float64)
    ours = batch_norm(x, w, b)
    native = F.batch_norm(x, None, None, w, b, training=True, eps=1e-5)
    torch.testing.assert_close(ours, native, rtol=1e-12, atol=1e-12)
    # Transductive: the output of one image depends on the rest of the batch.
    assert not torch.allclose(batch_norm(x[:4], w, b), ours[:4])
