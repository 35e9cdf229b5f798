"""Table layouts that fit the page (``bench table --layout``).

* ``wide`` (default): one column per cell and one per Δ, a column per protocol fact that differs between
  rows. Wide: two cells with Δ and two protocol columns run past the margin of a plain article page.
* ``compact``: for the text width of a one-column paper. Δ beside the mean in one cell,
  ``81.90 ± 1.62 (Δ -1.10 ± 1.07)``; protocol facts equal for all rows stay in the caption (as in every
  layout), the others become a footnote mark on the row label (``mamlᵃ``) with the facts in a footnote.
* ``narrow``: for one column of a two-column paper. As compact, but Δ goes on a second line under the
  mean, and LaTeX sets the table in ``\\footnotesize`` with narrower column gaps.

Every layout shows the same numbers (``format_cell``/``format_diff`` of one :class:`Table`) and the same
caption and footnotes; only where they sit changes. CSV has one layout (a row per learner and cell).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from benchmark.errors import BenchError
from benchmark.reporting.tables import (
    MISSING, RENDERERS, SUPERSCRIPTS, Table, cell_name, display_frame, format_cell, format_diff, frame_html,
    frame_latex, frame_markdown,
)

LAYOUTS = ("wide", "compact", "narrow")
#: Footnote marks, in the order rows need them: Unicode superscripts, which LaTeX gets as \textsuperscript.
MARKS = "".join(SUPERSCRIPTS)


@dataclass
class View:
    """A table laid out: the frame of strings, its caption and footnotes, and LaTeX settings."""

    frame: pd.DataFrame
    caption: str
    footnotes: list[str]
    latex: dict[str, str] = field(default_factory=dict)


def _marks(table: Table) -> tuple[dict[str, str], list[str]]:
    """A footnote mark per row for the protocol facts that differ between rows (rows with the same facts
    share a mark), and the footnotes that spell them out."""
    if not table.notes:
        return {}, []
    marks: dict[tuple[str, ...], str] = {}
    per_row: dict[str, str] = {}
    for row in table.rows:
        facts = tuple(per_label[row] for per_label in table.notes.values())
        if facts not in marks:
            if len(marks) == len(MARKS):
                raise BenchError(f"more than {len(MARKS)} different protocol settings: use --layout wide")
            marks[facts] = MARKS[len(marks)]
        per_row[row] = marks[facts]
    footnotes = []
    for facts, mark in marks.items():
        reported = [f"{label} {value}" for label, value in zip(table.notes, facts) if value != MISSING]
        unreported = [label for label, value in zip(table.notes, facts) if value == MISSING]
        spelled = "; ".join(reported + ([f"not reported: {', '.join(unreported)}"] if unreported else []))
        footnotes.append(f"{mark} {spelled}.")
    return per_row, footnotes


def _uniform_seeds(table: Table) -> int | None:
    """The seed count of every cell when they all agree and it is more than one (then the caption says it
    once instead of every cell)."""
    counts = {cell.seeds for cell in table.cells.values()}
    return counts.pop() if len(counts) == 1 and max(counts) > 1 else None


def _mean_text(table: Table, row: str, column: tuple[int, int], seeds: int | None) -> str:
    cell = table.cells.get((row, column))
    text = format_cell(cell)
    if cell is not None and seeds is not None:
        text = text.removesuffix(f" ({seeds} seeds)")
    return text


def _diff_text(table: Table, row: str, column: tuple[int, int]) -> str:
    """``Δ +1.23 ± 0.45``, ``ref``, ``Δ n/p``, or empty when there is nothing to compare."""
    diff = format_diff(table, row, column)
    if diff == MISSING:
        return ""
    return diff if diff == "ref" else f"Δ {diff}"


def _beside(mean: str, diff: str) -> str:
    """``mean (diff)``; into the seed count's parentheses when there is one: ``m ± c (3 seeds; Δ d ± e)``."""
    if not diff:
        return mean
    if mean.endswith(" seeds)"):
        return f"{mean[:-1]}; {diff})"
    return f"{mean} ({diff})"


def view(table: Table, layout: str) -> View:
    """``table`` laid out as ``layout`` (one of ``LAYOUTS``)."""
    if layout not in LAYOUTS:
        raise BenchError(f"unknown table layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if layout == "wide":
        return View(display_frame(table), table.caption, list(table.footnotes))
    marks, mark_notes = _marks(table)
    seeds = _uniform_seeds(table)
    caption = table.caption + (f" Every cell combines {seeds} training seeds." if seeds else "")
    records = []
    for row in table.rows:
        label = f"{row}{marks[row]}" if row in marks else row
        means = {cell_name(*c): _mean_text(table, row, c, seeds) for c in table.columns}
        diffs = {cell_name(*c): _diff_text(table, row, c) for c in table.columns} if table.reference else {}
        if layout == "compact":
            records.append({"learner": label, **{k: _beside(v, diffs.get(k, "")) for k, v in means.items()}})
        else:
            records.append({"learner": label, **means})
            if diffs:
                records.append({"learner": "", **diffs})
    frame = pd.DataFrame.from_records(records)
    footnotes = list(table.footnotes)
    if not frame.isin([MISSING]).any().any():
        # The "—" note explains empty cells and protocol columns; here the facts moved into the marks' notes.
        footnotes = [note for note in footnotes if not note.startswith(f"{MISSING}:")]
    latex = {"font": "\\footnotesize", "tabcolsep": "3pt"} if layout == "narrow" else {}
    return View(frame, caption, footnotes + mark_notes, latex)


def render(table: Table, fmt: str, layout: str = "wide") -> str:
    """``table`` as ``fmt`` (markdown, latex, html or csv) in ``layout``."""
    if fmt not in RENDERERS:
        raise BenchError(f"unknown table format {fmt!r}: use one of {', '.join(RENDERERS)}")
    if layout == "wide" or fmt == "csv":
        if fmt == "csv" and layout != "wide":
            raise BenchError(f"--layout {layout} is for markdown, latex and html: csv always has one row per "
                             "learner and cell")
        return RENDERERS[fmt](table)
    laid_out = view(table, layout)
    if fmt == "latex":
        return frame_latex(laid_out.frame, laid_out.caption, laid_out.footnotes, **laid_out.latex)
    writer = frame_markdown if fmt == "markdown" else frame_html
    return writer(laid_out.frame, laid_out.caption, laid_out.footnotes)
