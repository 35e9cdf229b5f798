"""The episodic Omniglot protocol: named class splits, seeded episode sampling and test-episode manifests.

A *class* is a character at one rotation: under ``vinyals`` each of the 1028/172/423 characters appears at
0, 90, 180 and 270 degrees (counter-clockwise, ``torch.rot90``) as four classes. A split's classes live in a
``ClassPool``: one uint8 bank [C, 20, 28, 28] on the target device, so an episode is pure tensor indexing.

Every random choice comes from a ``torch.Generator`` seeded from (protocol, split, way, shot, query, seed,
purpose). Test episodes are drawn once on the CPU into a ``Manifest`` (class ids, rotations and drawing
indices, with a content hash), so every learner on every device is scored on the identical episodes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from typing import Iterator

import torch

from benchmark.harness.data.omniglot import DRAWINGS, OmniglotImages
from benchmark.episodes import EpisodeBatch, LabeledBatch
from benchmark.errors import DataError, ProtocolError
from benchmark.learner import seed_from

SPLITS = ("train", "val", "test")

#: sha256 of every shipped split file: a protocol is only what it says if its files are intact.
SPLIT_FILE_SHA256 = {
    ("vinyals", "train"): "4802517a0723803119a9aca109acf9e927d96aa8363af0abb384e73ffcacd669",
    ("vinyals", "val"): "63133968e7fd9bd047403ac343f9c2f3c31ab84081b837ebcc336368a2027bf7",
    ("vinyals", "test"): "c743a2eca257f93d853df033a4f6544f58332ea9cca181e0d1941fefd7f04bf9",
    ("lake", "train"): "57114cfb9d8c108ed98a1590c1bff9f78d1c07b97bcf189e2de0327224cf27d8",
    ("lake", "val"): "7f10ddd8aaa20ee0708393ebeb77bd059c62c6fdc129fead459d3db52939a39f",
    ("lake", "test"): "a780e63cd5b7809a353a5f9816f12f5db7b0e65bc6ce4830d3187c0886b90217",
}


@dataclass(frozen=True)
class Protocol:
    """A named class split with its rotation policy.

    Attributes:
        name: "vinyals" or "lake".
        rotations: the rotations (degrees, counter-clockwise) under which every character is a class.
        description: one line for tables and ``bench data``.
        validation: what serves as the validation split.
    """

    name: str
    rotations: tuple[int, ...]
    description: str
    validation: str

    def characters(self, split: str) -> list[str]:
        """Character names of one split, e.g. "images_evaluation/Gurmukhi/character42"; sha256-checked."""
        if split not in SPLITS:
            raise ProtocolError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        raw = resources.files("benchmark.harness.data").joinpath(f"splits/{self.name}/{split}.txt").read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if digest != SPLIT_FILE_SHA256[(self.name, split)]:
            raise DataError(
                f"split file {self.name}/{split}.txt has sha256 {digest[:12]}…, expected "
                f"{SPLIT_FILE_SHA256[(self.name, split)][:12]}…; reinstall metabench"
            )
        return raw.decode().split()

    def num_classes(self, split: str) -> int:
        """Classes of one split (characters x rotations), known without loading the data."""
        return len(self.characters(split)) * len(self.rotations)

    @cached_property
    def split_hash(self) -> str:
        """sha256 over the protocol's three split files (their shipped hashes)."""
        h = hashlib.sha256()
        for split in SPLITS:
            h.update(f"{split}:{SPLIT_FILE_SHA256[(self.name, split)]}\n".encode())
        return h.hexdigest()

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "split_hash": self.split_hash,
            "rotations": list(self.rotations),
            "validation": self.validation,
        }


PROTOCOLS = {
    "vinyals": Protocol(
        name="vinyals",
        rotations=(0, 90, 180, 270),
        description="Vinyals et al. 2016 split: 1028/172/423 characters, x4 rotations = 4112/688/1692 classes",
        validation="the 172 Vinyals validation characters (688 classes)",
    ),
    "lake": Protocol(
        name="lake",
        rotations=(0,),
        description="Lake et al. 2015: background set (964 characters) to train, evaluation set (659) to test",
        validation=(
            "5 of the 30 background alphabets held out (Balinese, Early_Aramaic, Inuktitut, Mkhedruli, Tifinagh: "
            "158 characters); meta-training uses the other 806 characters"
        ),
    ),
}


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ProtocolError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}") from None


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts: stable across runs, processes and platforms (no Python hash())."""
    return seed_from(json.dumps([str(p) for p in parts]))


@dataclass(frozen=True)
class EpisodeSpec:
    """The shape of an episode: N classes, K support and Q query drawings per class."""

    way: int
    shot: int
    query: int

    def validate(self, num_classes: int | None = None, split: str = "") -> None:
        """Raise ProtocolError naming the limit when the episode cannot be drawn."""
        if self.way < 2:
            raise ProtocolError(f"way must be at least 2 (got {self.way})")
        if self.shot < 1:
            raise ProtocolError(f"shot must be at least 1 (got {self.shot})")
        if self.query < 1:
            raise ProtocolError(f"query must be at least 1 (got {self.query})")
        if self.shot + self.query > DRAWINGS:
            raise ProtocolError(
                f"shot + query must be at most {DRAWINGS}, the drawings per Omniglot character "
                f"(got {self.shot} + {self.query} = {self.shot + self.query})"
            )
        if num_classes is not None and self.way > num_classes:
            raise ProtocolError(f"way {self.way} exceeds the {num_classes} classes of the {split} split")


class ClassPool:
    """The classes of one split of a protocol, as one image bank on a device.

    Class ``c`` is character ``c // R`` of the split list at rotation ``rotations[c % R]``.

    Attributes:
        bank: uint8 [C, 20, 28, 28] on ``device``; ink 255.
        num_classes: C = characters x rotations.
    """

    def __init__(self, data: OmniglotImages, protocol: Protocol, split: str, device: torch.device | str = "cpu"):
        self.protocol, self.split, self.device = protocol, split, torch.device(device)
        self.characters = protocol.characters(split)
        index = data.index_of()
        missing = [c for c in self.characters if c not in index]
        if missing:
            raise DataError(
                f"{len(missing)} characters of the {protocol.name}/{split} split are not in the data "
                f"(first: {missing[0]}); the data set is incomplete: run `bench data`"
            )
        chars = torch.tensor([index[c] for c in self.characters])
        images = data.images[chars]  # [n_chars, 20, 28, 28]
        # rot90 with k quarter turns (counter-clockwise); stack so that class = char * R + r.
        rotated = [torch.rot90(images, k=deg // 90, dims=(-2, -1)) for deg in protocol.rotations]
        self.bank = torch.stack(rotated, dim=1).flatten(0, 1).contiguous().to(self.device)
        self.num_classes = self.bank.shape[0]

    def describe_class(self, class_id: int) -> tuple[str, int]:
        """(character name, rotation in degrees) of a class id."""
        r = len(self.protocol.rotations)
        return self.characters[class_id // r], self.protocol.rotations[class_id % r]

    def episodes(self, draw: EpisodeDraw, spec: EpisodeSpec) -> EpisodeBatch:
        """Gather episodes by indexing the bank, then put support and query in their drawn random orders."""
        classes, drawings = draw.classes.to(self.device), draw.drawings.to(self.device)
        t, n, _ = drawings.shape
        k, q = spec.shot, spec.query
        images = self.bank[classes.unsqueeze(-1), drawings]  # [T, N, K+Q, 28, 28] uint8
        images = images.unsqueeze(3).to(torch.float32).div_(255.0)  # [T, N, K+Q, 1, 28, 28]
        labels = torch.arange(n, device=self.device)
        support_x = images[:, :, :k].reshape(t, n * k, 1, *images.shape[-2:])
        query_x = images[:, :, k:].reshape(t, n * q, 1, *images.shape[-2:])
        support_y = labels.repeat_interleave(k).expand(t, n * k)
        query_y = labels.repeat_interleave(q).expand(t, n * q)
        # Shuffle positions so that a learner cannot read labels off the order of the images.
        s_order, q_order = draw.support_order.to(self.device), draw.query_order.to(self.device)
        return EpisodeBatch(
            support_x=_take(support_x, s_order), support_y=support_y.gather(1, s_order),
            query_x=_take(query_x, q_order), query_y=query_y.gather(1, q_order),
            way=n, shot=k, query=q,
        )


def _take(images: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """images [T, M, 1, H, W] reordered along M by order [T, M]."""
    return images[torch.arange(images.shape[0], device=images.device).unsqueeze(1), order]


@dataclass(frozen=True)
class EpisodeDraw:
    """The random choices behind T episodes (all int64, on the generator's device).

    Attributes:
        classes: [T, N] class ids; label n of episode t is class ``classes[t, n]``.
        drawings: [T, N, K+Q] drawing indices per class; the first K are support, the rest query.
        support_order: [T, N*K] a permutation of the support positions (label-grouped -> shuffled).
        query_order: [T, N*Q] a permutation of the query positions.
    """

    classes: torch.Tensor
    drawings: torch.Tensor
    support_order: torch.Tensor
    query_order: torch.Tensor

    def slice(self, start: int, stop: int) -> EpisodeDraw:
        return EpisodeDraw(self.classes[start:stop], self.drawings[start:stop], self.support_order[start:stop],
                           self.query_order[start:stop])


def draw_episodes(num_tasks: int, num_classes: int, spec: EpisodeSpec, generator: torch.Generator) -> EpisodeDraw:
    """Random classes, drawings and example orders for ``num_tasks`` episodes, on the generator's device.

    Classes are distinct within an episode and come in random order (so labels are assigned at random);
    support and query drawings are distinct; support and query positions are shuffled.
    """
    device = generator.device
    # The N smallest of C uniform keys: a uniformly random ordered N-subset, in one batched kernel.
    keys = torch.rand(num_tasks, num_classes, generator=generator, device=device)
    classes = keys.topk(spec.way, dim=1, largest=False, sorted=True).indices
    draw_keys = torch.rand(num_tasks, spec.way, DRAWINGS, generator=generator, device=device)
    drawings = draw_keys.topk(spec.shot + spec.query, dim=2, largest=False, sorted=True).indices
    support_order = torch.rand(num_tasks, spec.way * spec.shot, generator=generator, device=device).argsort(dim=1)
    query_order = torch.rand(num_tasks, spec.way * spec.query, generator=generator, device=device).argsort(dim=1)
    return EpisodeDraw(classes, drawings, support_order, query_order)


class EpisodeSampler:
    """Endless seeded training (or validation) episodes from a pool, drawn on the pool's device."""

    def __init__(self, pool: ClassPool, spec: EpisodeSpec, seed: int, purpose: str = "train"):
        spec.validate(pool.num_classes, pool.split)
        self.pool, self.spec = pool, spec
        self.generator = torch.Generator(device=pool.device)
        p = pool.protocol
        self.generator.manual_seed(derive_seed(p.name, p.split_hash, pool.split, spec.way, spec.shot, spec.query,
                                               seed, purpose))

    def sample(self, num_tasks: int) -> EpisodeBatch:
        """A batch of ``num_tasks`` fresh episodes: [T, N*K, 1, 28, 28] support, [T, N*Q, ...] query."""
        return self.pool.episodes(draw_episodes(num_tasks, self.pool.num_classes, self.spec, self.generator), self.spec)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class MinibatchSampler:
    """Plain classification minibatches over every class of a pool (for pre-trained baselines)."""

    def __init__(self, pool: ClassPool, batch_size: int, seed: int, purpose: str = "minibatch"):
        self.pool, self.batch_size = pool, batch_size
        self.generator = torch.Generator(device=pool.device)
        self.generator.manual_seed(derive_seed(pool.protocol.name, pool.split, batch_size, seed, purpose))

    def sample(self) -> LabeledBatch:
        """``batch_size`` images drawn uniformly over (class, drawing), with replacement across steps."""
        g, dev = self.generator, self.pool.device
        y = torch.randint(self.pool.num_classes, (self.batch_size,), generator=g, device=dev)
        d = torch.randint(DRAWINGS, (self.batch_size,), generator=g, device=dev)
        x = self.pool.bank[y, d].unsqueeze(1).to(torch.float32).div_(255.0)
        return LabeledBatch(x=x, y=y, num_classes=self.pool.num_classes)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


@dataclass(frozen=True)
class Manifest:
    """A fixed, hashed list of episodes: the same for every learner that is scored on it.

    Attributes:
        header: protocol, split, split hash, rotations, way, shot, query, seed, episodes.
        draw: the episodes' classes, drawings and example orders (see EpisodeDraw), on the CPU.
    """

    header: dict
    draw: EpisodeDraw
    hash: str = field(default="")

    @property
    def classes(self) -> torch.Tensor:
        """[E, N] class ids of the pool."""
        return self.draw.classes

    @property
    def drawings(self) -> torch.Tensor:
        """[E, N, K+Q] drawing indices."""
        return self.draw.drawings

    @property
    def spec(self) -> EpisodeSpec:
        return EpisodeSpec(self.header["way"], self.header["shot"], self.header["query"])

    @property
    def num_episodes(self) -> int:
        return self.classes.shape[0]

    @staticmethod
    def build(pool: ClassPool, spec: EpisodeSpec, seed: int, episodes: int) -> Manifest:
        """Draw ``episodes`` episodes on the CPU, so the manifest does not depend on the device."""
        if episodes < 1:
            raise ProtocolError(f"the number of episodes must be at least 1 (got {episodes})")
        spec.validate(pool.num_classes, pool.split)
        p = pool.protocol
        g = torch.Generator(device="cpu")
        g.manual_seed(derive_seed(p.name, p.split_hash, pool.split, spec.way, spec.shot, spec.query, seed,
                                  "manifest"))
        draw = draw_episodes(episodes, pool.num_classes, spec, g)
        header = {
            "protocol": p.name, "split": pool.split, "split_hash": p.split_hash, "rotations": list(p.rotations),
            "way": spec.way, "shot": spec.shot, "query": spec.query, "seed": seed, "episodes": episodes,
        }
        return Manifest._with_hash(header, draw)

    @staticmethod
    def _body(header: dict, draw: EpisodeDraw) -> dict:
        return {"header": header, "classes": draw.classes.tolist(), "drawings": draw.drawings.tolist(),
                "support_order": draw.support_order.tolist(), "query_order": draw.query_order.tolist()}

    @staticmethod
    def _with_hash(header: dict, draw: EpisodeDraw) -> Manifest:
        body = json.dumps(Manifest._body(header, draw), sort_keys=True, separators=(",", ":"))
        return Manifest(header, draw, hashlib.sha256(body.encode()).hexdigest())

    def batches(self, pool: ClassPool, batch_size: int) -> Iterator[tuple[int, EpisodeBatch]]:
        """Yield (index of the first episode, EpisodeBatch of up to ``batch_size`` episodes) on the pool's device."""
        self.check_pool(pool)
        for start in range(0, self.num_episodes, batch_size):
            stop = min(start + batch_size, self.num_episodes)
            yield start, pool.episodes(self.draw.slice(start, stop), self.spec)

    def check_pool(self, pool: ClassPool) -> None:
        h = self.header
        if (h["protocol"], h["split"], h["split_hash"]) != (pool.protocol.name, pool.split, pool.protocol.split_hash):
            raise ProtocolError(
                f"manifest is for {h['protocol']}/{h['split']} but the pool is {pool.protocol.name}/{pool.split}"
            )

    def to_json(self, pool: ClassPool | None = None) -> dict:
        """A portable form: per episode its classes, drawings and example orders (with ``pool``, also each
        class as (character, rotation))."""
        out = {"hash": self.hash, **self._body(self.header, self.draw)}
        if pool is not None:
            out["class_names"] = [
                [list(pool.describe_class(int(c))) for c in row] for row in self.classes.tolist()
            ]
        return out

    @staticmethod
    def from_json(obj: dict) -> Manifest:
        keys = ("classes", "drawings", "support_order", "query_order")
        m = Manifest._with_hash(obj["header"], EpisodeDraw(*(torch.tensor(obj[k]) for k in keys)))
        if obj.get("hash") and obj["hash"] != m.hash:
            raise ProtocolError(f"manifest content hash {m.hash[:12]}… does not match its recorded {obj['hash'][:12]}…")
        return m


@dataclass
class Pools:
    """The three splits of a protocol on the run's device."""

    train: ClassPool
    val: ClassPool
    test: ClassPool


def load_pools(data: OmniglotImages, protocol: Protocol, device: torch.device) -> Pools:
    return Pools(*(ClassPool(data, protocol, split, device) for split in SPLITS))


def make_sampler(phase, pool: ClassPool, spec: EpisodeSpec, seed: int, index: int = 0) -> EpisodeSampler | MinibatchSampler:
    """The sampler of one training phase (``benchmark.learner.Episodes`` or ``Minibatches``).

    Phase 0 keeps the purposes "train" and "minibatch" alone, so a single-phase run draws exactly what it
    always drew; later phases get their own streams.
    """
    from benchmark.learner import Minibatches

    if isinstance(phase, Minibatches):
        return MinibatchSampler(pool, phase.images, seed, purpose="minibatch" if index == 0 else f"minibatch:{index}")
    return EpisodeSampler(pool, spec, seed, purpose="train" if index == 0 else f"train:{index}")


def draw(sampler: EpisodeSampler | MinibatchSampler, phase) -> EpisodeBatch | LabeledBatch:
    """One training batch of ``phase`` from its sampler."""
    return sampler.sample() if isinstance(sampler, MinibatchSampler) else sampler.sample(phase.tasks)
