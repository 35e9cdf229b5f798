"""The run directory: the one module that knows its files, writes them (runner) and reads them (tables).

Layout of ``<out>/<learner>-<N>w<K>s-<protocol>-seed<S>-<confighash>/``:

=================  ===================================================================================
``config.json``    the resolved plan (``run``: everything the result depends on), the learner's facts
                   and implementation, its plugin and code hash, the protocol, versions, device, command
``manifest.json``  the test episodes, with their content hash
``train_log.csv``  one row every ``log_every`` iterations: metrics, seconds per iteration, validation
``episodes.csv``   one row per test episode: ``episode,accuracy``
``steps.csv``      for learners that adapt by gradient steps: ``episode,step,accuracy`` after each step
``summary.json``   mean, 95% CI, n, times, memory, selection; written last: its presence means finished
``checkpoint.pt``  the learner's state and every random stream, for resuming
``progress.json``  where the run stands (phase, iteration of total, seconds per iteration, host, pid, time),
                   rewritten at the start, every log row, the evaluation and the end: what
                   ``bench sweep --status`` reads from another process or machine
``best-<i>.pt``    with ``--select best-val``: the learner's states at its ``ensemble`` best validation
                   accuracies (one file unless ``--ensemble`` asks for more)
``.lock``          locked (``filelock``) by the process that works on the run; ``--force`` empties the
                   directory but keeps this file, so the lock holds throughout
=================  ===================================================================================

Every file is written atomically (a temporary ``.<name>.*.tmp`` in the same folder, then a rename), so a
reader sees the old or the new file, never half of one; temporaries left by a killed process are removed
when the next process takes the run's lock. Reading a file that is damaged raises ``RunDirError`` with one line
that names the file and the fix.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from benchmark.errors import BenchError
from benchmark.harness.atomic import atomic_write_bytes, atomic_write_csv, atomic_write_json, remove_temporaries

CONFIG, MANIFEST, TRAIN_LOG, EPISODES, STEPS, SUMMARY, CHECKPOINT, PROGRESS, LOCK = (
    "config.json", "manifest.json", "train_log.csv", "episodes.csv", "steps.csv", "summary.json", "checkpoint.pt",
    "progress.json", ".lock",
)


def best_file(slot: int) -> str:
    """The file of the ``slot``-th kept best-validation state."""
    return f"best-{slot}.pt"
#: The files that make a finished run (what ``bench table`` reads).
FINISHED = (CONFIG, EPISODES, SUMMARY)


class RunDirError(BenchError):
    """A file of a run directory that cannot be read or does not hold what it should."""


# -- writing ------------------------------------------------------------------------------------------------
class RunDirectory:
    """One run's directory: state, atomic writes, checkpoints and the lock."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- what is there --------------------------------------------------------------------------------
    def recorded_identity(self) -> dict[str, Any] | None:
        """The ``run`` entry of an existing ``config.json`` (None when there is none)."""
        if not (self / CONFIG).is_file():
            return None
        config = read_json(self / CONFIG)
        run = config.get("run")
        if not isinstance(run, dict):
            raise RunDirError(f"{self / CONFIG} has no 'run' entry; it is not a metabench run: use --force to "
                              "start the run again, or another --out/--name")
        return run

    def is_finished(self) -> bool:
        return (self / SUMMARY).is_file()

    def has_checkpoint(self) -> bool:
        return (self / CHECKPOINT).is_file()

    def clear(self) -> None:
        """Delete the run's files (``--force``), keeping the lock; only ever in a directory that holds a
        ``config.json``."""
        import shutil

        if not (self / CONFIG).is_file():
            return
        for entry in self.path.iterdir():
            if entry.name == LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def remove_stale_temporaries(self) -> list[str]:
        """Delete ``.<file>.*.tmp`` files a killed writer left behind (call while holding the lock: every
        writer holds it, so none of them is live); returns their names."""
        return remove_temporaries(self.path)

    # -- writes -----------------------------------------------------------------------------------------
    def write_config(self, record: Mapping[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self / CONFIG, record)

    def write_manifest(self, manifest_json: Mapping[str, Any]) -> None:
        atomic_write_json(self / MANIFEST, manifest_json)

    def write_log(self, rows: list[dict[str, Any]]) -> None:
        keys = ["iteration"] + sorted({k for row in rows for k in row} - {"iteration"})
        atomic_write_csv(self / TRAIN_LOG, keys, ([row.get(k, "") for k in keys] for row in rows))

    def write_results(self, accuracies: Iterable[float], summary: Mapping[str, Any]) -> None:
        """``episodes.csv`` then ``summary.json``: the summary last, so its presence means complete."""
        atomic_write_csv(self / EPISODES, ["episode", "accuracy"],
                         ((i, f"{a:.6f}") for i, a in enumerate(accuracies)))
        atomic_write_json(self / SUMMARY, json_safe(summary))

    def write_steps(self, by_step: list[list[float]]) -> None:
        """``steps.csv``: the accuracy of every test episode after every adaptation step ([S+1][E] values)."""
        atomic_write_csv(self / STEPS, ["episode", "step", "accuracy"],
                         ((e, s, f"{a:.6f}") for s, row in enumerate(by_step) for e, a in enumerate(row)))

    def write_progress(self, record: Mapping[str, Any]) -> None:
        """``progress.json``: where the run stands, for readers in other processes (``bench sweep --status``)."""
        atomic_write_json(self / PROGRESS, json_safe(record))

    def read_progress(self) -> dict[str, Any] | None:
        """``progress.json``, or None when there is none or it cannot be read (it is advisory only)."""
        try:
            value = json.loads((self / PROGRESS).read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        return value if isinstance(value, dict) else None

    def save_state(self, name: str, state: Any) -> None:
        """A checkpoint (``CHECKPOINT`` or a ``best_file``) via ``torch.save``, atomically."""
        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self / name, buffer.getvalue())

    def load_state(self, name: str, device: Any) -> dict[str, Any]:
        """A checkpoint read with ``weights_only=True``; a damaged file is a RunDirError naming it."""
        import pickle
        import zipfile

        import torch

        path = self / name
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError,
                AttributeError, KeyError, IndexError, TypeError) as exc:
            reason = "empty" if path.stat().st_size == 0 else f"{type(exc).__name__}"
            raise RunDirError(f"{path} is damaged ({reason}) and cannot be resumed from: use --force to start "
                              "the run again") from None
        if not isinstance(state, dict):
            raise RunDirError(f"{path} does not hold a metabench checkpoint: use --force to start the run again")
        return state

    # -- the lock -------------------------------------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        return self.path / LOCK

    def lock(self, wait: float = 0.0) -> RunLock:
        """An exclusive lock on this run (a context manager).

        Raises:
            BenchError: another process holds it (after ``wait`` seconds).
        """
        return RunLock(self.path, self.lock_path, wait)

    def lock_held(self) -> bool:
        """Whether some process holds the run's lock now (it is working on the run). Creates nothing: the
        probe takes a shared lock for an instant, so a process starting on the run at that very moment may
        have to wait for it (``wait_for_lock``)."""
        import fcntl

        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)


class RunLock:
    """Hold ``<run>/.lock`` while a process works on the run, so two processes never write one run."""

    def __init__(self, path: Path, lock_path: Path, wait: float) -> None:
        from filelock import FileLock

        self.path, self.lock_path, self.wait = path, lock_path, wait
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(lock_path))

    def __enter__(self) -> RunLock:
        from filelock import Timeout

        try:
            self._lock.acquire(timeout=self.wait)
        except Timeout:
            raise BenchError(f"{self.path} is in use by another bench process (it holds {self.lock_path}); "
                             "wait for it to finish, or run elsewhere with another --out") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


# -- reading ------------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; anything else is a RunDirError naming the file."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise RunDirError(f"cannot read {path} ({type(exc).__name__}: {exc}); delete that run directory or run "
                          "it again with --force") from None
    if not isinstance(value, dict):
        raise RunDirError(f"{path} is not a JSON object; delete that run directory or run it again with --force")
    return value


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@dataclass(frozen=True)
class FinishedRun:
    """A finished run as ``bench table`` and ``bench reproduce`` need it (validated on reading).

    Attributes:
        path: the run directory.
        config: ``config.json`` (its ``run`` entry holds the plan).
        summary: ``summary.json``.
        accuracy: per-episode accuracies in episode order (a float64 numpy array [n]).
    """

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    accuracy: Any

    @property
    def run(self) -> dict[str, Any]:
        return self.config["run"]


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Every directory at or below ``paths`` that holds a ``config.json``, sorted.

    A path that does not exist is an error: a typo must not look like "no runs".
    """
    found: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise BenchError(f"{path} does not exist: pass the results directory that `bench run` wrote to")
        if path.is_file():
            path = path.parent
        found.update(config.parent for config in path.rglob(CONFIG))
    return sorted(found)


#: Entries of ``config.json``'s ``run`` that tables use, with the Python type each must have.
_RUN_TYPES: dict[str, tuple[type, ...]] = {
    "learner": (str,), "way": (int,), "shot": (int,), "query": (int,), "seed": (int,), "iterations": (int,),
    "train_way": (int,), "train_shot": (int,), "train_query": (int,), "select": (str,),
}


def read_finished_run(run_dir: Path) -> FinishedRun | None:
    """A finished run, ``None`` when it is not finished (no summary yet), or RunDirError when a file is
    damaged or holds values of the wrong type."""
    import numpy as np

    missing = [name for name in FINISHED if not (run_dir / name).is_file()]
    if missing:
        return None
    config = read_json(run_dir / CONFIG)
    summary = read_json(run_dir / SUMMARY)
    run = config.get("run")
    if not isinstance(run, dict):
        raise RunDirError(f"{run_dir / CONFIG} has no 'run' entry; run it again with `bench run --force`")
    for key, types in _RUN_TYPES.items():
        value = run.get(key)
        if not isinstance(value, types) or isinstance(value, bool):
            raise RunDirError(f"{run_dir / CONFIG}: run.{key} is {value!r}, not {types[0].__name__}; run it again "
                              "with `bench run --force`")
    if summary.get("status") != "complete":
        raise RunDirError(f"{run_dir / SUMMARY}: status is {summary.get('status')!r}, not 'complete'")
    if not isinstance(config.get("manifest_hash"), str):
        raise RunDirError(f"{run_dir / CONFIG} has no manifest_hash; run it again with `bench run --force`")
    if summary.get("manifest_hash", config["manifest_hash"]) != config["manifest_hash"]:
        raise RunDirError(f"{run_dir}: config.json and summary.json name different test manifests; run it again")
    accuracy = _read_episodes(run_dir / EPISODES)
    n = summary.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or n != accuracy.size:
        raise RunDirError(f"{run_dir / SUMMARY}: n is {n!r} but {EPISODES} has {accuracy.size} rows; run it again")
    return FinishedRun(Path(run_dir), config, summary, np.asarray(accuracy, dtype=np.float64))


def _read_episodes(path: Path):
    """Per-episode accuracies ``[n]`` ordered by episode index, which must be exactly 0..n-1."""
    import numpy as np

    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise RunDirError(f"cannot read {path} ({exc}); run it again with --force") from None
    if not rows or rows[0][:2] != ["episode", "accuracy"] or len(rows) < 2:
        raise RunDirError(f"{path} must have the header `episode,accuracy` and one row per test episode")
    try:
        pairs = sorted((int(r[0]), float(r[1])) for r in rows[1:])
    except (ValueError, IndexError):
        bad = next(r for r in rows[1:] if not _row_ok(r))
        raise RunDirError(f"{path}: row {','.join(bad)!r} is not `<episode>,<accuracy>`; run it again") from None
    episodes = np.array([e for e, _ in pairs])
    accuracy = np.array([a for _, a in pairs], dtype=np.float64)
    if not np.array_equal(episodes, np.arange(len(pairs))):
        raise RunDirError(f"{path}: episode indices must be 0..{len(pairs) - 1}, each once; run it again")
    if not np.all((accuracy >= 0) & (accuracy <= 1)):
        raise RunDirError(f"{path}: accuracies must be fractions in [0, 1]; run it again")
    return accuracy


def read_train_log(run_dir: Path):
    """``train_log.csv`` as a DataFrame sorted by iteration (``None`` when the run has none).

    Columns: ``iteration``, the learner's metrics (e.g. ``loss``, ``accuracy``), ``seconds_per_iteration``
    and ``val_accuracy`` (empty on rows without validation); a file without an ``iteration`` column or with
    non-numeric values is a RunDirError.
    """
    import pandas as pd

    path = Path(run_dir) / TRAIN_LOG
    if not path.is_file():
        return None
    try:
        log = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunDirError(f"cannot read {path} ({type(exc).__name__}); run it again with --force") from None
    if "iteration" not in log.columns or not all(pd.api.types.is_numeric_dtype(t) for t in log.dtypes):
        raise RunDirError(f"{path} must have an `iteration` column and numbers only; run it again with --force")
    return log.sort_values("iteration", ignore_index=True)


def read_steps(run_dir: Path):
    """``steps.csv`` as an array ``[steps + 1, episodes]`` of accuracies (``None`` when the run has none:
    its learner does not adapt by gradient steps)."""
    import numpy as np
    import pandas as pd

    path = Path(run_dir) / STEPS
    if not path.is_file():
        return None
    try:
        steps = pd.read_csv(path)
        table = steps.pivot(index="step", columns="episode", values="accuracy").sort_index().sort_index(axis=1)
    except (OSError, UnicodeDecodeError, ValueError, KeyError) as exc:
        raise RunDirError(f"cannot read {path} ({type(exc).__name__}): it must hold `episode,step,accuracy`, one "
                          "row per episode and step; run it again with --force") from None
    values = table.to_numpy(dtype=np.float64)
    episodes, step_index = table.columns.to_numpy(), table.index.to_numpy()
    if (np.isnan(values).any() or not np.array_equal(episodes, np.arange(len(episodes)))
            or not np.array_equal(step_index, np.arange(len(step_index)))
            or not np.all((values >= 0) & (values <= 1))):
        raise RunDirError(f"{path}: every episode 0..E-1 needs an accuracy in [0, 1] after every step 0..S; run it "
                          "again with --force")
    return values


def _row_ok(row: list[str]) -> bool:
    try:
        int(row[0]), float(row[1])
    except (ValueError, IndexError):
        return False
    return True


def check_writable(out: Path) -> None:
    """Fail early, before any work, when ``out`` cannot hold results."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BenchError(f"cannot write results to {out} ({exc.strerror or exc}); pass --out to a writable folder") from None
