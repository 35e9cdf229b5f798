"""``bench reproduce PAPER``: run a registered paper's cells with its preset; our numbers beside the paper's."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import click

from benchmark.cli.options import (
    data_dir_option, device_option, plugin_option, quiet_option, time_limit_option,
)


@click.command("reproduce")
@click.argument("paper_name", metavar="PAPER", required=False)
@click.option("--list", "list_papers", is_flag=True, help="List the papers that plugins register, and exit.")
@click.option("--learner", "learners", multiple=True, help="Learners to run (repeatable; default: the paper's).")
@click.option("--cells", type=str, default=None, help="Comma-separated cells, e.g. 5w1s,20w1s (default: all the paper's).")
@click.option("--iterations", type=int, default=None, help="Reduced protocol: this many meta-iterations (rows say reduced).")
@click.option("--quick", is_flag=True, help="CPU smoke of the pipeline with the paper's reduced protocol; labelled QUICK.")
@device_option
@data_dir_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Default results/PAPER (results/PAPER-quick with --quick).")
@click.option("--table-only", is_flag=True, help="Only rebuild the table from the runs already there.")
@time_limit_option
@quiet_option
@plugin_option
def reproduce(paper_name, list_papers, learners, cells, iterations, quick, device, data_dir, out, table_only,
              time_limit, quiet, plugin_files) -> None:
    """Run the cells of a paper's table with its preset and compare with the published numbers.

    \b
    bench reproduce --list                            # the papers plugins register
    bench reproduce finn2017                          # every cell (a GPU job)
    bench reproduce finn2017 --learner maml --cells 20w1s --time-limit 9m
    bench reproduce finn2017 --quick                  # reduced CPU smoke, minutes

    Cells already started resume, finished ones are skipped. Writes one run directory per cell and
    table.md / table.tex under --out.
    """
    from benchmark.errors import BenchError
    from benchmark.harness.plugins import load_registry

    registry = load_registry(plugin_files)
    if list_papers or not paper_name:
        if not paper_name and not list_papers:
            raise BenchError("name a paper (e.g. `bench reproduce finn2017`), or see `bench reproduce --list`")
        _print_papers(registry)
        return
    paper = registry.paper(paper_name)
    if quick and paper.quick is None:
        raise BenchError(f"{paper.name} declares no --quick protocol; run it with --iterations N instead")
    if iterations is not None and iterations < 1:
        raise BenchError(f"--iterations must be at least 1 (got {iterations})")
    from benchmark.reporting.reproduce import parse_cells

    cell_list = parse_cells(cells, paper) if cells or not quick else list(paper.quick.cells)
    learner_list = list(learners) or list(paper.learners)
    out = out or Path("results") / (f"{paper.name}-quick" if quick else paper.name)
    if not table_only:
        from benchmark.errors import RunStopped

        try:
            _run_cells(paper, registry, learner_list, cell_list, iterations, quick, device, data_dir, out,
                       time_limit, quiet, plugin_files)
        except RunStopped:
            _write_table(paper, learner_list, cell_list, quick, out)  # the table shows how far each cell got
            raise
    _write_table(paper, learner_list, cell_list, quick, out)


def _print_papers(registry: Any) -> None:
    from rich.table import Table
    from rich.text import Text

    from benchmark.cli.console import stdout_console
    from benchmark.papers import cell_label

    table = Table(title="Papers")
    for column in ("paper", "title", "learners", "cells", "plugin"):
        table.add_column(column)
    for name in registry.paper_names():
        paper = registry.paper(name)
        table.add_row(Text(name), Text(paper.title), Text(", ".join(paper.learners)),
                      Text(", ".join(cell_label(*c) for c in paper.cells)), Text(registry.paper_origin(name).name))
    stdout_console().print(table)


def _run_cells(paper, registry, learners, cells, iterations, quick, device, data_dir, out, time_limit, quiet,
               plugin_files) -> None:
    from benchmark.cli.console import stderr_console, stdout_console
    from benchmark.cli.runs import outcome_line, progress_factory
    from benchmark.harness.execute import execute_plans
    from benchmark.harness.plan import RunRequest, plan_runs
    from benchmark.harness.settings import parse_duration

    import time

    console, err = stdout_console(), stderr_console()
    deadline = time.monotonic() + parse_duration(time_limit) if time_limit else None
    command = shlex.join(["bench", *sys.argv[1:]])
    settings: dict[str, Any] = dict(paper.quick.settings) if quick else {}
    if iterations is not None:
        settings["iterations"] = iterations
    for way, shot in cells:
        for learner in learners:
            if learner not in registry:
                err.print(f"note: skipping {learner}: no installed plugin provides it", markup=False)
                continue
            request = RunRequest(
                learner=learner, settings={"way": way, "shot": shot, **settings}, preset=paper.name,
                config_values=dict(paper.quick.learners.get(learner, {})) if quick else {}, device=device,
                data_dir=data_dir, out=out, plugin_files=plugin_files, command=command,
            )
            plans, session = plan_runs(request, registry=registry)
            limit = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            for plan, outcome in execute_plans(plans, session, progress=progress_factory(quiet), time_limit=limit):
                console.print(outcome_line(plan, outcome), markup=False)


def _write_table(paper, learners, cells, quick, out: Path) -> None:
    from benchmark.cli.console import stdout_console
    from benchmark.reporting.reproduce import comparison, render
    from benchmark.harness.atomic import atomic_write_bytes

    label = (f"QUICK CPU smoke: {paper.quick.description}; not the paper protocol" if quick
             else "see the protocol column")
    result = comparison(out, paper, learners, cells, label)
    out.mkdir(parents=True, exist_ok=True)
    markdown = render(result, "markdown")
    atomic_write_bytes(out / "table.md", markdown.encode())
    atomic_write_bytes(out / "table.tex", render(result, "latex").encode())
    stdout_console().print(markdown, markup=False)
