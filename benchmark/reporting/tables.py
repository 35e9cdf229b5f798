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
  degrees of freedom; :mod:`benchmark.reporting.stats`), which covers training randomness as well as episodes.
* **Intervals.** The caption says what each ``±`` covers: with one seed, the sampling of test episodes
  only. A Δ from one seed per learner says so in a footnote. An accuracy whose interval would pass 0% or
  100%, or would have zero width, shows ``[low, high]`` instead (:func:`benchmark.reporting.stats.accuracy_bounds`).
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
from benchmark.harness.rundir import FINISHED, FinishedRun, RunDirError, find_run_dirs, read_finished_run
from benchmark.reporting.stats import Bounds, MeanCI, SeedRun, accuracy_bounds, seeds_difference, seeds_mean_ci

#: Run settings that define the experiment: runs differing in one of them are never combined.
EXPERIMENT_KEYS = ("protocol", "split_hash", "rotations", "query", "train", "iterations", "reduced", "select")
#: Protocol facts the harness itself knows, shown for every run: (label, record key). The learner's own facts
#: (its ``describe()``, keyed by label) follow them.
HARNESS_FACTS = (
    ("split", "split"),
    ("rotations", "rotations"),
    ("queries/class", "query"),
    ("training episodes", "train"),
    ("weights tested", "select"),
)
MISSING = "—"
NOT_PAIRED = "n/p"

Warn = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# --------------------------------------------------------------------------------------------------------
# Loading


def _json_value(value: Any) -> str:
    """A canonical string for comparing config values (dicts/lists included)."""
    return json.dumps(value, sort_keys=True, default=str)


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _record(finished: FinishedRun) -> dict[str, Any]:
    """One finished run as a flat record (a DataFrame row)."""
    config, run, summary = finished.config, finished.run, finished.summary
    protocol = config.get("protocol") if isinstance(config.get("protocol"), dict) else {}
    describe = config.get("describe") if isinstance(config.get("describe"), dict) else {}
    plugin = config.get("plugin") if isinstance(config.get("plugin"), dict) else {}
    train = (run["train_way"], run["train_shot"], run["train_query"])
    record: dict[str, Any] = {
        "path": str(finished.path),
        "learner": run["learner"],
        "way": run["way"],
        "shot": run["shot"],
        "query": run["query"],
        "train": "as test" if train == (run["way"], run["shot"], run["query"]) else "{}w{}s, {} queries/class".format(*train),
        "seed": run["seed"],
        "iterations": run["iterations"],
        "select": run["select"] + (f" (ensemble of {run['ensemble']})" if run.get("ensemble", 1) > 1 else ""),
        "episodes": finished.accuracy.size,
        "reduced": bool(run.get("reduced", False)),
        "preset": run.get("preset"),
        "protocol": run.get("protocol"),
        "split_hash": protocol.get("split_hash"),
        "rotations": "/".join(str(r) for r in protocol.get("rotations", [])) or None,
        "manifest_hash": str(config["manifest_hash"]),
        "learner_config": _json_value(run.get("learner_config", {})),
        "describe": describe,
        "plugin": plugin.get("distribution") or plugin.get("file") or plugin.get("plugin"),
        "plugin_version": plugin.get("version"),
        "code_sha256": plugin.get("code_sha256"),
        "device": config.get("device"),
        "device_name": config.get("device_name"),
        "torch_version": config.get("torch_version"),
        "tf32": (config.get("tf32_convolutions"), config.get("tf32_matmul")),
        "validation_manifest_hash": config.get("validation_manifest_hash"),
        "accuracy_mean": summary.get("accuracy_mean"),
        "ci95": summary.get("ci95"),
        "n": finished.accuracy.size,
        "wall_time_s": summary.get("wall_time_s"),
        "ms_per_iteration": summary.get("ms_per_iteration"),
        "peak_memory_mb": summary.get("peak_memory_mb"),
        "accuracy": finished.accuracy,
    }
    # The experiment identity used to tell variants apart (see the module docstring).
    variant = {f"learner_config.{k}": _json_value(v) for k, v in (run.get("learner_config") or {}).items()}
    variant.update({f"describe.{k}": _json_value(v) for k, v in describe.items()})
    variant.update({k: _json_value(record[k]) for k in EXPERIMENT_KEYS})
    record["variant"] = variant
    # Computed before the DataFrame exists: pandas would turn an int column with a gap into floats (1.0).
    split = MISSING if record["protocol"] is None else f"{record['protocol']} ({str(record['split_hash'] or '?')[:8]})"
    facts = {"split": split, "rotations": _text(record["rotations"]), "query": _text(record["query"]),
             "train": record["train"], "select": _text(record["select"])}
    facts.update({f"describe.{k}": _text(v) for k, v in describe.items()})
    record["facts"] = facts
    return record


def load_runs(paths: Iterable[str | Path], warn: Warn = _stderr) -> pd.DataFrame:
    """Load every finished run below ``paths``: one DataFrame row per run.

    Columns: the run's settings (``learner, way, shot, query, train, seed, iterations, select, reduced,
    preset, protocol, split_hash, rotations, manifest_hash``), its plugin (``plugin, plugin_version,
    code_sha256``), ``describe`` (the learner's facts), where it ran (``device``, e.g. ``cpu`` or ``cuda:0``,
    and ``device_name``), ``validation_manifest_hash``, summary facts (``accuracy_mean, ci95, n,
    wall_time_s, ms_per_iteration, peak_memory_mb``), ``accuracy`` (a float array ``[n]`` in episode order),
    ``variant`` (a dict of the settings that define the experiment) and ``facts`` (the protocol facts as the
    table shows them). Unfinished runs are skipped with a note; so are runs whose files are damaged (the
    note names the file), so one bad run never hides the others.

    :param warn: called with one line per skipped directory (default: print to stderr).
    :raises BenchError: when no finished run is found.
    """
    paths = list(paths)
    records = []
    for run_dir in find_run_dirs(paths):
        try:
            finished = read_finished_run(run_dir)
        except RunDirError as exc:
            warn(f"skipping {run_dir}: {exc}")
            continue
        if finished is None:
            missing = [name for name in FINISHED if not (run_dir / name).is_file()]
            warn(f"skipping {run_dir}: no {', '.join(missing)} (unfinished run?)")
            continue
        records.append(_record(finished))
    if not records:
        where = ", ".join(str(p) for p in paths)
        raise BenchError(
            f"no finished runs under {where}: a run directory needs config.json, episodes.csv and summary.json "
            "with status 'complete'; run `bench run` first or pass the directory it wrote to"
        )
    return pd.DataFrame.from_records(records)


def fact_columns(runs: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    """(label, fact key) of every protocol fact: the harness's, then each learner fact label in the order
    runs report them."""
    labels: dict[str, str] = {}
    for facts in runs:
        for key in facts:
            if key.startswith("describe."):
                labels.setdefault(key[len("describe."):], key)
    return list(HARNESS_FACTS) + list(labels.items())


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
    #: The plugin that produced the runs: distribution (or file), version, code hash (";"-joined if several).
    plugin: dict[str, str] = field(default_factory=dict)
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


def row_labels(runs: pd.DataFrame) -> pd.Series:
    """A row label per run: the learner name, plus the keys that tell its variants apart in some cell (the
    rows of the table, and the series of every figure)."""
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


def dedupe_seeds(group: pd.DataFrame, row: str, warn: Warn) -> pd.DataFrame:
    """Keep one run per seed: identical copies collapse (with a note); so do GPU repeats on the same test
    episodes with the same code and setup (``GPU_REPEAT_KEYS``), which may differ by rounding (GPU kernels do
    not add in a fixed order); other disagreeing copies are an error that says why they differ where it can."""
    keep = []
    for seed, same in group.groupby("seed", dropna=False, sort=True):
        first = same.iloc[0]
        for _, other in same.iloc[1:].iterrows():
            same_episodes = other["manifest_hash"] == first["manifest_hash"]
            if same_episodes and np.array_equal(other["accuracy"], first["accuracy"]):
                warn(f"note: {other['path']} repeats {first['path']} (same seed, same accuracies); counted once")
                continue
            devices = {_device_type(first), _device_type(other)}
            setup = [key for key in GPU_REPEAT_KEYS if first.get(key) != other.get(key)]
            if same_episodes and devices == {"cuda"} and not setup:
                shift = 100 * abs(float(np.mean(other["accuracy"])) - float(np.mean(first["accuracy"])))
                warn(f"note: {other['path']} repeats {first['path']} on a GPU with the same code and setup (same "
                     f"seed; GPU runs may round differently, here {shift:.2f} points apart); counted once, the "
                     "first kept")
                continue
            if len(devices) > 1:
                why = f" (they ran on {' and '.join(sorted(devices))}, whose training episode streams differ)"
            elif devices == {"cuda"} and setup:
                why = f" (GPU runs with different {', '.join(setup)})"
            else:
                why = ""
            raise BenchError(
                f"two runs of {row} {cell_name(first['way'], first['shot'])} with seed {seed} disagree{why}: "
                f"{first['path']} and {other['path']}; remove one, or pass only the directories to tabulate"
            )
        keep.append(same.index[0])
    return group.loc[keep]


#: What two GPU runs of one seed must share to be repeats of one result (their learner code, torch, TF32
#: flags and GPU model): a rerun after a fix of the learner is another result, not a repeat.
GPU_REPEAT_KEYS = ("code_sha256", "torch_version", "tf32", "device_name")


def _device_type(run: pd.Series) -> str:
    return str(run.get("device") or "cpu").split(":")[0]


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
            "freedom (see benchmark.reporting.stats)."
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


#: Footnote for cells shown as ``[low, high]`` (:func:`benchmark.reporting.stats.accuracy_bounds`).
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


def _cells(runs: pd.DataFrame, warn: Warn) -> dict[tuple[str, tuple[int, int]], Cell]:
    """One :class:`Cell` per (row label, (way, shot)), its seeds pooled (``runs`` has a ``row`` column)."""
    cells: dict[tuple[str, tuple[int, int]], Cell] = {}
    for (row, way, shot), group in runs.groupby(["row", "way", "shot"], sort=False):
        group = dedupe_seeds(group, str(row), warn)
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
            plugin={k: ";".join(sorted({str(v) for v in group[k] if v is not None})) for k in PLUGIN_COLUMNS},
        )
    return cells


def _pair_with_reference(cells: dict[tuple[str, tuple[int, int]], Cell], reference: str) -> list[str]:
    """Set every other row's paired difference to ``reference`` in place; returns the Δ footnotes."""
    seed_counts: set[tuple[int, int]] = set()  # (row's seeds, reference's seeds) of every Δ shown
    for (row, column), cell in cells.items():
        base = cells.get((reference, column))
        if row == reference or base is None:
            continue
        cell.paired = set(cell.manifests) == set(base.manifests)
        if cell.paired:
            cell.diff = seeds_difference(cell.runs, base.runs)
            seed_counts.add((cell.seeds, base.seeds))
    footnotes = [
        f"Δ: paired difference to {reference} (this row minus {reference}) on identical test episodes "
        "(same manifest hash): mean of the per-episode differences ± 95% CI."
    ]
    footnotes += _delta_coverage_notes(seed_counts)
    if any(c.paired is False for c in cells.values()):
        footnotes.append(
            f"{NOT_PAIRED}: not paired: this run and the {reference} run were scored on different test "
            "episodes (different manifest hashes), so no difference is reported."
        )
    return footnotes


def _place_facts(cells: dict[tuple[str, tuple[int, int]], Cell], rows: list[str], facts: list[tuple[str, str]]
                 ) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """Protocol facts (``facts``: :func:`fact_columns` of the cells): ``(fixed, per_row)``: in the caption when
    every run agrees, else one column per fact with each row's values summarized over its cells."""
    fixed: dict[str, str] = {}
    per_row: dict[str, dict[str, str]] = {}
    for label, key in facts:
        values = {c.facts.get(key, MISSING) for c in cells.values()}
        if len(values) == 1:
            fixed[label] = values.pop()
            continue
        per_row[label] = {
            row: _summarize_facts({col: c.facts.get(key, MISSING) for (r, col), c in cells.items() if r == row})
            for row in rows
        }
    return fixed, per_row


def build_table(runs: pd.DataFrame, reference: str | None = None, warn: Warn = _stderr) -> Table:
    """Group runs into rows and (way, shot) columns and compute every cell's statistics.

    :param runs: the output of :func:`load_runs`; a ``row`` column, when present, is kept as the row labels
        (figures tabulate a subset of a folder's runs under the labels of the whole folder).
    :param reference: a learner name (or an exact row label) to compare every row against.
    :raises BenchError: unknown reference, or two disagreeing runs of the same seed.
    """
    if "row" not in runs.columns:
        runs = runs.assign(row=row_labels(runs))
    cells = _cells(runs, warn)
    learners = {c.row: c.learner for c in cells.values()}
    rows = sorted(learners, key=lambda r: (learners[r], r))
    columns = sorted({key[1] for key in cells})
    footnotes: list[str] = []
    if reference is not None:
        reference = _resolve_reference(reference, rows, learners)
        rows.remove(reference)
        rows.insert(0, reference)
        footnotes += _pair_with_reference(cells, reference)
    reduced_rows = sorted(set(runs.loc[runs["reduced"].astype(bool), "row"]))
    if reduced_rows:
        footnotes.append(
            f"Reduced protocol: {', '.join(reduced_rows)} ran fewer meta-iterations than their preset; do not "
            "compare them with the paper's numbers."
        )
    facts = fact_columns(c.facts for c in cells.values())
    fact_missing = any(c.facts.get(key, MISSING) == MISSING for c in cells.values() for _, key in facts)
    if fact_missing or any((row, column) not in cells for row in rows for column in columns):
        footnotes.append(
            f"{MISSING}: no finished run for this cell (in a Δ column: for this row or the reference); "
            "in a protocol column: not reported by the learner."
        )
    fixed, per_row = _place_facts(cells, rows, facts)
    if any(c.bounds.rule != "normal" for c in cells.values()):
        footnotes.append(EDGE_NOTE)
    return Table(rows, columns, cells, per_row, _caption(cells.values(), fixed), footnotes, reference)


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
    magnitude = _pct(abs(cell.diff.mean))
    # The sign of what is shown: a difference that rounds to zero (e.g. -1e-15 between identical runs) is +0.00.
    sign = "-" if cell.diff.mean < 0 and float(magnitude) != 0 else "+"
    return f"{sign}{magnitude} ± {_pct(cell.diff.ci)}"


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
    # disable_numparse: tabulate would reprint number-like strings ("98.80" as 98.8) and realign them.
    lines = [f"Table: {caption}", "", frame.to_markdown(index=False, disable_numparse=True)]
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
#: Superscript letters used as footnote marks (``--layout compact``), each with its plain letter.
SUPERSCRIPTS = dict(zip("ᵃᵇᶜᵈᵉᶠᵍʰⁱʲᵏˡᵐⁿᵒᵖʳˢᵗᵘᵛʷˣʸᶻ", "abcdefghijklmnoprstuvwxyz"))
# The few non-ASCII characters we emit, spelled so that plain pdflatex needs no package for them.
_LATEX_UNICODE = {"±": r"$\pm$", "Δ": r"$\Delta$", "—": "---", "×": r"$\times$",
                  **{mark: rf"\textsuperscript{{{letter}}}" for mark, letter in SUPERSCRIPTS.items()}}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters (one pass, so escapes are never escaped again)."""
    return "".join(_LATEX_SPECIALS.get(ch, _LATEX_UNICODE.get(ch, ch)) for ch in text)


def render_latex(table: Table) -> str:
    """A ``table`` float with a plain ``tabular``: compiles with pdflatex as pasted, no extra packages."""
    return frame_latex(display_frame(table), table.caption, table.footnotes)


def frame_latex(frame: pd.DataFrame, caption: str, footnotes: Iterable[str] = (), font: str = "\\small",
                tabcolsep: str | None = None) -> str:
    """Any frame of strings as a ``table`` float with a plain ``tabular`` (first column left, others centred).

    :param font: the size command for the float (``\\small``; ``\\footnotesize`` for a narrow column).
    :param tabcolsep: the gap on each side of a column (LaTeX's default is 6pt), set inside the float only.
    """
    align = "l" + "c" * (frame.shape[1] - 1)

    def line(values: Iterable[str]) -> str:
        # A minus sign, not a hyphen, in front of negative differences.
        cells = (re.sub(r"(?<![\w.])-(?=\d)", r"$-$", latex_escape(str(v))) for v in values)
        return " & ".join(cells) + r" \\"

    out = [
        "% metabench results table. Plain LaTeX2e: needs no \\usepackage (no booktabs).",
        "% Too wide for the page? bench table --layout compact (one-column paper) or narrow (two-column paper).",
        r"\begin{table}[htbp]",
        r"\centering",
        font,
        *([rf"\setlength{{\tabcolsep}}{{{tabcolsep}}}"] if tabcolsep else []),
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


def render_html(table: Table) -> str:
    """An HTML ``<table>`` with its caption and the footnotes under it (no styles, no scripts)."""
    return frame_html(display_frame(table), table.caption, table.footnotes)


def frame_html(frame: pd.DataFrame, caption: str, footnotes: Iterable[str] = ()) -> str:
    """Any frame of strings as an HTML table: the first column as row headers, the caption as ``<caption>``."""
    from html import escape

    head = "".join(f'<th scope="col">{escape(str(c))}</th>' for c in frame.columns)
    body = []
    for values in frame.itertuples(index=False):
        first, *rest = (escape(str(v)) for v in values)
        body.append(f'<tr><th scope="row">{first}</th>' + "".join(f"<td>{v}</td>" for v in rest) + "</tr>")
    out = [f"<table>\n<caption>{escape(caption)}</caption>", f"<thead><tr>{head}</tr></thead>",
           "<tbody>", *body, "</tbody>\n</table>"]
    footnotes = list(footnotes)
    if footnotes:
        out += ['<ul class="footnotes">', *(f"<li>{escape(n)}</li>" for n in footnotes), "</ul>"]
    return "\n".join(out) + "\n"


CSV_COLUMNS = (
    "row", "learner", "way", "shot", "mean", "ci", "ci_low", "ci_high", "std", "n", "seeds", "manifest_hash",
    "reference", "diff", "diff_ci", "paired",
)  # fmt: skip
#: Where a row's numbers come from, in the CSV: the plugin's distribution (or file), version, code hash.
PLUGIN_COLUMNS = ("plugin", "plugin_version", "code_sha256")


def csv_frame(table: Table) -> pd.DataFrame:
    """One row per (row, cell); ``mean, ci, ci_low, ci_high, std, diff, diff_ci`` in percent at full precision.

    ``ci_low``/``ci_high``: the ends of the interval as the table shows it (``mean ± ci`` unless an
    edge-of-scale rule applied, see ``EDGE_NOTE``).
    ``n`` counts the accuracies behind ``mean`` (episodes x seeds); ``paired`` is empty without a reference
    or on the reference row, else true/false; ``diff``/``diff_ci`` are empty unless paired. Then the plugin
    columns and one column per protocol fact (harness facts by key, learner facts by their label).
    """
    facts = fact_columns(c.facts for c in table.cells.values())
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
                    **cell.plugin,
                    **{label if key.startswith("describe.") else key: cell.facts.get(key, MISSING)
                       for label, key in facts},
                }
            )
    fact_names = [label if key.startswith("describe.") else key for label, key in facts]
    return pd.DataFrame.from_records(records, columns=[*CSV_COLUMNS, *PLUGIN_COLUMNS, *fact_names])


def render_csv(table: Table) -> str:
    return csv_frame(table).to_csv(index=False)


RENDERERS: dict[str, Callable[[Table], str]] = {
    "markdown": render_markdown,
    "latex": render_latex,
    "html": render_html,
    "csv": render_csv,
}


def make_table(
    paths: Sequence[str | Path], fmt: str = "markdown", reference: str | None = None, warn: Warn = _stderr,
    layout: str = "wide",
) -> str:
    """Load, build and render in one call (what ``bench table`` does); ``layout``: see
    :mod:`benchmark.reporting.layouts`."""
    # Imported here: layouts builds on this module's renderers.
    from benchmark.reporting.layouts import LAYOUTS, render

    if fmt not in RENDERERS:
        raise BenchError(f"unknown table format {fmt!r}: use one of {', '.join(RENDERERS)}")
    if layout not in LAYOUTS:
        raise BenchError(f"unknown table layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    return render(build_table(load_runs(paths, warn=warn), reference=reference, warn=warn), fmt, layout)
