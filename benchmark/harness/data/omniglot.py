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
import multiprocessing
import os
import re
import zipfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from benchmark.harness.data.cache import CacheDir, Warn, warn_on_stderr
from benchmark.harness.data.sources import SETS, Sources, cache_root, find_sources
from benchmark.errors import DataError
from benchmark.harness.atomic import atomic_torch_save, atomic_write_json

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
    """Map character path -> sorted list of (file name, member or path) for one source.

    Raises:
        DataError: a zip that cannot be opened (truncated, not a zip).
    """
    chars: dict[str, list[tuple[str, str]]] = {}
    if source.kind == "zip":
        try:
            with zipfile.ZipFile(source.path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise _invalid_source("zip", str(source.path), _short_reason(None, exc)) from None
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


class _Unreadable(Exception):
    """A source file that a worker could not read or decode: (kind, container, short reason).

    Workers raise it instead of the original error so that the parent, which receives it pickled, knows which
    zip or folder is at fault and can turn it into one ``DataError`` line.
    """


def _decode_chunk(args) -> "list":
    """Decode a list of (kind, container, member) triples in a worker process.

    Raises:
        _Unreadable: a member that cannot be read or decoded.
    """
    kind, container, members = args
    member, out = None, []  # a loop, not a comprehension: the handler names the member that failed
    try:
        if kind == "zip":
            with zipfile.ZipFile(container) as zf:
                for member in members:
                    out.append(_decode_png(zf.read(member)))
        else:
            for member in members:
                out.append(_decode_png(Path(member).read_bytes()))
        return out
    except Exception as exc:  # noqa: BLE001
        # Only reading and decoding run in this block, and bad bytes surface as many types: BadZipFile (CRC),
        # zlib.error, EOFError, OSError and UnidentifiedImageError, SyntaxError ("broken PNG file"), ValueError.
        shown = member if kind == "zip" or member is None else os.path.relpath(member, container)
        raise _Unreadable(kind, container, _short_reason(shown, exc)) from None


def _short_reason(member: str | None, exc: BaseException) -> str:
    """One short line: the member at fault (unless the message names it) and what was wrong with it."""
    from PIL import UnidentifiedImageError

    text = "not an image" if isinstance(exc, UnidentifiedImageError) else (str(exc).splitlines() or [""])[0]
    text = text[:160] or type(exc).__name__
    if member is None or Path(member).name in text:
        return text
    return f"{member}: {text}"


def _invalid_source(kind: str, container: str, reason: str) -> DataError:
    if kind == "zip":
        return DataError(
            f"{container} is not a valid Omniglot zip ({reason}): download it again (or `bench data` downloads it)"
        )
    return DataError(
        f"{container} is not a valid Omniglot folder ({reason}): extract it again from the original zip "
        "(or `bench data` downloads the zips)"
    )


def _decode_jobs(sources: Sources) -> tuple[list[tuple[str, str, list[str]]], list[str]]:
    """(one (kind, container, members) job per character, character names), in cache order."""
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
    return jobs, characters


def _chunks(jobs: list, workers: int) -> list[tuple[str, str, list[str]]]:
    """Group per-character jobs into chunks that amortize process overhead; a chunk never mixes containers
    (a worker opens one zip per chunk)."""
    chunk = max(1, len(jobs) // (workers * 8))
    grouped = []
    for i in range(0, len(jobs), chunk):
        batch = jobs[i : i + chunk]
        for kind, container in dict.fromkeys((k, c) for k, c, _ in batch):
            grouped.append((kind, container, [m for k, c, ms in batch if (k, c) == (kind, container) for m in ms]))
    return grouped


def _worker_context():
    """Start decode workers from a fresh server process, not by forking this one.

    By the time data loads, torch and other libraries may have started threads; forking a multi-threaded
    process can deadlock the child (Python 3.12 warns about it). This module imports nothing heavy at the
    top, so a forkserver (or spawned) worker starts cheaply.
    """
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _decode_chunks(grouped: list, workers: int) -> list:
    """Decode every chunk, in worker processes when there are several; a bad file becomes a ``DataError``."""
    try:
        if workers > 1 and len(grouped) > 1:
            with ProcessPoolExecutor(max_workers=workers, mp_context=_worker_context()) as pool:
                try:
                    return [a for part in pool.map(_decode_chunk, grouped) for a in part]
                except _Unreadable:
                    pool.shutdown(cancel_futures=True)  # the decode has failed: do not finish the other chunks
                    raise
                except BrokenProcessPool:
                    # A worker imports the main script; one without an `if __name__ == "__main__":` guard re-runs
                    # and the worker dies. Decoding here is slower, never wrong.
                    warn_on_stderr("note: the Omniglot decode workers could not start (is the main script missing "
                                   "an `if __name__ == \"__main__\":` guard?); decoding in this process instead")
        return [a for g in grouped for a in _decode_chunk(g)]
    except _Unreadable as exc:
        raise _invalid_source(*exc.args) from None


def decode_sources(sources: Sources, *, workers: int | None = None):
    """Decode every drawing of both sets.

    Returns:
        (images uint8 tensor [C, 20, 28, 28], character names)

    Raises:
        DataError: a character without exactly 20 drawings, no characters at all, or a zip, PNG or folder
            that cannot be read or decoded.
    """
    import numpy as np
    import torch

    jobs, characters = _decode_jobs(sources)
    workers = workers or min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1, 8)
    decoded = _decode_chunks(_chunks(jobs, workers), workers)
    images = torch.from_numpy(np.stack(decoded)).reshape(len(characters), DRAWINGS, IMAGE_SIZE, IMAGE_SIZE)
    return images, characters


def content_hash(images, characters) -> str:
    """sha256 of the character names and the decoded pixels."""
    h = hashlib.sha256()
    h.update("\n".join(characters).encode())
    h.update(images.contiguous().numpy().data)  # the buffer itself: tobytes() would copy 25 MB first
    return h.hexdigest()


def cache_file_for(sources: Sources) -> Path:
    key = hashlib.sha256(f"{PREPROCESS_VERSION}:{sources.key}".encode()).hexdigest()[:20]
    return cache_root() / f"omniglot28-{key}.pt"


def load_omniglot(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    strict: bool = True,
    warn: Warn | None = None,
) -> OmniglotImages:
    """Find, decode (once) and return Omniglot.

    Args:
        data_dir: a folder with the zips or extracted folders; ``None`` uses ``BENCH_DATA_DIR``, then the cache.
        download: allow downloading the original zips when nothing is found.
        strict: require the real data set (1623 characters, known content hash). Tests of the reading code
            pass ``strict=False`` to load a small fake tree.
        warn: receives one line per warning (a damaged cache rebuilt, an unwritable cache); default stderr.

    Raises:
        DataError: no data, data that cannot be decoded, or (``strict``) data that is not the real set.
    """
    cache = CacheDir(cache_root(), warn or warn_on_stderr)
    cache.tidy()
    damaged = None
    if data_dir is None and not os.environ.get("BENCH_DATA_DIR"):
        verified, damaged = _load_verified_decode(cache)
        if verified is not None:
            return verified
    sources = _find_sources_for(data_dir, download, damaged)
    if strict:
        _refuse_unknown_zips(sources)
    path = cache_file_for(sources)
    if damaged is not None and damaged[0] != path:
        cache.warn(f"warning: the Omniglot cache {damaged[0]} is damaged ({damaged[1]}); using {sources.root}")
    data, from_cache = _load_or_build(path, sources, cache)
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
        _remember_verified_decode(path, cache)
    return result


def _find_sources_for(data_dir, download: bool, damaged: tuple[Path, str] | None) -> Sources:
    """``find_sources``, whose error also says when a damaged cache is why the sources were needed."""
    try:
        return find_sources(data_dir, download=download)
    except DataError as exc:
        if damaged is None:
            raise
        raise DataError(f"the Omniglot cache {damaged[0]} is damaged ({damaged[1]}) and cannot be rebuilt: {exc}") from None


def _refuse_unknown_zips(sources: Sources) -> None:
    """Strict loads refuse a zip of unknown checksum before spending seconds decoding it: ``verify`` would
    refuse it afterwards anyway. (``bench data`` still decodes it, to report whether the pixels are real.)"""
    for f in sources.files:
        if f.kind == "zip" and f.checksum_status == "unknown":
            raise DataError(
                f"{f.path} is not a known Omniglot zip (its checksum matches neither the original md5 nor the "
                "known repack sha256): download it again (or `bench data` downloads it)"
            )


def _load_or_build(path: Path, sources: Sources, cache: CacheDir) -> tuple[dict, bool]:
    """(the cached data, True) when ``path`` holds an intact decode of ``sources``; else decode, cache and
    return (data, False). The decode runs under the cache lock, so concurrent commands decode once."""
    data, _ = _read_cache(path)
    if data is not None:
        return data, True
    with cache.locked():
        # Another command may have built it while we waited for the lock.
        data, problem = _read_cache(path)
        if data is not None:
            return data, True
        if problem is not None:
            cache.warn(f"warning: the Omniglot cache {path} is damaged ({problem}); decoding {sources.root} again")
        images, characters = decode_sources(sources)
        data = {
            "format": PREPROCESS_VERSION,
            "images": images,
            "characters": list(characters),
            "content_sha256": content_hash(images, characters),
        }
        cache.write(lambda: atomic_torch_save(path, data))
    return data, False


def _read_cache(path: Path) -> tuple[dict | None, str | None]:
    """(data, None) when ``path`` holds an intact decode; (None, what is wrong) when it is damaged;
    (None, None) when there is none.

    The content hash is recomputed on every load (about 20 ms for the real data on 2 CPU cores): a flipped bit in the file
    would otherwise train every later run on wrong pixels.
    """
    import torch

    if not path.is_file():
        return None, None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - truncated or foreign files fail in many ways (zip, pickle, EOF, OS)
        return None, "not a readable cache file"
    return _cache_problem(data)


def _cache_problem(data) -> tuple[dict | None, str | None]:
    """``_read_cache``'s answer for a loaded object: is it our format, and do its pixels match their hash?"""
    import torch

    # A foreign file may hold any object that torch's weights-only unpickler allows: check before indexing.
    images, characters = (data.get("images"), data.get("characters")) if isinstance(data, dict) else (None, None)
    well_formed = (
        isinstance(images, torch.Tensor)
        and isinstance(characters, list)
        and data.get("format") == PREPROCESS_VERSION
        and images.dtype == torch.uint8
        and tuple(images.shape) == (len(characters), DRAWINGS, IMAGE_SIZE, IMAGE_SIZE)
        and all(isinstance(c, str) for c in characters)
    )
    if not well_formed:
        return None, f"not a {PREPROCESS_VERSION} cache file"
    if content_hash(images, characters) != data.get("content_sha256"):
        return None, "its pixels do not match their content hash"
    return data, None


#: Names the cache file of the last verified real decode (written by any successful load of the real data).
VERIFIED_POINTER = "omniglot28-verified.json"


def _remember_verified_decode(path: Path, cache: CacheDir) -> None:
    """Point the cache at this verified decode, so later commands need neither --data-dir nor the zips.
    Written only when it changes: a warm load writes nothing."""
    import json

    record = {"cache_file": path.name, "content_sha256": REAL_CONTENT_SHA256}
    pointer = cache.root / VERIFIED_POINTER
    try:
        if json.loads(pointer.read_text()) == record:
            return
    except (OSError, ValueError):
        pass
    with cache.locked():
        cache.write(lambda: atomic_write_json(pointer, record))


def _load_verified_decode(cache: CacheDir) -> tuple[OmniglotImages | None, tuple[Path, str] | None]:
    """(the real data from the cache alone, None) when an earlier load verified it; else (None, None), or
    (None, (cache file, what is wrong)) when the verified decode has been damaged since."""
    import json

    pointer = cache.root / VERIFIED_POINTER
    try:
        record = json.loads(pointer.read_text())
        path = cache.root / record["cache_file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
    data, problem = _read_cache(path)
    if problem is not None:
        return None, (path, problem)
    if data is None or data["content_sha256"] != REAL_CONTENT_SHA256:
        return None, None  # gone, or a pointer edited to name other data: look for the sources
    sources = Sources("cache", cache.root, ())
    return OmniglotImages(data["images"], tuple(data["characters"]), REAL_CONTENT_SHA256, sources, path, True), None


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
