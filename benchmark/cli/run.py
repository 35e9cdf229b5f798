"""``bench run``: train a learner and evaluate it on the fixed, hashed test episodes.

Every input is checked before anything is written under --out; a bad one is a one-line error and exit code 2.
"""

from __future__ import annotations

from pathlib import Path

import click

from benchmark.cli.common import override_option, plugin_option
from benchmark.cli.data import data_dir_option

DEFAULTS = {"query": 15, "iterations": 10000, "episodes": 600, "protocol": "vinyals"}


def run_options(f):
    """Options shared by ``bench run`` and ``bench reproduce``-style commands."""
    for option in reversed([
        click.option("--query", type=int, default=None, help=f"Query images per class (default {DEFAULTS['query']}; finn2017: K)."),
        click.option("--iterations", type=int, default=None, help=f"Meta-training iterations (default {DEFAULTS['iterations']}; finn2017: 60000)."),
        click.option("--episodes", type=int, default=None, help="Test episodes (default 600)."),
        click.option("--seed", "seeds", type=int, multiple=True, help="Training seed; repeat for several runs (default 0)."),
        click.option("--episode-seed", type=int, default=0, show_default=True, help="Seed of the test-episode manifest (keep it fixed to pair learners)."),
        click.option("--protocol", type=str, default=None, help="Class split: vinyals (default) or lake."),
        click.option("--device", type=str, default="auto", show_default=True, help="auto (the GPU when there is one), cpu, cuda or cuda:N."),
        data_dir_option,
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("results"), show_default=True, help="Folder for run directories."),
        click.option("--name", type=str, default=None, help="Run directory name (default: learner-WwKs-protocol-seedS-confighash)."),
        override_option,
        click.option("--preset", type=str, default=None, help="A paper's protocol for this cell: finn2017."),
        click.option("--val-every", type=int, default=500, show_default=True, help="Validate every N iterations."),
        click.option("--val-episodes", type=int, default=100, show_default=True, help="Validation episodes (val split, fixed seed)."),
        click.option("--log-every", type=int, default=50, show_default=True, help="Read metrics back from the device every N iterations."),
        click.option("--checkpoint-every", type=int, default=500, show_default=True, help="Checkpoint every N iterations."),
        click.option("--force", is_flag=True, help="Redo a run that already finished (its directory is replaced)."),
        click.option("-q", "--quiet", is_flag=True, help="No progress on stderr."),
        plugin_option,
    ]):
        f = option(f)
    return f


@click.command("run")
@click.option("--learner", "learner_name", required=True, help="A learner name (see `bench learners`).")
@click.option("--way", type=int, default=5, show_default=True, help="Classes per episode (N).")
@click.option("--shot", type=int, default=1, show_default=True, help="Support images per class (K).")
@run_options
def run(learner_name: str, way: int, shot: int, **options) -> None:
    """Train a learner and evaluate it on the fixed test episodes.

    \b
    bench run --learner maml --way 20 --shot 1
    bench run --learner maml --way 5 --shot 1 --preset finn2017
    bench run --learner finetune -o head=cosine --seed 0 --seed 1

    Results land in --out/<learner>-<W>w<K>s-<protocol>-seed<S>-<hash>/: config.json, train_log.csv,
    episodes.csv (accuracy per test episode), summary.json (mean, 95% CI) and checkpoint.pt. Re-running the
    same command resumes an interrupted run and skips a finished one.
    """
    from benchmark.cli.session import execute_runs

    execute_runs(learner_name, way, shot, options)
