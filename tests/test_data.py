"""Reading, caching, verification and errors of the Omniglot loader: fake trees first, then the real data."""

from __future__ import annotations

import json
import time
import zipfile

import pytest
import torch

from benchmark.cli import main
from benchmark.harness.data import load_omniglot
from benchmark.harness.data.fake import make_fake_omniglot
from benchmark.harness.data.omniglot import REAL_CONTENT_SHA256, verify
from benchmark.harness.data.sources import DOWNLOAD_URLS, find_sources
from benchmark.errors import DataError


def test_fake_folders_and_zips_decode_to_identical_tensors(tmp_path, isolated_cache):
    folders = make_fake_omniglot(tmp_path / "folders")
    zips = make_fake_omniglot(tmp_path / "zips", zips=True)
    assert sorted(p.name for p in zips.iterdir()) == ["images_background.zip", "images_evaluation.zip"]
    a = load_omniglot(folders, strict=False)
    b = load_omniglot(zips, strict=False)
    assert a.images.shape == (12, 20, 28, 28) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and a.characters == b.characters
    assert a.characters[0] == "images_background/Alphabet_00/character01"
    assert a.characters[-1].startswith("images_evaluation/")
    # Ink is 255, paper 0, and nearest-neighbour resizing keeps the images binary.
    assert set(a.images.unique().tolist()) == {0, 255}
    assert 0.01 < a.images.float().mean().item() / 255 < 0.5


def test_cache_is_reused_and_keyed_by_the_sources(tmp_path, isolated_cache):
    root = make_fake_omniglot(tmp_path / "d", zips=True)
    first = load_omniglot(root, strict=False)
    assert not first.from_cache and first.cache_path.is_file()
    second = load_omniglot(root, strict=False)
    assert second.from_cache and torch.equal(first.images, second.images)
    # Different sources -> a different cache file, never a stale hit.
    other = load_omniglot(make_fake_omniglot(tmp_path / "e", zips=True, seed=1), strict=False)
    assert not other.from_cache and other.cache_path != first.cache_path
    assert not torch.equal(other.images, first.images)
    # No temporary files are left beside the cache.
    assert not list(isolated_cache.glob("*.tmp"))


def test_a_corrupt_cache_file_is_rebuilt(tmp_path, isolated_cache):
    root = make_fake_omniglot(tmp_path / "d")
    first = load_omniglot(root, strict=False)
    first.cache_path.write_bytes(b"truncated")
    again = load_omniglot(root, strict=False)
    assert not again.from_cache and torch.equal(again.images, first.images)


def test_strict_loading_refuses_an_incomplete_data_set(tmp_path, isolated_cache):
    root = make_fake_omniglot(tmp_path / "d")
    with pytest.raises(DataError, match="expected 30 and 964"):
        load_omniglot(root)


def test_a_character_with_missing_drawings_is_an_error(tmp_path, isolated_cache):
    root = make_fake_omniglot(tmp_path / "d", drawings=19)
    with pytest.raises(DataError, match="19 drawings, expected 20"):
        load_omniglot(root, strict=False)


def test_a_folder_without_the_sets_names_what_is_missing(tmp_path, isolated_cache):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="images_background.zip or images_evaluation.zip"):
        find_sources(tmp_path / "empty")
    with pytest.raises(DataError, match="is not a folder"):
        find_sources(tmp_path / "nope")


def test_offline_with_nothing_found_names_every_way_to_get_data(isolated_cache):
    with pytest.raises(DataError) as err:
        find_sources(None, download=False)
    message = str(err.value)
    assert "--data-dir" in message and "BENCH_DATA_DIR" in message
    assert all(url in message for url in DOWNLOAD_URLS.values())


def test_environment_variable_is_used(tmp_path, isolated_cache, monkeypatch):
    root = make_fake_omniglot(tmp_path / "d", zips=True)
    monkeypatch.setenv("BENCH_DATA_DIR", str(root))
    assert find_sources().origin == "BENCH_DATA_DIR"


@pytest.fixture
def http_server(tmp_path):
    """Serve tmp_path/remote over HTTP on the loopback interface, standing in for the dataset's home."""
    import functools
    import http.server
    import threading

    (tmp_path / "remote").mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "remote"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_lands_checked_zips_in_the_cache(tmp_path, isolated_cache, monkeypatch, http_server):
    """The real download path against a loopback server; an md5 mismatch is refused and leaves nothing."""
    import hashlib

    from benchmark.harness.data import sources

    src = make_fake_omniglot(tmp_path / "remote", zips=True)
    urls = {s: f"{http_server}/{s}.zip" for s in sources.SETS}
    md5s = {s: hashlib.md5((src / f"{s}.zip").read_bytes()).hexdigest() for s in sources.SETS}
    monkeypatch.setattr(sources, "DOWNLOAD_URLS", urls)
    monkeypatch.setattr(sources, "ORIGINAL_MD5", {**md5s, "images_evaluation": "0" * 32})
    with pytest.raises(DataError, match="does not match its md5"):
        find_sources(None)
    assert not list((isolated_cache / "omniglot").glob("*.part"))
    monkeypatch.setattr(sources, "ORIGINAL_MD5", md5s)
    found = find_sources(None)
    assert found.origin == "download"
    assert all(f.checksum_status == "original" for f in found.files)
    assert find_sources(None).origin == "cache"


def test_bench_data_exits_nonzero_on_fake_data(tmp_path, isolated_cache, capsys):
    root = make_fake_omniglot(tmp_path / "d", zips=True)
    assert main(["data", "--data-dir", str(root), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["origin"] == "--data-dir"
    failed = {c["name"] for c in report["checks"] if not c["ok"]}
    assert "images_background: characters" in failed and "decoded content hash" in failed


def test_bench_data_missing_data_is_exit_2(isolated_cache, capsys):
    assert main(["data", "--no-download"]) == 2
    assert "--data-dir" in capsys.readouterr().err


# -- the real data ---------------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_zips_have_the_known_checksums(omniglot_dir):
    found = find_sources(omniglot_dir)
    assert [f.checksum_status for f in found.files] == ["repack", "repack"]
    sums = dict(line.split()[::-1] for line in (omniglot_dir / "SHA256SUMS").read_text().splitlines())
    assert {f.path.name: f.fingerprint for f in found.files} == sums


@pytest.mark.realdata
def test_real_data_counts_shape_and_values(omniglot):
    assert omniglot.images.shape == (1623, 20, 28, 28) and omniglot.images.dtype == torch.uint8
    assert omniglot.content_sha256 == REAL_CONTENT_SHA256 and verify(omniglot) == []
    assert len({c.split("/")[1] for c in omniglot.characters}) == 50
    assert set(omniglot.images.unique().tolist()) == {0, 255}
    ink = omniglot.images.float().mean().item() / 255
    assert 0.05 < ink < 0.15  # ~8% ink in the 105x105 originals


@pytest.mark.realdata
def test_real_extracted_folders_verify_by_content_hash(omniglot_dir, tmp_path, isolated_cache):
    """Extracted folders decode to the same bytes as the zips (the evaluation set keeps the test short)."""
    with zipfile.ZipFile(omniglot_dir / "images_evaluation.zip") as zf:
        zf.extractall(tmp_path / "d")
    (tmp_path / "d" / "images_background.zip").symlink_to(omniglot_dir / "images_background.zip")
    data = load_omniglot(tmp_path / "d")
    assert data.sources.files[1].kind == "folder" and data.is_real


@pytest.mark.realdata
def test_warm_load_is_well_under_a_second(omniglot_dir, omniglot):
    t0 = time.perf_counter()
    again = load_omniglot(omniglot_dir)
    assert again.from_cache
    assert time.perf_counter() - t0 < 1.0


def test_a_script_without_a_main_guard_still_decodes(tmp_path, isolated_cache):
    """Decode workers start from a forkserver and import the main script: one without an
    `if __name__ == "__main__":` guard kills them, and the decode falls back to this process with a note."""
    import subprocess
    import sys

    data = make_fake_omniglot(tmp_path / "zips", zips=True)
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import sys\n"
        "from benchmark.harness.data.omniglot import decode_sources\n"
        "from benchmark.harness.data.sources import find_sources\n"
        "images, names = decode_sources(find_sources(sys.argv[1], download=False), workers=2)\n"
        "print('decoded', tuple(images.shape), flush=True)\n")
    done = subprocess.run([sys.executable, str(script), str(data)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "decoded (12, 20, 28, 28)" in done.stdout and "decoding in this process instead" in done.stderr
