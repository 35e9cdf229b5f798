"""``bench data``: say where the Omniglot data came from, verify it, and build the decoded cache."""

from __future__ import annotations

import time

import click

from benchmark.cli.options import data_dir_option

def _checks(data) -> list[dict]:
    """Each verification as {name, ok, detail}."""
    from benchmark.harness.data.omniglot import DRAWINGS, EXPECTED, REAL_CONTENT_SHA256, set_counts

    checks = []
    for set_name, (alphabets, characters) in set_counts(data.characters).items():
        want_a, want_c = EXPECTED[set_name]
        checks.append({"name": f"{set_name}: alphabets", "ok": alphabets == want_a, "detail": f"{alphabets} (expected {want_a})"})
        checks.append({"name": f"{set_name}: characters", "ok": characters == want_c, "detail": f"{characters} (expected {want_c})"})
    shape = tuple(data.images.shape)
    checks.append({"name": "drawings per character", "ok": shape[1:] == (DRAWINGS, 28, 28),
                   "detail": f"images {list(shape)} (expected [1623, {DRAWINGS}, 28, 28])"})
    for f in data.sources.files:
        if f.kind == "zip":
            status = f.checksum_status
            detail = {"original": "md5 of the authors' original zip", "repack": "sha256 of the known repack",
                      "unknown": f"sha256 {f.fingerprint[:16]}… matches no known zip"}[status]
            checks.append({"name": f"{f.path.name}: checksum", "ok": status != "unknown", "detail": detail})
    checks.append({"name": "decoded content hash", "ok": data.content_sha256 == REAL_CONTENT_SHA256,
                   "detail": f"{data.content_sha256[:16]}… (expected {REAL_CONTENT_SHA256[:16]}…)"})
    return checks


@click.command("data")
@data_dir_option
@click.option("--no-download", is_flag=True, help="Fail instead of downloading when no data is found.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
def data(data_dir: str | None, no_download: bool, as_json: bool) -> None:
    """Find, verify and cache the Omniglot data.

    Looks in --data-dir (or BENCH_DATA_DIR), then the cache; otherwise downloads the two original zips and
    checks their md5. Decodes all 32,460 drawings once into a 28x28 cache. Exit code 0 only when every check
    holds: 30 + 20 alphabets, 964 + 659 characters, 20 drawings each, zip checksums, decoded content hash.
    """
    from benchmark.cli.console import print_json, stdout_console
    from benchmark.harness.data.omniglot import load_omniglot

    t0 = time.perf_counter()
    loaded = load_omniglot(data_dir, download=not no_download, strict=False)
    seconds = time.perf_counter() - t0
    checks = _checks(loaded)
    ok = all(c["ok"] for c in checks)
    report = {
        "ok": ok,
        "origin": loaded.sources.origin,
        "root": str(loaded.sources.root),
        "sources": [{"set": f.set_name, "path": str(f.path), "kind": f.kind, "checksum": f.checksum_status}
                    for f in loaded.sources.files],
        "cache": str(loaded.cache_path),
        "cache_hit": loaded.from_cache,
        "seconds": round(seconds, 3),
        "checks": checks,
    }
    if as_json:
        print_json(report)
    else:
        from rich.table import Table

        console = stdout_console()
        console.print(f"Omniglot from {report['origin']}: {report['root']}", markup=False)
        for s in report["sources"]:
            console.print(f"  {s['set']}: {s['kind']} {s['path']}", markup=False)
        verb = "loaded from cache" if loaded.from_cache else "decoded and cached"
        console.print(f"  {verb} in {seconds:.2f} s: {report['cache']}", markup=False)
        table = Table("check", "ok", "detail", title=None)
        for c in checks:
            table.add_row(c["name"], "yes" if c["ok"] else "NO", c["detail"])
        console.print(table)
        console.print("All checks hold." if ok else "Some checks FAILED: download the data again.", markup=False)
    if not ok:
        raise click.exceptions.Exit(1)
