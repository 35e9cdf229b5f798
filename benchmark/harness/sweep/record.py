"""The sweep record, ``<out>/sweep.json``: every run that sweeps planned in a folder, and where each was sent.

Layout::

    {"format": 1,
     "runs": {"<run directory name>": {"label", "learner", "way", "shot", "seed", "overrides", "config_hash",
                                       "command" (without --device), "metabench_version", "added",
                                       "job": {"executor": "local", "log", "started", "ended", "exit_code", "pid",
                                               "host"}
                                            | {"executor": "slurm", "job_id", "folder", "submitted"}}},
     "sweeps": [{"at", "command", "executor", "metabench_version", "grid", "runs", "new"}]}

A sweep with another grid adds its runs; a run already recorded keeps its entry (runs are named by config
hash, so one name is one config) and only its latest job changes. Every update is a read-modify-write
under ``<out>/.sweep.lock`` and an atomic write, so two sweeps on one folder never lose each other's runs
and a reader never sees half a file.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from benchmark.errors import BenchError
from benchmark.harness.atomic import atomic_write_json

SWEEP_FILE = "sweep.json"
LOCK_FILE = ".sweep.lock"
FORMAT = 1
#: Seconds to wait for another sweep's update of the record (they take milliseconds).
LOCK_WAIT_S = 60


def now() -> str:
    """The time in ISO 8601 (UTC), as the record writes it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_record(out: Path) -> dict[str, Any]:
    """The folder's sweep record.

    Raises:
        BenchError: there is none (the folder holds no sweep), or it is damaged.
    """
    path = Path(out) / SWEEP_FILE
    if not path.is_file():
        raise BenchError(f"{out} holds no sweep ({SWEEP_FILE} is missing): pass the --out of a `bench sweep`")
    return _load(path)


def _load(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise BenchError(f"cannot read {path} ({type(exc).__name__}); restore it, or move it away and run the "
                         "sweep again (finished runs are kept and skipped)") from None
    if not isinstance(record, dict) or not isinstance(record.get("runs"), dict) or record.get("format") != FORMAT:
        raise BenchError(f"{path} is not a metabench sweep record (format {FORMAT}); move it away and run the sweep "
                         "again (finished runs are kept and skipped)")
    return record


def update_record(out: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Apply ``change`` to the record (created empty when absent) under the folder's sweep lock; returns it."""
    from filelock import FileLock, Timeout

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(out / LOCK_FILE), timeout=LOCK_WAIT_S):
            path = out / SWEEP_FILE
            record = _load(path) if path.is_file() else {"format": FORMAT, "runs": {}, "sweeps": []}
            change(record)
            atomic_write_json(path, record)
    except Timeout:
        raise BenchError(f"{out / LOCK_FILE} stayed locked for {LOCK_WAIT_S} s; is another bench sweep hanging "
                         "on this folder?") from None
    return record


def add_sweep(out: Path, runs: Sequence[Any], *, command: str, executor: str, grid: dict[str, Any]) -> list[str]:
    """Record a sweep and its runs (``SweepRun``s); returns the names of the runs that are new to the folder."""
    from benchmark import __version__

    new: list[str] = []

    def change(record: dict[str, Any]) -> None:
        for run in runs:
            entry = record["runs"].get(run.name)
            if entry is None:
                new.append(run.name)
                p = run.point
                entry = record["runs"][run.name] = {
                    "label": run.label, "learner": p.learner, "way": p.way, "shot": p.shot, "seed": p.seed,
                    "overrides": list(p.overrides), "config_hash": run.config_hash,
                    "metabench_version": __version__, "added": now(),
                }
            entry["command"] = shlex.join(["bench", *run.args])  # the latest (paths or the device may change)
        record["sweeps"].append({"at": now(), "command": command, "executor": executor, "metabench_version": __version__,
                                 "grid": grid, "runs": [run.name for run in runs], "new": list(new)})

    update_record(out, change)
    return new


def set_jobs(out: Path, jobs: dict[str, dict[str, Any]], *, merge: bool = False) -> None:
    """Record the latest job of each named run: a new job replaces the previous one; with ``merge``, the
    fields update the current job (e.g. its exit code when it ends)."""

    def change(record: dict[str, Any]) -> None:
        for name, job in jobs.items():
            entry = record["runs"].get(name)
            if entry is not None:
                entry["job"] = {**entry.get("job", {}), **job} if merge else dict(job)

    update_record(out, change)
