"""Reproducing a paper's table: the published numbers (declared by the paper's plugin) beside ours, measured by
``bench run --preset PAPER`` on our fixed test episodes.

The mark compares our interval with the published one (``benchmark.reporting.stats.compare_to_published``): *within*
when the two 95% intervals are compatible, *above* or *below* otherwise. It is given only when both sides
are 95% confidence intervals measured on the paper's protocol; anything else (a published ± that is a
standard deviation over seeds, no ± at all, a number measured under another protocol, a reduced run of
ours) is shown but never judged. Cells without a finished run show how far their run got, or *pending*; a
number is never shown that the named command did not measure.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from benchmark.errors import BenchError
from benchmark.papers import Anchor, Paper, cell_label


@dataclass(frozen=True)
class Row:
    """One (learner, cell) line of a reproduction table (all strings, as shown)."""

    learner: str
    cell: str
    published: str
    ours: str
    mark: str
    protocol: str
    wall_time: str
    device: str

    def as_dict(self) -> dict[str, str]:
        return {"learner": self.learner, "cell": self.cell, "published": self.published, "ours": self.ours,
                "mark": self.mark, "protocol": self.protocol, "wall time": self.wall_time, "device": self.device}


def parse_cells(text: str | None, paper: Paper) -> list[tuple[int, int]]:
    """``"5w1s,20w1s"`` -> cells of ``paper`` (default: all of them)."""
    from benchmark.harness.settings import parse_cell

    if not text:
        return list(paper.cells)
    cells = []
    for part in (c for c in text.split(",") if c.strip()):
        cell = parse_cell(part)
        if cell not in paper.cells:
            known = ", ".join(cell_label(*c) for c in paper.cells)
            raise BenchError(f"{paper.name} has no cell {part.strip()!r}; choose from {known} (comma-separated)")
        cells.append(cell)
    return cells


def published_text(anchor: Anchor | None) -> str:
    if anchor is None:
        return "—"
    text = f"{anchor.mean:.2f}" if anchor.ci is None else f"{anchor.mean:.2f} ± {anchor.ci:.2f}"
    if not anchor.verified:
        text += " (unverified)"
    return text


def mark(ours_mean: float, ours_ci: float | None, anchor: Anchor | None, reduced: bool) -> str:
    """within / above / below, or why the cell is not judged (all numbers in percent)."""
    from benchmark.reporting.stats import compare_to_published

    if anchor is None:
        return "no published number"
    if reduced:
        return "not compared (reduced)"
    if anchor.protocol:
        return "not judged (other protocol)"
    if not anchor.is_95_ci or ours_ci is None:
        return "not judged (no 95% CI)"
    return compare_to_published(ours_mean, ours_ci, anchor.mean, anchor.ci)


def comparison(out: Path, paper: Paper, learners: Iterable[str], cells: Iterable[tuple[int, int]],
               label: str) -> dict[str, Any]:
    """Published against ours for every (learner, cell); returns ``{"rows": [Row], "caption": str}``."""
    runs = _runs_of(out, paper.name)
    rows = []
    for way, shot in cells:
        for learner in learners:
            rows.append(_row(paper, learner, way, shot, runs))
    return {"rows": rows, "caption": _caption(paper, label, learners)}


def _runs_of(out: Path, paper_name: str) -> list[tuple[Path, dict[str, Any], Any]]:
    """(run dir, config, finished run or None) of every run of this paper's preset under ``out``."""
    from benchmark.harness.rundir import CONFIG, RunDirError, find_run_dirs, read_finished_run, read_json

    if not out.is_dir():
        return []
    found = []
    for run_dir in find_run_dirs([out]):
        try:
            config = read_json(run_dir / CONFIG)
            if (config.get("run") or {}).get("preset") != paper_name:
                continue
            found.append((run_dir, config, read_finished_run(run_dir)))
        except RunDirError:
            continue  # a damaged run is shown as pending; `bench table` names the file
    return found


def _row(paper: Paper, learner: str, way: int, shot: int, runs: list[tuple[Path, dict, Any]]) -> Row:
    from benchmark.reporting.stats import mean_ci

    anchor = paper.anchor(learner, way, shot)
    mine = [(d, c, f) for d, c, f in runs if c["run"].get("learner") == learner
            and (c["run"].get("way"), c["run"].get("shot")) == (way, shot)]
    base = dict(learner=learner, cell=f"{way}-way {shot}-shot", published=published_text(anchor))
    finished = [(d, c, f) for d, c, f in mine if f is not None]
    if not finished:
        progress = _progress(mine)
        return Row(**base, ours=progress or "pending", mark="pending", protocol="—", wall_time="—", device="—")
    # The full protocol when there is one, else the longest reduced run; seed 0 first.
    _, config, run = sorted(finished, key=lambda x: (x[1]["run"].get("reduced", False), -x[1]["run"]["iterations"],
                                                     x[1]["run"]["seed"]))[0]
    m = mean_ci(run.accuracy)
    ci = None if m.ci != m.ci else 100 * m.ci  # NaN with a single episode
    reduced = bool(config["run"].get("reduced"))
    ours = f"{100 * m.mean:.2f} ± {ci:.2f}" if ci is not None else f"{100 * m.mean:.2f}"
    protocol = f"reduced: {config['run']['iterations']} iterations" if reduced else "paper"
    return Row(**base, ours=ours, mark=mark(100 * m.mean, ci, anchor, reduced), protocol=protocol,
               wall_time=_duration(run.summary.get("wall_time_s")), device=str(config.get("device_name", "—")))


def _progress(runs: list[tuple[Path, dict, Any]]) -> str:
    """How far the furthest unfinished run got (its progress.json, else its train_log.csv; no torch needed)."""
    from benchmark.harness.rundir import RunDirectory

    best = None
    for run_dir, config, _ in runs:
        progress = RunDirectory(run_dir).read_progress() or {}
        done = progress.get("iteration")
        if not isinstance(done, int):
            done = _last_logged_iteration(run_dir / "train_log.csv")
        total = config["run"].get("iterations")
        if done is not None and (best is None or done > best[0]):
            best = (done, total, progress.get("phase"))
    if best is None:
        return ""
    if best[2] == "stopped":  # checkpointed by a time limit or a signal: the same command resumes it
        return f"stopped at {best[0]}/{best[1]} iterations (resumable)"
    return f"running: {best[0]}/{best[1]} iterations"


def _last_logged_iteration(path: Path) -> int | None:
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        return int(rows[-1]["iteration"]) if rows else None
    except (OSError, ValueError, KeyError):
        return None


def _caption(paper: Paper, label: str, learners: Iterable[str]) -> str:
    kinds = sorted({a.ci_kind for a in paper.anchors if a.learner in set(learners)})
    sources = sorted({a.source for a in paper.anchors if a.learner in set(learners)})
    parts = [
        f"{paper.title} on metabench ({label}): Omniglot test accuracy (%).",
        "Published: the paper's number" + (f" (± is: {'; '.join(kinds)})." if kinds else "."),
        f"Ours: `bench reproduce {paper.name}` (`bench run --preset {paper.name}`) on the fixed, hashed test "
        "manifest, one training seed, mean ± 1.96 s/sqrt(n) over its test episodes.",
        "Mark: whether the two 95% intervals are compatible (|difference| within sqrt(ci_ours² + ci_published²)); "
        "not judged when the published ± is not a 95% CI, the number comes from another protocol, or our run is "
        "reduced.",
    ]
    if paper.notes:
        parts.append(paper.notes)
    if sources:
        parts.append("Sources: " + "; ".join(sources) + ".")
    return " ".join(parts)


def _duration(seconds: Any) -> str:
    try:
        s = float(seconds)
    except (TypeError, ValueError):
        return "—"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def render(result: dict[str, Any], fmt: str) -> str:
    """The comparison as Markdown or LaTeX, with the same renderers as ``bench table``."""
    import pandas as pd

    from benchmark.reporting.tables import frame_latex, frame_markdown

    frame = pd.DataFrame([row.as_dict() for row in result["rows"]])
    return (frame_markdown if fmt == "markdown" else frame_latex)(frame, result["caption"])
