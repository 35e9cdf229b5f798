"""``bench report``: one self-contained HTML page of a results folder (tables, figures, provenance)."""

from __future__ import annotations

from pathlib import Path

import click

from benchmark.cli.options import figure_size_option


@click.command("report")
@click.argument("paths", nargs=-1, type=click.Path(path_type=str))
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The HTML file to write (default: report.html in the first PATH, so its links to the run "
              "files work).")
@click.option("--reference", metavar="LEARNER", default=None,
              help="Add the paired differences to this learner to the table and the interval chart.")
@figure_size_option
@click.option("--title", default=None, help="The page's title (default: the results folder).")
def report(paths: tuple[str, ...], output: Path | None, reference: str | None, size: str, title: str | None) -> None:
    """Write one static HTML page for the runs below PATHS (default: results/).

    The page holds bench table's table (caption and footnotes included), every figure of bench plot that
    the runs allow (embedded as PNG, each with its numbers as a CSV download), and each run's provenance:
    config, versions, device, git commit, wall time, plugin and code hash, with links to its files. It needs
    no server and no network: open it in a browser, or send it.

    \b
    bench report results/ --reference maml                  writes results/report.html
    bench report results/ --output paper/report.html --title "Omniglot, 5-way"
    """
    from benchmark.reporting.report import write_report

    paths = paths or ("results/",)
    first = Path(paths[0])
    output = output or ((first.parent if first.is_file() else first) / "report.html")
    written = write_report(paths, output, reference=reference, size=size, title=title,
                           warn=lambda message: click.echo(message, err=True))
    click.echo(f"wrote {written}")
