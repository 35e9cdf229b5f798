"""`bench sweep` grids: option and sweep-file parsing, expansion into runs, --dry-run, and bad input (exit 2,
one line, nothing written). No training here; the registry loads the first-party learners."""

from __future__ import annotations

import json

import pytest

from benchmark.cli import main
from benchmark.errors import BenchError
from benchmark.harness.sweep.grid import (
    Grid, build_grid, load_sweep_file, parse_cells, parse_option_axes, parse_seeds, split_values,
)

SWEEP_FILE = """
learners = ["fomaml", "finetune"]
cells = ["5w1s", "20w1s"]
seeds = "0..1"

[settings]
iterations = 4
query = 2

[options]
eval_batch_size = 8

[learner.fomaml]
inner_lr = [0.4, 2.0]
first_order = true
"""


def test_seed_cell_and_option_parsing():
    assert parse_seeds(["0..2", "7"]) == (0, 1, 2, 7)
    assert parse_seeds(["0,3,5", "3"]) == (0, 3, 5)
    assert parse_cells(["5w1s", "20w1s,5w1s"]) == ((5, 1), (20, 1))
    assert split_values("0.4,2.0") == ["0.4", "2.0"]
    assert split_values("[32,64],[64,64]") == ["[32,64]", "[64,64]"]
    assert parse_option_axes(["inner_lr=0.4,2.0", "meta_batch_size=8"]) == {
        "inner_lr": ("0.4", "2.0"), "meta_batch_size": ("8",)}


def test_grid_expands_learners_cells_options_and_seeds_in_order():
    grid = Grid(learners=("maml", "protonet"), cells=((5, 1), (20, 1)), seeds=(0, 1, 2),
                options={"inner_lr": ("0.4", "2.0")})
    points = grid.points()
    assert len(points) == 2 * 2 * 2 * 3
    assert [p.label for p in points[:4]] == ["maml 5w1s seed 0 inner_lr=0.4", "maml 5w1s seed 1 inner_lr=0.4",
                                             "maml 5w1s seed 2 inner_lr=0.4", "maml 5w1s seed 0 inner_lr=2.0"]
    assert points[-1].label == "protonet 20w1s seed 2 inner_lr=2.0"


def test_sweep_file_and_command_line_merge(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP_FILE)
    parts = load_sweep_file(path)
    assert parts["learner_options"] == {"fomaml": {"inner_lr": ("0.4", "2.0"), "first_order": ("true",)}}
    grid = build_grid(parts)
    assert len(grid.points()) == 2 * 2 * 2 + 1 * 2 * 2  # fomaml: 2 lr values; finetune: 1
    # The command line wins: its seeds replace the file's, its -o and settings replace the same keys.
    grid = build_grid(parts, seeds=("5",), options=("eval_batch_size=16",), settings={"iterations": 9, "way": 3})
    assert grid.seeds == (5,) and grid.options == {"eval_batch_size": ("16",)}
    assert grid.settings == {"iterations": 9, "query": 2}


@pytest.mark.parametrize("text, message", [
    ("learners = [\"fomaml\"]\ncolour = 1\n", "unknown key(s) colour"),
    ("learners = [\"fomaml\"\n", "not valid TOML"),
    ("learners = [\"fomaml\"]\n[settings]\nway = 5\n", "sets way"),
    ("learners = [\"fomaml\"]\n[settings]\niterations = [1, 2]\n", "single value"),
    ("learners = [\"fomaml\"]\n[settings]\niterations = \"10\"\n", "must be an integer"),
    ("learners = [\"fomaml\"]\n[settings]\nepochs = 10\n", "unknown harness settings epochs"),
    ("learners = [\"fomaml\"]\nseeds = \"3..1\"\n", "range 3..1 is empty"),
    ("learners = [\"fomaml\"]\n[learner.maml]\ninner_lr = 0.1\n", "options for maml"),
    ("learners = [\"fomaml\"]\n[options]\ninner_lr = []\n", "empty list"),
])
def test_bad_sweep_files_are_one_line_errors(text, message, tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    with pytest.raises(BenchError) as info:
        build_grid(load_sweep_file(path))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("args, message", [
    (["--learner", "nope"], "unknown learner 'nope'"),
    (["--learner", "fomaml", "--cell", "5x1"], "not of the form <way>w<shot>s"),
    (["--learner", "fomaml", "--seed", "2..0"], "range 2..0 is empty"),
    (["--learner", "fomaml", "--seed", "a"], "write a seed"),
    (["--learner", "fomaml", "-o", "inner_lr"], "not of the form KEY=VALUE"),
    (["--learner", "fomaml", "-o", "inner_lr=0.4,,2"], "empty value"),
    (["--learner", "fomaml", "-o", "nope=1,2"], "unknown option 'nope'"),
    (["--learner", "fomaml", "-o", "inner_lr=0.4,-1"], "inner_lr=-1: option 'inner_lr' must be > 0"),
    (["--learner", "fomaml", "--cell", "5w5s", "--query", "16"], "shot + query must be at most 20"),
    (["--learner", "fomaml", "--cell", "2000w1s"], "exceeds the"),
    (["--learner", "fomaml", "--workers", "0"], "--workers must be at least 1"),
    (["--learner", "fomaml", "--executor", "slurm", "--time-limit", "9m"], "--time-limit is for the local"),
    (["--learner", "fomaml", "--executor", "slurm", "--time", "1m", "--signal-delay", "60"], "not shorter"),
    (["--learner", "fomaml", "--executor", "slurm", "--sbatch", "qos"], "--sbatch 'qos'"),
    (["--file", "missing.toml"], "cannot read the sweep file"),
    ([], "name the learners"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    code = main(["sweep", *args, "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_dry_run_prints_the_plan_and_commands_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["sweep", "--learner", "fomaml", "--learner", "finetune", "--cell", "5w1s", "--seed", "0..1",
            "-o", "eval_batch_size=8,16", "--iterations", "4", "--out", str(out), "--device", "cpu", "--dry-run"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "8 runs: 0 finished, 0 to resume, 0 running elsewhere, 8 new" in text
    assert text.count("bench run --learner") == 8 and "--name fomaml-5w1s-vinyals-seed1-" in text
    assert not out.exists()
    assert main([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    names = [run["name"] for run in plan["runs"]]
    assert len(set(names)) == 8 and all(run["state"] == "new" for run in plan["runs"])
    # The same names as `bench run` gives these runs: the config hash of the same plan.
    from benchmark.harness.plan import RunRequest, resolve_plans
    from benchmark.harness.plugins import load_registry

    (plan_0,) = resolve_plans(RunRequest("fomaml", settings={"way": 5, "shot": 1, "iterations": 4},
                                         overrides=("eval_batch_size=8",), out=out.absolute()), load_registry())
    assert plan_0.dirname == names[0]
    assert not out.exists()


def test_points_that_make_the_same_run_are_planned_once(tmp_path, capsys):
    assert main(["sweep", "--learner", "fomaml", "-o", "inner_lr=0.4,0.40", "--seed", "0,0", "--out",
                 str(tmp_path / "o"), "--device", "cpu", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "1 runs: 0 finished, 0 to resume, 0 running elsewhere, 1 new; 1 grid points repeat" in text


def test_status_of_a_folder_without_a_sweep_is_an_error(tmp_path, capsys):
    assert main(["sweep", "--status", "--out", str(tmp_path)]) == 2
    assert "holds no sweep" in capsys.readouterr().err


def test_local_workers_go_round_the_visible_gpus(monkeypatch):
    import torch

    from benchmark.harness.sweep.local import worker_devices

    assert worker_devices("cpu", None, 4) == ["cpu"] and worker_devices("cpu", 3, 1) == ["cpu"] * 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert worker_devices("auto", None, 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert worker_devices("cuda", 3, 2) == ["cuda:0", "cuda:1", "cuda:0"]
    assert worker_devices("cuda:1", None, 3) == ["cuda:1"] * 3
    with pytest.raises(BenchError, match="--per-device must be at least 1"):
        worker_devices("cuda", None, 0)
