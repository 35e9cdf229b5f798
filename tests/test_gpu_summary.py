"""``scripts/gpu_summary.py``: a GPU sitting's perf reports against the targets (no GPU or torch needed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_summary.py"


@pytest.fixture(scope="module")
def gs():
    spec = importlib.util.spec_from_file_location("gpu_summary", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_summary"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_summary"]


def report(learner="maml", way=20, shot=1, ms=10.0, loop_ms=800.0, graph=None, device="cuda:0", **extra):
    """A ``bench perf --json`` report as a GPU sitting would write it (only the fields the summary reads)."""
    batch = 16 if way == 20 else 32
    shipped = {"variant": "shipped", "median_ms": ms, "peak_memory_mb": 900.0, "peak_reserved_mb": 1000.0,
               "warmup_peak_reserved_mb": 1200.0, "graph_pool_mb": 300.0, "warmup_s": 2.0,
               "graph": graph if graph is not None else {"captured": True, "disabled_reason": None, "warmup": 3}}
    loop = {"variant": "per-task loop", "median_ms": loop_ms, "peak_memory_mb": 900.0, "graph": None,
            "speedup_vs_loop": 1.0}
    shipped["speedup_vs_loop"] = round(loop_ms / ms, 2)
    out = {"learner": learner, "way": way, "shot": shot, "query": shot, "device": device, "device_name": "H200",
           "torch_version": "2.11.0", "config": {"meta_batch_size": batch, "inner_steps": 5 if way == 20 else 1,
                                                 "test_inner_steps": 5 if way == 20 else 3,
                                                 "compile": False},
           "training": [shipped, loop], "speedup": shipped["speedup_vs_loop"]}
    out.update(extra)
    return out


def rows(gs, lines):
    """The summary's target rows, by label."""
    return {t.label: line for t in gs.TARGETS for line in lines if line.startswith(t.label + " ")}


def test_collect_then_summary_reads_each_target(gs, tmp_path):
    jsonl = tmp_path / "perf.jsonl"
    runs = {
        "maml-20w1s": report(ms=9.5, loop_ms=700.0, evaluation={"episodes": 600, "seconds": 6.2, "run_seconds": 7.9}),
        "maml-5w1s": report(way=5, ms=3.0, loop_ms=300.0,
                            graph={"captured": False, "disabled_reason": "capture failed: RuntimeError: x", "warmup": 3}),
        "fomaml-20w1s": report(learner="fomaml", ms=4.0),
        "maml-20w5s": report(shot=5, ms=40.0),
    }
    runs["maml-20w5s"]["training"] = runs["maml-20w5s"]["training"][:1]
    runs["maml-20w5s"]["training"][0].update(warmup_peak_reserved_mb=15500.0, peak_reserved_mb=14000.0)
    del runs["maml-20w5s"]["speedup"]
    for name, r in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(r, indent=2))
        gs.collect(jsonl, name, tmp_path / f"{name}.json", 0, 30.0)
    gs.collect(jsonl, "maml-5w1s-compile", tmp_path / "absent.json", 124, 300.0)
    gs.collect(jsonl, "later", tmp_path / "absent.json", gs.SKIPPED, 0)
    lines = gs.summary(gs.read_records([jsonl]))
    table = rows(gs, lines)
    assert "9.50 ms" in table["maml 20w1s 2nd order: ms/meta-iteration"] and "PASS" in table["maml 20w1s 2nd order: ms/meta-iteration"]
    assert "73.7x" in table["maml 20w1s 2nd order: x the per-task loop"]
    assert "FAIL" in table["maml 5w1s: ms/meta-iteration"]
    assert "fell back: capture failed: RuntimeError: x" in table["maml 5w1s: ms/meta-iteration"]
    assert "100.0x" in table["maml 5w1s: x the per-task loop"] and "FAIL" in table["maml 5w1s: x the per-task loop"]
    assert "7.90 s (predict alone 6.20 s)" in table["maml 20w1s: 600 test episodes"]  # judged as a run tests
    memory = table["maml 20w5s 2nd order: peak reserved"]
    assert "15.14 GiB" in memory and "graph pool 0.29" in memory and "PASS (marginal)" in memory
    assert "5 of 7 targets met" in lines
    assert "run maml-5w1s-compile: timed out after 300 s" in lines
    assert "run later: skipped: not enough of the sitting's time budget left" in lines
    assert not any(line.startswith("note:") for line in lines)  # the paper's settings on a GPU


def test_summary_of_a_dry_run_says_what_is_not_comparable(gs, tmp_path):
    dry = report(device="cpu", graph={}, evaluation={"episodes": 5, "seconds": 0.5})
    dry["training"][0].update(graph=None, peak_reserved_mb=None, warmup_peak_reserved_mb=None, graph_pool_mb=None)
    dry["config"]["meta_batch_size"] = 2
    (tmp_path / "perf-maml-20w1s.json").write_text(json.dumps(dry))
    lines = gs.summary(gs.read_records([tmp_path / "perf-maml-20w1s.json"]))
    table = rows(gs, lines)
    assert "N/A (5 episodes, not 600)" in table["maml 20w1s: 600 test episodes"]
    assert "no graph" in table["maml 20w1s 2nd order: ms/meta-iteration"]
    assert "MISSING" in table["fomaml 20w1s: ms/meta-iteration"]
    assert "note: maml-20w1s: device cpu (a dry run, not a GPU), meta_batch_size=2 (paper: 16)" in lines


def test_graph_text_covers_each_state(gs):
    assert gs.graph_text({"graph": None}) == "no graph"
    assert gs.graph_text({"graph": {"captured": True}}) == "captured"
    assert gs.graph_text({"graph": {"captured": False, "disabled_reason": "why"}}) == "fell back: why"
    assert "after 3 eager steps" in gs.graph_text({"graph": {"captured": False, "disabled_reason": None, "warmup": 3}})
    assert "no graph field" in gs.graph_text({})


@pytest.mark.parametrize("way", [5, 20])
def test_the_paper_settings_are_what_bench_perf_runs(gs, way):
    """The summary flags a report whose settings differ from PAPER_CONFIG; bench perf runs MAML's defaults,
    so the two must agree or every sitting's summary carries a false note."""
    from plugins.maml import MAML

    config = MAML.default_config(way, 1)
    assert {key: getattr(config, key) for key in gs.PAPER_CONFIG[way]} == gs.PAPER_CONFIG[way]
