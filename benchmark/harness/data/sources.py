"""Where the Omniglot images come from, and whether they are the real ones.

Lookup order (the first that holds data wins):

1. ``--data-dir DIR`` or ``BENCH_DATA_DIR``: the two original zips (``images_background.zip``,
   ``images_evaluation.zip``) or their extracted folders (``images_background/``, ``images_evaluation/``).
2. ``<cache>/omniglot/``: zips downloaded earlier (``<cache>`` is ``BENCH_CACHE_DIR`` or the user's cache
   directory, e.g. ``~/.cache/metabench`` on Linux).
3. A download of the two original zips from the dataset's public home, checked against their md5
   before they are kept in the cache.

Zips are fingerprinted by their content (md5 and sha256 in one pass), so a zip is *verified* when it is the
authors' original or the byte-for-byte reproducible repack that our machines hold. Extracted folders have no
archive checksum; they are verified after decoding, by the hash of the decoded pixels (see ``omniglot.py``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from benchmark.harness.data.cache import cache_lock, why_unwritable
from benchmark.errors import DataError

SETS = ("images_background", "images_evaluation")

#: The dataset's public home: the authors' repository.
DOWNLOAD_URLS = {
    "images_background": "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_background.zip",
    "images_evaluation": "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_evaluation.zip",
}

#: md5 of the authors' original zips (what a download must match).
ORIGINAL_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}

#: sha256 of the deterministic repack (same PNGs, sorted stored entries) that ships on our machines.
REPACK_SHA256 = {
    "images_background": "5e40902b4b72dcec6d87732eb8e8c0862f2c92b579cf264e65fc7a0954e80d47",
    "images_evaluation": "bcc0b44a73cc146a6739d98c0004e3fc70173968e567278fb429b3dd55342400",
}


@dataclass(frozen=True)
class SourceFile:
    """One of the two image sets, as a zip or as an extracted folder."""

    set_name: str  # "images_background" or "images_evaluation"
    path: Path
    kind: str  # "zip" or "folder"
    fingerprint: str  # sha256 of the zip bytes, or of the folder's (path, size, mtime) listing
    md5: str | None = None  # zips only

    @property
    def checksum_status(self) -> str:
        """"original", "repack", "unknown" (a zip that matches neither) or "n/a" (folders)."""
        if self.kind != "zip":
            return "n/a"
        if self.md5 == ORIGINAL_MD5[self.set_name]:
            return "original"
        if self.fingerprint == REPACK_SHA256[self.set_name]:
            return "repack"
        return "unknown"


@dataclass(frozen=True)
class Sources:
    """The two image sets and how they were found."""

    origin: str  # "--data-dir", "BENCH_DATA_DIR", "cache" or "download"
    root: Path
    files: tuple[SourceFile, ...] = field(default_factory=tuple)

    @property
    def key(self) -> str:
        """A hash of both sources: the decoded cache is stored under it."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.set_name}:{f.kind}:{f.fingerprint}\n".encode())
        return h.hexdigest()


def cache_root() -> Path:
    """``BENCH_CACHE_DIR`` if set, else the per-user cache directory for metabench."""
    env = os.environ.get("BENCH_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("metabench"))


def _hash_file(path: Path) -> tuple[str, str]:
    """(sha256, md5) of a file, read once in 1 MiB blocks."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def _fingerprint_folder(path: Path) -> str:
    """Hash of the sorted (relative path, size, mtime) listing: cheap, and changes when a file does."""
    h = hashlib.sha256()
    entries = []
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            p = Path(dirpath) / name
            st = p.stat()
            entries.append(f"{p.relative_to(path).as_posix()}:{st.st_size}:{st.st_mtime_ns}")
    for e in sorted(entries):
        h.update(e.encode() + b"\n")
    return h.hexdigest()


def _describe(set_name: str, path: Path) -> SourceFile:
    if path.is_dir():
        return SourceFile(set_name, path, "folder", _fingerprint_folder(path))
    sha, md5 = _hash_file(path)
    return SourceFile(set_name, path, "zip", sha, md5)


def _sources_in(directory: Path) -> dict[str, Path]:
    """The image sets found in ``directory``: an extracted folder wins over a zip of the same set."""
    found = {}
    for set_name in SETS:
        folder, archive = directory / set_name, directory / f"{set_name}.zip"
        if folder.is_dir():
            found[set_name] = folder
        elif archive.is_file():
            found[set_name] = archive
    return found


def how_to_get_data() -> str:
    urls = " and ".join(DOWNLOAD_URLS.values())
    return (
        "pass --data-dir DIR (or set BENCH_DATA_DIR) to a folder holding images_background.zip and "
        "images_evaluation.zip or their extracted folders, or let `bench data` download them from "
        f"{urls}"
    )


def find_sources(
    data_dir: str | os.PathLike | None = None, *, download: bool = True
) -> Sources:
    """Locate both image sets, downloading them into the cache as a last resort.

    Raises:
        DataError: the named folder lacks a set, or nothing was found and the download failed or is off.
    """
    origin = "--data-dir"
    if data_dir is None and os.environ.get("BENCH_DATA_DIR"):
        data_dir, origin = os.environ["BENCH_DATA_DIR"], "BENCH_DATA_DIR"
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataError(f"{origin} {root} is not a folder; {how_to_get_data()}")
        found = _sources_in(root)
        missing = [s for s in SETS if s not in found]
        if missing:
            raise DataError(
                f"{origin} {root} has no {' or '.join(m + '.zip' for m in missing)} (nor the extracted "
                f"folder); {how_to_get_data()}"
            )
        return Sources(origin, root, tuple(_describe(s, found[s]) for s in SETS))

    cache = cache_root() / "omniglot"
    found = _sources_in(cache)
    # A cached zip that is not a known one is a broken or partial download: fetch it again.
    good = {s: f for s, p in found.items() if (f := _usable(p, s)) is not None}
    if len(good) == len(SETS):
        return Sources("cache", cache, tuple(good[s] for s in SETS))
    if not download:
        raise DataError(f"no Omniglot data found in the cache {cache}; {how_to_get_data()}")
    try:
        # Under the cache lock, so that concurrent commands download once; the first may have finished.
        with cache_lock(cache_root()):
            for set_name in SETS:
                if set_name not in good and _usable(_sources_in(cache).get(set_name), set_name) is None:
                    _download(set_name, cache)
    except OSError as exc:
        raise DataError(
            f"cannot download Omniglot into {cache} ({why_unwritable(cache, exc)}): set BENCH_CACHE_DIR to a "
            "writable folder, or pass --data-dir DIR (or set BENCH_DATA_DIR) to a folder holding the zips"
        ) from None
    found = _sources_in(cache)
    return Sources("download", cache, tuple(_describe(s, found[s]) for s in SETS))


def _usable(path: Path | None, set_name: str) -> SourceFile | None:
    """The cached set at ``path`` when it is a folder or a zip of known checksum; None when absent or unknown."""
    if path is None:
        return None
    f = _describe(set_name, path)
    return f if f.kind == "folder" or f.checksum_status != "unknown" else None


def _download(set_name: str, cache: Path) -> None:
    """Fetch one original zip into the cache (torchvision shows a progress bar on stderr), check its md5."""
    from torchvision.datasets.utils import check_integrity, download_url

    cache.mkdir(parents=True, exist_ok=True)
    url, md5 = DOWNLOAD_URLS[set_name], ORIGINAL_MD5[set_name]
    filename = f"{set_name}.zip"
    partial = cache / f"{filename}.part"
    partial.unlink(missing_ok=True)  # download_url skips a file that exists when no md5 is given
    try:
        # Download under a temporary name so that an interrupted download never looks like data.
        download_url(url, str(cache), filename=partial.name, md5=None)
    except Exception as exc:  # urllib raises URLError, HTTPError, OSError, socket errors...
        partial.unlink(missing_ok=True)
        raise DataError(f"could not download {url} ({exc}); {how_to_get_data()}") from exc
    if not check_integrity(str(partial), md5):
        partial.unlink(missing_ok=True)
        raise DataError(f"the download of {url} does not match its md5 {md5}; try again, or {how_to_get_data()}")
    os.replace(partial, cache / filename)
