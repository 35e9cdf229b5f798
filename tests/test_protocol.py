"""Splits, seeded episodes and manifests: fast checks on fake data, protocol facts on the real data."""

from __future__ import annotations

import pytest
import torch

from benchmark.harness.data import load_omniglot
from benchmark.harness.data.fake import make_fake_omniglot
from benchmark.errors import ProtocolError
from benchmark.harness.protocol import (
    PROTOCOLS,
    ClassPool,
    EpisodeSampler,
    EpisodeSpec,
    Manifest,
    MinibatchSampler,
    draw_episodes,
    get_protocol,
)


@pytest.mark.parametrize(
    "spec, message",
    [
        (EpisodeSpec(1, 1, 1), "way must be at least 2"),
        (EpisodeSpec(5, 0, 1), "shot must be at least 1"),
        (EpisodeSpec(5, 1, 0), "query must be at least 1"),
        (EpisodeSpec(5, 5, 16), "shot \\+ query must be at most 20"),
    ],
)
def test_bad_episode_specs_name_the_limit(spec, message):
    with pytest.raises(ProtocolError, match=message):
        spec.validate()


def test_way_larger_than_the_split_and_unknown_protocol():
    with pytest.raises(ProtocolError, match="way 700 exceeds the 688 classes of the val split"):
        EpisodeSpec(700, 1, 1).validate(688, "val")
    with pytest.raises(ProtocolError, match="unknown protocol 'omni'; choose one of vinyals, lake"):
        get_protocol("omni")


def test_draw_episodes_distinct_classes_and_drawings():
    spec = EpisodeSpec(20, 5, 15)
    g = torch.Generator().manual_seed(0)
    draw = draw_episodes(200, 30, spec, g)
    classes, drawings = draw.classes, draw.drawings
    assert classes.shape == (200, 20) and drawings.shape == (200, 20, 20)
    assert torch.equal(draw.query_order.sort(dim=1).values, torch.arange(300).expand(200, 300))
    assert torch.equal(draw.support_order.sort(dim=1).values, torch.arange(100).expand(200, 100))
    assert all(len(set(row)) == 20 for row in classes.tolist())
    assert all(sorted(d) == list(range(20)) for d in drawings.reshape(-1, 20).tolist())
    # Classes come in random order (labels are assigned at random), not sorted by id.
    assert not all(row == sorted(row) for row in classes.tolist()[:10])


def test_manifest_needs_at_least_one_episode(omniglot):
    pool = ClassPool(omniglot, get_protocol("vinyals"), "test")
    with pytest.raises(ProtocolError, match="at least 1"):
        Manifest.build(pool, EpisodeSpec(5, 1, 1), seed=0, episodes=0)


def test_split_files_are_checked(monkeypatch):
    from benchmark.harness import protocol

    monkeypatch.setitem(protocol.SPLIT_FILE_SHA256, ("vinyals", "val"), "0" * 64)
    with pytest.raises(Exception, match="reinstall metabench"):
        get_protocol("vinyals").characters("val")


# -- the real data ---------------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_split_sizes_disjoint_and_covering(omniglot):
    for name, sizes in {"vinyals": (1028, 172, 423), "lake": (806, 158, 659)}.items():
        p = PROTOCOLS[name]
        chars = [set(p.characters(s)) for s in ("train", "val", "test")]
        assert tuple(len(c) for c in chars) == sizes
        assert not (chars[0] & chars[1] or chars[0] & chars[2] or chars[1] & chars[2])
        assert set().union(*chars) == set(omniglot.characters)
    lake = PROTOCOLS["lake"]
    assert all(c.startswith("images_evaluation/") for c in lake.characters("test"))
    classes = {s: ClassPool(omniglot, get_protocol("vinyals"), s).num_classes for s in ("train", "val", "test")}
    assert classes == {"train": 4112, "val": 688, "test": 1692}


@pytest.mark.realdata
def test_rotated_classes_are_really_rotated(omniglot):
    pool = ClassPool(omniglot, get_protocol("vinyals"), "train")
    index = omniglot.index_of()
    for class_id in (0, 1, 2, 3, 4097, 4110):
        name, degrees = pool.describe_class(class_id)
        original = omniglot.images[index[name]]
        assert torch.equal(pool.bank[class_id], torch.rot90(original, degrees // 90, dims=(-2, -1)))
        if degrees:
            assert not torch.equal(pool.bank[class_id], original)


@pytest.mark.realdata
def test_episodes_shapes_labels_and_disjoint_support_query(omniglot):
    pool = ClassPool(omniglot, get_protocol("vinyals"), "train")
    spec = EpisodeSpec(20, 1, 15)
    batch = EpisodeSampler(pool, spec, seed=0).sample(16)
    assert batch.support_x.shape == (16, 20, 1, 28, 28) and batch.query_x.shape == (16, 300, 1, 28, 28)
    assert batch.support_x.dtype == torch.float32 and 0 <= batch.support_x.min() and batch.support_x.max() <= 1
    assert batch.support_y.min() == 0 and batch.support_y.max() == 19 and batch.query_y.max() == 19
    assert torch.equal(batch.query_y[0].bincount(), torch.full((20,), 15))
    # Support and query drawings of a class never coincide (up to the one duplicated Braille drawing pair).
    for t in range(4):
        for n in range(20):
            s = batch.support_x[t][batch.support_y[t] == n]
            q = batch.query_x[t][batch.query_y[t] == n]
            assert len(s) == 1 and len(q) == 15
            assert not any(torch.equal(s[0], qi) for qi in q)
    # Positions say nothing about labels: guessing "label = position // Q" scores about chance.
    guess = torch.arange(20).repeat_interleave(15)
    assert (batch.query_y == guess).float().mean() < 0.15
    assert not torch.equal(batch.support_y[0], torch.arange(20))


@pytest.mark.realdata
def test_same_seed_same_episodes_other_seed_different(omniglot):
    pool = ClassPool(omniglot, get_protocol("vinyals"), "test")
    spec = EpisodeSpec(5, 1, 15)
    a, b = Manifest.build(pool, spec, 0, 600), Manifest.build(pool, spec, 0, 600)
    c = Manifest.build(pool, spec, 1, 600)
    assert a.hash == b.hash and torch.equal(a.classes, b.classes) and torch.equal(a.drawings, b.drawings)
    assert c.hash != a.hash and not torch.equal(a.classes, c.classes)
    assert Manifest.from_json(a.to_json(pool)).hash == a.hash
    x = EpisodeSampler(pool, spec, seed=3).sample(4)
    y = EpisodeSampler(pool, spec, seed=3).sample(4)
    z = EpisodeSampler(pool, spec, seed=4).sample(4)
    assert torch.equal(x.support_x, y.support_x) and not torch.equal(x.support_x, z.support_x)
    # Another way/shot draws another stream.
    assert Manifest.build(pool, EpisodeSpec(5, 5, 15), 0, 600).hash != a.hash


@pytest.mark.realdata
def test_manifest_batches_cover_every_episode_once(omniglot):
    pool = ClassPool(omniglot, get_protocol("vinyals"), "test")
    m = Manifest.build(pool, EpisodeSpec(5, 1, 2), 0, 23)
    starts, total = [], 0
    for start, batch in m.batches(pool, batch_size=10):
        starts.append(start)
        total += batch.num_tasks
    assert starts == [0, 10, 20] and total == 23


@pytest.mark.realdata
def test_minibatch_sampler_labels_cover_the_split(omniglot):
    pool = ClassPool(omniglot, get_protocol("vinyals"), "train")
    mb = MinibatchSampler(pool, batch_size=4096, seed=0).sample()
    assert mb.x.shape == (4096, 1, 28, 28) and mb.num_classes == 4112
    assert 0 <= mb.y.min() and mb.y.max() < 4112 and mb.y.unique().numel() > 2000


def test_fake_pool_missing_characters_is_a_clear_error(tmp_path, isolated_cache):
    data = load_omniglot(make_fake_omniglot(tmp_path / "d"), strict=False)
    with pytest.raises(Exception, match="run `bench data`"):
        ClassPool(data, get_protocol("vinyals"), "train")
