"""submitit against the real local Slurm cluster (``slurm_cluster`` fixture): one job, a job array, and a
checkpointable job that reaches its time limit, is requeued, and resumes where it stopped.

Each test submits into its own fresh folder: Slurm job ids restart at 1 when the cluster's state is purged,
so a reused submitit folder could hand back an old job's result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit")
cloudpickle = pytest.importorskip("cloudpickle")

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

# The job unpickles the callables below in a fresh interpreter where this test module is not importable
# (tests/ is not a package on sys.path there): ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

# Requeue test: a 1-minute limit. Slurm sends USR2 `SIGNAL_DELAY_S` before it, but slurmctld checks time limits
# only every 30 s, so the signal comes somewhere in [30 - delay, 60 - delay] s after the start: [20, 50] s here.
# The work (STEPS x STEP_S = 55 s) outlasts that, so the first run is always interrupted, and the signal never
# comes before submitit has installed its handler (about a second after the start). A requeued run starts
# ~12 s after a check (cred_expire=10 + scheduling), so with a 10 s delay its next signal is ~49 s away and it
# finishes. A 20 s delay (46 steps) lets the first run end sooner, but a resumed run is then signalled ~19 s in
# and may need a third run: measured 60 and 71 s against 69-74 s here, so the steadier setting was kept.
SIGNAL_DELAY_S = 10
STEPS = 55
STEP_S = 1.0


def _executor(slurm_cluster, folder: Path, max_num_timeout: int = 3, **params):
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=max_num_timeout)
    ex.update_parameters(
        slurm_partition=slurm_cluster.partition,
        cpus_per_task=1,
        timeout_min=params.pop("timeout_min", 5),
        **params,
    )
    return ex


def _result(job, timeout_s: float = 120):
    """job.result(), but a broken cluster fails the test instead of hanging CI: cancel and fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} not done after {timeout_s} s (state {job.state}); stderr:\n{job.stderr()}")
        time.sleep(0.5)
    return job.result()


def _square(x: int) -> dict:
    return {"value": x * x, "job_id": os.environ.get("SLURM_JOB_ID"), "array_task": os.environ.get("SLURM_ARRAY_TASK_ID")}


def _sacct_states(job_id: str) -> list[str]:
    """All states of the job's allocation in accounting (--duplicates: each requeued run is its own record)."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "--duplicates", "-o", "State", "-j", job_id],
        capture_output=True, text=True, check=True,
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def _wait_sacct(job_id: str, want: str, timeout_s: float = 30) -> list[str]:
    """Accounting is written asynchronously (slurmctld -> slurmdbd): poll until `want` shows up."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = _sacct_states(job_id)
        if any(s.startswith(want) for s in states) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def test_single_job_returns_its_value(slurm_cluster, tmp_path):
    job = _executor(slurm_cluster, tmp_path / "submitit").submit(_square, 12)
    result = _result(job)
    assert result["value"] == 144
    assert result["job_id"] == job.job_id
    # sacct knows the job: submitit relies on it to notice a job that died without a result.
    assert "COMPLETED" in _wait_sacct(job.job_id, "COMPLETED")


def test_job_array_of_three(slurm_cluster, tmp_path):
    ex = _executor(slurm_cluster, tmp_path / "submitit", slurm_array_parallelism=2)
    jobs = ex.map_array(_square, [1, 2, 3])
    assert len(jobs) == 3
    array_ids = {job.job_id.split("_")[0] for job in jobs}
    assert len(array_ids) == 1, [job.job_id for job in jobs]  # one sbatch, one array job
    results = [_result(job) for job in jobs]
    assert [r["value"] for r in results] == [1, 4, 9]
    assert sorted(r["array_task"] for r in results) == ["0", "1", "2"]
    sbatch_file = jobs[0].paths.submission_file.read_text()
    assert "#SBATCH --array=0-2%2" in sbatch_file


class StepCounter(submitit.helpers.Checkpointable):
    """Sums f(i) over `steps` steps of `step_s` seconds each, saving its progress to `state_file` after every step,
    so a requeued run resumes from the last finished step. Returns the sum and how many runs it took."""

    def __init__(self, state_file: str, steps: int, step_s: float) -> None:
        self.state_file = state_file
        self.steps = steps
        self.step_s = step_s

    def _load(self) -> dict:
        try:
            return json.loads(Path(self.state_file).read_text())
        except FileNotFoundError:
            return {"step": 0, "total": 0, "runs": []}

    def _save(self, state: dict) -> None:
        tmp = Path(self.state_file + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_file)  # atomic: a signal mid-save leaves the previous state intact

    def __call__(self) -> dict:
        state = self._load()
        state["runs"].append({"job_id": os.environ.get("SLURM_JOB_ID"), "from_step": state["step"], "t": time.time()})
        self._save(state)
        while state["step"] < self.steps:
            time.sleep(self.step_s)
            state["total"] += (state["step"] + 1) ** 2
            state["step"] += 1
            self._save(state)
        return {"total": state["total"], "steps": state["step"], "runs": state["runs"]}


def test_timeout_requeue_resume(slurm_cluster, tmp_path):
    reference = StepCounter(str(tmp_path / "reference.json"), STEPS, 0.0)()
    assert reference["total"] == sum(i * i for i in range(1, STEPS + 1))

    ex = _executor(slurm_cluster, tmp_path / "submitit", timeout_min=1, slurm_signal_delay_s=SIGNAL_DELAY_S,
                   max_num_timeout=5)
    state_file = tmp_path / "progress.json"
    job = ex.submit(StepCounter(str(state_file), STEPS, STEP_S))
    result = _result(job, timeout_s=300)

    assert result["total"] == reference["total"]
    assert result["steps"] == STEPS
    runs = result["runs"]
    assert len(runs) >= 2, f"the job was never interrupted: {runs}"
    assert runs[1]["from_step"] > 0, f"the requeued run started over instead of resuming: {runs}"
    assert {r["job_id"] for r in runs} == {job.job_id}  # requeued as the same Slurm job
    assert "Requeued job" in job.stderr() or "Requeued job" in (job.stdout() or "")
    states = _wait_sacct(job.job_id, "COMPLETED")
    assert "REQUEUED" in states and "COMPLETED" in states, states
