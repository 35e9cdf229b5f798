"""``bench table``: summarize finished runs as a table of mean ± 95% CI, optionally against a reference."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("table")
@click.argument("paths", nargs=-1, type=click.Path(path_type=str))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["markdown", "latex", "html", "csv"]),
    default="markdown",
    show_default=True,
    help="markdown (pipe table with caption), latex (plain tabular, no extra packages), html (a <table> with "
    "caption and footnotes) or csv (percent, full precision, one row per learner and cell).",
)
@click.option(
    "--layout",
    type=click.Choice(["wide", "compact", "narrow"]),
    default="wide",
    show_default=True,
    help="wide: a column per cell, per Δ and per differing protocol fact; compact (fits a one-column paper): Δ "
    "beside the mean in one cell, differing protocol facts as footnote marks; narrow (fits one column of a "
    "two-column paper): as compact with Δ on a second line, smaller type. Not for csv.",
)
@click.option(
    "--reference",
    metavar="LEARNER",
    default=None,
    help="Add the paired difference to this learner on identical test episodes, with its 95% CI.",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=str),
    default=None,
    help="Write the table to this file instead of stdout.",
)
def table(paths: tuple[str, ...], fmt: str, layout: str, reference: str | None, output: str | None) -> None:
    """Summarize the runs below PATHS (default: results/) as a table.

    One row per learner (variants of a learner that differ in config are separate rows, labelled by the
    differing keys), one column per way/shot. Cells are mean ± 95% CI in percent over the test episodes;
    several training seeds of the same run combine (t interval over seeds x episodes, which also covers
    training randomness). Runs that are not complete are skipped with a note on stderr.

    \b
    bench table results/
    bench table results/ --reference maml --format latex --output table.tex
    bench table results/ --reference maml --format latex --layout narrow   (one column of a two-column paper)
    """
    from benchmark.errors import BenchError
    from benchmark.reporting.tables import make_table

    text = make_table(paths or ("results/",), fmt=fmt, reference=reference, warn=lambda m: click.echo(m, err=True),
                      layout=layout)
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        Path(output).write_text(text)
    except OSError as exc:
        raise BenchError(f"cannot write {output}: {exc}; choose another --output path") from exc
    click.echo(f"wrote {output}", err=True)
