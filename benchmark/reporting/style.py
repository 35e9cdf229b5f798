"""The look every figure shares: paper sizes, fonts that survive a LaTeX build, a colour-blind-safe palette
with a stable colour per learner, and the one way figures are written to disk.

matplotlib is imported inside the functions: ``bench --help`` and ``bench table`` must not pay for it.
Figures are ``matplotlib.figure.Figure`` objects on an Agg canvas, never pyplot, so nothing needs a display
and no global figure state leaks between figures.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The Okabe-Ito palette (Okabe & Ito 2008), distinguishable with the common colour-vision deficiencies, in
#: the order series get them. Its yellow (#F0E442) is left out: too faint on white for lines and points.
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#E69F00", "#56B4E9", "#CC79A7", "#000000")
#: Beyond seven series the colours repeat with another line style and marker, so no two series look alike.
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")


@dataclass(frozen=True)
class PaperSize:
    """A figure width for one kind of paper, and the font sizes that read well at that width."""

    width: float  # inches
    font: float  # points, labels and titles
    small: float  # points, ticks and legends
    max_columns: int  # panels side by side before wrapping to the next row


#: ``one-column``: the text width of a one-column paper (NeurIPS, ICLR: 5.5 in); ``two-column``: one column of
#: a two-column paper (ICML, CVPR: 3.25 in), where panels stack.
SIZES = {
    "one-column": PaperSize(width=5.5, font=8, small=7, max_columns=3),
    "two-column": PaperSize(width=3.25, font=7, small=6, max_columns=2),
}
#: Resolution of the PNGs: sharp on screen and in a report, small enough to send or commit.
PNG_DPI = 200
FORMATS = ("pdf", "png")


def paper_size(name: str) -> PaperSize:
    from benchmark.errors import BenchError

    if name not in SIZES:
        raise BenchError(f"unknown figure size {name!r}: use one of {', '.join(SIZES)}")
    return SIZES[name]


def rc_params(size: PaperSize) -> dict[str, Any]:
    """matplotlib settings of every figure."""
    from cycler import cycler

    return {
        # TrueType fonts embedded as Type 42: pdflatex and journal checkers reject Type 3 fonts.
        "pdf.fonttype": 42,
        "ps.fonttype": 42,
        "svg.fonttype": "none",
        "font.family": "sans-serif",
        "font.sans-serif": ["DejaVu Sans"],  # ships with matplotlib, so every machine draws the same glyphs
        "font.size": size.font,
        "axes.titlesize": size.font,
        "axes.labelsize": size.font,
        "xtick.labelsize": size.small,
        "ytick.labelsize": size.small,
        "legend.fontsize": size.small,
        "legend.frameon": False,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.linewidth": 0.4,
        "grid.alpha": 0.35,
        "axes.linewidth": 0.6,
        "lines.linewidth": 1.2,
        "lines.markersize": 3.5,
        "errorbar.capsize": 2,
        "xtick.major.width": 0.6,
        "ytick.major.width": 0.6,
        "axes.prop_cycle": cycler(color=OKABE_ITO),
        "figure.constrained_layout.use": True,
        "savefig.dpi": PNG_DPI,
    }


@contextlib.contextmanager
def styled(size: PaperSize) -> Iterator[None]:
    """Draw (and save) inside this context: matplotlib reads fonts when artists are made and when saved."""
    import matplotlib

    with matplotlib.rc_context(rc_params(size)):
        yield


@dataclass(frozen=True)
class SeriesStyle:
    """How one series is drawn: its colour, and the line style and marker that separate series past seven."""

    color: str
    linestyle: str
    marker: str
    #: 0 for the first seven series, 1 for the next seven (which repeat the colours), and so on.
    lap: int = 0


class Palette:
    """A fixed style per series label (a table row: the learner, or the learner and the keys of its variant).

    Labels get the palette in sorted order of the labels in the *results folder*, not of one figure, so a
    learner keeps its colour in every figure and in every report made of the same folder, and never shares
    a colour with another series of that folder (up to seven; then the line style and marker differ).
    """

    def __init__(self, labels: Iterable[str]) -> None:
        self.labels = sorted(set(labels))
        self._styles = {label: self._style(i) for i, label in enumerate(self.labels)}

    @staticmethod
    def _style(index: int) -> SeriesStyle:
        lap = index // len(OKABE_ITO)
        return SeriesStyle(OKABE_ITO[index % len(OKABE_ITO)], LINESTYLES[lap % len(LINESTYLES)],
                           MARKERS[lap % len(MARKERS)], lap)

    def __getitem__(self, label: str) -> SeriesStyle:
        if label not in self._styles:  # a label outside the folder (a caller's own series): next free style
            self._styles[label] = self._style(len(self._styles))
        return self._styles[label]

    def color(self, label: str) -> str:
        return self[label].color


def new_figure(size: PaperSize, panels: int, panel_height: float, columns: int | None = None,
               sharex: bool = False, sharey: bool = False) -> tuple[Any, list[Any]]:
    """A figure of ``panels`` axes in a grid at most ``size.max_columns`` wide (or ``columns``), on an Agg
    canvas; the axes come back flat, in reading order, the unused ones removed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(panels, columns or size.max_columns))
    nrows = -(-panels // ncols)
    fig = Figure(figsize=(size.width, panel_height * nrows + 0.45))
    FigureCanvasAgg(fig)
    grid = fig.subplots(nrows, ncols, squeeze=False, sharex=sharex, sharey=sharey)
    axes = [ax for row in grid for ax in row]
    for ax in axes[panels:]:
        ax.remove()
    return fig, axes[:panels]


def legend_on_top(fig: Any, handles: Sequence[Any], labels: Sequence[str], size: PaperSize) -> None:
    """One legend for the whole figure, above the panels: as many entries per line as fit the width, read
    left to right, line by line (matplotlib fills a legend column by column, so the entries are reordered)."""
    if not handles:
        return
    # Width of an entry: its handle, the gaps, and its text (about 0.6 em per character).
    widest = max(0.55 + 0.6 * size.small / 72 * len(label) for label in labels)
    per_line = max(1, min(len(handles), int(size.width / widest)))
    order = [i for column in range(per_line) for i in range(column, len(handles), per_line)]
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="outside upper center", ncols=per_line,
               handlelength=1.8, columnspacing=1.2)


def time_unit(seconds: Sequence[float]) -> tuple[str, float]:
    """A readable unit for durations up to ``max(seconds)``: (name, seconds per unit)."""
    longest = max((s for s in seconds if s == s), default=0.0)
    if longest >= 2 * 3600:
        return "hours", 3600.0
    if longest >= 120:
        return "minutes", 60.0
    return "seconds", 1.0


def save(fig: Any, size: PaperSize, stem: Path, formats: Sequence[str] = FORMATS, dpi: int = PNG_DPI) -> list[Path]:
    """Write ``fig`` as ``stem.pdf``/``stem.png`` (the formats asked for; ``dpi`` for the PNG); returns the
    paths written."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    with styled(size):
        for fmt in formats:
            path = stem.with_suffix(f".{fmt}")
            # No creation date in the PDF: the same runs give the same file.
            metadata = {"CreationDate": None} if fmt == "pdf" else {"Software": None}
            fig.savefig(path, format=fmt, metadata=metadata, dpi=dpi)
            written.append(path)
    return written


def png_bytes(fig: Any, size: PaperSize, dpi: int = PNG_DPI) -> bytes:
    """``fig`` as PNG bytes (for a report's data URIs)."""
    buffer = io.BytesIO()
    with styled(size):
        fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()
