"""`bench run` end to end on the real data at tiny scale: files, resume, skip, refusal, bad input."""

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

TINY = ["--way", "5", "--shot", "1", "--query", "2", "--iterations", "4", "--episodes", "6", "--val-every", "2",
        "--val-episodes", "3", "--log-every", "2", "--checkpoint-every", "2", "--device", "cpu", "-q"]
TINY_CONFIG = {
    "maml": ["-o", "meta_batch_size=2", "-o", "test_inner_steps=2"],
    "fomaml": ["-o", "meta_batch_size=2", "-o", "test_inner_steps=2"],
    "finetune": ["-o", "batch_size=16", "-o", "head_epochs=2"],
}


def bench_run(out: Path, data_dir: Path, learner: str, *extra: str) -> int:
    return main(["run", "--learner", learner, *TINY, *TINY_CONFIG.get(learner, []), "--data-dir", str(data_dir),
                 "--out", str(out), *extra])


def only_run_dir(out: Path) -> Path:
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.parametrize("learner", ["maml", "fomaml", "finetune"])
def test_each_first_party_learner_runs_end_to_end(learner, tmp_path, omniglot_dir, capsys):
    assert bench_run(tmp_path, omniglot_dir, learner) == 0
    run = only_run_dir(tmp_path)
    assert run.name.startswith(f"{learner}-5w1s-vinyals-seed0-")
    by_step = {"steps.csv"} if learner in ("maml", "fomaml") else set()  # learners that adapt by steps
    assert {p.name for p in run.iterdir()} == {
        "config.json", "train_log.csv", "episodes.csv", "summary.json", "checkpoint.pt", "manifest.json", "progress.json",
        ".lock"} | by_step
    progress = json.loads((run / "progress.json").read_text())
    assert progress["phase"] == "done" and progress["iteration"] == progress["total"] == 4
    config = json.loads((run / "config.json").read_text())
    for key in ("run", "describe", "implementation", "plugin", "protocol", "manifest_hash", "torch_version",
                "device_name", "metabench_version", "git_commit", "command"):
        assert key in config
    assert config["run"]["learner"] == learner and config["run"]["learner_config"]
    assert config["plugin"]["distribution"] == "metabench" and len(config["plugin"]["code_sha256"]) == 64
    assert config["protocol"]["name"] == "vinyals" and config["protocol"]["rotations"] == [0, 90, 180, 270]
    episodes = pd.read_csv(run / "episodes.csv")
    assert list(episodes.columns) == ["episode", "accuracy"] and episodes["episode"].tolist() == list(range(6))
    assert episodes["accuracy"].between(0, 1).all()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["n"] == 6
    assert summary["accuracy_mean"] == pytest.approx(episodes["accuracy"].mean(), abs=1e-6)
    assert summary["manifest_hash"] == config["manifest_hash"]
    log = pd.read_csv(run / "train_log.csv")
    assert log["iteration"].tolist() == [2, 4] and log["val_accuracy"].notna().all()
    assert "over 6 test episodes" in capsys.readouterr().out


def test_table_from_two_learners_pairs_identical_episodes(tmp_path, omniglot_dir, capsys):
    assert bench_run(tmp_path, omniglot_dir, "maml") == 0
    assert bench_run(tmp_path, omniglot_dir, "fomaml") == 0
    capsys.readouterr()
    assert main(["table", str(tmp_path), "--format", "csv", "--reference", "maml"]) == 0
    table = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    acc = {p.name.split("-")[0]: pd.read_csv(p / "episodes.csv")["accuracy"] for p in tmp_path.iterdir()}
    diff = 100 * (acc["fomaml"] - acc["maml"])
    row = table[table["learner"].str.startswith("fomaml")].iloc[0]
    assert row["mean"] == pytest.approx(100 * acc["fomaml"].mean(), abs=1e-4)
    assert row["diff"] == pytest.approx(diff.mean(), abs=1e-4)
    assert row["diff_ci"] == pytest.approx(1.96 * diff.std(ddof=1) / len(diff) ** 0.5, abs=1e-4)
    assert main(["table", str(tmp_path), "--format", "markdown"]) == 0
    assert "95% confidence interval" in capsys.readouterr().out


def test_finished_run_is_skipped_unless_forced(tmp_path, omniglot_dir, capsys):
    assert bench_run(tmp_path, omniglot_dir, "fomaml") == 0
    before = (only_run_dir(tmp_path) / "summary.json").read_text()
    capsys.readouterr()
    assert bench_run(tmp_path, omniglot_dir, "fomaml") == 0
    assert "already finished" in capsys.readouterr().out
    summary = only_run_dir(tmp_path) / "summary.json"
    summary.write_text(before.replace('"complete"', '"complete" '))  # mark the file: --force must rewrite it
    assert bench_run(tmp_path, omniglot_dir, "fomaml", "--force") == 0
    assert "done" in capsys.readouterr().out
    after = json.loads(summary.read_text())
    assert summary.read_text() != before.replace('"complete"', '"complete" ')  # rewritten
    assert after["accuracy_mean"] == json.loads(before)["accuracy_mean"]  # and the same result again


def test_same_directory_with_another_config_is_refused(tmp_path, omniglot_dir, capsys):
    assert bench_run(tmp_path, omniglot_dir, "fomaml", "--name", "mine") == 0
    capsys.readouterr()
    assert bench_run(tmp_path, omniglot_dir, "fomaml", "--name", "mine", "-o", "inner_lr=0.1") == 2
    err = capsys.readouterr().err
    assert "different config" in err and "learner_config" in err and "--force" in err


def _command(out: Path, data_dir: Path, iterations: int) -> list[str]:
    args = [a if a != "4" else str(iterations) for a in TINY]
    return [sys.executable, "-c", "import sys; from benchmark.cli import main; sys.exit(main(sys.argv[1:]))",
            "run", "--learner", "fomaml", *args, *TINY_CONFIG["fomaml"], "--data-dir", str(data_dir),
            "--out", str(out)]


def test_resume_after_kill_gives_the_same_episodes(tmp_path, omniglot_dir):
    """kill -9 after the first checkpoint, run again: the results equal an uninterrupted run's."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference = subprocess.run(_command(tmp_path / "ref", omniglot_dir, 12), env=env, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr

    proc = subprocess.Popen(_command(tmp_path / "killed", omniglot_dir, 12), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "killed").glob("*/checkpoint.pt")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = only_run_dir(tmp_path / "killed")
    assert not (run / "summary.json").exists() and not (run / "episodes.csv").exists()

    resumed = subprocess.run(_command(tmp_path / "killed", omniglot_dir, 12), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from iteration" in resumed.stdout
    ref_run = only_run_dir(tmp_path / "ref")
    assert (run / "episodes.csv").read_text() == (ref_run / "episodes.csv").read_text()
    ref_log = pd.read_csv(ref_run / "train_log.csv").drop(columns="seconds_per_iteration")
    log = pd.read_csv(run / "train_log.csv").drop(columns="seconds_per_iteration")
    pd.testing.assert_frame_equal(log, ref_log)


def test_ctrl_c_checkpoints_and_says_how_to_resume(tmp_path, omniglot_dir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_command(tmp_path, omniglot_dir, 10_000), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("*/checkpoint.pt")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "interrupted (Ctrl-C) at iteration" in err and "run the same command again" in err
    assert not list(tmp_path.glob("*/summary.json"))


def test_ctrl_c_mid_window_then_resume_equals_an_unbroken_run(tmp_path, omniglot_dir):
    """Ctrl-C between log rows: the checkpoint keeps the partial metric window, so the log and the
    episodes of the resumed run equal an uninterrupted run's."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    extra = ["--log-every", "7", "--checkpoint-every", "1000", "--val-every", "1000"]
    command = _command(tmp_path / "stopped", omniglot_dir, 200) + extra
    reference = subprocess.run(_command(tmp_path / "ref", omniglot_dir, 200) + extra, env=env,
                               capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "stopped").glob("*/config.json")):
        time.sleep(0.01)
    time.sleep(1.0)  # into training, well before its end (no checkpoint before iteration 200)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the interrupt arrived")
    assert proc.returncode == 130, err
    resumed = subprocess.run(command, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0 and "resumed from iteration" in resumed.stdout, resumed.stderr
    run, ref_run = only_run_dir(tmp_path / "stopped"), only_run_dir(tmp_path / "ref")
    assert (run / "episodes.csv").read_text() == (ref_run / "episodes.csv").read_text()
    columns = ["iteration", "loss", "accuracy", "val_accuracy"]
    pd.testing.assert_frame_equal(pd.read_csv(run / "train_log.csv")[columns],
                                  pd.read_csv(ref_run / "train_log.csv")[columns])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--learner", "nope"], "unknown learner 'nope'"),
        (["--learner", "fomaml", "--way", "1"], "way must be at least 2"),
        (["--learner", "fomaml", "--shot", "0"], "shot must be at least 1"),
        (["--learner", "fomaml", "--query", "0"], "query must be at least 1"),
        (["--learner", "fomaml", "--shot", "5", "--query", "16"], "shot + query must be at most 20"),
        (["--learner", "fomaml", "--way", "2000"], "exceeds the"),
        (["--learner", "fomaml", "-o", "nope=1"], "nope"),
        (["--learner", "fomaml", "--protocol", "omni"], "unknown protocol"),
        (["--learner", "fomaml", "--episodes", "0"], "at least 1"),
        (["--learner", "fomaml", "-o", "meta_batch_size=0"], "option 'meta_batch_size' must be >= 1, got 0"),
        (["--learner", "fomaml", "--name", ".."], "must be one folder name"),
        (["--learner", "fomaml", "--device", "meta"], "unsupported device"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, message, tmp_path, omniglot_dir, capsys):
    out = tmp_path / "out"
    code = main(["run", *args, "--data-dir", str(omniglot_dir), "--out", str(out), "--iterations", "1", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists()


def test_missing_data_says_how_to_get_it(tmp_path, isolated_cache, capsys):
    out = tmp_path / "out"
    assert main(["run", "--learner", "fomaml", "--data-dir", str(tmp_path / "none"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "BENCH_DATA_DIR" in err and not out.exists()


def test_a_cuda_device_is_named_with_its_index_and_computes_in_exact_float32(monkeypatch):
    """One GPU is recorded under one name whether asked for as auto, cuda or cuda:0; TF32 (PyTorch's default
    for cuDNN convolutions) is turned off."""
    import torch

    from benchmark.harness.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32  # properties: no monkeypatch
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert [str(resolve_device(n)) for n in ("auto", "cuda", "cuda:0")] == ["cuda:1", "cuda:1", "cuda:0"]
        assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert str(resolve_device("cpu")) == "cpu"


def test_absent_cuda_and_unwritable_out(tmp_path, omniglot_dir, capsys):
    import torch

    if not torch.cuda.is_available():
        assert main(["run", "--learner", "fomaml", "--device", "cuda", "--out", str(tmp_path / "o"),
                     "--data-dir", str(omniglot_dir)]) == 2
        assert "--device cpu" in capsys.readouterr().err and not (tmp_path / "o").exists()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["run", "--learner", "fomaml", *TINY, "--out", str(blocker / "sub"),
                 "--data-dir", str(omniglot_dir)]) == 2
    assert "cannot write results" in capsys.readouterr().err


def test_a_copy_without_git_records_the_commit_it_is_given(monkeypatch):
    """On a machine that gets the checkout without its .git (a GPU sitting), BENCH_GIT_COMMIT names the
    commit; where git answers, git's answer wins."""
    import subprocess

    from benchmark.harness import provenance

    assert provenance.git_commit() not in (None, "given")  # this checkout: git answers
    monkeypatch.setenv("BENCH_GIT_COMMIT", "given")
    assert provenance.git_commit() != "given"

    def no_git(*args, **kwargs):
        raise OSError("git: not found")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert provenance.git_commit() == "given"
    monkeypatch.delenv("BENCH_GIT_COMMIT")
    assert provenance.git_commit() is None
