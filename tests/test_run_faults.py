"""Faults and bad values around a run (issue 18): each is one line naming the file or value and the fix, exit
code 2 (or the documented stop code), and nothing half-written; what can keep working, does.

Data-layer faults (a damaged cache, bad zips, an unwritable cache) are in test_data_faults.py.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from benchmark.cli import main

pytestmark = pytest.mark.realdata

TINY = ["--way", "5", "--shot", "1", "--query", "2", "--episodes", "4", "--val-every", "2", "--val-episodes", "2",
        "--log-every", "1", "--checkpoint-every", "1", "--device", "cpu", "-q"]
FOMAML = ["--learner", "fomaml", "-o", "meta_batch_size=2", "-o", "test_inner_steps=1"]


def run(out: Path, data: Path, *extra: str, iterations: int = 2) -> int:
    return main(["run", *FOMAML, *TINY, "--iterations", str(iterations), "--data-dir", str(data), "--out", str(out),
                 *extra])


def only(out: Path) -> Path:
    [path] = [p for p in out.iterdir() if p.is_dir()]
    return path


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("Error: "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def unfinished(tmp_path, omniglot_dir, capsys) -> Path:
    """A run directory with a checkpoint but no results yet (as after a kill)."""
    assert run(tmp_path / "out", omniglot_dir, iterations=2) == 0
    path = only(tmp_path / "out")
    for name in ("summary.json", "episodes.csv", "steps.csv"):
        (path / name).unlink(missing_ok=True)
    capsys.readouterr()
    return path


# -- 3. a damaged resume state ---------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "other learner", "config.json"])
def test_a_damaged_resume_state_is_one_line_naming_the_file(damage, unfinished, tmp_path, omniglot_dir, capsys):
    checkpoint = unfinished / "checkpoint.pt"
    if damage == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    elif damage == "garbage":
        checkpoint.write_bytes(bytes(range(256)) * 40)
    elif damage == "empty":
        checkpoint.write_bytes(b"")
    elif damage == "other learner":
        assert main(["run", "--learner", "finetune", "-o", "batch_size=8", "-o", "head_epochs=1", *TINY,
                     "--iterations", "1", "--data-dir", str(omniglot_dir), "--out", str(tmp_path / "ft")]) == 0
        shutil.copy(only(tmp_path / "ft") / "checkpoint.pt", checkpoint)
        capsys.readouterr()
    else:
        (unfinished / "config.json").write_text('{"run": {"learner": ')
    assert run(tmp_path / "out", omniglot_dir, iterations=2) == 2
    name = "config.json" if damage == "config.json" else "checkpoint.pt"
    err = one_line_error(capsys, str(unfinished / name), "--force")
    assert "weights_only=False" not in err and not (unfinished / "summary.json").exists()
    assert run(tmp_path / "out", omniglot_dir, "--force", iterations=2) == 0  # and --force starts it again


# -- 4. a full disk ------------------------------------------------------------------------------------------------
def test_a_full_disk_at_a_checkpoint_is_one_line_and_resumable(tmp_path, omniglot_dir, capsys, monkeypatch):
    from benchmark.harness import atomic

    real = atomic.atomic_write_bytes

    def full(path, data):
        if path.name == "checkpoint.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(atomic, "atomic_write_bytes", full)
    from benchmark.harness import rundir

    monkeypatch.setattr(rundir, "atomic_write_bytes", full)
    assert run(tmp_path / "out", omniglot_dir, iterations=2) == 2
    one_line_error(capsys, "No space left on device", "checkpoint.pt", "free some space or choose another --out")
    path = only(tmp_path / "out")
    assert not list(path.glob(".*.tmp")) and not (path / "summary.json").exists()
    monkeypatch.undo()
    assert run(tmp_path / "out", omniglot_dir, iterations=2) == 0


# -- 5. numeric values ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("inner_lr=nan", "option 'inner_lr' must be a finite number, got nan"),
    ("inner_lr=inf", "option 'inner_lr' must be a finite number, got inf"),
    ("inner_lr=1e308", "option 'inner_lr' must be <= 100.0, got 1e+308"),
    ("inner_lr=-1", "option 'inner_lr' must be > 0, got -1.0"),
    ("meta_lr=inf", "option 'meta_lr' must be a finite number, got inf"),
    ("meta_lr=nan", "option 'meta_lr' must be a finite number, got nan"),
    ("inner_steps=1000000", "option 'inner_steps' must be <= 100, got 1000000"),
])
def test_bad_numbers_are_refused_before_anything_runs(override, message, tmp_path, omniglot_dir, capsys):
    assert run(tmp_path / "out", omniglot_dir, "-o", override) == 2
    one_line_error(capsys, message)
    assert not (tmp_path / "out").exists()


def test_a_batch_that_cannot_fit_is_refused_with_the_estimate(tmp_path, omniglot_dir, capsys):
    assert run(tmp_path / "out", omniglot_dir, "-o", "meta_batch_size=100000") == 2
    err = one_line_error(capsys, "this run would need about", "are available", "meta_batch_size")
    assert "GiB" in err and not (tmp_path / "out").exists()


DIVERGES = '''
import torch
from dataclasses import dataclass
from benchmark import hookimpl
from benchmark.config import option
from benchmark.learner import Episodes, Learner


class Diverges(Learner):
    """Its loss becomes NaN at the third step."""

    name = "diverges"

    @dataclass(frozen=True)
    class Config:
        lr: float = option(0.1, "learning rate")

    def __init__(self, config, context):
        super().__init__(config, context)
        self.step = torch.zeros(())

    def training(self):
        return [Episodes(tasks=1)]

    def meta_train_step(self, batch):
        self.step += 1
        return {"loss": torch.where(self.step >= 3, torch.tensor(float("nan")), self.step)}

    def predict(self, support_x, support_y, query_x):
        return torch.zeros(*query_x.shape[:2], self.context.way)

    def state_dict(self):
        return {"step": self.step.clone()}

    def load_state_dict(self, state):
        self.step = state["step"].clone()


@hookimpl
def bench_register_learners(register):
    register(Diverges)
'''


def test_a_loss_that_becomes_non_finite_stops_the_run_saying_when(tmp_path, omniglot_dir, capsys):
    plugin = tmp_path / "diverges.py"
    plugin.write_text(DIVERGES)
    code = main(["run", "--learner", "diverges", "--plugin", str(plugin), *TINY, "--iterations", "10",
                 "--data-dir", str(omniglot_dir), "--out", str(tmp_path / "out")])
    assert code == 2
    one_line_error(capsys, "the training loss became nan between iterations 3 and 3", "smaller learning rate")
    assert not (only(tmp_path / "out") / "summary.json").exists()


# -- 6. stale temporaries ------------------------------------------------------------------------------------------
def test_stale_temporaries_are_removed_on_resume(unfinished, tmp_path, omniglot_dir):
    stale = unfinished / ".checkpoint.pt.k3j2h1.tmp"
    stale.write_bytes(b"x" * 1000)
    assert run(tmp_path / "out", omniglot_dir, iterations=2) == 0
    assert not stale.exists() and (unfinished / "summary.json").exists()


# -- 7. bench table on wrong value types -----------------------------------------------------------------------------
@pytest.mark.parametrize("damage, named", [
    (("summary.json", "n", "abc"), "summary.json"),
    (("summary.json", "n", None), "summary.json"),
    (("config.json", "way", "five"), "config.json"),
    ("episodes", "episodes.csv"),
])
def test_bench_table_skips_a_run_with_wrong_value_types(damage, named, tmp_path, omniglot_dir, capsys):
    out = tmp_path / "out"
    assert run(out, omniglot_dir, iterations=1) == 0
    assert run(out, omniglot_dir, "-o", "inner_lr=0.2", iterations=1) == 0
    bad = sorted(p for p in out.iterdir() if p.is_dir())[0]
    if damage == "episodes":
        (bad / "episodes.csv").write_text("episode,accuracy\n0,0.5\n1,abc\n")
    else:
        file, key, value = damage
        record = json.loads((bad / file).read_text())
        (record["run"] if file == "config.json" else record)[key] = value
        (bad / file).write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["table", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"skipping {bad}" in captured.err and named in captured.err
    assert captured.out.startswith("Table:")


# -- 8. smaller ones ---------------------------------------------------------------------------------------------------
def test_one_episode_writes_strict_json_and_the_table_says_n_a(tmp_path, omniglot_dir, capsys):
    out = tmp_path / "out"
    assert main(["run", *FOMAML, *[a if a != "4" else "1" for a in TINY], "--iterations", "1",
                 "--data-dir", str(omniglot_dir), "--out", str(out)]) == 0
    text = (only(out) / "summary.json").read_text()
    assert "NaN" not in text and json.loads(text)["ci95"] is None
    assert "± n/a %" in capsys.readouterr().out
    assert main(["table", str(out)]) == 0
    assert "± n/a" in capsys.readouterr().out


def test_a_run_directory_name_taken_by_a_file(tmp_path, omniglot_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine").write_text("not a folder")
    assert run(out, omniglot_dir, "--name", "mine") == 2
    one_line_error(capsys, str(out / "mine"), "exists and is not a folder")


def test_time_limit_stops_cleanly_and_the_run_resumes_to_the_same_result(tmp_path, omniglot_dir, capsys):
    assert run(tmp_path / "ref", omniglot_dir, iterations=8) == 0
    out = tmp_path / "out"
    code = run(out, omniglot_dir, "--time-limit", "0.001s", iterations=8)
    err = capsys.readouterr().err
    assert code == 3 and "Stopped: time limit reached at iteration" in err and "run the same command again" in err
    assert (only(out) / "checkpoint.pt").exists() and not (only(out) / "summary.json").exists()
    assert run(out, omniglot_dir, iterations=8) == 0
    assert (only(out) / "episodes.csv").read_text() == (only(tmp_path / "ref") / "episodes.csv").read_text()


LONG_STEPS = DIVERGES.replace("torch.where(self.step >= 3, torch.tensor(float(\"nan\")), self.step)", "self.step")


def test_a_long_cpu_run_says_how_long_it_will_take(tmp_path, omniglot_dir, capsys):
    plugin = tmp_path / "long.py"
    plugin.write_text(LONG_STEPS.replace('"diverges"', '"slowpoke"').replace("import torch\n", "import time\nimport torch\n")
                      .replace("        self.step += 1\n", "        self.step += 1\n        time.sleep(0.01)\n"))
    args = [a for a in TINY if a != "-q"]
    code = main(["run", "--learner", "slowpoke", "--plugin", str(plugin), *args, "--iterations", "1000000",
                 "--time-limit", "3s", "--data-dir", str(omniglot_dir), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 3
    assert "on this CPU the remaining" in err and "hours" in err and "--iterations" in err and "GPU" in err
