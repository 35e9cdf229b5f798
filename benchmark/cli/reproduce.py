"""``bench reproduce finn2017``: run a paper's cells with its preset and put our numbers beside the paper's."""

from __future__ import annotations

from pathlib import Path

import click

from benchmark.cli.common import plugin_option
from benchmark.cli.data import data_dir_option


@click.command("reproduce")
@click.argument("paper", type=click.Choice(["finn2017"]))
@click.option("--learner", "learners", multiple=True, help="Learners to run (repeatable; default maml, fomaml, finetune).")
@click.option("--cells", type=str, default=None, help="Comma-separated cells: 5w1s,5w5s,20w1s,20w5s (default all).")
@click.option("--iterations", type=int, default=None, help="Reduced protocol: this many meta-iterations (the table says reduced).")
@click.option("--quick", is_flag=True, help="CPU smoke: 5-way 1-shot, 600 iterations, meta-batch 8; labelled quick.")
@click.option("--device", type=str, default="auto", show_default=True)
@data_dir_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Default results/finn2017 (results/finn2017-quick with --quick).")
@click.option("--table-only", is_flag=True, help="Only rebuild the table from the runs already there.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@plugin_option
def reproduce(paper, learners, cells, iterations, quick, device, data_dir, out, table_only, quiet, plugin_files) -> None:
    """Run the cells of a paper's table with its preset and compare with the published numbers.

    \b
    bench reproduce finn2017                        # every cell: maml, fomaml, finetune (GPU: hours in all)
    bench reproduce finn2017 --learner maml --cells 20w1s
    bench reproduce finn2017 --quick                # 5-way 1-shot smoke on the CPU, < 15 minutes

    Cells already started resume, finished ones are skipped. Writes one run directory per cell and
    table.md / table.tex under --out.
    """
    from benchmark.cli.console import stdout_console
    from benchmark.cli.session import execute_runs
    from benchmark.errors import BenchError
    from benchmark.reproduce import LEARNERS, QUICK, comparison, parse_cells, render
    from benchmark.results import atomic_write_bytes

    learner_list = list(learners) or list(LEARNERS)
    cell_list = parse_cells(",".join(QUICK["cells"]) if quick and not cells else cells)
    if quick and iterations is None:
        iterations = QUICK["iterations"]
    if iterations is not None and iterations < 1:
        raise BenchError(f"--iterations must be at least 1 (got {iterations})")
    out = out or Path("results") / (f"{paper}-quick" if quick else paper)
    # Each row states its own protocol (paper or reduced); --quick tables are labelled as a whole.
    label = (f"QUICK CPU smoke: {QUICK['iterations']} iterations, meta-batch 8; not the paper protocol" if quick
             else "see the protocol column")

    if not table_only:
        for way, shot in cell_list:
            for learner in learner_list:
                overrides = QUICK["overrides"].get(learner, []) if quick else []
                options = {
                    "query": None, "iterations": iterations, "episodes": None, "seeds": (0,), "episode_seed": 0,
                    "protocol": None, "device": device, "data_dir": data_dir, "out": out, "name": None,
                    "overrides": tuple(overrides), "preset": paper, "val_every": 500 if not quick else 100,
                    "val_episodes": 100, "log_every": 50, "checkpoint_every": 500 if not quick else 100,
                    "force": False, "quiet": quiet, "plugin_files": plugin_files,
                }
                execute_runs(learner, way, shot, options)
    result = comparison(out, paper, learner_list, cell_list, label)
    out.mkdir(parents=True, exist_ok=True)
    markdown = render(result, "markdown")
    atomic_write_bytes(out / "table.md", markdown.encode())
    atomic_write_bytes(out / "table.tex", render(result, "latex").encode())
    stdout_console().print(markdown, markup=False)
