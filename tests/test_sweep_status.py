"""`bench sweep --status`: each state from the files a run leaves and its latest job (local exit codes, Slurm
states given here instead of asking sacct), with the log's last lines for failed runs. No training."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmark.cli import main
from benchmark.harness.sweep import status as S
from benchmark.harness.sweep.record import FORMAT, SWEEP_FILE
from benchmark.harness.sweep.slurm import unfold


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def _sweep(out: Path, runs: dict) -> None:
    _write(out / SWEEP_FILE, {"format": FORMAT, "sweeps": [],
                              "runs": {name: {"label": name.replace("-", " "), **entry} for name, entry in runs.items()}})


def _progress(out: Path, name: str, iteration: int, total: int, **extra) -> None:
    _write(out / name / "progress.json", {"phase": "training", "iteration": iteration, "total": total,
                                          "seconds_per_iteration": 0.5, "updated": time.time(), "host": "node1",
                                          **extra})


@pytest.fixture
def folder(tmp_path):
    """A sweep folder with one run in each state (the running one's lock held by another process)."""
    out = tmp_path / "sweep"
    local = {"executor": "local", "started": "t", "host": "elsewhere", "pid": 1}
    _sweep(out, {
        "done": {"job": {**local, "exit_code": 0}},
        "training": {"job": local},
        "waiting": {},
        "stopped": {"job": {**local, "exit_code": 143, "log": "logs/stopped.log"}},
        "broken": {"job": {**local, "exit_code": 2, "log": "logs/broken.log"}},
        "slurm-pending": {"job": {"executor": "slurm", "job_id": "7_1", "folder": "slurm/a"}},
        "slurm-failed": {"job": {"executor": "slurm", "job_id": "7_2", "folder": "slurm/a"}},
    })
    _write(out / "done" / "summary.json", {"status": "complete", "accuracy_mean": 0.819, "ci95": 0.0162, "n": 600})
    _progress(out, "training", 4000, 10000)
    _progress(out, "stopped", 300, 10000, phase="stopped")
    _write(out / "stopped" / "checkpoint.pt", "")
    _write(out / "logs" / "broken.log",
           "=== start\nloading\n\nError: the training loss became nan between iterations 1 and 50\n")
    _progress(out, "slurm-pending", 120, 500, phase="stopped")
    _write(out / "slurm-pending" / "checkpoint.pt", "")
    _write(out / "slurm" / "a" / "7_2_0_log.err",
           "Traceback (most recent call last):\nRunFailed: bench run exited with code 2\n")
    return out


def _holding_lock(path: Path):
    """Another process that holds a run's lock, as a running `bench run` does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    code = ("import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_each_state_with_its_detail(folder):
    holder = _holding_lock(folder / "training" / ".lock")
    try:
        states = {"7_1": "REQUEUED", "7_2": "FAILED"}
        by_name = {s.name: s for s in S.sweep_status(folder, slurm_states=lambda ids: states)}
    finally:
        holder.kill()
        holder.wait()
    assert by_name["done"].state == "finished" and by_name["done"].detail == "81.90 ± 1.62 % over 600 test episodes"
    running = by_name["training"]
    assert running.state == "running" and running.detail.startswith("iteration 4000/10000, ETA 50m")
    assert "(on node1)" in running.detail and 2990 < running.eta_s <= 3000
    assert by_name["waiting"].state == "queued" and by_name["waiting"].detail == "not started"
    assert by_name["stopped"].state == "stopped"
    assert by_name["stopped"].detail == "stopped by SIGTERM (exit 143) at iteration 300/10000; resumable"
    broken = by_name["broken"]
    assert broken.state == "failed" and broken.detail.startswith("exit 2")
    assert broken.tail[-1] == "Error: the training loss became nan between iterations 1 and 50"
    assert by_name["slurm-pending"].state == "queued"
    assert by_name["slurm-pending"].detail == "job requeued, resumes at iteration 120"
    assert by_name["slurm-pending"].job == "7_1"
    failed = by_name["slurm-failed"]
    assert failed.state == "failed" and failed.detail == "job failed" and failed.tail[-1].startswith("RunFailed")
    # Once the lock is free, a local run without an exit code whose process is gone was stopped with its sweep.
    assert S.sweep_status(folder, slurm_states=lambda ids: states, names=["training"])[0].state == "stopped"


def test_a_live_local_process_counts_as_running_before_it_takes_the_lock(tmp_path):
    out = tmp_path / "sweep"
    _sweep(out, {"starting": {"job": {"executor": "local", "started": "t", "pid": os.getpid(),
                                      "host": socket.gethostname()}}})
    (status,) = S.sweep_status(out)
    assert status.state == "running" and status.detail == "the run is starting"


def test_status_command_prints_every_run_and_the_failed_logs(folder, capsys, monkeypatch):
    monkeypatch.setattr("benchmark.harness.sweep.slurm.job_states", lambda ids: {"7_1": "PENDING", "7_2": "TIMEOUT"})
    assert main(["sweep", "--status", "--out", str(folder)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == (f"sweep {folder}: 7 runs: 1 finished, 0 running, 2 queued, 2 stopped, 2 failed")
    assert "| Error: the training loss became nan" in text and "job timeout" in text and "[job 7_1]" in text
    assert main(["sweep", "--status", "--json", "--out", str(folder)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["failed"] == 2 and {r["name"] for r in report["runs"]} >= {"done", "broken"}


def test_exit_codes_and_slurm_ids():
    assert S.describe_exit(0)[0] == "finished"
    assert S.describe_exit(3) == ("stopped", "stopped by time limit (exit 3)")
    assert S.describe_exit(140)[0] == S.describe_exit(130)[0] == "stopped"
    assert S.describe_exit(-9) == ("failed", "killed by SIGKILL")
    assert unfold("12_[4-6,9%2]") == ["12_4", "12_5", "12_6", "12_9"]
    assert unfold("12_3") == ["12_3"] and unfold("15") == ["15"]
    assert S.format_duration(3725) == "1h02m" and S.format_duration(200) == "3m20s" and S.format_duration(4) == "4s"


def test_slurm_submits_no_run_that_ended_or_is_in_flight_since_the_sweep_planned_it(tmp_path, monkeypatch, capsys):
    """The plan is made before the cluster is asked; a run that finished in between (its job ended) must not be
    submitted again, nor one whose job is queued or running. Only the new run goes."""
    from types import SimpleNamespace

    import benchmark.harness.sweep.slurm as slurm
    import benchmark.harness.sweep.status as status
    from benchmark.cli import sweep as cli_sweep

    states = {"done-meanwhile": (status.FINISHED, "1_0"), "queued": (status.QUEUED, "1_1"),
              "running": (status.RUNNING, "1_2"), "new": (status.QUEUED, None)}
    monkeypatch.setattr(status, "sweep_status", lambda out, names: [
        status.RunStatus(name=n, label=n, state=states[n][0], detail="", job=states[n][1]) for n in names])
    submitted = []

    def submit(runs, out, options, device):
        submitted.extend(run.name for run in runs)
        return tmp_path / "slurm" / "x", {run.name: f"2_{i}" for i, run in enumerate(runs)}

    monkeypatch.setattr(slurm, "submit", submit)
    (tmp_path / "slurm" / "x").mkdir(parents=True)
    runs = [SimpleNamespace(name=n, label=n) for n in states]
    cli_sweep._run_slurm(tmp_path, runs, options=None, device="cpu", wait=False, info=lambda m: None)
    assert submitted == ["new"]
