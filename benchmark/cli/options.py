"""Click options shared by several commands, so every command spells (and defaults) them the same.

Defaults come from ``benchmark.harness.settings.RunSettings``: they are written in one place. No torch
here: command modules import this at ``bench <command> --help`` time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, TypeVar

import click

from benchmark.harness.settings import SELECTIONS, RunSettings

F = TypeVar("F", bound=Callable[..., object])
_D = RunSettings()


def plugin_option(func: F) -> F:
    """``--plugin FILE.py`` (repeatable): load a plugin from a file without packaging it.

    The command receives ``plugin_files: tuple[str, ...]``. Existence is checked by
    ``benchmark.harness.plugins.get_plugin_manager`` so that the error reads like every other plugin error.
    """
    return click.option(
        "--plugin", "plugin_files", multiple=True, metavar="FILE.py", type=click.Path(dir_okay=False),
        help="Load a plugin from a Python file (repeatable); no packaging needed.",
    )(func)


def override_option(func: F) -> F:
    """``-o/--option KEY=VALUE`` (repeatable): override one field of the learner's config.

    The command receives ``overrides: tuple[str, ...]``.
    """
    return click.option(
        "-o", "--option", "overrides", multiple=True, metavar="KEY=VALUE",
        help="Override a learner config field (repeatable); `bench learners NAME` lists the fields.",
    )(func)


data_dir_option = click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=str), default=None, envvar="BENCH_DATA_DIR",
    show_envvar=True,
    help="Folder with images_background.zip/images_evaluation.zip or their extracted folders "
    "(default: the cache, else download).",
)

def _set_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> None:
    if value is not None:
        if value < 1:
            raise click.BadParameter("must be at least 1")
        os.environ["BENCH_THREADS"] = str(value)  # applied with the device (benchmark.harness.runtime)


def device_option(func: F) -> F:
    """``--device`` and ``--threads`` (CPU threads torch may use; on a shared machine fewer threads than cores
    can be much faster, since threads waiting for busy cores stall each other)."""
    func = click.option("--threads", type=int, default=None, envvar="BENCH_THREADS", show_envvar=True,
                        expose_value=False, callback=_set_threads, is_eager=False,
                        help="CPU threads for torch (default: torch's choice, one per core).")(func)
    return click.option("--device", type=str, default="auto", show_default=True,
                        help="auto (the GPU when there is one), cpu, cuda or cuda:N.")(func)

quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")

time_limit_option = click.option(
    "--time-limit", type=str, default=None, metavar="DURATION",
    help="Checkpoint and stop cleanly (exit code 3, resumable) before this much wall time has passed, e.g. 9m, "
    "1h30m; run the same command again to continue.",
)

#: RunSettings fields that ``bench run`` sets with options of the same name (way/shot are separate).
SETTING_OPTIONS = ("query", "train_way", "train_shot", "train_query", "iterations", "episodes", "episode_seed",
                   "protocol", "select", "ensemble", "val_every", "val_episodes", "log_every", "checkpoint_every")


def run_setting_options(func: F) -> F:
    """The options that set ``RunSettings`` fields; each defaults to None ("not given"), so a preset can
    fill what the command line leaves open. The command receives one keyword per field."""
    options = [
        click.option("--query", type=int, default=None, help=f"Query images per class (default {_D.query})."),
        click.option("--train-way", type=int, default=None, help="Classes per training episode (default: --way)."),
        click.option("--train-shot", type=int, default=None, help="Support images per class in training episodes "
                     "(default: --shot)."),
        click.option("--train-query", type=int, default=None, help="Query images per class in training episodes "
                     "(default: --query)."),
        click.option("--iterations", type=int, default=None, help=f"Meta-training iterations (default {_D.iterations})."),
        click.option("--episodes", type=int, default=None, help=f"Test episodes (default {_D.episodes})."),
        click.option("--episode-seed", type=int, default=None,
                     help=f"Seed of the test-episode manifest (default {_D.episode_seed}; keep it fixed to pair learners)."),
        click.option("--protocol", type=str, default=None, help=f"Class split: vinyals or lake (default {_D.protocol})."),
        click.option("--select", type=click.Choice(SELECTIONS), default=None,
                     help=f"Weights to test: the last iterate or the best validation checkpoint (default {_D.select})."),
        click.option("--ensemble", type=int, default=None, metavar="K",
                     help="With --select best-val: average the logits of the K best validation checkpoints (default 1)."),
        click.option("--val-every", type=int, default=None, help=f"Validate every N iterations (default {_D.val_every})."),
        click.option("--val-episodes", type=int, default=None,
                     help=f"Validation episodes (val split, fixed seed; default {_D.val_episodes})."),
        click.option("--log-every", type=int, default=None,
                     help=f"Read metrics back from the device every N iterations (default {_D.log_every})."),
        click.option("--checkpoint-every", type=int, default=None,
                     help=f"Checkpoint every N iterations (default {_D.checkpoint_every})."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def given_settings(options: dict[str, Any]) -> dict[str, Any]:
    """Pop the RunSettings options from a command's keyword arguments; keep the ones that were given."""
    values = {name: options.pop(name) for name in SETTING_OPTIONS}
    return {k: v for k, v in values.items() if v is not None}


out_option = click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
                          show_default=True, help="Folder for run directories.")

figure_size_option = click.option(
    "--size", type=click.Choice(["one-column", "two-column"]), default="one-column", show_default=True,
    help="Figure width: one-column (5.5 in, a one-column paper's text width) or two-column (3.25 in, one "
    "column of a two-column paper).",
)
