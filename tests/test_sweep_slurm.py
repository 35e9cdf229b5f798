"""`bench sweep --executor slurm` against the real local Slurm cluster (``slurm_cluster`` fixture), end to end on
the real data at tiny scale: one job array of two runs; one run gets SIGUSR2 mid-training (what Slurm sends
before a time limit or a preemption), checkpoints, is requeued by submitit and resumes to exactly the per-episode
results of an uninterrupted local run; --status along the way; the table at the end.

``scancel --signal=USR2 <job>`` signals the processes of the job's steps, as Slurm's own ``--signal=USR2@<delay>``
does; not ``--batch``, which signals only the batch shell (submitit's process runs in the step that the shell
starts with srun). A signal sent when the run is mid-training, rather than a real time limit, keeps the test
short and the stop where it must be: slurmctld checks limits every 30 s, so a limit lands anywhere in a window.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from benchmark.cli import main

pytest.importorskip("submitit")
pytestmark = [pytest.mark.slurm, pytest.mark.realdata, pytest.mark.usefixtures("slurm_cluster")]

TINY = ["--query", "2", "--episodes", "6", "--val-episodes", "3", "--device", "cpu", "--iterations", "60",
        "--log-every", "5", "--val-every", "30", "--checkpoint-every", "30",
        "-o", "meta_batch_size=2", "-o", "test_inner_steps=1", "-o", "vectorize=false"]


def _status(out: Path, capsys) -> dict[str, dict]:
    assert main(["sweep", "--status", "--json", "--out", str(out)]) == 0
    return {run["name"]: run for run in json.loads(capsys.readouterr().out)["runs"]}


def _poll(condition, what: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


def test_slurm_sweep_requeues_a_signalled_run_that_ends_as_an_unbroken_local_run(slurm_cluster, tmp_path, omniglot_dir,
                                                                                 capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the jobs' runs use one thread each, as the reference
    out = tmp_path / "sweep"
    sweep = ["sweep", "--learner", "fomaml", "--seed", "0..1", *TINY, "--data-dir", str(omniglot_dir), "--out", str(out),
             "--executor", "slurm", "--partition", slurm_cluster.partition, "--time", "5m", "--signal-delay", "30",
             "--max-parallel", "2"]
    reference = subprocess.Popen(
        [sys.executable, "-m", "benchmark", "run", "--learner", "fomaml", "--seed", "0", *TINY, "-q", "--data-dir",
         str(omniglot_dir), "--out", str(tmp_path / "reference"), "--name", "run"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert main(sweep) == 0
    text = capsys.readouterr().out
    assert "submitted job array" in text and "2 run(s)" in text and "bench sweep --status" in text
    record = json.loads((out / "sweep.json").read_text())
    jobs = {entry["seed"]: (name, entry["job"]["job_id"]) for name, entry in record["runs"].items()}
    assert sorted(jobs) == [0, 1] and len({job.split("_")[0] for _, job in jobs.values()}) == 1  # one array
    assert {run["state"] for run in _status(out, capsys).values()} <= {"queued", "running", "finished"}

    name, job = jobs[0]
    run = out / name
    progress = lambda: json.loads((run / "progress.json").read_text()) if (run / "progress.json").is_file() else {}  # noqa: E731
    _poll(lambda: progress().get("iteration", 0) >= 10, "the run's 10th iteration")
    status = _status(out, capsys)[name]
    assert status["state"] == "running" and status["detail"].startswith("iteration ") and "ETA" in status["detail"]
    subprocess.run(["scancel", "--signal=USR2", job], check=True, capture_output=True)
    _poll(lambda: progress().get("phase") == "stopped", "the run to checkpoint and stop", 60)
    stopped_at = progress()["iteration"]
    assert 10 <= stopped_at < 60
    _poll(lambda: _status(out, capsys)[name]["state"] != "running", "the job to leave the running state", 60)
    status = _status(out, capsys)[name]
    if status["state"] == "queued":  # it may already be running again when we look
        assert status["detail"].endswith(f", resumes at iteration {stopped_at}"), status

    # The same sweep again, waiting: nothing is submitted twice; it reports each run's end, then the table.
    assert main([*sweep, "--wait", "--table"]) == 0
    captured = capsys.readouterr()
    assert "submitted" not in captured.out and "| fomaml " in captured.out
    assert "(2 seeds)" in (out / "table.md").read_text()
    assert {run["state"] for run in _status(out, capsys).values()} == {"finished"}

    log = (out / record["runs"][name]["job"]["folder"] / f"{job}_0_log.out").read_text()
    assert "Requeued job" in log and f"resumed from iteration {stopped_at}" in log
    # Accounting (each requeued start is its own record) lags the job's end by a moment.
    states = lambda: subprocess.run(["sacct", "-n", "-X", "-P", "--duplicates", "-o", "State", "-j", job],  # noqa: E731
                                    capture_output=True, text=True, check=True).stdout.split()
    _poll(lambda: "COMPLETED" in states(), "the job's COMPLETED record", 60)
    assert "REQUEUED" in states()
    assert reference.wait(timeout=300) == 0, reference.communicate()[1]
    assert (run / "episodes.csv").read_text() == (tmp_path / "reference" / "run" / "episodes.csv").read_text()
    columns = ["iteration", "loss", "accuracy", "val_accuracy"]
    pd.testing.assert_frame_equal(pd.read_csv(run / "train_log.csv")[columns],
                                  pd.read_csv(tmp_path / "reference" / "run" / "train_log.csv")[columns])
