"""benchmark.reporting.tables and `bench table`: synthetic run directories, numbers checked by hand with numpy."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from benchmark.cli import main
from benchmark.errors import BenchError
from benchmark.reporting.stats import SeedRun, seeds_difference, seeds_mean_ci
from benchmark.reporting.tables import build_table, csv_frame, latex_escape, load_runs, make_table, render_latex


def write_run(
    root: Path,
    name: str,
    accuracy: np.ndarray,
    learner: str = "maml",
    way: int = 5,
    shot: int = 1,
    seed: int = 0,
    manifest: str = "manifest-a",
    status: str = "complete",
    learner_config: dict[str, Any] | None = None,
    describe: dict[str, Any] | None = None,
    **config_overrides: Any,
) -> Path:
    """Write config.json, episodes.csv and summary.json in the format `bench run` writes."""
    run = root / name
    run.mkdir(parents=True)
    default_describe = {"order": "second", "inner steps (train/test)": "1/10", "batch norm": "transductive"}
    settings = {"way": way, "shot": shot, "query": 15, "train_way": way, "train_shot": shot, "train_query": 15,
                "iterations": 60000, "episodes": len(accuracy), "episode_seed": 0, "protocol": "vinyals",
                "select": "last", "val_every": 500, "val_episodes": 100, "seed": seed, "preset": None,
                "reduced": False, "learner": learner,
                "learner_config": {"inner_lr": 0.4} if learner_config is None else learner_config}
    extra_run = {k: config_overrides.pop(k) for k in list(config_overrides) if k in settings}
    config = {
        "run": {**settings, **extra_run},
        "metabench_version": "0.1.0",
        "describe": default_describe if describe is None else describe,
        "protocol": {"name": "vinyals", "split_hash": "0123456789abcdef", "rotations": [0, 90, 180, 270]},
        "plugin": {"plugin": learner, "distribution": "metabench", "version": "0.1.0", "code_sha256": "c0de"},
        "manifest_hash": manifest,
        "device": "cpu",
        "device_name": "test",
        "torch_version": "2.2",
        "cuda_version": None,
        "git_commit": None,
        "python_version": "3.11",
        **config_overrides,
    }
    (run / "config.json").write_text(json.dumps(config))
    pd.DataFrame({"episode": np.arange(len(accuracy)), "accuracy": accuracy}).to_csv(run / "episodes.csv", index=False)
    summary = {
        "accuracy_mean": float(np.mean(accuracy)),
        "ci95": 0.0,
        "std": 0.0,
        "n": len(accuracy),
        "wall_time_s": 1.0,
        "ms_per_iteration": 1.0,
        "peak_memory_mb": 1.0,
        "manifest_hash": manifest,
        "status": status,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def accuracies(seed: int, n: int = 600, p: float = 0.9) -> np.ndarray:
    # Multiples of 1/75 below 0.95, so that adding 0.05 stays in [0, 1].
    return np.minimum(np.random.default_rng(seed).binomial(75, p, size=n), 71) / 75


def by_hand(acc: np.ndarray) -> tuple[float, float]:
    """Mean and 95% half-width in percent: 1.96 s / sqrt(n), s with ddof=1."""
    return 100 * acc.mean(), 100 * 1.96 * acc.std(ddof=1) / math.sqrt(len(acc))


def table_rows(table) -> dict[str, dict[str, str]]:
    from benchmark.reporting.tables import display_frame

    return display_frame(table).set_index("learner").to_dict(orient="index")


def test_cells_are_mean_and_ci_in_percent(tmp_path: Path) -> None:
    a, b = accuracies(0), accuracies(1, p=0.8)
    write_run(tmp_path, "maml-5w1s", a)
    write_run(tmp_path / "nested" / "deeper", "finetune-20w1s", b, learner="finetune", way=20, describe={})
    runs = load_runs([tmp_path])
    assert len(runs) == 2 and set(runs["learner"]) == {"maml", "finetune"}
    table = build_table(runs)
    rows = table_rows(table)
    mean, ci = by_hand(a)
    assert rows["maml"]["5-way 1-shot"] == f"{mean:.2f} ± {ci:.2f}"
    mean, ci = by_hand(b)
    assert rows["finetune"]["20-way 1-shot"] == f"{mean:.2f} ± {ci:.2f}"
    assert rows["finetune"]["5-way 1-shot"] == "—"
    # Learners with different describe() facts get per-row protocol columns; shared facts go to the caption.
    assert rows["maml"]["order"] == "second" and rows["finetune"]["order"] == "—"
    assert rows["maml"]["inner steps (train/test)"] == "1/10"
    assert rows["maml"]["batch norm"] == "transductive"
    assert "600 test episodes" in table.caption and "vinyals (01234567)" in table.caption
    assert "rotations 0/90/180/270" in table.caption and "queries/class 15" in table.caption
    # CSV keeps full precision (percent).
    frame = csv_frame(table).set_index("row")
    assert frame.loc["maml", "mean"] == pytest.approx(100 * a.mean())
    assert frame.loc["maml", "ci"] == pytest.approx(by_hand(a)[1])


def test_paired_difference_of_a_constant_shift(tmp_path: Path) -> None:
    b = accuracies(2)
    write_run(tmp_path, "ref", b, learner="maml")
    write_run(tmp_path, "better", b + 0.05, learner="fomaml")
    table = build_table(load_runs([tmp_path]), reference="maml")
    rows = table_rows(table)
    assert table.rows[0] == "maml"  # the reference leads
    assert rows["fomaml"]["5-way 1-shot Δ"] == "+5.00 ± 0.00"
    assert rows["maml"]["5-way 1-shot Δ"] == "ref"
    frame = csv_frame(table).set_index("row")
    assert frame.loc["fomaml", "diff"] == pytest.approx(5.0)
    assert frame.loc["fomaml", "diff_ci"] == pytest.approx(0.0, abs=1e-9)
    assert bool(frame.loc["fomaml", "paired"]) is True


def test_paired_difference_ci_by_hand(tmp_path: Path) -> None:
    a, b = accuracies(3), accuracies(4)
    write_run(tmp_path, "a", a, learner="a")
    write_run(tmp_path, "b", b, learner="b")
    table = build_table(load_runs([tmp_path]), reference="b")
    mean, ci = by_hand(a - b)
    sign = "+" if mean >= 0 else "-"
    assert table_rows(table)["a"]["5-way 1-shot Δ"] == f"{sign}{abs(mean):.2f} ± {ci:.2f}"


def test_a_difference_that_rounds_to_zero_is_shown_without_a_minus(tmp_path: Path) -> None:
    b = accuracies(2)
    a = b.copy()
    a[0] -= 1e-12  # a rounding-level difference, like that of two runs of the same learner
    write_run(tmp_path, "ref", b, learner="maml")
    write_run(tmp_path, "same", a, learner="fomaml")
    table = build_table(load_runs([tmp_path]), reference="maml")
    assert csv_frame(table).set_index("row").loc["fomaml", "diff"] < 0
    assert table_rows(table)["fomaml"]["5-way 1-shot Δ"] == "+0.00 ± 0.00"


def test_runs_on_different_manifests_are_never_paired(tmp_path: Path) -> None:
    b = accuracies(5)
    write_run(tmp_path, "ref", b, learner="maml", manifest="manifest-a")
    write_run(tmp_path, "other", b + 0.05, learner="fomaml", manifest="manifest-b")
    table = build_table(load_runs([tmp_path]), reference="maml")
    assert table_rows(table)["fomaml"]["5-way 1-shot Δ"] == "n/p"
    assert any("different test episodes" in note for note in table.footnotes)
    frame = csv_frame(table).set_index("row")
    assert bool(frame.loc["fomaml", "paired"]) is False and pd.isna(frame.loc["fomaml", "diff"])
    assert "n/p" in make_table([tmp_path], reference="maml")


def test_several_seeds_combine_and_duplicates_count_once(tmp_path: Path) -> None:
    seeds = [accuracies(10, p=0.85), accuracies(11, p=0.9), accuracies(12, p=0.93)]
    for seed, acc in enumerate(seeds):
        write_run(tmp_path, f"maml-seed{seed}", acc, seed=seed)
    # An identical copy of seed 0 (e.g. a copied directory) must not count as a fourth seed.
    shutil.copytree(tmp_path / "maml-seed0", tmp_path / "copy" / "maml-seed0")
    notes: list[str] = []
    runs = load_runs([tmp_path], warn=notes.append)
    table = build_table(runs, warn=notes.append)
    cell = table.cells[("maml", (5, 1))]
    assert cell.seeds == 3
    assert cell.result.mean == pytest.approx(np.mean([s.mean() for s in seeds]))
    expected = seeds_mean_ci([SeedRun("manifest-a", acc) for acc in seeds])
    assert table_rows(table)["maml"]["5-way 1-shot"] == f"{100 * expected.mean:.2f} ± {100 * expected.ci:.2f} (3 seeds)"
    assert "two-way ANOVA of seeds × episodes" in table.caption
    assert "covers both training randomness and the sampling of test episodes" in table.caption
    assert any("counted once" in n for n in notes)
    assert make_table([tmp_path]) == make_table([tmp_path])


def test_footnotes_say_what_a_delta_covers(tmp_path: Path) -> None:
    write_run(tmp_path, "ref", accuracies(100), learner="maml")
    write_run(tmp_path, "one", accuracies(101), learner="fomaml")
    single = build_table(load_runs([tmp_path]), reference="maml")
    assert any("one training seed per learner" in n and "not training randomness" in n for n in single.footnotes)
    assert not any("a side has several seeds" in n for n in single.footnotes)
    for seed in (1, 2):
        write_run(tmp_path, f"ref{seed}", accuracies(110 + seed), learner="maml", seed=seed)
        write_run(tmp_path, f"one{seed}", accuracies(120 + seed), learner="fomaml", seed=seed)
    several = build_table(load_runs([tmp_path]), reference="maml")
    assert not any("one training seed per learner" in n for n in several.footnotes)
    assert any("a side has several seeds" in n for n in several.footnotes)
    cell = several.cells[("fomaml", (5, 1))]
    expected = seeds_difference(cell.runs, several.cells[("maml", (5, 1))].runs)
    assert (cell.diff.mean, cell.diff.ci) == (expected.mean, expected.ci)


def test_perfect_accuracy_shows_an_interval_not_zero_width(tmp_path: Path) -> None:
    write_run(tmp_path, "perfect", np.ones(600), learner="maml")
    write_run(tmp_path, "usual", accuracies(130), learner="fomaml")
    table = build_table(load_runs([tmp_path]))
    rows = table_rows(table)
    # 600 episodes x 5-way x 15 queries = 45000 correct queries: Wilson's lower end is 45000 / (45000 + 1.96^2).
    assert rows["maml"]["5-way 1-shot"] == "100.00 [99.99, 100.00]"
    assert rows["fomaml"]["5-way 1-shot"].count("±") == 1
    assert any(n.startswith("[low, high]") and "Wilson" in n for n in table.footnotes)
    frame = csv_frame(table).set_index("row")
    assert frame.loc["maml", "ci_low"] == pytest.approx(100 * 45_000 / (45_000 + 1.96**2))
    assert frame.loc["maml", "ci_high"] == 100.0
    assert frame.loc["fomaml", "ci_high"] == pytest.approx(frame.loc["fomaml", "mean"] + frame.loc["fomaml", "ci"])
    assert not any(n.startswith("[low, high]") for n in build_table(load_runs([tmp_path / "usual"])).footnotes)


def test_disagreeing_copies_of_one_seed_are_an_error(tmp_path: Path) -> None:
    write_run(tmp_path, "one", accuracies(20), seed=0)
    write_run(tmp_path, "two", accuracies(21), seed=0)
    with pytest.raises(BenchError, match="seed 0 disagree: "):
        build_table(load_runs([tmp_path]))


def test_gpu_repeats_of_one_seed_count_once_and_other_devices_are_named(tmp_path: Path) -> None:
    """GPU kernels may round differently from run to run: two GPU runs of one seed on the same test episodes
    are one result (the first kept, with a note); a CPU and a GPU run of one seed trained on different
    episode streams, and the error says so."""
    base = accuracies(20)
    nudged = base.copy()
    nudged[0] = nudged[0] - 1 / 75
    write_run(tmp_path / "gpu", "one", base, seed=0, device="cuda:0")
    write_run(tmp_path / "gpu", "two", nudged, seed=0, device="cuda:1")
    notes: list[str] = []
    table = build_table(load_runs([tmp_path / "gpu"]), warn=notes.append)
    assert table.cells[("maml", (5, 1))].seeds == 1 and any("on a GPU" in n for n in notes)
    write_run(tmp_path / "mixed", "one", base, seed=0, device="cpu")
    write_run(tmp_path / "mixed", "two", nudged, seed=0, device="cuda:0")
    with pytest.raises(BenchError, match="seed 0 disagree .they ran on cpu and cuda"):
        build_table(load_runs([tmp_path / "mixed"]))
    # A GPU rerun with other learner code (a fix) is another result, not a repeat.
    write_run(tmp_path / "fixed", "one", base, seed=0, device="cuda:0")
    write_run(tmp_path / "fixed", "two", nudged, seed=0, device="cuda:0",
              plugin={"plugin": "maml", "distribution": "metabench", "version": "0.1.0", "code_sha256": "f1x"})
    with pytest.raises(BenchError, match="GPU runs with different code_sha256"):
        build_table(load_runs([tmp_path / "fixed"]))


def test_config_variants_are_separate_rows(tmp_path: Path) -> None:
    write_run(tmp_path, "lr-small", accuracies(30), learner_config={"inner_lr": 0.1, "meta_batch": 32})
    write_run(tmp_path, "lr-big", accuracies(31), learner_config={"inner_lr": 0.4, "meta_batch": 32})
    # A different config in another cell only (e.g. the paper's 20-way default) does not split rows by itself.
    write_run(tmp_path, "20w", accuracies(32), way=20, learner_config={"inner_lr": 0.4, "meta_batch": 16})
    table = build_table(load_runs([tmp_path]))
    assert table.rows == ["maml (inner_lr=0.1)", "maml (inner_lr=0.4)"]
    assert ("maml (inner_lr=0.4)", (20, 5)) not in table.cells
    assert ("maml (inner_lr=0.4)", (20, 1)) in table.cells
    with pytest.raises(BenchError, match="matches several rows"):
        build_table(load_runs([tmp_path]), reference="maml")
    assert build_table(load_runs([tmp_path]), reference="maml (inner_lr=0.1)").rows[0] == "maml (inner_lr=0.1)"


def test_incomplete_runs_are_skipped_with_a_note(tmp_path: Path) -> None:
    write_run(tmp_path, "done", accuracies(40))
    write_run(tmp_path, "crashed", accuracies(41), learner="fomaml", status="running")
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "config.json").write_text("{}")
    notes: list[str] = []
    runs = load_runs([tmp_path], warn=notes.append)
    assert list(runs["learner"]) == ["maml"]
    assert len(notes) == 2 and any("'running'" in n for n in notes) and any("episodes.csv" in n for n in notes)


def test_corrupt_runs_are_skipped_with_a_note_naming_the_file(tmp_path: Path) -> None:
    run = write_run(tmp_path, "bad", accuracies(42))
    (run / "episodes.csv").write_text("episode,accuracy\n0,97.5\n")  # percent instead of a fraction
    write_run(tmp_path, "good", accuracies(43), learner="fomaml")
    notes: list[str] = []
    runs = load_runs([tmp_path], warn=notes.append)
    assert list(runs["learner"]) == ["fomaml"]
    assert len(notes) == 1 and "episodes.csv" in notes[0] and "[0, 1]" in notes[0]
    (tmp_path / "good" / "summary.json").unlink()
    with pytest.raises(BenchError, match="no finished runs"):
        load_runs([tmp_path], warn=notes.append)


def test_markdown_has_caption_and_csv_parses_back(tmp_path: Path) -> None:
    write_run(tmp_path, "a", accuracies(50), learner="maml")
    write_run(tmp_path, "b", accuracies(51), learner="fomaml", manifest="manifest-b")
    markdown = make_table([tmp_path], fmt="markdown", reference="maml")
    assert markdown.startswith("Table: Omniglot test accuracy (%), mean ± 95% confidence interval")
    assert "| learner" in markdown and "5-way 1-shot Δ" in markdown and "- n/p: not paired" in markdown
    frame = pd.read_csv(io.StringIO(make_table([tmp_path], fmt="csv", reference="maml")))
    assert list(frame.columns[:4]) == ["row", "learner", "way", "shot"]
    assert {"mean", "ci", "ci_low", "ci_high", "n", "diff", "diff_ci"} <= set(frame.columns)
    assert frame.set_index("row").loc["maml", "n"] == 600


def test_latex_escapes_and_is_balanced(tmp_path: Path) -> None:
    assert latex_escape("a_b & 50% #1 ± {x}") == r"a\_b \& 50\% \#1 $\pm$ \{x\}"
    write_run(tmp_path, "a", accuracies(60), learner="my_learner", learner_config={"mode": "a&b"})
    write_run(tmp_path, "b", accuracies(61), learner="my_learner", learner_config={"mode": "c#d"}, seed=1)
    write_run(tmp_path, "c", accuracies(62), learner="ref", manifest="other")
    latex = render_latex(build_table(load_runs([tmp_path]), reference="ref"))
    body = "\n".join(line for line in latex.splitlines() if not line.startswith("%"))
    assert body.count("{") == body.count("}")
    assert r"\begin{table}" in body and r"\end{table}" in body and r"\begin{tabular}" in body
    assert "±" not in body and "Δ" not in body and "—" not in body
    # Every special character is escaped: none stands without a backslash before it.
    assert not re.search(r"(?<!\\)[%&#_]", body.replace(" & ", " "))
    assert r"my\_learner (mode=a\&b)" in body and r"$\pm$" in body


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_latex_compiles_as_pasted(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_run(runs, "a", accuracies(70), learner="my_learner", learner_config={"mode": "50%"})
    write_run(runs, "b", accuracies(71), learner="ref", describe={})
    write_run(runs, "c", accuracies(72), learner="ref", way=20, seed=0, manifest="m20")
    write_run(runs, "d", accuracies(73), learner="ref", way=20, seed=1, manifest="m20")
    latex = make_table([runs], fmt="latex", reference="ref")
    document = "\\documentclass{article}\n\\begin{document}\n" + latex + "\\end{document}\n"
    (tmp_path / "t.tex").write_text(document)
    result = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:]


def test_cli_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path, "a", accuracies(80), learner="maml")
    write_run(tmp_path, "b", accuracies(81), learner="fomaml")
    assert main(["table", str(tmp_path), "--reference", "maml"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Table:") and "fomaml" in out
    output = tmp_path / "t.csv"
    assert main(["table", str(tmp_path), "--format", "csv", "--output", str(output)]) == 0
    assert len(pd.read_csv(output)) == 2


def test_cli_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["table"]) == 2  # default results/ does not exist
    assert "results" in capsys.readouterr().err
    (tmp_path / "results").mkdir()
    assert main(["table"]) == 2
    assert "no finished runs" in capsys.readouterr().err
    write_run(tmp_path / "results", "a", accuracies(90), learner="maml")
    write_run(tmp_path / "results", "b", accuracies(91), learner="fomaml")
    assert main(["table", "--reference", "protonet"]) == 2
    err = capsys.readouterr().err
    assert "protonet" in err and "fomaml, maml" in err
    assert main(["table"]) == 0
