"""Decode Omniglot once into a uint8 tensor [characters, 20, 28, 28] and cache it.

Preprocessing follows the MAML reference code (cbfinn/maml, ``data/omniglot_resized/resize_images.py``):
``Image.open(png).resize((28, 28), resample=LANCZOS)``. The PNGs are 1-bit (mode ``"1"``), and Pillow
resizes 1-bit images with nearest-neighbour sampling whatever filter is asked for, so the reference images
are binary nearest-neighbour samples of the 105x105 drawings. We reproduce that exactly. The reference loader
then computes ``1 - pixel / 255``, so ink is 1 and paper is 0: we store ink as 255 and paper as 0, and the
episode sampler divides by 255.

Characters are indexed in sorted path order ("images_background/<Alphabet>/characterNN", then the
evaluation set); drawings in file order (``NNNN_01.png`` ... ``NNNN_20.png``).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from benchmark.data.sources import SETS, Sources, cache_root, find_sources
from benchmark.errors import DataError
from benchmark.results import atomic_torch_save, atomic_write_json

IMAGE_SIZE = 28
DRAWINGS = 20
#: Bump when decoding changes: it is part of the cache key.
PREPROCESS_VERSION = "maml-nearest-28-ink255-v1"

#: What the real data holds.
EXPECTED = {"images_background": (30, 964), "images_evaluation": (20, 659)}

#: sha256 of the decoded real data (character names + pixels). Zips and folders, original or repack,
#: all decode to these exact bytes, so this verifies extracted folders too.
REAL_CONTENT_SHA256 = "976bebd11ce222de019c97fa10746d40a4b6ad64760a878d45b49122e19b633a"

_PNG = re.compile(r"^(images_background|images_evaluation)/([^/]+)/(character\d+)/(\d+)_(\d+)\.png$")


@dataclass(frozen=True)
class OmniglotImages:
    """The decoded data set.

    Attributes:
        images: uint8 tensor [C, 20, 28, 28]; ink 255, paper 0.
        characters: C names, "images_background/<Alphabet>/characterNN".
        content_sha256: hash of names and pixels (``REAL_CONTENT_SHA256`` for the real data).
        sources: where the data came from.
        cache_path: the cache file the tensor was loaded from or written to.
        from_cache: whether this load decoded nothing.
    """

    images: "torch.Tensor"  # noqa: F821
    characters: tuple[str, ...]
    content_sha256: str
    sources: Sources
    cache_path: Path
    from_cache: bool

    @property
    def is_real(self) -> bool:
        return self.content_sha256 == REAL_CONTENT_SHA256

    def index_of(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.characters)}


def _list_pngs(source) -> dict[str, list[tuple[str, str]]]:
    """Map character path -> sorted list of (file name, member or path) for one source."""
    chars: dict[str, list[tuple[str, str]]] = {}
    if source.kind == "zip":
        with zipfile.ZipFile(source.path) as zf:
            names = zf.namelist()
        for n in names:
            m = _PNG.match(n)
            if m and m.group(1) == source.set_name:
                chars.setdefault("/".join(m.group(1, 2, 3)), []).append((n, n))
    else:
        for p in source.path.rglob("*.png"):
            rel = f"{source.set_name}/{p.relative_to(source.path).as_posix()}"
            m = _PNG.match(rel)
            if m:
                chars.setdefault("/".join(m.group(1, 2, 3)), []).append((rel, str(p)))
    return {c: sorted(files) for c, files in chars.items()}


def _decode_png(data: bytes):
    """105x105 1-bit PNG -> 28x28 uint8 numpy array, ink 255 (the MAML reference resize, see module doc)."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        small = im.resize((IMAGE_SIZE, IMAGE_SIZE), resample=Image.LANCZOS)  # nearest for mode "1"
        pixels = np.asarray(small.convert("L"), dtype=np.uint8)
    return 255 - pixels


def _decode_chunk(args) -> "list":
    """Decode a list of (kind, container, member) triples in a worker process."""
    kind, container, members = args
    out = []
    if kind == "zip":
        with zipfile.ZipFile(container) as zf:
            for member in members:
                out.append(_decode_png(zf.read(member)))
    else:
        for member in members:
            out.append(_decode_png(Path(member).read_bytes()))
    return out


def decode_sources(sources: Sources, *, workers: int | None = None):
    """Decode every drawing of both sets.

    Returns:
        (images uint8 tensor [C, 20, 28, 28], character names)

    Raises:
        DataError: a character without exactly 20 drawings, or no characters at all.
    """
    import numpy as np
    import torch

    jobs, characters = [], []
    for source in sources.files:
        chars = _list_pngs(source)
        for name in sorted(chars):
            files = chars[name]
            if len(files) != DRAWINGS:
                raise DataError(
                    f"{name} in {source.path} has {len(files)} drawings, expected {DRAWINGS}; "
                    "the data is incomplete: download it again"
                )
            characters.append(name)
            jobs.append((source.kind, str(source.path), [member for _, member in files]))
    if not characters:
        raise DataError(f"no Omniglot PNGs found under {sources.root}")
    workers = workers or min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1, 8)
    # One job per character keeps each worker's zip handle busy; chunk them to amortize process overhead.
    chunk = max(1, len(jobs) // (workers * 8))
    # A chunk never mixes containers (a worker opens one zip per chunk).
    grouped = []
    for i in range(0, len(jobs), chunk):
        batch = jobs[i : i + chunk]
        for kind, container in dict.fromkeys((k, c) for k, c, _ in batch):
            grouped.append((kind, container, [m for k, c, ms in batch if (k, c) == (kind, container) for m in ms]))
    if workers > 1 and len(grouped) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            decoded = [a for part in pool.map(_decode_chunk, grouped) for a in part]
    else:
        decoded = [a for g in grouped for a in _decode_chunk(g)]
    images = torch.from_numpy(np.stack(decoded)).reshape(len(characters), DRAWINGS, IMAGE_SIZE, IMAGE_SIZE)
    return images, characters


def content_hash(images, characters) -> str:
    """sha256 of the character names and the decoded pixels."""
    h = hashlib.sha256()
    h.update("\n".join(characters).encode())
    h.update(images.contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_file_for(sources: Sources) -> Path:
    key = hashlib.sha256(f"{PREPROCESS_VERSION}:{sources.key}".encode()).hexdigest()[:20]
    return cache_root() / f"omniglot28-{key}.pt"


def load_omniglot(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    strict: bool = True,
) -> OmniglotImages:
    """Find, decode (once) and return Omniglot.

    Args:
        data_dir: a folder with the zips or extracted folders; ``None`` uses ``BENCH_DATA_DIR``, then the cache.
        download: allow downloading the original zips when nothing is found.
        strict: require the real data set (1623 characters, known content hash). Tests of the reading code
            pass ``strict=False`` to load a small fake tree.
    """
    import torch

    if data_dir is None and not os.environ.get("BENCH_DATA_DIR"):
        verified = _load_verified_decode()
        if verified is not None:
            return verified
    sources = find_sources(data_dir, download=download)
    path = cache_file_for(sources)
    data, from_cache = None, False
    if path.is_file():
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            from_cache = True
        except Exception:  # a truncated or foreign file: rebuild it
            data = None
    if data is None:
        images, characters = decode_sources(sources)
        data = {
            "format": PREPROCESS_VERSION,
            "images": images,
            "characters": list(characters),
            "content_sha256": content_hash(images, characters),
        }
        atomic_torch_save(path, data)
    result = OmniglotImages(
        images=data["images"],
        characters=tuple(data["characters"]),
        content_sha256=data["content_sha256"],
        sources=sources,
        cache_path=path,
        from_cache=from_cache,
    )
    problems = verify(result)
    if strict and problems:
        raise DataError(
            "the Omniglot data in "
            f"{sources.root} is not the complete data set: {'; '.join(problems)}. Download it again"
        )
    if not problems:
        _remember_verified_decode(path)
    return result


#: Names the cache file of the last verified real decode (written by any successful load of the real data).
VERIFIED_POINTER = "omniglot28-verified.json"


def _remember_verified_decode(path: Path) -> None:
    """Point the cache at this verified decode, so later commands need neither --data-dir nor the zips.
    Written only when it changes: a warm load writes nothing."""
    import json

    record = {"cache_file": path.name, "content_sha256": REAL_CONTENT_SHA256}
    pointer = cache_root() / VERIFIED_POINTER
    try:
        if json.loads(pointer.read_text()) == record:
            return
    except (OSError, ValueError):
        pass
    atomic_write_json(pointer, record)


def _load_verified_decode() -> OmniglotImages | None:
    """The real data from the cache alone, when an earlier load verified it; None otherwise."""
    import json

    import torch

    pointer = cache_root() / VERIFIED_POINTER
    try:
        record = json.loads(pointer.read_text())
        path = cache_root() / record["cache_file"]
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, KeyError, RuntimeError):
        return None
    if data.get("content_sha256") != REAL_CONTENT_SHA256 or content_hash(data["images"], data["characters"]) != REAL_CONTENT_SHA256:
        return None  # edited or corrupted: fall back to the sources
    sources = Sources("cache", cache_root(), ())
    return OmniglotImages(data["images"], tuple(data["characters"]), REAL_CONTENT_SHA256, sources, path, True)


def set_counts(characters: tuple[str, ...] | list[str]) -> dict[str, tuple[int, int]]:
    """(alphabets, characters) per image set, from character names "<set>/<Alphabet>/characterNN"."""
    counts = {}
    for set_name in SETS:
        names = [c for c in characters if c.startswith(set_name + "/")]
        counts[set_name] = (len({c.split("/")[1] for c in names}), len(names))
    return counts


def verify(data: OmniglotImages) -> list[str]:
    """Every way in which ``data`` differs from the real Omniglot (empty when it is the real thing)."""
    problems = []
    for set_name, (alphabets, characters) in set_counts(data.characters).items():
        want_alpha, want_chars = EXPECTED[set_name]
        if (alphabets, characters) != (want_alpha, want_chars):
            problems.append(
                f"{set_name} has {alphabets} alphabets and {characters} characters, "
                f"expected {want_alpha} and {want_chars}"
            )
    for f in data.sources.files:
        if f.kind == "zip" and f.checksum_status == "unknown":
            problems.append(f"{f.path.name} matches neither the original md5 nor the known repack sha256")
    if not problems and data.content_sha256 != REAL_CONTENT_SHA256:
        problems.append("the decoded pixels do not match the known content hash")
    return problems
