"""Reproducing a paper's table in the harness: the published numbers (shipped as ``anchors/*.csv``) beside
ours, measured by ``bench run --preset`` on our fixed test episodes.

A cell is *within* when our mean lies inside the published 95% interval, *above* or *below* otherwise.
Cells without a finished run are *pending*; a number is never shown that the named command did not measure.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from benchmark.errors import BenchError

CELLS = {"5w1s": (5, 1), "5w5s": (5, 5), "20w1s": (20, 1), "20w5s": (20, 5)}
LEARNERS = ("maml", "fomaml", "finetune")

#: ``--quick``: the 5-way 1-shot cells on 2 CPU cores in under 15 minutes, as a smoke of the whole pipeline.
QUICK = {"cells": ("5w1s",), "iterations": 600, "overrides": {"maml": ["meta_batch_size=8"],
                                                            "fomaml": ["meta_batch_size=8"]}}


@dataclass(frozen=True)
class Anchor:
    learner: str
    way: int
    shot: int
    mean: float  # percent
    ci95: float  # percent
    source: str


def load_anchors(paper: str) -> list[Anchor]:
    try:
        text = resources.files("benchmark").joinpath(f"anchors/{paper}.csv").read_text()
    except FileNotFoundError:
        raise BenchError(f"no published numbers for {paper!r}; choose finn2017") from None
    return [Anchor(r["learner"], int(r["way"]), int(r["shot"]), float(r["mean"]), float(r["ci95"]), r["source"])
            for r in csv.DictReader(text.splitlines())]


def parse_cells(text: str | None) -> list[tuple[int, int]]:
    if not text:
        return list(CELLS.values())
    cells = []
    for name in (c.strip() for c in text.split(",") if c.strip()):
        if name not in CELLS:
            raise BenchError(f"unknown cell {name!r}; choose from {', '.join(CELLS)} (comma-separated)")
        cells.append(CELLS[name])
    return cells


def mark(ours: float, anchor: Anchor | None) -> str:
    if anchor is None:
        return "no published number"
    if ours > anchor.mean + anchor.ci95:
        return "above"
    if ours < anchor.mean - anchor.ci95:
        return "below"
    return "within"


def comparison(out: Path, paper: str, learners: list[str], cells: list[tuple[int, int]], label: str) -> dict[str, Any]:
    """Published vs ours for every (learner, cell); returns rows and the caption."""
    from benchmark.stats import mean_ci
    from benchmark.tables import find_run_dirs, load_runs

    anchors = {(a.learner, a.way, a.shot): a for a in load_anchors(paper)}
    runs = None
    if out.is_dir() and find_run_dirs([out]):
        try:
            runs = load_runs([out], warn=lambda message: None)
        except BenchError:
            runs = None
    rows = []
    for learner in learners:
        for way, shot in cells:
            anchor = anchors.get((learner, way, shot))
            row: dict[str, Any] = {
                "learner": learner, "cell": f"{way}-way {shot}-shot",
                "published": f"{anchor.mean:.1f} ± {anchor.ci95:.1f}" if anchor else "—",
                "ours": "pending", "mark": "pending", "protocol": "—", "wall time": "—", "device": "—",
            }
            if runs is not None:
                match = runs[(runs["learner"] == learner) & (runs["way"] == way) & (runs["shot"] == shot)
                             & (runs["preset"] == paper)]
                if len(match):
                    # The full protocol when there is one, else the longest reduced run; seed 0 first.
                    run = match.sort_values(["reduced", "iterations", "seed"], ascending=[True, False, True]).iloc[0]
                    m = mean_ci(run["accuracy"])
                    row.update({
                        "ours": f"{100 * m.mean:.2f} ± {100 * m.ci:.2f}",
                        # A reduced run is labelled, never judged against the paper's interval.
                        "mark": "not compared (reduced)" if run["reduced"] else mark(100 * m.mean, anchor),
                        "protocol": f"reduced: {int(run['iterations'])} iterations" if run["reduced"] else "paper",
                        "wall time": _duration(run["wall_time_s"]),
                        "device": run["device_name"],
                    })
            rows.append(row)
    sources = sorted({a.source for a in anchors.values() if a.learner in learners})
    caption = (
        f"{paper} on metabench ({label}): Omniglot test accuracy (%), mean ± 95% CI over 600 test episodes. "
        "Published: the paper's number and interval. Ours: `bench reproduce "
        f"{paper}` (`bench run --preset {paper}`) on the fixed, hashed Vinyals-split test manifest, one training "
        "seed. Mark: our mean within, above or below the published interval. Sources: " + "; ".join(sources) + "."
    )
    return {"rows": rows, "caption": caption}


def _duration(seconds: Any) -> str:
    try:
        s = float(seconds)
    except (TypeError, ValueError):
        return "—"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def render(result: dict[str, Any], fmt: str) -> str:
    """The comparison as Markdown or LaTeX, with the same renderers as ``bench table``."""
    import pandas as pd

    from benchmark.tables import frame_latex, frame_markdown

    frame = pd.DataFrame(result["rows"])
    return (frame_markdown if fmt == "markdown" else frame_latex)(frame, result["caption"])
