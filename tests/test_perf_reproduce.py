"""`bench perf` (structure of its report, not speed) and `bench reproduce` (anchors, marks, pending cells)."""

from __future__ import annotations

import json

import pytest

from benchmark.cli import main
from benchmark.papers import Anchor
from benchmark.reporting.reproduce import comparison, mark, parse_cells
from benchmark.errors import BenchError


@pytest.mark.realdata
def test_perf_times_shipped_and_reference_in_one_report(omniglot_dir, capsys):
    code = main(["perf", "--learner", "fomaml", "--device", "cpu", "--iterations", "2", "--warmup", "0",
                 "--eval-episodes", "3", "-o", "meta_batch_size=2", "-o", "test_inner_steps=1",
                 "--data-dir", str(omniglot_dir), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    variants = {t["variant"]: t for t in report["training"]}
    assert set(variants) == {"shipped", "per-task loop"}
    assert all(t["timed_iterations"] == 2 and t["median_ms"] > 0 and t["peak_memory_mb"] > 0 for t in variants.values())
    assert report["speedup"] == pytest.approx(variants["per-task loop"]["median_ms"] / variants["shipped"]["median_ms"], rel=0.01)
    assert report["evaluation"]["episodes"] == 3 and report["device"] == "cpu" and report["query"] == 1
    # fomaml adapts by steps, so a run's test also reads the accuracy after each: timed as well.
    assert report["evaluation"]["run_seconds"] > 0


@pytest.mark.realdata
def test_perf_ablation_times_each_variant_or_says_why_not(omniglot_dir, capsys):
    # 5-way 1-shot 1-query: the shipped fomaml runs vmap on the CPU, so plain "vmap" duplicates it.
    assert main(["perf", "--learner", "fomaml", "--device", "cpu", "--iterations", "2", "--warmup", "0",
                 "--eval-episodes", "0", "-o", "meta_batch_size=2", "-o", "vectorize=false", "--ablation",
                 "--data-dir", str(omniglot_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {t["variant"]: t for t in report["training"]}
    assert list(rows) == ["shipped", "per-task loop", "vmap"]
    assert rows["per-task loop"]["speedup_vs_loop"] == 1.0 and rows["vmap"]["speedup_vs_loop"] > 0
    assert "needs a CUDA device" in report["skipped_variants"]["vmap + cuda graph"]
    assert main(["perf", "--learner", "fomaml", "--device", "cpu", "--iterations", "1", "--warmup", "0",
                 "--eval-episodes", "0", "-o", "meta_batch_size=2", "--ablation", "--no-reference",
                 "--data-dir", str(omniglot_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [t["variant"] for t in report["training"]] == ["shipped"] and "speedup" not in report
    assert report["skipped_variants"]["vmap"] == "the same as shipped on this device"


@pytest.mark.realdata
def test_perf_of_a_learner_without_a_reference(omniglot_dir, capsys):
    assert main(["perf", "--learner", "finetune", "--device", "cpu", "--iterations", "1", "--warmup", "0",
                 "--eval-episodes", "0", "--data-dir", str(omniglot_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [t["variant"] for t in report["training"]] == ["shipped"] and "speedup" not in report


def _paper():
    from benchmark.harness.plugins import load_registry

    return load_registry().paper("finn2017")


def test_anchors_are_the_published_table():
    anchors = {(a.learner, a.way, a.shot): (a.mean, a.ci) for a in _paper().anchors}
    assert anchors[("maml", 20, 1)] == (95.8, 0.3) and anchors[("fomaml", 20, 1)] == (89.4, 0.5)
    assert len(anchors) == 8
    fomaml = _paper().anchor("fomaml", 5, 1)
    assert not fomaml.verified and fomaml.protocol  # measured by Nichol et al.: shown, never judged


def test_marks_compare_intervals_and_cells_parse():
    anchor = Anchor("maml", 20, 1, 95.8, 0.3, "95% CI over 600 test tasks", "paper")
    # |difference| within sqrt(ci_ours^2 + ci_published^2) = 0.5 for a 0.4 interval of ours.
    assert [mark(x, 0.4, anchor, False) for x in (95.5, 96.3, 95.29, 96.31)] == ["within", "within", "below", "above"]
    assert mark(90.0, 0.4, anchor, True) == "not compared (reduced)"
    assert mark(90.0, 0.4, _paper().anchor("fomaml", 20, 1), False) == "not judged (other protocol)"
    assert mark(90.0, 0.4, Anchor("x", 5, 1, 99.0, 0.1, "std over 3 seeds", "s"), False) == "not judged (no 95% CI)"
    assert parse_cells("5w1s, 20w5s", _paper()) == [(5, 1), (20, 5)]
    with pytest.raises(BenchError, match="choose from 5w1s, 5w5s, 20w1s, 20w5s"):
        parse_cells("5w2s", _paper())


def _fake_run(root, learner, way, shot, accuracies, preset="finn2017", reduced=False):
    run = root / f"{learner}-{way}w{shot}s"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({
        "run": {"learner": learner, "way": way, "shot": shot, "query": shot, "train_way": way, "train_shot": shot,
                "train_query": shot, "seed": 0, "iterations": 60000, "select": "last", "preset": preset,
                "reduced": reduced, "learner_config": {}},
        "manifest_hash": "m", "device_name": "NVIDIA H200",
        "protocol": {"name": "vinyals", "split_hash": "s", "rotations": [0, 90, 180, 270]}}))
    (run / "episodes.csv").write_text("episode,accuracy\n" + "".join(f"{i},{a}\n" for i, a in enumerate(accuracies)))
    (run / "summary.json").write_text(json.dumps({"status": "complete", "n": len(accuracies),
                                                  "manifest_hash": "m", "wall_time_s": 720.0}))
    return run


def test_comparison_puts_ours_beside_published_and_the_rest_pending(tmp_path):
    _fake_run(tmp_path, "maml", 20, 1, [0.96, 0.97, 0.95, 0.96])
    _fake_run(tmp_path, "fomaml", 20, 1, [0.5, 0.6, 0.5, 0.6], preset=None)  # not this preset: stays pending
    started = _fake_run(tmp_path, "maml", 5, 1, [0.9])
    (started / "summary.json").unlink()
    (started / "train_log.csv").write_text("iteration,loss\n500,1.0\n1000,0.5\n")
    result = comparison(tmp_path, _paper(), ["maml", "fomaml"], [(20, 1), (5, 1)], "paper protocol")
    rows = {(r.learner, r.cell): r for r in result["rows"]}
    ours = rows[("maml", "20-way 1-shot")]
    assert ours.published == "95.80 ± 0.30" and ours.ours.startswith("96.00 ± ")
    assert ours.mark == "within" and ours.wall_time == "12.0 min" and ours.device == "NVIDIA H200"
    assert rows[("fomaml", "20-way 1-shot")].ours == "pending"
    assert rows[("maml", "5-way 1-shot")].mark == "pending"
    assert rows[("maml", "5-way 1-shot")].ours == "running: 1000/60000 iterations"
    assert "Finn" in result["caption"] and "95% CI over 600 test tasks" in result["caption"]
    # A cell checkpointed by its time limit (as a GPU sitting leaves it) says so.
    (started / "progress.json").write_text(json.dumps({"phase": "stopped", "iteration": 1200, "total": 60000,
                                                       "reason": "time limit reached"}))
    rows = {(r.learner, r.cell): r for r in comparison(tmp_path, _paper(), ["maml"], [(5, 1)], "x")["rows"]}
    assert rows[("maml", "5-way 1-shot")].ours == "stopped at 1200/60000 iterations (resumable)"


def test_reproduce_table_only_shows_pending_cells(tmp_path, capsys):
    assert main(["reproduce", "finn2017", "--table-only", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "table.md").read_text()
    assert table.count("pending") == 2 * 12 and "98.70 ± 0.40" in table and "(unverified)" in table
    assert (tmp_path / "table.tex").read_text().count(r"\\") >= 13


def test_reproduce_lists_the_registered_papers(capsys):
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    assert "finn2017" in out and "maml" in out
    assert main(["reproduce", "nopaper"]) == 2
    assert "unknown paper 'nopaper'" in capsys.readouterr().err


def test_reduced_runs_are_labelled_and_never_judged(tmp_path, capsys):
    _fake_run(tmp_path, "maml", 20, 1, [0.96, 0.97, 0.95, 0.96], reduced=True)
    rows = comparison(tmp_path, _paper(), ["maml"], [(20, 1)], "x")["rows"]
    assert rows[0].mark == "not compared (reduced)" and rows[0].protocol.startswith("reduced")
    assert main(["table", str(tmp_path)]) == 0
    assert "Reduced protocol: maml ran fewer meta-iterations" in capsys.readouterr().out


def test_perf_table_shows_reserved_memory_and_graph_pools_on_cuda(capsys):
    """A replayed CUDA graph allocates nothing: the human table shows what each variant holds (reserved,
    the larger of warm-up and timed steps) and its graph pool, not the near-zero allocated peak."""
    from benchmark.cli.perf import _print

    def variant(name, allocated, reserved, warmup_reserved, pool):
        return {"variant": name, "median_ms": 10.0, "iterations_per_s": 100.0, "peak_memory_mb": allocated,
                "peak_reserved_mb": reserved, "warmup_peak_reserved_mb": warmup_reserved, "graph_pool_mb": pool,
                "warmup_s": 2.0, "batch_size": 16, "sampling_ms": 0.1, "sampling_share": 0.01}

    report = {"learner": "maml", "way": 20, "shot": 1, "query": 1, "device_name": "H200", "device": "cuda:0",
              "torch_version": "2.11.0", "training": [variant("shipped", 3.0, 800.0, 2345.0, 1500.0),
                                                      variant("per-task loop", 700.0, 900.0, None, None)]}
    _print(report, warmup=5)
    out = capsys.readouterr().out
    assert "reserved" in out and "graph pool" in out  # headers, wrapped at the console's width
    shipped = [cell.strip() for cell in next(line for line in out.splitlines() if "shipped" in line).split("│")]
    assert shipped[4:6] == ["2345", "1500"] and "3" not in shipped
    report["device"] = "cpu"
    for t in report["training"]:
        t.update(peak_reserved_mb=None, warmup_peak_reserved_mb=None, graph_pool_mb=None)
    _print(report, warmup=5)
    out = capsys.readouterr().out
    assert "peak" in out and "reserved" not in out and "graph pool" not in out


def test_the_committed_paper_tables_are_current(tmp_path, capsys):
    """results/PAPER/table.md and table.tex are what --table-only writes from the runs committed beside them,
    so a change of the table's format or of a paper's anchors cannot leave a stale table in the repository."""
    import shutil
    from pathlib import Path

    committed = sorted((Path(__file__).resolve().parents[1] / "results").glob("*/table.md"))
    assert committed, "no committed paper table found under results/"
    for table in committed:
        paper, copy = table.parent.name, tmp_path / table.parent.name
        shutil.copytree(table.parent, copy)
        assert main(["reproduce", paper, "--table-only", "--out", str(copy), "-q"]) == 0
        for name in ("table.md", "table.tex"):
            assert (copy / name).read_text() == (table.parent / name).read_text(), (
                f"results/{paper}/{name} is stale: run `bench reproduce {paper} --table-only` and commit it")
