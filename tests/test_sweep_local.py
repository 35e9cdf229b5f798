"""Sweeps and stops on this machine, end to end on the real data at tiny scale: a local sweep with two workers,
re-run (skips) and grown (adds runs); and one run of a sweep held by its process (a second one refuses),
stopped by a SIGTERM to the sweep and then by --time-limit, and resumed by the sweep to exactly the episodes
and training log of an uninterrupted run.

Processes are frozen with SIGSTOP at chosen points so that each stop lands mid-training whatever the load.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from benchmark.cli import main

pytestmark = pytest.mark.realdata

TINY = ["--query", "2", "--episodes", "6", "--val-episodes", "3", "--device", "cpu",
        "-o", "meta_batch_size=2", "-o", "test_inner_steps=1", "-o", "vectorize=false"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _bench(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmark", *args]


def _progress(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "progress.json").read_text())
    except (OSError, ValueError):
        return {}


def _wait_until(condition, proc: subprocess.Popen, what: str, timeout: float = 180) -> bool:
    """Poll until ``condition()``; False when ``proc`` ended first; fails the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)
    return True


def _require(condition, proc: subprocess.Popen, what: str) -> None:
    if not _wait_until(condition, proc, what):
        out, err = proc.communicate()
        pytest.fail(f"the process ended (exit {proc.returncode}) before {what}:\n{out}\n{err}")


def _episodes_and_log(run_dir: Path) -> tuple[str, pd.DataFrame]:
    log = pd.read_csv(run_dir / "train_log.csv")
    return (run_dir / "episodes.csv").read_text(), log[["iteration", "loss", "accuracy"]]


def test_local_sweep_runs_in_parallel_skips_when_rerun_and_adds_a_changed_grids_runs(tmp_path, omniglot_dir, capsys):
    out = tmp_path / "sweep"
    sweep = ["sweep", "--learner", "fomaml", *TINY, "--iterations", "4", "--log-every", "2", "--val-every", "2",
             "--data-dir", str(omniglot_dir), "--out", str(out), "--workers", "2"]
    assert main([*sweep, "--seed", "0..1"]) == 0
    captured = capsys.readouterr()
    line = r"^\[\d/2\] fomaml 5w1s seed \d .*: \d+\.\d\d ± \d+\.\d\d % over 6 test episodes"
    assert len(re.findall(line, captured.out, re.M)) == 2
    assert f"table: bench table {out}" in captured.out and "2 worker(s)" in captured.err
    runs = sorted(p for p in out.iterdir() if (p / "summary.json").is_file())
    assert len(runs) == 2 and all((out / "logs" / f"{run.name}.log").is_file() for run in runs)
    record = json.loads((out / "sweep.json").read_text())
    assert sorted(record["runs"]) == [run.name for run in runs]
    assert all(entry["job"]["exit_code"] == 0 and entry["metabench_version"] for entry in record["runs"].values())
    summaries = {run.name: (run / "summary.json").read_text() for run in runs}

    assert main([*sweep, "--seed", "0..1"]) == 0  # the same sweep again: nothing runs
    captured = capsys.readouterr()
    assert "2 runs, 2 finished already, 0 new" in captured.err and "[1/" not in captured.out

    assert main([*sweep, "--seed", "0..2", "--table"]) == 0  # a changed grid adds its run, keeps the others
    captured = capsys.readouterr()
    assert "3 runs, 2 finished already, 1 new" in captured.err
    assert re.search(r"^\[1/1\] fomaml 5w1s seed 2 ", captured.out, re.M)
    assert "| fomaml " in captured.out and "(3 seeds)" in (out / "table.md").read_text()
    assert {run.name: (run / "summary.json").read_text() for run in runs} == summaries
    record = json.loads((out / "sweep.json").read_text())
    assert len(record["runs"]) == 3 and [len(s["new"]) for s in record["sweeps"]] == [2, 0, 1]

    assert main(["sweep", "--status", "--out", str(out)]) == 0
    assert "3 runs: 3 finished, 0 running, 0 queued, 0 stopped, 0 failed" in capsys.readouterr().out


def test_stops_of_a_sweep_and_its_run_then_resume_equal_an_unbroken_run(tmp_path, omniglot_dir, capsys, monkeypatch):
    """One run of a sweep: a SIGTERM to the sweep reaches it mid-training (it checkpoints, the sweep exits 143);
    meanwhile a second process on the run refuses, as the first holds its lock; the run's own command then
    stops at its --time-limit; the same sweep resumes it to the end. Its episodes and training log equal an
    uninterrupted run's."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the in-process sweep's runs use one thread, as the reference
    out = tmp_path / "sweep"
    settings = ["--iterations", "60", "--log-every", "5", "--val-every", "1000", "--checkpoint-every", "1000"]
    sweep = ["sweep", "--learner", "fomaml", *TINY, *settings, "--data-dir", str(omniglot_dir), "--out", str(out)]
    popen = lambda args: subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # noqa: E731
    reference = popen(_bench("run", "--learner", "fomaml", *TINY, *settings, "-q", "--data-dir", str(omniglot_dir),
                             "--out", str(tmp_path / "reference"), "--name", "run"))
    proc = popen(_bench(*sweep))
    run = lambda: next(iter(out.glob("fomaml-*")), out / "none")  # noqa: E731
    _require(lambda: _progress(run()).get("iteration", 0) >= 10, proc, "the run's 10th iteration")
    child = _progress(run())["pid"]
    os.kill(child, signal.SIGSTOP)  # mid-training, holding the run's lock
    command = shlex.split(json.loads((out / "sweep.json").read_text())["runs"][run().name]["command"])[1:]
    command += ["--device", "cpu"]
    second = subprocess.run(_bench(*command, "--wait-for-lock", "0"), env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 2 and "is in use by another bench process" in second.stderr, second.stderr
    assert second.stderr.count("\n") == 1
    proc.send_signal(signal.SIGTERM)  # the sweep forwards it (pending while the run is frozen)
    time.sleep(1.0)
    os.kill(child, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "the sweep was stopped by SIGTERM" in err and "run the same bench sweep again" in err
    progress = _progress(run())
    stopped_at = progress["iteration"]
    assert progress["phase"] == "stopped" and "SIGTERM" in progress["reason"] and 10 <= stopped_at < 60
    assert main(["sweep", "--status", "--out", str(out)]) == 0
    assert f"stopped by SIGTERM (exit 143) at iteration {stopped_at}/60; resumable" in capsys.readouterr().out

    limit_s = 15
    timed = popen(_bench(*command, "--time-limit", f"{limit_s}s"))
    # A loaded machine may reach the limit before that progress: the same stop, only earlier.
    if _wait_until(lambda: _progress(run()).get("iteration", 0) >= stopped_at + 5, timed, "progress after resuming"):
        timed.send_signal(signal.SIGSTOP)  # the limit passes while it is frozen: it stops at its next iteration
        time.sleep(limit_s + 0.5)
        timed.send_signal(signal.SIGCONT)
    _, err = timed.communicate(timeout=120)
    assert timed.returncode == 3 and "time limit reached at iteration" in err, err
    paused_at = _progress(run())["iteration"]
    assert stopped_at <= paused_at < 60

    assert main(sweep) == 0
    assert "1 runs, 0 finished already" in capsys.readouterr().err
    assert f"resumed from iteration {paused_at}" in (out / "logs" / f"{run().name}.log").read_text()
    assert reference.wait(timeout=300) == 0, reference.communicate()[1]
    episodes, log = _episodes_and_log(run())
    ref_episodes, ref_log = _episodes_and_log(tmp_path / "reference" / "run")
    assert episodes == ref_episodes
    pd.testing.assert_frame_equal(log, ref_log)
