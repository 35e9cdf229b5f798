"""Data faults of issue 18, each provoked through the real CLI entry: a one-line error naming the file and the
fix (exit code 2) or a warning and a command that goes on, and nothing half-written left behind.

Most tests run on a small fake tree that ``fake_is_real`` makes pass every check, so the good path (exit 0,
"All checks hold.") is exercised in a second; one test repeats the issue's scenario on the real zips.
"""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

from benchmark.cli import main
from benchmark.harness.data import omniglot, sources
from benchmark.harness.data.cache import LOCK_NAME
from benchmark.harness.data.fake import make_fake_omniglot


def bench(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``bench ARGS`` in this process: (exit code, stdout, stderr)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def leftovers(folder: Path) -> list[str]:
    """Temporaries and decoded caches under ``folder``: what a failed command must not leave."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".part")) or p.suffix == ".pt")


def temporaries(folder: Path) -> list[str]:
    return [name for name in leftovers(folder) if name.endswith(".tmp")]


def stored_member_span(archive: Path, pick) -> tuple[str, int, int]:
    """(name, first byte, size) of the stored (uncompressed) member ``pick(infolist)`` inside ``archive``."""
    with zipfile.ZipFile(archive) as zf:
        info = pick(zf.infolist())
    assert info.compress_type == zipfile.ZIP_STORED
    with open(archive, "rb") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
    return info.filename, info.header_offset + 30 + name_len + extra_len, info.file_size


def flip_bytes(path: Path, start: int, count: int) -> None:
    data = bytearray(path.read_bytes())
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def flip_cached_pixels(cache_file: Path, count: int = 4096) -> None:
    """Invert ``count`` bytes of the image tensor inside a decoded cache (torch's zip stores it uncompressed,
    and torch.load does not check CRCs: the file still loads)."""
    _, start, size = stored_member_span(cache_file, lambda infos: max(infos, key=lambda i: i.file_size))
    flip_bytes(cache_file, start, min(count, size))


@pytest.fixture
def fake_zips(tmp_path) -> Path:
    return make_fake_omniglot(tmp_path / "zips", zips=True)


@pytest.fixture
def fake_is_real(fake_zips, monkeypatch) -> Path:
    """Make the fake zips pass every check (counts, checksums, content hash), as the real data does."""
    found = sources.find_sources(fake_zips)
    images, characters = omniglot.decode_sources(found, workers=1)
    monkeypatch.setattr(omniglot, "EXPECTED", {"images_background": (2, 6), "images_evaluation": (2, 6)})
    monkeypatch.setattr(omniglot, "REAL_CONTENT_SHA256", omniglot.content_hash(images, characters))
    monkeypatch.setattr(sources, "REPACK_SHA256", {f.set_name: f.fingerprint for f in found.files})
    return fake_zips


def cache_file(cache: Path) -> Path:
    (path,) = cache.glob("omniglot28-*.pt")
    return path


# -- the good path stays as it was -----------------------------------------------------------------------------


def test_bench_data_good_path_prints_what_it_did(fake_is_real, isolated_cache, capsys):
    code, out, err = bench(capsys, "data", "--data-dir", str(fake_is_real))
    assert (code, err) == (0, "")
    assert out.startswith(f"Omniglot from --data-dir: {fake_is_real}\n")
    assert "decoded and cached in" in out and out.endswith("All checks hold.\n")
    code, out, err = bench(capsys, "data", "--data-dir", str(fake_is_real))
    assert (code, err) == (0, "") and "loaded from cache in" in out
    # The verified decode alone serves a command without --data-dir.
    code, out, err = bench(capsys, "data", "--no-download")
    assert (code, err) == (0, "") and out.startswith(f"Omniglot from cache: {isolated_cache}\n")
    assert sorted(p.name for p in isolated_cache.iterdir()) == sorted(
        [LOCK_NAME, cache_file(isolated_cache).name, omniglot.VERIFIED_POINTER]
    )


# -- 1. a damaged decoded cache --------------------------------------------------------------------------------


def test_a_damaged_cache_is_rebuilt_from_the_sources_with_a_warning(fake_is_real, isolated_cache, capsys):
    assert bench(capsys, "data", "--data-dir", str(fake_is_real))[0] == 0
    path = cache_file(isolated_cache)
    flip_cached_pixels(path)
    code, out, err = bench(capsys, "data", "--data-dir", str(fake_is_real))
    assert code == 0 and "decoded and cached" in out and out.endswith("All checks hold.\n")
    assert err == (
        f"warning: the Omniglot cache {path} is damaged (its pixels do not match their content hash); "
        f"decoding {fake_is_real} again\n"
    )
    code, out, err = bench(capsys, "data", "--data-dir", str(fake_is_real))
    assert (code, err) == (0, "") and "loaded from cache" in out
    assert temporaries(isolated_cache) == []


def test_a_damaged_cache_without_sources_is_a_one_line_error(fake_is_real, isolated_cache, capsys):
    assert bench(capsys, "data", "--data-dir", str(fake_is_real))[0] == 0
    path = cache_file(isolated_cache)
    flip_cached_pixels(path)
    damaged = path.read_bytes()
    code, out, err = bench(capsys, "data", "--no-download")
    assert code == 2 and out == ""
    assert err.startswith(
        f"Error: the Omniglot cache {path} is damaged (its pixels do not match their content hash) and cannot "
        f"be rebuilt: no Omniglot data found in the cache {isolated_cache / 'omniglot'}; pass --data-dir DIR"
    )
    assert err.count("\n") == 1
    assert path.read_bytes() == damaged and temporaries(isolated_cache) == []


def test_a_damaged_cache_is_rebuilt_from_zips_downloaded_earlier(fake_is_real, isolated_cache, capsys):
    """The cache-only path falls back to the zips in <cache>/omniglot (else a download), as before."""
    shutil.copytree(fake_is_real, isolated_cache / "omniglot")
    assert bench(capsys, "data")[0] == 0
    path = cache_file(isolated_cache)
    flip_cached_pixels(path)
    code, out, err = bench(capsys, "data", "--no-download")
    assert code == 0 and out.startswith("Omniglot from cache") and "decoded and cached" in out
    assert err.startswith(f"warning: the Omniglot cache {path} is damaged") and err.count("\n") == 1


@pytest.mark.realdata
def test_real_data_a_damaged_cache_fails_no_longer_silently(omniglot, omniglot_dir, isolated_cache, capsys):
    """The issue's scenario: 4 KiB of flipped pixels in the real cache passed every check."""
    isolated_cache.mkdir()
    path = isolated_cache / omniglot.cache_path.name
    shutil.copyfile(omniglot.cache_path, path)
    flip_cached_pixels(path)
    code, out, err = bench(capsys, "data", "--data-dir", str(omniglot_dir))
    assert code == 0 and out.endswith("All checks hold.\n")
    assert err.startswith(f"warning: the Omniglot cache {path} is damaged (its pixels do not match")
    assert path.read_bytes() == omniglot.cache_path.read_bytes()


# -- 2. bad zips and PNGs --------------------------------------------------------------------------------------


def test_a_truncated_zip_is_a_one_line_error(fake_zips, isolated_cache, capsys):
    archive = fake_zips / "images_background.zip"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    code, out, err = bench(capsys, "data", "--data-dir", str(fake_zips))
    assert (code, out) == (2, "")
    assert err == (
        f"Error: {archive} is not a valid Omniglot zip (File is not a zip file): download it again "
        "(or `bench data` downloads it)\n"
    )
    assert leftovers(isolated_cache) == []


def _flip_png_bytes(root: Path) -> tuple[Path, str]:
    """Flip 16 bytes inside one stored PNG of the background zip: its CRC-32 no longer matches."""
    archive = root / "images_background.zip"
    name, start, size = stored_member_span(archive, lambda infos: infos[len(infos) // 2])
    flip_bytes(archive, start + size // 2, 16)
    return archive, f"(Bad CRC-32 for file '{name}')"


def _replace_png_with_text(root: Path) -> tuple[Path, str]:
    """Rewrite the background zip with one member that is valid zip data but not an image."""
    archive = root / "images_background.zip"
    with zipfile.ZipFile(archive) as zf:
        members = [(i.filename, zf.read(i)) for i in zf.infolist()]
    name = members[len(members) // 2][0]
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for member, data in members:
            zf.writestr(member, b"not a png" if member == name else data)
    return archive, f"({name}: not an image)"


def _break_png_in_folder(root: Path) -> tuple[Path, str]:
    """Extract the background zip and truncate one PNG of the folder."""
    with zipfile.ZipFile(root / "images_background.zip") as zf:
        zf.extractall(root)
    (root / "images_background.zip").unlink()
    folder = root / "images_background"
    png = sorted(folder.rglob("*.png"))[7]
    png.write_bytes(png.read_bytes()[:40])
    return folder, f"({png.relative_to(folder).as_posix()}: "


@pytest.mark.parametrize(
    "damage, kind", [(_flip_png_bytes, "zip"), (_replace_png_with_text, "zip"), (_break_png_in_folder, "folder")]
)
def test_a_png_that_cannot_be_decoded_is_a_one_line_error(damage, kind, fake_zips, isolated_cache, capsys, monkeypatch):
    """The decode runs in worker processes (forced here even on one core); the parent maps their errors."""
    monkeypatch.setattr(omniglot.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    container, reason = damage(fake_zips)
    code, out, err = bench(capsys, "data", "--data-dir", str(fake_zips))
    assert (code, out) == (2, "")
    assert err.startswith(f"Error: {container} is not a valid Omniglot {kind} {reason}")
    assert err.count("\n") == 1 and "Traceback" not in err
    fix = "download it again (or `bench data` downloads it)" if kind == "zip" else "extract it again"
    assert fix in err
    assert leftovers(isolated_cache) == []


def test_a_strict_command_refuses_a_zip_of_unknown_checksum_before_decoding(fake_zips, isolated_cache, capsys, monkeypatch, tmp_path):
    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded a zip that was refused anyway")

    monkeypatch.setattr(omniglot, "decode_sources", must_not_decode)
    code, out, err = bench(capsys, "run", "--learner", "maml", "--way", "5", "--shot", "1",
                           "--data-dir", str(fake_zips), "--out", str(tmp_path / "runs"))
    assert code == 2
    assert err == (
        f"Error: {fake_zips / 'images_background.zip'} is not a known Omniglot zip (its checksum matches neither "
        "the original md5 nor the known repack sha256): download it again (or `bench data` downloads it)\n"
    )
    assert leftovers(isolated_cache) == [] and leftovers(tmp_path / "runs") == []


# -- 3. a cache folder that cannot be written ------------------------------------------------------------------


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_an_unwritable_cache_warns_once_and_the_command_goes_on(where, fake_is_real, tmp_path, monkeypatch, capsys):
    """Tests run as root, which chmod does not stop: a regular file where the folder (or its parent) should
    be gives the same refusal to every user."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    cache = blocker / "cache" if where == "under_a_file" else blocker
    monkeypatch.setenv("BENCH_CACHE_DIR", str(cache))
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)
    code, out, err = bench(capsys, "data", "--data-dir", str(fake_is_real))
    assert code == 0 and out.endswith("All checks hold.\n")
    assert err == (
        f"warning: cannot write the Omniglot cache in {cache} ({blocker} is a file, not a folder); going on "
        "with the data in memory: set BENCH_CACHE_DIR to a writable folder so that the next command need not "
        "decode again\n"
    )
    assert blocker.read_text() == "not a folder"


def test_a_full_disk_warns_once_and_leaves_no_temporary(fake_is_real, isolated_cache, monkeypatch, capsys):
    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)  # where a full disk surfaces for a buffered write
    code, out, err = bench(capsys, "data", "--data-dir", str(fake_is_real))
    assert code == 0 and out.endswith("All checks hold.\n")
    assert err.startswith(f"warning: cannot write the Omniglot cache in {isolated_cache} (No space left on device)")
    assert err.count("\n") == 1 and "BENCH_CACHE_DIR" in err
    assert leftovers(isolated_cache) == [] and not (isolated_cache / omniglot.VERIFIED_POINTER).exists()


def test_an_unwritable_verified_decode_pointer_is_a_warning(fake_is_real, isolated_cache, capsys):
    (isolated_cache / omniglot.VERIFIED_POINTER).mkdir(parents=True)  # os.replace onto a folder fails
    code, out, err = bench(capsys, "data", "--data-dir", str(fake_is_real))
    assert code == 0 and "decoded and cached" in out and out.endswith("All checks hold.\n")
    assert err.startswith(f"warning: cannot write the Omniglot cache in {isolated_cache} (Is a directory)")
    assert err.count("\n") == 1 and temporaries(isolated_cache) == []
    assert cache_file(isolated_cache).is_file()


def test_no_data_and_an_unwritable_cache_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    monkeypatch.setenv("BENCH_CACHE_DIR", str(blocker))
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)
    code, out, err = bench(capsys, "data")
    assert code == 2
    assert err == (
        f"Error: cannot download Omniglot into {blocker / 'omniglot'} ({blocker} is a file, not a folder): set "
        "BENCH_CACHE_DIR to a writable folder, or pass --data-dir DIR (or set BENCH_DATA_DIR) to a folder "
        "holding the zips\n"
    )


# -- 4. temporaries of killed commands -------------------------------------------------------------------------


def _stale_temporary(cache: Path, cache_name: str) -> Path:
    """What a `bench data` killed while writing leaves: atomic_write_bytes' temporary, here 8 MiB."""
    cache.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=cache, prefix=f".{cache_name}.", suffix=".tmp")
    os.ftruncate(fd, 8 << 20)
    os.close(fd)
    return Path(name)


def test_stale_temporaries_of_ours_are_removed_on_start(fake_is_real, isolated_cache, capsys):
    stale = _stale_temporary(isolated_cache, "omniglot28-0123456789abcdef0123.pt")
    others = [isolated_cache / ".somebody-else.tmp", isolated_cache / "omniglot28-notes.tmp"]
    for other in others:
        other.write_text("not ours")
    code, out, err = bench(capsys, "data", "--data-dir", str(fake_is_real))
    assert (code, err) == (0, "")
    assert not stale.exists() and all(other.exists() for other in others)


def test_a_temporary_is_kept_while_another_process_holds_the_lock(fake_is_real, isolated_cache, capsys):
    """A writer holds the lock while its temporary exists: a starting command must not delete it."""
    from filelock import FileLock

    assert bench(capsys, "data", "--data-dir", str(fake_is_real))[0] == 0
    live = _stale_temporary(isolated_cache, cache_file(isolated_cache).name)
    with FileLock(str(isolated_cache / LOCK_NAME)):  # separate lock objects exclude each other in one process
        code, out, err = bench(capsys, "data", "--data-dir", str(fake_is_real))
        assert (code, err) == (0, "") and "loaded from cache" in out
        assert live.exists()
    assert bench(capsys, "data", "--data-dir", str(fake_is_real))[0] == 0
    assert not live.exists()


# -- 5. concurrent commands ------------------------------------------------------------------------------------


def _stderr_line(proc: subprocess.Popen, deadline: float) -> str:
    ready, _, _ = select.select([proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
    if not ready:
        proc.kill()
        pytest.fail("a bench process printed nothing on stderr in time")
    return proc.stderr.readline()


def test_two_processes_starting_at_once_decode_once(fake_zips, isolated_cache):
    """Both processes wait on the lock (held here until both say so), then exactly one decodes."""
    from filelock import FileLock

    env = {**os.environ, "BENCH_CACHE_DIR": str(isolated_cache)}
    env.pop("BENCH_DATA_DIR", None)
    script = "import sys; from benchmark.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", script, "data", "--data-dir", str(fake_zips), "--json"]
    isolated_cache.mkdir()
    lock = FileLock(str(isolated_cache / LOCK_NAME))
    lock.acquire()
    try:
        procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        deadline = time.monotonic() + 120
        for proc in procs:
            assert _stderr_line(proc, deadline).startswith("note: waiting for another bench process")
    finally:
        lock.release()
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, err  # fake data fails the checks of the real set, nothing worse
        reports.append(json.loads(out))
    assert sorted(r["cache_hit"] for r in reports) == [False, True]
    assert leftovers(isolated_cache) == [cache_file(isolated_cache).name]
