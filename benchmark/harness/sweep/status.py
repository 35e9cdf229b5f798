"""Where each run of a sweep stands: finished, running (iteration, ETA), queued, stopped or failed (with the
last lines of its log).

The run directory says most of it: ``summary.json`` means finished, a held lock means a process works on
it, ``progress.json`` says how far it is. The latest job recorded in ``sweep.json`` says the rest: a Slurm
job's state (from ``sacct``) tells queued from failed, a local run's exit code tells stopped (resumable:
time limit, Ctrl-C, SIGTERM, SIGUSR2) from failed. Reads only; never takes a lock longer than an instant.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from benchmark.errors import EXIT_PAUSED, BenchError
from benchmark.harness import rundir as R
from benchmark.harness.sweep.record import read_record

FINISHED, RUNNING, QUEUED, STOPPED, FAILED = "finished", "running", "queued", "stopped", "failed"
STATES = (FINISHED, RUNNING, QUEUED, STOPPED, FAILED)
#: Exit codes of a ``bench run`` that checkpointed and stopped: running it again resumes it.
STOP_EXITS = {EXIT_PAUSED: "time limit", 128 + signal.SIGINT: "Ctrl-C", 128 + signal.SIGTERM: "SIGTERM",
              128 + signal.SIGUSR2: "SIGUSR2"}
#: Slurm job states (``sacct``) of a job that waits to run, runs, or has ended.
SLURM_WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD", "SUSPENDED",
                 "RESIZING"}
SLURM_RUNNING = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT"}
#: Lines of a failed run's log that the status shows.
TAIL_LINES = 6


@dataclass
class RunStatus:
    """One run's state.

    Attributes:
        state: one of ``STATES``.
        detail: one line: the result, the progress and ETA, why it stopped or failed.
        job: the job that ran it last (``123_4`` on Slurm, ``local`` here), or None.
        log: its log file, when there is one.
        tail: the last lines of its log (failed runs).
        iteration, total, eta_s: progress of a run that has started (None when unknown).
    """

    name: str
    label: str
    state: str
    detail: str
    job: str | None = None
    log: str | None = None
    tail: list[str] = field(default_factory=list)
    iteration: int | None = None
    total: int | None = None
    eta_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def describe_exit(code: int) -> tuple[str, str]:
    """(state, words) of a ``bench run`` exit code: finished, stopped (resumable) or failed."""
    if code == 0:
        return FINISHED, "exit 0"
    if code in STOP_EXITS:
        return STOPPED, f"stopped by {STOP_EXITS[code]} (exit {code})"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return FAILED, f"killed by {name}"
    return FAILED, f"exit {code}"


def sweep_status(out: Path, *, slurm_states: Callable[[list[str]], Mapping[str, str]] | None = None,
                 names: list[str] | None = None) -> list[RunStatus]:
    """The status of every run recorded in ``out``'s sweep record (or of ``names``), in the order the sweeps
    planned them (grid order, the first sweep's runs first).

    Args:
        slurm_states: job id -> Slurm state for the given ids (default: ``sacct``); ids it does not know
            are reported as unknown.
    """
    record = read_record(out)
    order = list(dict.fromkeys([name for sweep in record.get("sweeps", []) for name in sweep.get("runs", [])]
                               + list(record["runs"])))  # the record's JSON keeps its keys sorted
    entries = {name: record["runs"][name] for name in order
               if name in record["runs"] and (names is None or name in names)}
    slurm_ids = [e["job"]["job_id"] for e in entries.values() if e.get("job", {}).get("executor") == "slurm"]
    states: Mapping[str, str] = {}
    if slurm_ids:
        if slurm_states is None:
            from benchmark.harness.sweep.slurm import job_states as slurm_states
        states = slurm_states(slurm_ids)
    return [run_status(Path(out), name, entry, states) for name, entry in entries.items()]


def run_status(out: Path, name: str, entry: Mapping[str, Any], slurm_states: Mapping[str, str]) -> RunStatus:
    """One run's status from its directory, its lock, its progress and its latest job."""
    run = R.RunDirectory(out / name)
    job = entry.get("job") or {}
    status = RunStatus(name, entry.get("label", name), QUEUED, "not started", log=_log_path(out, job))
    if job.get("executor") == "slurm":
        status.job = job.get("job_id")
    elif job.get("executor") == "local":
        status.job = "local"
    progress = run.read_progress() or {}
    status.iteration, status.total = progress.get("iteration"), progress.get("total")
    if run.is_finished():
        return _finished(status, run)
    if run.lock_held():
        return _running(status, progress)
    if job.get("executor") == "slurm":
        return _slurm(status, run, progress, slurm_states.get(job.get("job_id", ""), "UNKNOWN"))
    if job.get("executor") == "local":
        return _local(status, run, progress, job)
    if run.has_checkpoint():
        status.state, status.detail = STOPPED, f"stopped at iteration {status.iteration}; resumable"
    return status


def _finished(status: RunStatus, run: R.RunDirectory) -> RunStatus:
    try:
        summary = R.read_json(run / R.SUMMARY)
    except BenchError as exc:
        status.state, status.detail = FAILED, str(exc)
        return status
    status.state, status.detail, status.iteration = FINISHED, summary_text(summary), status.total
    return status


def summary_text(summary: Mapping[str, Any]) -> str:
    """A finished run's result in words: ``81.90 ± 1.62 % over 600 test episodes``."""
    mean, ci, n = summary.get("accuracy_mean"), summary.get("ci95"), summary.get("n")
    if mean is None:
        return "finished"
    return f"{100 * mean:.2f} ± {'n/a' if ci is None else f'{100 * ci:.2f}'} % over {n} test episodes"


def _running(status: RunStatus, progress: Mapping[str, Any]) -> RunStatus:
    status.state = RUNNING
    if progress.get("phase") == "evaluating":
        status.detail = "evaluating the test episodes"
    elif status.iteration is None or not status.total:
        status.detail = "starting"
    else:
        status.eta_s = _eta(progress)
        eta = "ETA unknown" if status.eta_s is None else f"ETA {format_duration(status.eta_s)}"
        status.detail = f"iteration {status.iteration}/{status.total}, {eta}"
    if progress.get("host"):
        status.detail += f" (on {progress['host']})"
    return status


def _eta(progress: Mapping[str, Any]) -> float | None:
    """Seconds of training left: the remaining iterations at the last logged rate, less the time since."""
    rate = progress.get("seconds_per_iteration")
    if rate is None:
        return None
    left = (progress["total"] - progress["iteration"]) * rate - (time.time() - progress.get("updated", time.time()))
    return max(left, 0.0)


def _resumes(status: RunStatus, run: R.RunDirectory) -> str:
    return f", resumes at iteration {status.iteration}" if run.has_checkpoint() and status.iteration else ""


def _slurm(status: RunStatus, run: R.RunDirectory, progress: Mapping[str, Any], state: str) -> RunStatus:
    state = state.split()[0] if state else "UNKNOWN"  # "CANCELLED by 0" -> "CANCELLED"
    if state in SLURM_WAITING:
        status.state, status.detail = QUEUED, f"job {state.lower()}{_resumes(status, run)}"
    elif state in SLURM_RUNNING:
        status.state, status.detail = RUNNING, "job running, the run is starting"
    elif state == "UNKNOWN":
        status.state = STOPPED if run.has_checkpoint() else QUEUED
        status.detail = "Slurm does not know the job (sacct); run the sweep again to resubmit it"
    else:
        status.state, status.detail = FAILED, f"job {state.lower()}"
        if run.has_checkpoint():
            status.detail += f" at iteration {status.iteration}/{status.total}; running the sweep again resumes it"
        status.tail = log_tail(status.log)
    return status


def _local(status: RunStatus, run: R.RunDirectory, progress: Mapping[str, Any], job: Mapping[str, Any]) -> RunStatus:
    code = job.get("exit_code")
    if code is None:
        if _alive(job):
            status.state, status.detail = RUNNING, "the run is starting"
        elif job.get("started"):
            status.state, status.detail = STOPPED, "its sweep ended before it did; resumable" + _resumes(status, run)
        return status
    state, words = describe_exit(int(code))
    if state == FINISHED:  # exit 0 without a summary: a run directory that changed under it
        state, words = FAILED, "exit 0 but no summary.json"
    status.state = state
    status.detail = words + (f" at iteration {status.iteration}/{status.total}" if status.iteration is not None else "")
    if state == STOPPED:
        status.detail += "; resumable"
    else:
        status.tail = log_tail(status.log)
    return status


def _alive(job: Mapping[str, Any]) -> bool:
    """Whether the local process that runs the job is alive (only knowable on its own host)."""
    pid = job.get("pid")
    if not pid or job.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _log_path(out: Path, job: Mapping[str, Any]) -> str | None:
    if job.get("executor") == "local" and job.get("log"):
        return str(out / job["log"])
    if job.get("executor") == "slurm" and job.get("folder") and job.get("job_id"):
        return str(out / job["folder"] / f"{job['job_id']}_0_log.err")
    return None


def log_tail(path: str | None, lines: int = TAIL_LINES) -> list[str]:
    """The last non-empty lines of a log (a Slurm job's stderr, else its stdout); [] when there is none."""
    if not path:
        return []
    candidates = [Path(path)]
    if path.endswith(".err"):
        candidates.append(Path(path[: -len(".err")] + ".out"))
    for candidate in candidates:
        try:
            with open(candidate, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(fh.tell() - 64 * 1024, 0))
                text = fh.read().decode(errors="replace")
        except OSError:
            continue
        kept = [line.rstrip() for line in text.splitlines() if line.strip()]
        if kept:
            return kept[-lines:]
    return []


def format_duration(seconds: float) -> str:
    """``3725`` -> ``1h02m``, ``200`` -> ``3m20s``, ``42`` -> ``42s``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def counts(statuses: list[RunStatus]) -> dict[str, int]:
    """How many runs are in each state (every state present, in ``STATES`` order)."""
    return {state: sum(s.state == state for s in statuses) for state in STATES}
