"""``bench plot``: publication figures (PDF, PNG and the plotted numbers as CSV) from finished runs."""

from __future__ import annotations

from pathlib import Path

import click

from benchmark.cli.options import figure_size_option
# Help lines only: matplotlib is imported when a figure is drawn, never by --help.
from benchmark.reporting.figures import FIGURES

def _warn(message: str) -> None:
    click.echo(message, err=True)


def _common(func):
    """PATHS, --out, --size, --format and --dpi, shared by every figure."""
    func = click.option("--dpi", type=click.IntRange(50, 1200), default=200, show_default=True,
                        help="Resolution of the PNG (the PDF is vector graphics).")(func)
    func = click.option("--format", "formats", type=click.Choice(["pdf", "png"]), multiple=True,
                        help="File format (repeatable; default: pdf and png). The CSV is always written.")(func)
    func = figure_size_option(func)
    func = click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("figures"),
                        show_default=True, help="Folder for the figures (created if needed).")(func)
    return click.argument("paths", nargs=-1, type=click.Path(path_type=str))(func)


def _reference_option(func):
    return click.option("--reference", metavar="LEARNER", default=None,
                        help="Add a forest plot of the paired differences to this learner (as bench table "
                        "--reference).")(func)


def _draw(names: list[str], paths: tuple[str, ...], out: Path, size: str, formats: tuple[str, ...], dpi: int,
          reference: str | None, skip_unavailable: bool = False) -> None:
    """Load the runs once, draw each figure, write its files and list them on stdout."""
    from benchmark.errors import BenchError
    from benchmark.reporting import figures, style
    from benchmark.reporting.tables import load_runs

    paper = style.paper_size(size)
    runs = load_runs(paths or ("results/",), warn=_warn)
    drawn_any = False
    for name in names:
        try:
            drawn = figures.make(name, runs, paper, reference=reference, warn=_warn)
        except BenchError as exc:
            if not skip_unavailable:
                raise
            _warn(f"skipping the {name} figure: {exc}")
            continue
        for figure in drawn:
            try:
                written = figure.save(out, formats or style.FORMATS, dpi)
            except OSError as exc:
                raise BenchError(f"cannot write figures to {out} ({exc.strerror or exc}); choose another --out") from None
            click.echo("wrote " + ", ".join(str(p) for p in written))
            drawn_any = True
    if not drawn_any:
        raise BenchError("none of the figures could be drawn from these runs (the reasons are above)")


@click.group("plot", context_settings={"help_option_names": ["-h", "--help"]})
def plot() -> None:
    """Draw figures of the runs below PATHS (default: results/) for a paper.

    Each figure is written as PDF (fonts embedded as TrueType, for LaTeX) and PNG, with the numbers it
    draws as CSV beside it, into --out (default figures/). --size one-column (5.5 in, the text width of a
    one-column paper) or two-column (3.25 in, one column of a two-column paper). Every learner keeps one
    colour (colour-blind-safe Okabe-Ito palette) in every figure of the same results folder.
    Runs that differ in protocol, split, queries or iterations are separate series, labelled as in
    bench table; intervals are bench table's.

    \b
    bench plot curves results/               curves-<N>w<K>s.pdf: loss, accuracy, validation accuracy
    bench plot intervals results/ --reference maml
                                             intervals.pdf: mean ± 95% CI, paired differences to maml
    bench plot compute results/              compute.pdf: test accuracy against GPU-hours / CPU time
    bench plot steps results/                steps.pdf: test accuracy against adaptation steps
    bench plot all results/ --reference maml every figure above
    """


def _figure_command(name: str) -> click.Command:
    def command(paths, out, size, formats, dpi, reference=None):
        _draw([name], paths, out, size, formats, dpi, reference)

    example = f"bench plot {name} results/" + (" --reference maml" if name == "intervals" else "") + " --out figures/"
    command = _common(command)
    if name == "intervals":
        command = _reference_option(command)
    return plot.command(name, help=f"{FIGURES[name].help}\n\n\b\n{example}", short_help=FIGURES[name].help)(command)


for _name in FIGURES:
    _figure_command(_name)


@plot.command("all", short_help="Every figure above (those the runs allow), into one folder.")
@_reference_option
@_common
def plot_all(paths, out, size, formats, dpi, reference):
    """Every figure the runs allow (a figure that cannot be drawn, e.g. steps without a learner that records
    them, is skipped with the reason); --reference adds the paired differences to the interval chart.

    \b
    bench plot all results/ --reference maml --out figures/
    """
    _draw(list(FIGURES), paths, out, size, formats, dpi, reference, skip_unavailable=True)
