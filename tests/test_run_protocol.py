"""Protocol choices a run records and a table shows (issue 10): training episodes that differ from the test
cell, model selection by validation (never by test episodes), and a stop by SIGTERM that resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from benchmark.cli import main

pytestmark = pytest.mark.realdata

TINY = ["--way", "5", "--shot", "1", "--query", "2", "--episodes", "6", "--val-episodes", "4", "--log-every", "1",
        "--device", "cpu", "-q"]
FOMAML = ["--learner", "fomaml", "-o", "meta_batch_size=2", "-o", "test_inner_steps=1", "-o", "meta_lr=0.01"]


def only(out: Path) -> Path:
    [path] = [p for p in out.iterdir() if p.is_dir()]
    return path


def test_training_episodes_differ_from_the_test_cell(tmp_path, omniglot_dir, capsys):
    out = tmp_path / "out"
    assert main(["run", *FOMAML, *TINY, "--iterations", "2", "--train-shot", "3", "--train-query", "4",
                 "--data-dir", str(omniglot_dir), "--out", str(out)]) == 0
    run = json.loads((only(out) / "config.json").read_text())["run"]
    assert (run["way"], run["shot"], run["query"]) == (5, 1, 2)
    assert (run["train_way"], run["train_shot"], run["train_query"]) == (5, 3, 4)
    capsys.readouterr()
    assert main(["table", str(out)]) == 0
    assert "training episodes 5w3s, 4 queries/class" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--train-way", "5000"], "way 5000 exceeds the 4112 classes of the train split"),
    (["--train-shot", "15", "--train-query", "10"], "shot + query must be at most 20"),
    (["--train-way", "1"], "way must be at least 2"),
    (["--learner", "maml", "--train-way", "10"], "trains and tests with the same way: drop --train-way"),
    (["--select", "best-val", "--ensemble", "0"], "--ensemble 0 needs to be 1, or more with --select best-val"),
    (["--ensemble", "3"], "--ensemble 3 needs to be 1, or more with --select best-val"),
])
def test_impossible_training_episodes_and_selections_are_one_line_errors(args, message, tmp_path, omniglot_dir,
                                                                         capsys):
    out = tmp_path / "out"
    learner = [] if "--learner" in args else ["--learner", "fomaml"]
    assert main(["run", *learner, *args, *TINY, "--iterations", "1", "--data-dir", str(omniglot_dir),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_best_validation_selection_tests_the_best_checkpoint(tmp_path, omniglot_dir, capsys):
    """The selected iteration is the first with the highest validation accuracy, and the test accuracies are
    exactly those of a run that stops there (select=last), so test episodes never influenced the choice."""
    out = tmp_path / "out"
    args = ["run", *FOMAML, *TINY, "--val-every", "1", "--checkpoint-every", "1", "--data-dir", str(omniglot_dir)]
    assert main([*args, "--iterations", "6", "--select", "best-val", "--out", str(out)]) == 0
    run_dir = only(out)
    log = pd.read_csv(run_dir / "train_log.csv")
    best = int(log.loc[log["val_accuracy"].idxmax(), "iteration"])  # idxmax: the first maximum
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["selected_iterations"] == [best] and summary["select"] == "best-val"
    assert summary["selected_val_accuracy"] == pytest.approx(log["val_accuracy"].max())
    assert main([*args, "--iterations", str(best), "--out", str(tmp_path / "last")]) == 0
    stopped = only(tmp_path / "last")
    assert (run_dir / "episodes.csv").read_text() == (stopped / "episodes.csv").read_text()
    capsys.readouterr()
    assert main(["table", str(out)]) == 0
    assert "weights tested best-val" in capsys.readouterr().out


def test_an_ensemble_of_the_best_checkpoints(tmp_path, omniglot_dir):
    out = tmp_path / "out"
    assert main(["run", *FOMAML, *TINY, "--iterations", "4", "--val-every", "1", "--select", "best-val",
                 "--ensemble", "3", "--data-dir", str(omniglot_dir), "--out", str(out)]) == 0
    summary = json.loads((only(out) / "summary.json").read_text())
    assert summary["ensemble"] == 3 and len(set(summary["selected_iterations"])) == 3
    assert summary["selected_val_accuracy"] == sorted(summary["selected_val_accuracy"], reverse=True)
    assert len(list(only(out).glob("best-*.pt"))) == 3


def _command(out: Path, data_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-c", "import sys; from benchmark.cli import main; sys.exit(main(sys.argv[1:]))",
            "run", *FOMAML, *TINY, "--data-dir", str(data_dir), "--out", str(out), *extra]


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGUSR2, 140)])
def test_sigterm_and_sigusr2_checkpoint_and_resume_to_the_same_result(signum, code, tmp_path, omniglot_dir):
    """What Slurm sends before a time limit or a preemption: stop at an iteration boundary, checkpoint, exit
    resumable; the resumed run ends with the per-episode results of an unbroken one (best-val included)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    extra = ["--iterations", "60", "--val-every", "10", "--checkpoint-every", "1000", "--select", "best-val"]
    reference = subprocess.run(_command(tmp_path / "ref", omniglot_dir, extra), env=env, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    command = _command(tmp_path / "stopped", omniglot_dir, extra)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "stopped").glob("*/config.json")):
        time.sleep(0.02)
    time.sleep(1.0)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == code and "Stopped:" in err and "run the same command again" in err, err
    resumed = subprocess.run(command, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0 and "resumed from iteration" in resumed.stdout, resumed.stderr
    ran, ref = only(tmp_path / "stopped"), only(tmp_path / "ref")
    assert (ran / "episodes.csv").read_text() == (ref / "episodes.csv").read_text()
    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (ran, ref))
    assert ours["selected_iterations"] == theirs["selected_iterations"]
    # Each session that trained the run says where it started and on what.
    assert [s["from_iteration"] for s in theirs["sessions"]] == [0]
    first, second = ours["sessions"]
    assert first["from_iteration"] == 0 and 0 < second["from_iteration"] < 60
    assert second["device"] == "cpu" and second["torch_version"] and "started" in second


def test_a_run_started_with_other_learner_code_is_not_resumed(tmp_path, omniglot_dir, capsys):
    """One result must come from one algorithm: resuming with changed learner code is refused, --force
    starts the run again."""
    args = ["run", *FOMAML, *TINY, "--iterations", "100000", "--data-dir", str(omniglot_dir), "--out", str(tmp_path)]
    assert main([*args, "--time-limit", "2s"]) == 3
    run = only(tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["plugin"]["code_sha256"] = "0" * 64  # as if the learner's code had changed since
    (run / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main([*args, "--time-limit", "2s"]) == 2
    err = capsys.readouterr().err
    assert "was started with other code of learner 'fomaml'" in err and "--force" in err
    assert main([*args, "--time-limit", "2s", "--force"]) == 3
    assert json.loads((run / "config.json").read_text())["plugin"]["code_sha256"] != "0" * 64


@pytest.mark.gpu
def test_a_cuda_run_stopped_by_sigterm_resumes_and_finishes(tmp_path, omniglot_dir):
    """The path of a paper cell across GPU sittings: a graphed MAML run on CUDA is stopped by SIGTERM (what a
    time limit or the sitting's backstop sends) once it has trained a while: it checkpoints (capturable Adam's
    step tensors, the CUDA sampler's generator), a new process resumes it (state loaded onto the device, the
    graph captured anew) and finishes. GPU kernels may round differently from run to run, so the result is
    compared with an unbroken run's within a tolerance, not bit for bit."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, "-c", "import sys; from benchmark.cli import main; sys.exit(main(sys.argv[1:]))", "run",
            "--learner", "maml", "-o", "meta_batch_size=4", "-o", "test_inner_steps=1", "--way", "5", "--shot", "1",
            "--query", "2", "--episodes", "50", "--val-episodes", "4", "--iterations", "3000", "--log-every", "50",
            "--val-every", "1000", "--checkpoint-every", "1000", "--device", "cuda", "-q", "--data-dir", str(omniglot_dir)]
    reference = subprocess.run([*base, "--out", str(tmp_path / "ref")], env=env, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    split = [*base, "--out", str(tmp_path / "split")]
    proc = subprocess.Popen(split, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # stop it once it has trained (past the capture)
        progress = list((tmp_path / "split").glob("*/progress.json"))
        try:
            if progress and json.loads(progress[0].read_text()).get("iteration", 0) >= 100:
                break
        except (OSError, ValueError):
            pass  # written atomically, but the directory may be in the middle of appearing
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 143 and "Stopped:" in err, err
    second = subprocess.run(split, env=env, capture_output=True, text=True)
    assert second.returncode == 0 and "resumed from iteration" in second.stdout, second.stderr
    ran, ref = only(tmp_path / "split"), only(tmp_path / "ref")
    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (ran, ref))
    assert len(ours["sessions"]) == 2 and ours["sessions"][1]["device"].startswith("cuda:")
    # Same episodes, same updates up to rounding: the first log rows agree closely; after thousands of steps
    # rounding differences may have grown, so the end is compared statistically (50 episodes: SE ~2 points).
    assert ours["n"] == theirs["n"] == 50 and abs(ours["accuracy_mean"] - theirs["accuracy_mean"]) < 0.06
    ours_log, ref_log = (pd.read_csv(d / "train_log.csv") for d in (ran, ref))
    assert list(ours_log["iteration"]) == list(ref_log["iteration"]) and ours_log["loss"].notna().all()
    early = ref_log["iteration"] <= 100
    assert ((ours_log["loss"] - ref_log["loss"]).abs()[early] <= 1e-3 * ref_log["loss"].abs()[early]).all()
    config = json.loads((ran / "config.json").read_text())
    assert config["tf32_convolutions"] is False and config["device"].startswith("cuda:")


def test_sessions_record_where_each_session_began():
    from benchmark.harness.runner import TrainState, _record_session

    train = TrainState()
    _record_session(train, {"device": "cuda:0"})
    train.iteration = 40
    _record_session(train, {"device": "cuda:0"})
    _record_session(train, {"device": "cuda:1"})  # the session before trained nothing: replaced
    assert [(s["from_iteration"], s["device"]) for s in train.sessions] == [(0, "cuda:0"), (40, "cuda:1")]
    old = TrainState(iteration=500)  # a checkpoint written before sessions were recorded
    _record_session(old, {"device": "cpu"})
    assert old.sessions[0] == {"from_iteration": 0, "note": "earlier sessions not recorded"}
    assert old.sessions[1]["from_iteration"] == 500
