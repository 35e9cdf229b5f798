"""Turn finished run directories into a results table: one row per learner, one column per (way, shot).

Pipeline: :func:`find_run_dirs` -> :func:`load_runs` (a DataFrame, one row per run) -> :func:`build_table`
(a :class:`Table`: statistics per cell, protocol notes, caption) -> :func:`render_markdown`,
:func:`render_latex` or :func:`render_csv`.

Choices (each one is stated in the rendered table too):

* **Rows.** One row per learner. When two runs of the same learner in the same (way, shot) cell differ in
  anything that changes the experiment (a ``learner_config`` or ``describe`` entry, the split, rotations,
  queries, iterations, ``reduced``), they are *separate rows*, labelled by the differing keys, e.g.
  ``maml (inner_steps=5)``; we never average different experiments together and never guess which one
  the user meant.
* **Seeds.** Runs with the same row, cell and seed are the same experiment: an identical copy is shown
  once (with a note on stderr), two disagreeing copies are an error. Different seeds combine: mean over
  seeds of per-seed means, ``±`` a t interval over seeds and episodes (two-way ANOVA, Welch-Satterthwaite
  degrees of freedom; :mod:`benchmark.stats`), which covers training randomness as well as episodes.
* **Intervals.** The caption says what each ``±`` covers: with one seed, the sampling of test episodes
  only. A Δ from one seed per learner says so in a footnote. An accuracy whose interval would pass 0% or
  100%, or would have zero width, shows ``[low, high]`` instead (:func:`benchmark.stats.accuracy_bounds`).
* **Paired differences** (``reference=``): learner minus reference, per episode, only between runs scored
  on identical test episodes (the same set of manifest hashes). Anything else is never paired and shows
  ``n/p``.
* **Units.** Percent. Rendered tables show two decimals; the CSV keeps full precision (still percent).
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmark.errors import BenchError
from benchmark.stats import Bounds, MeanCI, SeedRun, accuracy_bounds, seeds_difference, seeds_mean_ci

RUN_FILES = ("config.json", "episodes.csv", "summary.json")
#: Top-level config entries that define the experiment: runs differing in one of them are never combined.
EXPERIMENT_KEYS = ("protocol", "split_hash", "rotations", "query", "iterations", "reduced")
#: Protocol facts shown in the table: (label, run column). Stated once in the caption when every run
#: agrees, otherwise as a column with one value per row.
NOTE_FIELDS = (
    ("split", "split"),
    ("rotations", "rotations"),
    ("queries/class", "query"),
    ("inner steps train/test", "inner_steps"),
    ("order", "order"),
    ("batch norm", "batchnorm"),
)
MISSING = "—"
NOT_PAIRED = "n/p"

Warn = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# --------------------------------------------------------------------------------------------------------
# Loading


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Every directory at or below ``paths`` that holds a ``config.json``, sorted.

    Completeness (episodes.csv, summary.json, status) is checked by :func:`load_runs`, which can say why a
    run is skipped. A path that does not exist is an error: a typo must not look like "no runs".
    """
    found: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise BenchError(f"{path} does not exist: pass the results directory that `bench run` wrote to")
        if path.is_file():
            path = path.parent
        found.update(config.parent for config in path.rglob("config.json"))
    return sorted(found)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read {path}: {exc}; delete that run directory or run it again") from exc
    if not isinstance(value, dict):
        raise BenchError(f"{path} is not a JSON object; delete that run directory or run it again")
    return value


def _read_episodes(path: Path) -> np.ndarray:
    """Per-episode accuracies ``[n]`` ordered by episode index, which must be exactly 0..n-1."""
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read {path}: {exc}; delete that run directory or run it again") from exc
    if list(frame.columns[:2]) != ["episode", "accuracy"] or frame.empty:
        raise BenchError(f"{path} must have the header `episode,accuracy` and one row per test episode")
    frame = frame.sort_values("episode")
    episodes = frame["episode"].to_numpy()
    accuracy = frame["accuracy"].to_numpy(dtype=np.float64)
    if not np.array_equal(episodes, np.arange(len(frame))):
        raise BenchError(f"{path}: episode indices must be 0..{len(frame) - 1}, each once; run it again")
    if not np.all((accuracy >= 0) & (accuracy <= 1)):
        raise BenchError(f"{path}: accuracies must be fractions in [0, 1]; run it again")
    return accuracy


def _json_value(value: Any) -> str:
    """A canonical string for comparing config values (dicts/lists included)."""
    return json.dumps(value, sort_keys=True, default=str)


def _facts(run: dict[str, Any]) -> dict[str, str]:
    """The protocol facts of one run, as the strings the table shows."""

    def text(value: Any) -> str:
        return MISSING if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)

    split = MISSING if run["protocol"] is None else f"{run['protocol']} ({str(run['split_hash'] or '?')[:8]})"
    steps_train, steps_test = text(run["inner_steps_train"]), text(run["inner_steps_test"])
    steps = MISSING if steps_train == steps_test == MISSING else f"{steps_train}/{steps_test}"
    return {
        "split": split,
        "rotations": text(run["rotations"]),
        "query": text(run["query"]),
        "inner_steps": steps,
        "order": text(run["order"]),
        "batchnorm": text(run["batchnorm"]),
    }


def _load_run(run_dir: Path, warn: Warn) -> dict[str, Any] | None:
    """One run as a flat record, or ``None`` (with a note) when it is not a finished run."""
    missing = [name for name in RUN_FILES if not (run_dir / name).is_file()]
    if missing:
        warn(f"skipping {run_dir}: no {', '.join(missing)} (unfinished run?)")
        return None
    config = _read_json(run_dir / "config.json")
    summary = _read_json(run_dir / "summary.json")
    if summary.get("status") != "complete":
        warn(f"skipping {run_dir}: summary status is {summary.get('status')!r}, not 'complete'")
        return None
    for key in ("learner", "way", "shot", "manifest_hash"):
        if key not in config:
            raise BenchError(f"{run_dir / 'config.json'} has no {key!r}; run it again with `bench run`")
    if summary.get("manifest_hash", config["manifest_hash"]) != config["manifest_hash"]:
        raise BenchError(f"{run_dir}: config.json and summary.json name different test manifests; run it again")
    accuracy = _read_episodes(run_dir / "episodes.csv")
    if "n" in summary and int(summary["n"]) != accuracy.size:
        raise BenchError(
            f"{run_dir}: summary.json says n={summary['n']} but episodes.csv has {accuracy.size} rows; run it again"
        )
    protocol = config.get("protocol") or {}
    describe = config.get("describe") or {}
    learner_config = config.get("learner_config") or {}
    record: dict[str, Any] = {
        "path": str(run_dir),
        "learner": str(config["learner"]),
        "way": int(config["way"]),
        "shot": int(config["shot"]),
        "query": config.get("query"),
        "seed": config.get("seed"),
        "iterations": config.get("iterations"),
        "episodes": accuracy.size,
        "reduced": bool(config.get("reduced", False)),
        "preset": config.get("preset"),
        "protocol": protocol.get("name"),
        "split_hash": protocol.get("split_hash"),
        "rotations": "/".join(str(r) for r in protocol.get("rotations", [])) or None,
        "manifest_hash": str(config["manifest_hash"]),
        "order": describe.get("order"),
        "inner_steps_train": describe.get("inner_steps_train"),
        "inner_steps_test": describe.get("inner_steps_test"),
        "batchnorm": describe.get("batchnorm"),
        "learner_config": _json_value(learner_config),
        "describe": _json_value(describe),
        "device_name": config.get("device_name"),
        "accuracy_mean": summary.get("accuracy_mean"),
        "ci95": summary.get("ci95"),
        "std": summary.get("std"),
        "n": accuracy.size,
        "wall_time_s": summary.get("wall_time_s"),
        "ms_per_iteration": summary.get("ms_per_iteration"),
        "peak_memory_mb": summary.get("peak_memory_mb"),
        "accuracy": accuracy,
    }
    # The experiment identity used to tell variants apart (see the module docstring).
    variant = {f"learner_config.{k}": _json_value(v) for k, v in learner_config.items()}
    variant.update({f"describe.{k}": _json_value(v) for k, v in describe.items()})
    variant.update({k: _json_value(record[k]) for k in EXPERIMENT_KEYS})
    record["variant"] = variant
    # Computed before the DataFrame exists: pandas would turn an int column with a gap into floats (1.0).
    record["facts"] = _facts(record)
    return record


def load_runs(paths: Iterable[str | Path], warn: Warn = _stderr) -> pd.DataFrame:
    """Load every finished run below ``paths``: one DataFrame row per run.

    Columns: config facts (``learner, way, shot, query, seed, iterations, reduced, preset, protocol,
    split_hash, rotations, manifest_hash``), ``describe`` facts (``order, inner_steps_train,
    inner_steps_test, batchnorm``), summary facts (``accuracy_mean, ci95, std, n, wall_time_s,
    ms_per_iteration, peak_memory_mb``), ``accuracy`` (a float array ``[n]`` in episode order),
    ``variant`` (a dict of the settings that define the experiment) and ``facts`` (the protocol facts as
    the table shows them).

    :param warn: called with one line per skipped directory (default: print to stderr).
    :raises BenchError: when no finished run is found, or a run's files are corrupt.
    """
    paths = list(paths)
    records = [r for d in find_run_dirs(paths) if (r := _load_run(d, warn)) is not None]
    if not records:
        where = ", ".join(str(p) for p in paths)
        raise BenchError(
            f"no finished runs under {where}: a run directory needs config.json, episodes.csv and summary.json "
            "with status 'complete'; run `bench run` first or pass the directory it wrote to"
        )
    return pd.DataFrame.from_records(records)


# --------------------------------------------------------------------------------------------------------
# Statistics per cell


def cell_name(way: int, shot: int) -> str:
    return f"{way}-way {shot}-shot"


@dataclass
class Cell:
    """The statistics of one (row, way, shot) cell, as fractions (renderers turn them into percent)."""

    row: str
    learner: str
    way: int
    shot: int
    result: MeanCI
    seeds: int
    manifests: tuple[str, ...]
    runs: list[SeedRun]
    facts: dict[str, Any]
    #: The ends of ``result``'s interval after the edge-of-scale rules (``rule`` ``"normal"`` when none applied).
    bounds: Bounds
    #: Difference to the reference row; ``None`` when there is no reference, this is the reference row,
    #: or the reference has no run in this cell.
    diff: MeanCI | None = None
    #: ``False`` when a reference run exists but on other test episodes (never paired).
    paired: bool | None = None


@dataclass
class Table:
    """A built table: rows, cells, per-row protocol notes and the text that explains them."""

    rows: list[str]
    columns: list[tuple[int, int]]
    cells: dict[tuple[str, tuple[int, int]], Cell]
    notes: dict[str, dict[str, str]]  # note label -> row -> text, for facts that differ between rows
    caption: str
    footnotes: list[str] = field(default_factory=list)
    reference: str | None = None


def _short_key(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _display_value(encoded: str | None) -> str:
    if encoded is None:
        return "unset"
    value = json.loads(encoded)
    return value if isinstance(value, str) else json.dumps(value)


def _row_labels(runs: pd.DataFrame) -> pd.Series:
    """A row label per run: the learner name, plus the keys that tell its variants apart in some cell."""
    labels = pd.Series(runs["learner"].to_numpy(), index=runs.index, dtype=object)
    for learner, group in runs.groupby("learner", sort=False):
        splitting: set[str] = set()
        for _, cell in group.groupby(["way", "shot"]):
            keys = set().union(*(v.keys() for v in cell["variant"]))
            splitting |= {k for k in keys if len({v.get(k) for v in cell["variant"]}) > 1}
        if not splitting:
            continue
        ordered = sorted(splitting)
        shorts = [_short_key(k) for k in ordered]
        # Keep the namespace only where two keys would read the same.
        names = [s if shorts.count(s) == 1 else k for s, k in zip(shorts, ordered)]
        for index, variant in group["variant"].items():
            parts = [f"{name}={_display_value(variant.get(key))}" for name, key in zip(names, ordered)]
            labels[index] = f"{learner} ({', '.join(parts)})"
    return labels


def _dedupe_seeds(group: pd.DataFrame, row: str, warn: Warn) -> pd.DataFrame:
    """Keep one run per seed: identical copies collapse (with a note), disagreeing copies are an error."""
    keep = []
    for seed, same in group.groupby("seed", dropna=False, sort=True):
        first = same.iloc[0]
        for _, other in same.iloc[1:].iterrows():
            identical = other["manifest_hash"] == first["manifest_hash"] and np.array_equal(
                other["accuracy"], first["accuracy"]
            )
            if not identical:
                raise BenchError(
                    f"two runs of {row} {cell_name(first['way'], first['shot'])} with seed {seed} disagree: "
                    f"{first['path']} and {other['path']}; remove one, or pass only the directories to tabulate"
                )
            warn(f"note: {other['path']} repeats {first['path']} (same seed, same accuracies); counted once")
        keep.append(same.index[0])
    return group.loc[keep]


def _summarize_facts(values: dict[tuple[int, int], str]) -> str:
    """One text for a row's fact across cells: the value, or 'cell: value; ...' when cells differ."""
    distinct = set(values.values())
    if len(distinct) == 1:
        return distinct.pop()
    return "; ".join(f"{way}w{shot}s: {v}" for (way, shot), v in sorted(values.items()))


def _resolve_reference(reference: str, rows: list[str], learners: dict[str, str]) -> str:
    if reference in rows:
        return reference
    matches = [row for row in rows if learners[row] == reference]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise BenchError(
            f"reference {reference!r} matches several rows ({'; '.join(matches)}): pass one of these labels exactly"
        )
    raise BenchError(f"reference learner {reference!r} has no runs here; learners present: {', '.join(rows)}")


def _caption(cells: Iterable[Cell], fixed: dict[str, str]) -> str:
    cells = list(cells)
    sizes = {run.accuracy.size for c in cells for run in c.runs}
    over = f"{sizes.pop()} test episodes" if len(sizes) == 1 else "the test episodes (n per cell in the CSV)"
    parts = [
        "Omniglot test accuracy (%), mean ± 95% confidence interval: ± is 1.96 s/sqrt(n) over "
        f"{over} of one training seed (normal approximation, as in the few-shot papers); it covers the "
        "sampling of test episodes, not training randomness."
    ]
    if any(c.seeds > 1 for c in cells):
        parts.append(
            "Cells marked (k seeds) average k training seeds (mean of per-seed means) and their ± covers both "
            "training randomness and the sampling of test episodes: t × SE, SE = sqrt(seed variance/k + "
            "episode variance/n + residual/(k n)) from a two-way ANOVA of seeds × episodes (seeds scored on "
            "different test episodes: the spread of the seed means), t with Welch-Satterthwaite degrees of "
            "freedom (see benchmark.stats)."
        )
    if fixed:
        parts.append("Protocol: " + "; ".join(f"{label} {value}" for label, value in fixed.items()) + ".")
    return " ".join(parts)


def _queries_per_episode(group: pd.DataFrame, way: int) -> int | None:
    """``way x queries per class`` of a cell's runs, or ``None`` when the runs do not say."""
    query = group["query"].iloc[0]
    if query is None or (isinstance(query, float) and math.isnan(query)):
        return None
    return way * int(query)


#: Footnote for cells shown as ``[low, high]`` (:func:`benchmark.stats.accuracy_bounds`).
EDGE_NOTE = (
    "[low, high]: an accuracy at the edge of the scale, shown as the ends of its 95% interval. Where mean ± CI "
    "would pass 0% or 100% it is cut there (the accuracy cannot leave [0, 100], so the cut interval covers "
    "as often as the uncut one); where every episode scored the same (± would be 0.00) it is the Wilson "
    "score interval for the proportion of correct queries over all episodes × queries per episode (one "
    "trial per episode when the query count is unknown)."
)


def _delta_coverage_notes(seed_counts: set[tuple[int, int]]) -> list[str]:
    """What the ± of the Δ shown covers, given their ``(row seeds, reference seeds)``."""
    notes = []
    if (1, 1) in seed_counts:
        notes.append(
            "Δ from one training seed per learner: ± is 1.96 s/sqrt(n) of the per-episode differences and "
            "covers the sampling of test episodes only, not training randomness: another training seed of "
            "either learner can move Δ by more than this."
        )
    if any(max(pair) > 1 for pair in seed_counts):
        notes.append(
            "Δ where a side has several seeds: ± is t × SE, SE = sqrt(variance of the per-episode differences/n "
            "+ each side's seed variance/its seed count), t with Welch-Satterthwaite degrees of freedom; it "
            "covers the training randomness of each side with several seeds and the sampling of test "
            "episodes. A side with a single seed adds no seed variance: its training randomness is not covered."
        )
    return notes


def build_table(runs: pd.DataFrame, reference: str | None = None, warn: Warn = _stderr) -> Table:
    """Group runs into rows and (way, shot) columns and compute every cell's statistics.

    :param runs: the output of :func:`load_runs`.
    :param reference: a learner name (or an exact row label) to compare every row against.
    :raises BenchError: unknown reference, or two disagreeing runs of the same seed.
    """
    runs = runs.assign(row=_row_labels(runs))
    cells: dict[tuple[str, tuple[int, int]], Cell] = {}
    for (row, way, shot), group in runs.groupby(["row", "way", "shot"], sort=False):
        group = _dedupe_seeds(group, str(row), warn)
        seed_runs = [SeedRun(m, a) for m, a in zip(group["manifest_hash"], group["accuracy"])]
        result = seeds_mean_ci(seed_runs)
        cells[(str(row), (int(way), int(shot)))] = Cell(
            row=str(row),
            learner=str(group["learner"].iloc[0]),
            way=int(way),
            shot=int(shot),
            result=result,
            seeds=len(seed_runs),
            manifests=tuple(sorted(set(group["manifest_hash"]))),
            runs=seed_runs,
            facts=group["facts"].iloc[0],
            bounds=accuracy_bounds(result, _queries_per_episode(group, int(way))),
        )

    learners = {c.row: c.learner for c in cells.values()}
    rows = sorted(learners, key=lambda r: (learners[r], r))
    columns = sorted({key[1] for key in cells})
    footnotes: list[str] = []
    if reference is not None:
        reference = _resolve_reference(reference, rows, learners)
        rows.remove(reference)
        rows.insert(0, reference)
        seed_counts: set[tuple[int, int]] = set()  # (row's seeds, reference's seeds) of every Δ shown
        for (row, column), cell in cells.items():
            base = cells.get((reference, column))
            if row == reference or base is None:
                continue
            cell.paired = set(cell.manifests) == set(base.manifests)
            if cell.paired:
                cell.diff = seeds_difference(cell.runs, base.runs)
                seed_counts.add((cell.seeds, base.seeds))
        footnotes.append(
            f"Δ: paired difference to {reference} (this row minus {reference}) on identical test episodes "
            "(same manifest hash): mean of the per-episode differences ± 95% CI."
        )
        footnotes += _delta_coverage_notes(seed_counts)
        if any(c.paired is False for c in cells.values()):
            footnotes.append(
                f"{NOT_PAIRED}: not paired: this run and the {reference} run were scored on different test "
                "episodes (different manifest hashes), so no difference is reported."
            )
    reduced_rows = sorted(set(runs.loc[runs["reduced"].astype(bool), "row"]))
    if reduced_rows:
        footnotes.append(
            f"Reduced protocol: {', '.join(reduced_rows)} ran fewer meta-iterations than their preset; do not "
            "compare them with the paper's numbers."
        )
    fact_missing = any(MISSING in c.facts.values() for c in cells.values())
    if fact_missing or any((row, column) not in cells for row in rows for column in columns):
        footnotes.append(
            f"{MISSING}: no finished run for this cell (in a Δ column: for this row or the reference); "
            "in a protocol column: not reported by the learner."
        )

    # Protocol facts: in the caption when every run agrees, else one column per fact.
    fixed: dict[str, str] = {}
    notes: dict[str, dict[str, str]] = {}
    for label, key in NOTE_FIELDS:
        values = {c.facts[key] for c in cells.values()}
        if len(values) == 1:
            fixed[label] = values.pop()
            continue
        notes[label] = {
            row: _summarize_facts({col: c.facts[key] for (r, col), c in cells.items() if r == row}) for row in rows
        }
    if any(c.bounds.rule != "normal" for c in cells.values()):
        footnotes.append(EDGE_NOTE)
    return Table(rows, columns, cells, notes, _caption(cells.values(), fixed), footnotes, reference)


# --------------------------------------------------------------------------------------------------------
# Rendering


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


def format_cell(cell: Cell | None) -> str:
    """``'97.12 ± 0.45'`` (percent, two decimals), with ``' (3 seeds)'`` when seeds were combined.

    At the edge of the scale, ``'100.00 [99.99, 100.00]'``: the interval's ends (see ``EDGE_NOTE``).
    """
    if cell is None:
        return MISSING
    if cell.bounds.rule == "normal":
        text = f"{_pct(cell.result.mean)} ± {_pct(cell.result.ci)}"
    else:
        text = f"{_pct(cell.result.mean)} [{_pct(cell.bounds.lower)}, {_pct(cell.bounds.upper)}]"
    return text + (f" ({cell.seeds} seeds)" if cell.seeds > 1 else "")


def format_diff(table: Table, row: str, column: tuple[int, int]) -> str:
    """``'+1.23 ± 0.45'``, ``'ref'`` on the reference row, ``'n/p'`` when unpaired, ``'—'`` when no run."""
    cell = table.cells.get((row, column))
    if row == table.reference:
        return "ref" if cell is not None else MISSING
    if cell is None or cell.paired is None:
        return MISSING
    if not cell.paired or cell.diff is None:
        return NOT_PAIRED
    sign = "+" if cell.diff.mean >= 0 else "-"
    return f"{sign}{_pct(abs(cell.diff.mean))} ± {_pct(cell.diff.ci)}"


def display_frame(table: Table) -> pd.DataFrame:
    """The table as strings: ``learner``, one column per cell (and its ``Δ`` column), then protocol notes."""
    records = []
    for row in table.rows:
        record = {"learner": row}
        for column in table.columns:
            record[cell_name(*column)] = format_cell(table.cells.get((row, column)))
            if table.reference is not None:
                record[f"{cell_name(*column)} Δ"] = format_diff(table, row, column)
        for label, per_row in table.notes.items():
            record[label] = per_row[row]
        records.append(record)
    return pd.DataFrame.from_records(records)


def render_markdown(table: Table) -> str:
    """A pipe table (GitHub/pandoc) with a pandoc ``Table:`` caption and the footnotes under it."""
    return frame_markdown(display_frame(table), table.caption, table.footnotes)


def frame_markdown(frame: pd.DataFrame, caption: str, footnotes: Iterable[str] = ()) -> str:
    """Any frame of strings as a pipe table with a pandoc ``Table:`` caption and footnotes as a list."""
    frame = frame.astype(str)
    for column in frame.columns:  # a literal | would split the cell
        frame[column] = frame[column].str.replace("|", "\\|", regex=False)
    lines = [f"Table: {caption}", "", frame.to_markdown(index=False)]
    footnotes = list(footnotes)
    if footnotes:
        lines += [""] + [f"- {note}" for note in footnotes]
    return "\n".join(lines) + "\n"


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
# The few non-ASCII characters we emit, spelled so that plain pdflatex needs no package for them.
_LATEX_UNICODE = {"±": r"$\pm$", "Δ": r"$\Delta$", "—": "---", "×": r"$\times$"}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters (one pass, so escapes are never escaped again)."""
    return "".join(_LATEX_SPECIALS.get(ch, _LATEX_UNICODE.get(ch, ch)) for ch in text)


def render_latex(table: Table) -> str:
    """A ``table`` float with a plain ``tabular``: compiles with pdflatex as pasted, no extra packages."""
    return frame_latex(display_frame(table), table.caption, table.footnotes)


def frame_latex(frame: pd.DataFrame, caption: str, footnotes: Iterable[str] = ()) -> str:
    """Any frame of strings as a ``table`` float with a plain ``tabular`` (first column left, others centred)."""
    align = "l" + "c" * (frame.shape[1] - 1)

    def line(values: Iterable[str]) -> str:
        # A minus sign, not a hyphen, in front of negative differences.
        cells = (re.sub(r"(?<![\w.])-(?=\d)", r"$-$", latex_escape(str(v))) for v in values)
        return " & ".join(cells) + r" \\"

    out = [
        "% metabench results table. Plain LaTeX2e: needs no \\usepackage (no booktabs).",
        "% Too wide for the page? Wrap the tabular in \\resizebox{\\textwidth}{!}{...} (\\usepackage{graphicx}).",
        r"\begin{table}[htbp]",
        r"\centering",
        r"\small",
        r"\caption{" + latex_escape(caption) + "}",
        r"\begin{tabular}{" + align + "}",
        r"\hline",
        line(frame.columns),
        r"\hline",
        *(line(values) for values in frame.itertuples(index=False)),
        r"\hline",
        r"\end{tabular}",
    ]
    footnotes = list(footnotes)
    if footnotes:
        out += [r"\par\smallskip", r"{\footnotesize"] + [latex_escape(n) + r"\par" for n in footnotes] + ["}"]
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


CSV_COLUMNS = (
    "row", "learner", "way", "shot", "mean", "ci", "ci_low", "ci_high", "std", "n", "seeds", "manifest_hash",
    "reference", "diff", "diff_ci", "paired",
    "split", "rotations", "query", "inner_steps", "order", "batchnorm",
)  # fmt: skip


def csv_frame(table: Table) -> pd.DataFrame:
    """One row per (row, cell); ``mean, ci, ci_low, ci_high, std, diff, diff_ci`` in percent at full precision.

    ``ci_low``/``ci_high``: the ends of the interval as the table shows it (``mean ± ci`` unless an
    edge-of-scale rule applied, see ``EDGE_NOTE``).
    ``n`` counts the accuracies behind ``mean`` (episodes x seeds); ``paired`` is empty without a reference
    or on the reference row, else true/false; ``diff``/``diff_ci`` are empty unless paired.
    """
    records = []
    for row in table.rows:
        for column in table.columns:
            cell = table.cells.get((row, column))
            if cell is None:
                continue
            diff = cell.diff
            records.append(
                {
                    "row": row,
                    "learner": cell.learner,
                    "way": cell.way,
                    "shot": cell.shot,
                    "mean": 100 * cell.result.mean,
                    "ci": 100 * cell.result.ci,
                    "ci_low": 100 * cell.bounds.lower,
                    "ci_high": 100 * cell.bounds.upper,
                    "std": 100 * cell.result.std,
                    "n": cell.result.n,
                    "seeds": cell.seeds,
                    "manifest_hash": ";".join(cell.manifests),
                    "reference": table.reference,
                    "diff": None if diff is None else 100 * diff.mean,
                    "diff_ci": None if diff is None else 100 * diff.ci,
                    "paired": cell.paired,
                    **cell.facts,
                }
            )
    return pd.DataFrame.from_records(records, columns=list(CSV_COLUMNS))


def render_csv(table: Table) -> str:
    return csv_frame(table).to_csv(index=False)


RENDERERS: dict[str, Callable[[Table], str]] = {
    "markdown": render_markdown,
    "latex": render_latex,
    "csv": render_csv,
}


def make_table(
    paths: Sequence[str | Path], fmt: str = "markdown", reference: str | None = None, warn: Warn = _stderr
) -> str:
    """Load, build and render in one call (what ``bench table`` does)."""
    if fmt not in RENDERERS:
        raise BenchError(f"unknown table format {fmt!r}: use one of {', '.join(RENDERERS)}")
    return RENDERERS[fmt](build_table(load_runs(paths, warn=warn), reference=reference, warn=warn))
