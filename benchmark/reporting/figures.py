"""The figures of ``bench plot`` and ``bench report``: one function per figure, each drawing the DataFrame
that :mod:`benchmark.reporting.series` (or the table) computed, so the CSV beside a figure is exactly what it
shows.

* :func:`learning_curves` -- training loss and accuracy, validation accuracy, against iterations and
  against training time; one figure per (way, shot) cell.
* :func:`interval_chart` -- per cell, each row's mean with its 95% interval and, with a reference, a forest
  plot of the paired differences: the statistics of ``bench table`` (``build_table``), not recomputed.
* :func:`compute_chart` -- test accuracy against device time, one point per run, the device named.
* :func:`steps_chart` -- test accuracy after each adaptation step, with the table's interval per step.

:func:`make` turns runs into finished figures by name; ``FIGURES`` lists the names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmark.errors import BenchError
from benchmark.reporting import series, style
from benchmark.reporting.style import Palette, PaperSize
from benchmark.reporting.tables import Table, Warn, build_table, cell_name, csv_frame

GREY = "#666666"
#: The glyph of each marker shape, to name the devices in a line of text (DejaVu Sans has them all).
MARKER_GLYPHS = {"o": "●", "s": "■", "^": "▲", "D": "◆"}


@dataclass
class Drawn:
    """A finished figure: its file stem, what it shows (for a report) and the numbers it drew."""

    name: str
    title: str
    caption: str
    figure: Any
    data: pd.DataFrame
    size: PaperSize

    def save(self, folder: Path, formats: tuple[str, ...] = style.FORMATS, dpi: int = style.PNG_DPI) -> list[Path]:
        """``<folder>/<name>.pdf|png`` and the drawn numbers as ``<name>.csv``."""
        written = style.save(self.figure, self.size, folder / self.name, formats, dpi)
        csv = folder / f"{self.name}.csv"
        self.data.to_csv(csv, index=False)
        return [*written, csv]


def _cells(frame: pd.DataFrame) -> list[tuple[int, int]]:
    return sorted({(int(w), int(s)) for w, s in zip(frame["way"], frame["shot"])})


def _cell_tag(way: int, shot: int) -> str:
    return f"{way}w{shot}s"


def _row_handles(rows: list[str], palette: Palette, marker: bool = True) -> tuple[list[Any], list[str]]:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=palette[r].color, linestyle=palette[r].linestyle,
                      marker=palette[r].marker if marker else None) for r in rows]
    return handles, list(rows)


def _with_seeds(row: str, seeds: int) -> str:
    """A legend label: the row, and how many seeds a line averages when more than one."""
    return f"{row} ({seeds} seeds)" if seeds > 1 else row


def _note(fig: Any, text: str, size: PaperSize) -> None:
    """A line of explanation under the panels (kept inside the figure by the layout engine)."""
    fig.supxlabel(text, fontsize=size.small, color=GREY, x=0.01, ha="left", wrap=True)


# -- learning curves -------------------------------------------------------------------------------------------
def learning_curves(curves: pd.DataFrame, palette: Palette, size: PaperSize) -> list[Drawn]:
    """One figure per cell: loss (log scale when it spans more than a decade) and accuracy against
    iterations (top) and training time (bottom); training accuracy solid, validation accuracy dashed with markers; several seeds as their mean
    with a band from the lowest to the highest seed.

    Line styles carry training against validation here, so rows that share a colour (past seven) are told
    apart by their marker, on their training lines too, not by the palette's line style."""
    from matplotlib.lines import Line2D

    drawn = []
    for way, shot in _cells(curves):
        data = curves[(curves["way"] == way) & (curves["shot"] == shot)]
        unit, per = style.time_unit(data["train_time_s"].tolist())
        with style.styled(size):
            fig, axes = style.new_figure(size, 4, panel_height=1.55, columns=2)
            rows = sorted(data["row"].unique())
            for row in rows:
                one = data[data["row"] == row]
                color, marker = palette[row].color, _curve_marker(palette, row)
                for ax, x in ((axes[0], one["iteration"]), (axes[2], one["train_time_s"] / per)):
                    _band_line(ax, x, one, "train_loss", color, "-", marker, sparse=True)
                for ax, x in ((axes[1], one["iteration"]), (axes[3], one["train_time_s"] / per)):
                    _band_line(ax, x, one, "train_accuracy", color, "-", marker, sparse=True)
                    _band_line(ax, x, one, "val_accuracy", color, "--", marker or "o")
            for ax in (axes[0], axes[2]):
                ax.set_ylabel("training loss")
                if _spans_decades(pd.concat([data["train_loss_min"], data["train_loss_max"]])):
                    _log_axis(ax.yaxis)
            for ax in (axes[1], axes[3]):
                ax.set_ylabel("accuracy (%)")
            for ax in axes[:2]:
                ax.set_xlabel("training iteration")
            for ax in axes[2:]:
                ax.set_xlabel(f"training time ({unit})")
            seeds = data.groupby("row")["seeds"].max()
            handles = [Line2D([], [], color=palette[r].color, linestyle="-", marker=_curve_marker(palette, r))
                       for r in rows]
            labels = [_with_seeds(row, seeds[row]) for row in rows]
            handles += [Line2D([], [], color=GREY, linestyle="-"), Line2D([], [], color=GREY, linestyle="--", marker="o")]
            labels += ["training", "validation"]
            style.legend_on_top(fig, handles, labels, size)
            band = "; several seeds: line = their mean, shaded = lowest to highest seed" if seeds.max() > 1 else ""
            _note(fig, f"{cell_name(way, shot)}. Training metrics are each learner's own (its loss and batch "
                       f"accuracy); validation: {way}-way episodes of the validation split; training time excludes "
                       f"validation{band}.", size)
        drawn.append(Drawn(
            f"curves-{_cell_tag(way, shot)}", f"Learning curves, {cell_name(way, shot)}",
            "Training loss and accuracy, validation accuracy, against training iterations (top) and "
            "training time (bottom, validation excluded)" + (", several seeds as mean and range" if seeds.max() > 1 else "")
            + ".", fig, data.reset_index(drop=True), size))
    return drawn


def _log_axis(axis: Any) -> None:
    """A log scale with ticks at 1, 2, 5 x 10^k labelled as plain numbers (0.5, 1, 2), not powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.axes.set_yscale("log") if axis.axis_name == "y" else axis.axes.set_xscale("log")
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _spans_decades(values: pd.Series) -> bool:
    """Whether positive values span more than a factor of ten (then a log axis shows them better)."""
    values = values.dropna()
    return bool(len(values)) and values.min() > 0 and values.max() / values.min() > 10


def _curve_marker(palette: Palette, row: str) -> str | None:
    """The marker that tells a learning curve from another of the same colour: none in the first lap of the
    palette, the row's own after it."""
    return palette[row].marker if palette[row].lap > 0 else None


#: Markers on a dense line (a training log): about this many per line, so that the line stays readable.
SPARSE_MARKERS = 8


def _band_line(ax: Any, x: pd.Series, data: pd.DataFrame, metric: str, color: str, linestyle: str,
               marker: str | None, sparse: bool = False) -> None:
    present = data[f"{metric}_mean"].notna().to_numpy()
    if not present.any():
        return
    xs = np.asarray(x, dtype=float)[present]
    every = max(1, len(xs) // SPARSE_MARKERS) if sparse else 1
    ax.plot(xs, data[f"{metric}_mean"].to_numpy()[present], color=color, linestyle=linestyle, marker=marker,
            markersize=2.5 if marker else None, markevery=every)
    if (data["seeds"] > 1).any():
        ax.fill_between(xs, data[f"{metric}_min"].to_numpy()[present], data[f"{metric}_max"].to_numpy()[present],
                        color=color, alpha=0.18, linewidth=0)


# -- interval chart --------------------------------------------------------------------------------------------
def interval_chart(table: Table, palette: Palette, size: PaperSize) -> Drawn:
    """Per cell: every row's mean with its 95% interval as the table shows it (edge-of-scale rules
    included); with a reference, beside it the paired differences to the reference (a forest plot)."""
    columns, rows = table.columns, table.rows
    reference = table.reference
    per_cell = 2 if reference else 1
    with style.styled(size):
        fig, axes = style.new_figure(size, len(columns) * per_cell, panel_height=0.35 + 0.22 * len(rows),
                                     columns=2 if reference else None, sharey=True)
        y = {row: len(rows) - 1 - i for i, row in enumerate(rows)}
        unpaired = False
        for c, column in enumerate(columns):
            ax = axes[c * per_cell]
            for row in rows:
                cell = table.cells.get((row, column))
                if cell is None:
                    ax.text(0.02, y[row], "no run", transform=ax.get_yaxis_transform(), va="center",
                            color=GREY, fontsize=size.small)
                    continue
                mean, low, high = (100 * v for v in (cell.result.mean, cell.bounds.lower, cell.bounds.upper))
                ax.errorbar([mean], [y[row]], xerr=[[mean - low], [high - mean]], fmt=palette[row].marker,
                            color=palette[row].color, markersize=4)
            ax.set_title(cell_name(*column))
            ax.set_xlabel("test accuracy (%), 95% CI")
            if reference:
                unpaired |= _forest(axes[c * per_cell + 1], table, column, y, palette, size)
        axes[0].set_yticks(list(y.values()), list(y.keys()))
        axes[0].set_ylim(-0.7, len(rows) - 0.3)
        notes = []
        if reference:
            notes.append(f"Δ: paired difference to {reference} on identical test episodes (percentage points).")
        if unpaired:
            notes.append(f"n/p: scored on other test episodes than {reference} (another manifest), so not paired.")
        if any(c.seeds > 1 for c in table.cells.values()):
            notes.append("Several seeds: t interval over seeds and episodes, as in bench table.")
        if notes:
            _note(fig, " ".join(notes), size)
    caption = ("Mean test accuracy with its 95% confidence interval per cell, the statistics of bench table"
               + (f"; right: paired differences to {reference} with their 95% CI." if reference else "."))
    return Drawn("intervals", "Accuracy with 95% intervals" + (f" and differences to {reference}" if reference else ""),
                 caption, fig, csv_frame(table), size)


def _forest(ax: Any, table: Table, column: tuple[int, int], y: dict[str, float], palette: Palette,
            size: PaperSize) -> bool:
    """The Δ panel of one cell; returns whether some row could not be paired."""
    unpaired = False
    ax.axvline(0, color=GREY, linewidth=0.6, zorder=0)
    for row, pos in y.items():
        cell = table.cells.get((row, column))
        if row == table.reference:
            if cell is not None:
                ax.plot([0], [pos], marker="D", color=palette[row].color, markerfacecolor="white", markersize=4)
                ax.annotate("reference", (0, pos), xytext=(5, 0), textcoords="offset points", va="center",
                            fontsize=size.small, color=GREY)
            continue
        if cell is None or cell.paired is None:
            continue
        if not cell.paired or cell.diff is None:
            unpaired = True
            ax.annotate("n/p", (0, pos), xytext=(5, 0), textcoords="offset points", va="center",
                        fontsize=size.small, color=GREY)
            continue
        ax.errorbar([100 * cell.diff.mean], [pos], xerr=[[100 * cell.diff.ci]], fmt=palette[row].marker,
                    color=palette[row].color, markersize=4)
    ax.set_title(f"{cell_name(*column)}, Δ to {table.reference}")
    ax.set_xlabel("difference (pp), 95% CI")
    low, high = ax.get_xlim()
    reach = max(abs(low), abs(high))
    ax.set_xlim(-reach, reach)  # zero in the middle, so left of it reads as worse at a glance
    return unpaired


# -- accuracy against compute ----------------------------------------------------------------------------------
def compute_chart(points: pd.DataFrame, palette: Palette, size: PaperSize) -> Drawn:
    """Per cell: each run's test accuracy (95% CI) against the wall time it took on its device; colour by row,
    marker shape by device when the runs ran on several devices, else the row's own marker (which tells rows
    apart past the seventh colour); log time axis when the times span more than a factor of ten."""
    cells = _cells(points)
    devices = list(dict.fromkeys(f"{n} ({d})" for n, d in zip(points["device_name"], points["device"])))
    device_marker = {d: style.MARKERS[i % len(style.MARKERS)] for i, d in enumerate(devices)}
    unit, per = style.time_unit(points["wall_time_s"].tolist())
    if points["gpu"].all():
        xlabel = "GPU-hours" if unit == "hours" else f"GPU time ({unit})"
    elif not points["gpu"].any():
        xlabel = f"CPU wall time ({unit})"
    else:
        xlabel = f"wall time on one device ({unit})"
    with style.styled(size):
        fig, axes = style.new_figure(size, len(cells), panel_height=2.0)
        for ax, (way, shot) in zip(axes, cells):
            data = points[(points["way"] == way) & (points["shot"] == shot)]
            for _, p in data.iterrows():
                device = f"{p['device_name']} ({p['device']})"
                marker = device_marker[device] if len(devices) > 1 else palette[p["row"]].marker
                ax.errorbar([p["wall_time_s"] / per], [p["mean"]],
                            yerr=[[p["mean"] - p["ci_low"]], [p["ci_high"] - p["mean"]]],
                            fmt=marker, color=palette[p["row"]].color, markersize=4)
            if _spans_decades(data["wall_time_s"]):
                _log_axis(ax.xaxis)
            else:
                ax.set_xlim(0, 1.06 * data["wall_time_s"].max() / per)  # costs read as proportions from zero
            ax.set_title(cell_name(way, shot))
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy (%), 95% CI")
        rows = sorted(points["row"].unique())
        style.legend_on_top(fig, *_row_handles(rows, palette, marker=len(devices) == 1), size)
        if len(devices) == 1:
            where = f"device: {devices[0]}"
        else:
            where = "marker = device: " + "; ".join(f"{MARKER_GLYPHS[device_marker[d]]} {d}" for d in devices)
        _note(fig, f"One point per run, {where}. Time: training, validation and test evaluation.", size)
    caption = ("Test accuracy (95% CI) against the wall time of each run on its device (GPU-hours on a GPU), "
               "training, validation and evaluation included: what a point of accuracy costs.")
    return Drawn("compute", "Accuracy against compute", caption, fig, points.drop(columns="path"), size)


# -- accuracy against adaptation steps ---------------------------------------------------------------------------
def steps_chart(steps: pd.DataFrame, palette: Palette, size: PaperSize) -> Drawn:
    """Per cell: test accuracy after 0..S adaptation steps per row, with the table's 95% interval per step
    as a band; the last step is the table's cell."""
    cells = _cells(steps)
    with style.styled(size):
        fig, axes = style.new_figure(size, len(cells), panel_height=2.0)
        for ax, (way, shot) in zip(axes, cells):
            data = steps[(steps["way"] == way) & (steps["shot"] == shot)]
            for row, one in data.groupby("row", sort=True):
                s = palette[row]
                ax.plot(one["step"], one["mean"], color=s.color, linestyle=s.linestyle, marker=s.marker)
                ax.fill_between(one["step"], one["ci_low"], one["ci_high"], color=s.color, alpha=0.18, linewidth=0)
            ax.axhline(100 / way, color=GREY, linewidth=0.6, linestyle=":", zorder=0)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_title(cell_name(way, shot))
            ax.set_xlabel("adaptation steps at test time")
            ax.set_ylabel("test accuracy (%), 95% CI")
        seeds = steps.groupby("row")["seeds"].max()
        handles, rows = _row_handles(sorted(seeds.index), palette)
        style.legend_on_top(fig, handles, [_with_seeds(row, seeds[row]) for row in rows], size)
        _note(fig, "Band: 95% CI per step, as bench table computes it; dotted: chance (100/way %). "
                   "The last step is the table's accuracy.", size)
    caption = ("Test accuracy after each adaptation step for learners that adapt by gradient steps, with the "
               "95% interval of bench table at every step; step 0 is before adaptation.")
    return Drawn("steps", "Accuracy against adaptation steps", caption, fig, steps, size)


# -- by name ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FigureKind:
    name: str
    help: str
    draw: Callable[[pd.DataFrame, Palette, PaperSize, str | None, Warn], list[Drawn]]


def _curves(runs, palette, size, reference, warn):
    return learning_curves(series.learning_curves(runs, warn), palette, size)


def _intervals(runs, palette, size, reference, warn):
    table = build_table(runs, reference=reference, warn=warn)
    if reference and not any(c.paired for c in table.cells.values()):
        raise BenchError(f"no run can be paired with {table.reference}: every run was scored on other test "
                         "episodes (another manifest) or in a cell without a reference run; pass runs with the "
                         "same --episode-seed and cell, or drop --reference")
    return [interval_chart(table, palette, size)]


def _compute(runs, palette, size, reference, warn):
    return [compute_chart(series.compute_points(runs, warn), palette, size)]


def _steps(runs, palette, size, reference, warn):
    return [steps_chart(series.adaptation_steps(runs, warn), palette, size)]


FIGURES = {
    "curves": FigureKind("curves", "Learning curves: training loss and accuracy, validation accuracy, against "
                         "iterations and training time.", _curves),
    "intervals": FigureKind("intervals", "Mean test accuracy with its 95% CI per cell; with --reference, a forest "
                            "plot of the paired differences.", _intervals),
    "compute": FigureKind("compute", "Test accuracy against compute: GPU-hours (CPU wall time on the CPU) per run, "
                          "the device named.", _compute),
    "steps": FigureKind("steps", "Test accuracy against adaptation steps, 95% CI per step (learners that adapt by "
                        "gradient steps).", _steps),
}


def make(name: str, runs: pd.DataFrame, size: PaperSize, reference: str | None = None,
         warn: Warn = series._quiet) -> list[Drawn]:
    """Draw figure ``name`` of ``runs`` (from ``load_runs``); colours from the palette of all of ``runs``."""
    runs = series.labelled(runs)
    palette = Palette(runs["row"])
    return FIGURES[name].draw(runs, palette, size, reference, warn)
