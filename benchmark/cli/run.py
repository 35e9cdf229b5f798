"""``bench run``: train a learner and evaluate it on the fixed, hashed test episodes.

Every input is checked before anything is written under --out; a bad one is a one-line error and exit code 2.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from benchmark.cli.options import (
    data_dir_option, device_option, given_settings, out_option, override_option, plugin_option, quiet_option,
    run_setting_options, time_limit_option,
)


@click.command("run")
@click.option("--learner", "learner_name", required=True, help="A learner name (see `bench learners`).")
@click.option("--way", type=int, default=5, show_default=True, help="Classes per test episode (N).")
@click.option("--shot", type=int, default=1, show_default=True, help="Support images per class (K).")
@run_setting_options
@click.option("--seed", "seeds", type=int, multiple=True, help="Training seed; repeat for several runs (default 0).")
@device_option
@data_dir_option
@out_option
@click.option("--name", type=str, default=None, help="Run directory name (default: learner-WwKs-protocol-seedS-confighash).")
@override_option
@click.option("--preset", type=str, default=None, help="A paper's protocol for this cell (see `bench reproduce --list`).")
@click.option("--force", is_flag=True, help="Redo a run that already finished (its directory is replaced).")
@time_limit_option
@click.option("--wait-for-lock", type=float, default=0.0, metavar="SECONDS", show_default=True,
              help="When another bench process works on the same run, wait this long for it before refusing.")
@quiet_option
@plugin_option
def run(learner_name: str, way: int, shot: int, seeds: tuple[int, ...], device: str, data_dir: str | None, out: Path,
        name: str | None, overrides: tuple[str, ...], preset: str | None, force: bool, time_limit: str | None,
        wait_for_lock: float, quiet: bool, plugin_files: tuple[str, ...], **settings) -> None:
    """Train a learner and evaluate it on the fixed test episodes.

    \b
    bench run --learner maml --way 20 --shot 1
    bench run --learner maml --way 5 --shot 1 --preset finn2017
    bench run --learner protonet --train-way 60 --select best-val
    bench run --learner finetune -o head=cosine --seed 0 --seed 1

    Results land in --out/<learner>-<W>w<K>s-<protocol>-seed<S>-<hash>/: config.json, train_log.csv,
    episodes.csv (accuracy per test episode), summary.json (mean, 95% CI) and checkpoint.pt. Re-running the
    same command resumes an interrupted run and skips a finished one. Exit codes: 0 done, 2 bad input or a
    fault, 3 stopped by --time-limit (resumable), 130/143/140 stopped by Ctrl-C/SIGTERM/SIGUSR2 (resumable).
    """
    from benchmark.cli.console import stdout_console
    from benchmark.cli.runs import outcome_line, progress_factory
    from benchmark.harness.execute import execute_plans
    from benchmark.harness.plan import RunRequest, plan_runs
    from benchmark.harness.settings import parse_duration

    limit = parse_duration(time_limit) if time_limit else None
    request = RunRequest(
        learner=learner_name, settings={"way": way, "shot": shot, **given_settings(settings)}, overrides=overrides,
        preset=preset, seeds=seeds or (0,), device=device, data_dir=data_dir, out=out, name=name,
        plugin_files=plugin_files, command=shlex.join(["bench", *sys.argv[1:]]),
    )
    plans, session = plan_runs(request)
    console = stdout_console()
    for plan, outcome in execute_plans(plans, session, force=force, progress=progress_factory(quiet), time_limit=limit,
                                       wait_for_lock=max(wait_for_lock, 0.0)):
        console.print(outcome_line(plan, outcome), markup=False)
