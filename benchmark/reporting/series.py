"""The numbers behind each figure, as DataFrames: what the figure draws and what the CSV beside it holds.

Every function takes the runs of :func:`benchmark.reporting.tables.load_runs` with a ``row`` column (the
table's row label: the learner, plus the keys that tell its variants apart) and groups them the way the
table does: one series per row, one panel per (way, shot) cell. Runs that differ in protocol, split,
queries, training episodes or iterations are therefore never averaged: they are separate rows whose label
names the difference, exactly as in ``bench table``. Accuracies are in percent, as in the table's CSV.

No matplotlib here: the numbers can be tested, and tabulated, without drawing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from benchmark.errors import BenchError
from benchmark.harness.rundir import RunDirError, read_steps, read_train_log
from benchmark.reporting.stats import SeedRun, accuracy_bounds, seeds_mean_ci
from benchmark.reporting.tables import Warn, build_table, dedupe_seeds, row_labels

#: train_log.csv columns drawn as learning curves: (column, name in the figure's CSV, scale to apply).
CURVE_METRICS = (("loss", "train_loss", 1.0), ("accuracy", "train_accuracy", 100.0),
                 ("val_accuracy", "val_accuracy", 100.0))
CELL = ["way", "shot"]


def labelled(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with the table's row labels in a ``row`` column (kept when already there)."""
    return runs if "row" in runs.columns else runs.assign(row=row_labels(runs))


def _quiet(message: str) -> None:
    """For repeated internal tabulations whose notes were already given once."""


def _read_or_skip(read: Callable[[str], Any], path: str, figure: str, warn: Warn) -> Any:
    """``read(path)``, or ``None`` with a note when the file is damaged: one bad run never hides the others."""
    try:
        return read(path)
    except RunDirError as exc:
        warn(f"skipping {path} in {figure}: {exc}")
        return None


# -- learning curves ----------------------------------------------------------------------------------------
def _seed_curve(path: str) -> pd.DataFrame | None:
    """One run's log: iteration, cumulative training time and the curve metrics (accuracies in percent)."""
    log = read_train_log(path)
    if log is None or log.empty:
        return None
    out = pd.DataFrame({"iteration": log["iteration"].astype(int)})
    if "seconds_per_iteration" in log.columns:
        # Each row covers the iterations since the previous row; validation time is not in it.
        steps = log["iteration"].diff().fillna(log["iteration"].iloc[0])
        out["train_time_s"] = (log["seconds_per_iteration"] * steps).cumsum()
    else:
        out["train_time_s"] = np.nan
    for column, name, scale in CURVE_METRICS:
        out[name] = log[column] * scale if column in log.columns else np.nan
    return out


def learning_curves(runs: pd.DataFrame, warn: Warn) -> pd.DataFrame:
    """Training loss, training accuracy and validation accuracy per logged iteration, per row and cell.

    Several seeds of a row are drawn as their mean with a band from the lowest to the highest seed, at the
    iterations every seed logged; ``train_time_s`` is the mean over seeds of the cumulative training time
    (wall clock, validation excluded). Seeds validated on different episodes (another ``--val-episodes``)
    are separate series, labelled ``[validation <hash>]``.

    Columns: ``row, learner, way, shot, validation, seeds, iteration, train_time_s`` and, for each of
    ``train_loss, train_accuracy, val_accuracy``: ``_mean, _min, _max`` (accuracies in percent; NaN where a
    run did not log the metric, or did not validate at that iteration).
    """
    runs = labelled(runs)
    frames = []
    for (row, way, shot), group in runs.groupby(["row", *CELL], sort=True):
        group = dedupe_seeds(group, str(row), warn)
        hashes = group["validation_manifest_hash"].fillna("unknown")
        if hashes.nunique() > 1:
            warn(f"note: seeds of {row} {way}w{shot}s were validated on different episodes: drawn as separate "
                 "curves")
        for validation, seeds in group.groupby(hashes, sort=True):
            label = str(row) if hashes.nunique() == 1 else f"{row} [validation {str(validation)[:8]}]"
            curves = []
            for path in seeds["path"]:
                curve = _read_or_skip(_seed_curve, path, "the learning curves", warn)
                if curve is None:
                    warn(f"skipping {path} in the learning curves: it has no train_log.csv rows")
                    continue
                curves.append(curve)
            if not curves:
                continue
            frames.append(_combine_seeds(curves, label, str(group["learner"].iloc[0]), int(way), int(shot),
                                         str(validation), warn))
    if not frames:
        raise BenchError("no run has a train_log.csv to draw learning curves from")
    return pd.concat(frames, ignore_index=True)


def _combine_seeds(curves: list[pd.DataFrame], row: str, learner: str, way: int, shot: int, validation: str,
                   warn: Warn) -> pd.DataFrame:
    """Mean, min and max over seeds at the iterations all of them logged."""
    common = sorted(set.intersection(*(set(c["iteration"]) for c in curves)))
    if len(common) < max(len(c) for c in curves):
        warn(f"note: the seeds of {row} {way}w{shot}s logged different iterations; their curves show the "
             f"{len(common)} iterations all of them logged")
    stacked = pd.concat([c.set_index("iteration").loc[common] for c in curves], keys=range(len(curves)))
    by_iteration = stacked.groupby(level="iteration")
    out = pd.DataFrame({"iteration": common})
    out.insert(0, "row", row)
    out.insert(1, "learner", learner)
    out.insert(2, "way", way)
    out.insert(3, "shot", shot)
    out.insert(4, "validation", validation)
    out.insert(5, "seeds", len(curves))
    out["train_time_s"] = by_iteration["train_time_s"].mean().to_numpy()
    for _, name, _ in CURVE_METRICS:
        # An iteration that no seed validated stays NaN (pandas skips NaN, and all-NaN gives NaN).
        out[f"{name}_mean"] = by_iteration[name].mean().to_numpy()
        out[f"{name}_min"] = by_iteration[name].min().to_numpy()
        out[f"{name}_max"] = by_iteration[name].max().to_numpy()
    return out


# -- accuracy against adaptation steps ------------------------------------------------------------------------
def adaptation_steps(runs: pd.DataFrame, warn: Warn) -> pd.DataFrame:
    """Test accuracy after each adaptation step, per row and cell, with the table's 95% interval per step.

    Each step is tabulated exactly like ``bench table`` tabulates the final accuracy (``build_table`` on the
    per-episode accuracies after that step: one seed, 1.96 s/sqrt(n) over episodes; several seeds, the t
    interval over seeds and episodes), so the last step is the table's cell. Runs of learners that do not
    adapt by gradient steps (no ``steps.csv``) are left out with a note.

    Columns: ``row, learner, way, shot, step, mean, ci, ci_low, ci_high, n, seeds`` (percent).
    """
    runs = labelled(runs)
    arrays, keep = [], []
    for index, path in runs["path"].items():
        steps = _read_or_skip(read_steps, path, "the adaptation-steps figure", warn)
        if steps is None:
            continue
        if steps.shape[1] != len(runs.at[index, "accuracy"]) or not np.allclose(steps[-1], runs.at[index, "accuracy"]):
            warn(f"skipping {path} in the adaptation-steps figure: the last step of steps.csv is not the accuracy "
                 "in episodes.csv; run it again with --force")
            continue
        arrays.append(steps)
        keep.append(index)
    without = sorted(set(runs["row"]) - set(runs.loc[keep, "row"]))
    if not keep:
        raise BenchError("no run recorded its accuracy after each adaptation step (steps.csv): only learners that "
                         "adapt by gradient steps and implement predict_steps do; pass runs of such a learner")
    if without:
        warn(f"note: no accuracy per adaptation step for {', '.join(without)} (their learners do not record it: "
             "no steps.csv); left out of the adaptation-steps figure")
    stepped = runs.loc[keep].assign(steps=arrays)
    for (row, way, shot), group in stepped.groupby(["row", *CELL]):
        if group["steps"].map(len).nunique() > 1:
            raise BenchError(f"the seeds of {row} {way}w{shot}s adapted for different numbers of steps "
                             f"({sorted(set(group['steps'].map(len) - 1))}); pass the runs of one setting")
    records = []
    for step in range(int(stepped["steps"].map(len).max())):
        at_step = stepped[stepped["steps"].map(len) > step]
        at_step = at_step.assign(accuracy=[a[step] for a in at_step["steps"]])
        table = build_table(at_step, warn=warn if step == 0 else _quiet)
        for cell in table.cells.values():
            records.append({"row": cell.row, "learner": cell.learner, "way": cell.way, "shot": cell.shot,
                            "step": step, "mean": 100 * cell.result.mean, "ci": 100 * cell.result.ci,
                            "ci_low": 100 * cell.bounds.lower, "ci_high": 100 * cell.bounds.upper,
                            "n": cell.result.n, "seeds": cell.seeds})
    return pd.DataFrame.from_records(records).sort_values(["way", "shot", "row", "step"], ignore_index=True)


# -- accuracy against compute ---------------------------------------------------------------------------------
def is_gpu(device: str | None) -> bool:
    return str(device or "").startswith("cuda")


def compute_points(runs: pd.DataFrame, warn: Warn) -> pd.DataFrame:
    """One point per run: its test accuracy (95% interval as ``bench table`` gives a single seed) against the
    wall time it took (training, validation and test evaluation) on its device.

    Columns: ``row, learner, way, shot, seed, device, device_name, gpu, wall_time_s, device_hours,
    iterations, ms_per_iteration, mean, ci_low, ci_high, n, path``; ``device_hours`` is GPU-hours on a GPU
    and CPU wall-clock hours on the CPU (one device per run).
    """
    runs = labelled(runs)
    records = []
    for _, run in runs.iterrows():
        wall = run["wall_time_s"]
        if not isinstance(wall, (int, float)) or not np.isfinite(wall):
            warn(f"skipping {run['path']} in the compute figure: its summary.json has no wall_time_s")
            continue
        result = seeds_mean_ci([SeedRun(run["manifest_hash"], run["accuracy"])])
        bounds = accuracy_bounds(result, int(run["way"]) * int(run["query"]))
        records.append({
            "row": run["row"], "learner": run["learner"], "way": int(run["way"]), "shot": int(run["shot"]),
            "seed": int(run["seed"]), "device": run["device"] or "unknown", "device_name": run["device_name"] or "unknown",
            "gpu": is_gpu(run["device"]), "wall_time_s": float(wall), "device_hours": float(wall) / 3600,
            "iterations": int(run["iterations"]), "ms_per_iteration": run["ms_per_iteration"],
            "mean": 100 * result.mean, "ci_low": 100 * bounds.lower, "ci_high": 100 * bounds.upper,
            "n": result.n, "path": run["path"],
        })
    if not records:
        raise BenchError("no finished run records its wall time (summary.json wall_time_s)")
    return pd.DataFrame.from_records(records).sort_values(["way", "shot", "row", "seed"], ignore_index=True)
