"""The ``slurm`` executor: a sweep's runs as one Slurm job array, submitted through submitit.

Each array task runs one ``bench run`` (``job.SweepJob``); ``--max-parallel`` caps how many tasks run at
once (``#SBATCH --array=0-N%P``). Each submission gets a fresh submitit folder ``<out>/slurm/<stamp>/``
(the job scripts, pickles and the logs ``<job>_<task>_0_log.out/.err``): job ids restart when a cluster's
state is reset, and a reused folder could then hand an old result to a new job. Job states come from
``sacct`` (one call for the whole sweep).

submitit is an optional dependency (``pip install -e '.[slurm]'``); only submitting needs it.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from benchmark.errors import BenchError

#: The job name every sweep array gets in ``squeue``.
JOB_NAME = "bench-sweep"


@dataclass(frozen=True)
class SlurmOptions:
    """What each array task asks Slurm for.

    Attributes:
        partition: the partition (None: the cluster's default).
        time_min: the time limit of one job in minutes; a run that needs longer is requeued and resumes.
        cpus_per_run, gpus_per_run: CPUs and GPUs of one task (``torch`` uses ``cpus_per_run`` threads).
        mem: memory per task in Slurm's syntax (``16G``), or None.
        max_parallel: tasks of the array that may run at once.
        signal_delay_s: seconds before the time limit at which Slurm sends SIGUSR2 (the run then
            checkpoints at its next iteration and the job requeues itself).
        max_requeues: how many time limits a job may reach before it is not requeued again (preemptions
            do not count).
        extra: more ``#SBATCH`` options (``account``, ``qos``, ``constraint``...).
    """

    partition: str | None = None
    time_min: int = 240
    cpus_per_run: int = 1
    gpus_per_run: int = 0
    mem: str | None = None
    max_parallel: int = 16
    signal_delay_s: int = 120
    max_requeues: int = 10
    extra: Mapping[str, str] = field(default_factory=dict)

    def check(self) -> None:
        """Raise BenchError for values Slurm would refuse or that could never work."""
        for name, low in (("time_min", 1), ("cpus_per_run", 1), ("gpus_per_run", 0), ("max_parallel", 1),
                          ("signal_delay_s", 1), ("max_requeues", 0)):
            if getattr(self, name) < low:
                raise BenchError(f"--{_option(name)} must be at least {low} (got {getattr(self, name)})")
        if self.signal_delay_s >= self.time_min * 60:
            raise BenchError(f"--signal-delay {self.signal_delay_s} s is not shorter than the time limit "
                             f"({self.time_min} min): the warning would come before the run starts")


def _option(name: str) -> str:
    return {"time_min": "time", "cpus_per_run": "cpus-per-run", "gpus_per_run": "gpus-per-run",
            "max_parallel": "max-parallel", "signal_delay_s": "signal-delay", "max_requeues": "max-requeues"}[name]


def time_minutes(seconds: float) -> int:
    """A time limit in whole minutes (Slurm's unit), rounded up."""
    return max(1, math.ceil(seconds / 60))


def check_available() -> None:
    """Raise BenchError when submitting cannot work here: no submitit, or no Slurm commands."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise BenchError("the slurm executor needs submitit: pip install -e '.[slurm]' (or pip install submitit)") from None
    missing = [cmd for cmd in ("sbatch", "sacct", "scontrol") if shutil.which(cmd) is None]
    if missing:
        raise BenchError(f"the slurm executor needs the Slurm commands ({', '.join(missing)} not found): run on the "
                         "cluster's login node, or use --executor local")


def new_folder(out: Path) -> Path:
    """A fresh submitit folder ``<out>/slurm/<UTC stamp>[-k]`` (created; never one that exists)."""
    base = Path(out) / "slurm"
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for k in range(1000):
        folder = base / (stamp if k == 0 else f"{stamp}-{k}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise BenchError(f"cannot make a new submission folder under {base}")


def submit(runs: Sequence[Any], out: Path, options: SlurmOptions, device: str) -> tuple[Path, dict[str, str]]:
    """Submit ``runs`` (``SweepRun``s) as one job array; returns the submitit folder and each run's job id.

    Raises:
        BenchError: sbatch refused the array (its message); the fresh folder is removed again.
    """
    import submitit

    from benchmark.harness.sweep.job import SweepJob

    folder = new_folder(out)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=options.max_requeues)
    params: dict[str, Any] = {
        "job_name": JOB_NAME, "time": options.time_min, "cpus_per_task": options.cpus_per_run,
        "array_parallelism": options.max_parallel, "signal_delay_s": options.signal_delay_s,
        "additional_parameters": dict(options.extra),
    }
    if options.partition:
        params["partition"] = options.partition
    if options.gpus_per_run:
        params["gpus_per_node"] = options.gpus_per_run
    if options.mem:
        params["mem"] = options.mem
    executor.update_parameters(**params)
    # The run must be checkpointed and gone before Slurm's kill: leave it most of the warning period.
    grace = max(options.signal_delay_s - 10, options.signal_delay_s // 2)
    try:
        with executor.batch():
            jobs = [executor.submit(SweepJob(run.command(device), str(Path(out) / run.name), options.cpus_per_run, grace))
                    for run in runs]
    except Exception as exc:  # submitit raises CalledProcessError/FailedJobError/...: sbatch said why
        shutil.rmtree(folder, ignore_errors=True)
        message = " ".join(str(exc).split())[:400]
        raise BenchError(f"sbatch refused the sweep's job array: {message}") from None
    return folder, {run.name: job.job_id for run, job in zip(runs, jobs)}


def job_states(job_ids: Sequence[str]) -> dict[str, str]:
    """The Slurm state of each job id (``123`` or ``123_4``); ids Slurm does not report are missing (unknown).

    ``squeue`` answers for jobs that wait or run (at once: accounting lags a fresh job by seconds, and
    folds pending array tasks into one line); ``sacct`` for jobs that have ended.
    """
    arrays = ",".join(sorted({job_id.split("_")[0] for job_id in job_ids}))
    if not arrays:
        return {}
    states: dict[str, str] = {}
    for line in _query(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", arrays]):
        job, _, state = line.partition("|")
        for job_id in unfold(job):
            states[job_id] = state
    # By name, not by id: squeue refuses a whole id list when one job in it has left its memory.
    wanted = set(arrays.split(","))
    for line in _query(["squeue", "-h", "-r", "-o", "%i|%T", "--name", JOB_NAME]):
        job, _, state = line.partition("|")
        if job.split("_")[0] in wanted:
            states[job] = state
    return states


def _query(command: list[str]) -> list[str]:
    """The output lines of a Slurm query; none when the command is missing, fails or hangs."""
    if shutil.which(command[0]) is None:
        return []
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()] if proc.returncode == 0 else []


def unfold(job: str) -> list[str]:
    """``"123_[4-6,9%2]"`` -> ``["123_4", "123_5", "123_6", "123_9"]``; other ids unchanged."""
    match = re.fullmatch(r"(\d+)_\[([\d,\-]+)(?:%\d+)?\]", job)
    if not match:
        return [job]
    ids = []
    for part in match.group(2).split(","):
        low, _, high = part.partition("-")
        ids.extend(f"{match.group(1)}_{i}" for i in range(int(low), int(high or low) + 1))
    return ids
