"""``bench sweep``: expand a grid into ordinary runs and run them here (a pool of workers) or on a Slurm
cluster (one job array through submitit); ``--status`` says where each run stands.

Every input is checked, and every run resolved, before anything is written or submitted: a bad one is a
one-line error and exit code 2.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from pathlib import Path

import click

from benchmark.cli.options import (
    data_dir_option, device_option, given_settings, out_option, plugin_option, quiet_option, run_setting_options,
    time_limit_option,
)

#: Seconds between two looks at the cluster while ``--wait`` waits.
POLL_S = 3.0
#: A job that ``sacct`` has not known for this long is not waited for any more.
UNKNOWN_GIVE_UP_S = 300.0


@click.command("sweep")
@click.option("--file", "sweep_file", type=click.Path(dir_okay=False, path_type=str), default=None,
              metavar="SWEEP.toml", help="A TOML sweep file (learners, cells, seeds, settings, options); the "
              "command line's values win over it.")
@click.option("--learner", "learners", multiple=True, metavar="NAME", help="A learner to sweep (repeatable).")
@click.option("--cell", "cells", multiple=True, metavar="WwKs",
              help="A test cell, e.g. 5w1s (repeatable or comma-separated; default 5w1s).")
@click.option("--seed", "seeds", multiple=True, metavar="SEEDS",
              help="Training seeds: 3, a range 0..4 or a list 0,2,5 (repeatable; default 0).")
@click.option("-o", "--option", "overrides", multiple=True, metavar="KEY=V1[,V2...]",
              help="A learner config field and its values, one run per value (repeatable; a list-valued field "
              "takes one bracketed value per run: widths=[32,64],[64,64]).")
@run_setting_options
@click.option("--preset", type=str, default=None, help="A paper's protocol for every run (see `bench reproduce --list`).")
@device_option
@data_dir_option
@out_option
@plugin_option
@click.option("--executor", type=click.Choice(["local", "slurm"]), default="local", show_default=True,
              help="local: worker processes on this machine; slurm: one job array through submitit.")
@click.option("--workers", type=int, default=None,
              help="local: runs at once (default: --per-device per visible GPU, or 1 on the CPU).")
@click.option("--per-device", type=int, default=1, show_default=True, help="local: runs at once on each GPU.")
@time_limit_option
@click.option("--partition", type=str, default=None, help="slurm: the partition (default: the cluster's).")
@click.option("--time", "slurm_time", type=str, default="4h", show_default=True, metavar="DURATION",
              help="slurm: time limit of one job; a longer run is requeued and resumes.")
@click.option("--cpus-per-run", type=int, default=1, show_default=True, help="slurm: CPUs per run (torch threads).")
@click.option("--gpus-per-run", type=int, default=0, show_default=True, help="slurm: GPUs per run.")
@click.option("--mem", type=str, default=None, help="slurm: memory per run, e.g. 16G.")
@click.option("--max-parallel", type=int, default=16, show_default=True, help="slurm: array tasks running at once.")
@click.option("--signal-delay", type=int, default=120, show_default=True, metavar="SECONDS",
              help="slurm: SIGUSR2 this long before the time limit; the run checkpoints and the job requeues.")
@click.option("--max-requeues", type=int, default=10, show_default=True,
              help="slurm: time limits a job may reach before it is not requeued again.")
@click.option("--sbatch", "sbatch_extra", multiple=True, metavar="KEY=VALUE",
              help="slurm: another #SBATCH option, e.g. --sbatch account=lab --sbatch qos=normal (repeatable).")
@click.option("--wait", is_flag=True, help="slurm: wait for every job, report each run as it ends, then the table.")
@click.option("--dry-run", is_flag=True, help="Print the plan (each run's state and directory) and the commands; "
              "write and submit nothing.")
@click.option("--status", "show_status", is_flag=True, help="Say where each run of the sweep in --out stands, and exit.")
@click.option("--json", "as_json", is_flag=True, help="With --status or --dry-run: JSON on stdout.")
@click.option("--table", "write_table", is_flag=True, help="When the sweep is finished, write --out/table.md and print it.")
@quiet_option
def sweep(sweep_file, learners, cells, seeds, overrides, preset, device, data_dir, out, plugin_files, executor, workers,
          per_device, time_limit, partition, slurm_time, cpus_per_run, gpus_per_run, mem, max_parallel, signal_delay,
          max_requeues, sbatch_extra, wait, dry_run, show_status, as_json, write_table, quiet, **settings) -> None:
    """Run a grid of runs (learners x cells x option values x seeds), each an ordinary resumable run.

    \b
    bench sweep --learner maml --learner fomaml --cell 5w1s --cell 20w1s --seed 0..2 --out results/t1
    bench sweep --learner maml -o inner_lr=0.4,2.0 --iterations 2000 --workers 2 --out results/lr
    bench sweep --file table1.toml --executor slurm --partition gpu --gpus-per-run 1 --time 4h --out results/t1
    bench sweep --status --out results/t1
    bench sweep --file table1.toml --out results/t1 --dry-run

    Each run goes to --out/<learner>-<W>w<K>s-<protocol>-seed<S>-<hash>/ exactly as `bench run` makes it;
    running the same sweep again skips finished runs and resumes the others, and a changed grid adds its new
    runs beside the old. --out/sweep.json records every planned run and the metabench version; logs are in
    --out/logs/ (local) or --out/slurm/<submission>/ (slurm). The table: `bench table OUT`, or --table.
    """
    if show_status:
        _print_status(out, as_json)
        return
    _check_executor_options(executor, write_table, wait, dry_run, time_limit)
    from benchmark.harness.settings import parse_duration
    from benchmark.harness.sweep.grid import build_grid, load_sweep_file

    grid = build_grid(load_sweep_file(sweep_file) if sweep_file else {}, learners=learners, cells=cells, seeds=seeds,
                      options=overrides, settings=given_settings(settings), preset=preset)
    limit = parse_duration(time_limit) if time_limit else None
    slurm_options = _slurm_options(partition, slurm_time, cpus_per_run, gpus_per_run, mem, max_parallel, signal_delay,
                                   max_requeues, sbatch_extra) if executor == "slurm" else None

    from benchmark.harness.plugins import load_registry
    from benchmark.harness.sweep.plan import SweepTarget, plan_sweep

    target = SweepTarget.of(out, data_dir, plugin_files)
    runs, duplicates = plan_sweep(grid, target, load_registry(target.plugin_files))
    devices = _devices(executor, device, workers, per_device)
    states = {run.name: _run_state(target.out / run.name) for run in runs}
    if dry_run:
        _print_plan(out, runs, states, duplicates, devices, executor, slurm_options, as_json)
        return
    _check_before_starting(target, executor, device)
    from benchmark.harness.sweep.record import add_sweep

    new = add_sweep(target.out, runs, command=shlex.join(["bench", *sys.argv[1:]]), executor=executor,
                    grid=grid.describe())
    done = sum(state == "done" for state in states.values())
    info = (lambda message: None) if quiet else (lambda message: click.echo(message, err=True))
    info(f"sweep {out}: {len(runs)} runs, {done} finished already, {len(new)} new to this folder"
         + (f" ({duplicates} grid points repeat another's config)" if duplicates else ""))
    todo = [run for run in runs if states[run.name] != "done"]
    if executor == "local":
        _run_local(target.out, todo, devices, limit, info)
    else:
        _run_slurm(target.out, todo, slurm_options, device, wait, info)
        if not wait:
            return
    _finish(out, target.out, [run.name for run in runs], write_table, info)


# -- planning -------------------------------------------------------------------------------------------------
def _check_executor_options(executor: str, write_table: bool, wait: bool, dry_run: bool, time_limit: str | None) -> None:
    """Refuse options that do not go with the executor."""
    from benchmark.errors import BenchError

    if write_table and executor == "slurm" and not wait and not dry_run:
        raise BenchError("--table with --executor slurm needs --wait (the runs end later); or run `bench table` "
                         "when --status says they are finished")
    if time_limit and executor == "slurm":
        raise BenchError("--time-limit is for the local executor; on Slurm, --time sets each job's limit")


def _devices(executor: str, device: str, workers: int | None, per_device: int) -> list[str]:
    """The device of each local worker slot; on Slurm, the one device every run asks its node for."""
    from benchmark.errors import BenchError

    if executor == "local":
        from benchmark.harness.sweep.local import worker_devices

        return worker_devices(device, workers, per_device)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):  # checked here; the nodes check that it exists
        raise BenchError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return [device]


def _check_before_starting(target, executor: str, device: str) -> None:
    """Data, device (local), Slurm (slurm) and a writable --out, before anything is written or submitted."""
    from benchmark.harness import rundir as R
    from benchmark.harness.sweep.plan import check_environment

    check_environment(target, device if executor == "local" else None)
    if executor == "slurm":
        from benchmark.harness.sweep.slurm import check_available

        check_available()
    R.check_writable(target.out)


def _slurm_options(partition, slurm_time, cpus_per_run, gpus_per_run, mem, max_parallel, signal_delay, max_requeues,
                   sbatch_extra):
    from benchmark.errors import BenchError
    from benchmark.harness.settings import parse_duration
    from benchmark.harness.sweep.slurm import SlurmOptions, time_minutes

    extra = {}
    for item in sbatch_extra:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"--sbatch {item!r} is not of the form KEY=VALUE; write e.g. --sbatch account=mylab")
        extra[key.strip()] = value.strip()
    options = SlurmOptions(partition=partition, time_min=time_minutes(parse_duration(slurm_time)),
                           cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run, mem=mem, max_parallel=max_parallel,
                           signal_delay_s=signal_delay, max_requeues=max_requeues, extra=extra)
    options.check()
    return options


def _run_state(path: Path) -> str:
    """done, running (another process holds it), resume or new: what the sweep will do with a run."""
    from benchmark.harness import rundir as R

    run = R.RunDirectory(path)
    if run.is_finished():
        return "done"
    if run.lock_held():
        return "running"
    return "resume" if run.has_checkpoint() else "new"


def _print_plan(out, runs, states, duplicates, devices, executor, slurm_options, as_json) -> None:
    commands = [run.shell_command(devices[i % len(devices)]) for i, run in enumerate(runs)]
    if as_json:
        click.echo(json.dumps({"out": str(out), "executor": executor, "duplicates": duplicates, "runs": [
            {"name": run.name, "label": run.label, "state": states[run.name], "config_hash": run.config_hash,
             "command": command} for run, command in zip(runs, commands)]}, indent=2))
        return
    tally = {state: sum(s == state for s in states.values()) for state in ("done", "resume", "running", "new")}
    click.echo(f"sweep {out}: {len(runs)} runs: {tally['done']} finished, {tally['resume']} to resume, "
               f"{tally['running']} running elsewhere, {tally['new']} new"
               + (f"; {duplicates} grid points repeat another's config" if duplicates else ""))
    width = max(len(run.label) for run in runs)
    for run in runs:
        click.echo(f"  {states[run.name]:<8}{run.label:<{width}}  {run.name}")
    if executor == "local":
        click.echo(f"executor local: {len(devices)} worker(s) on {', '.join(dict.fromkeys(devices))}")
    else:
        o = slurm_options
        click.echo(f"executor slurm: one job array of the runs to do, at most {o.max_parallel} at once, "
                   f"{o.time_min} min, {o.cpus_per_run} CPU(s) and {o.gpus_per_run} GPU(s) each"
                   + (f", partition {o.partition}" if o.partition else ""))
    click.echo("commands:")
    for run, command in zip(runs, commands):
        if states[run.name] != "done":
            click.echo(f"  {command}")


# -- executing -----------------------------------------------------------------------------------------------
def _run_local(out: Path, todo, devices, limit, info) -> None:
    from benchmark.cli.console import stdout_console
    from benchmark.harness.sweep.local import LOG_DIR, LocalPool

    console = stdout_console()
    busy = [run for run in todo if _run_state(out / run.name) == "running"]
    for run in busy:
        info(f"note: {run.label}: another process is working on it ({out / run.name}); not started")
    todo = [run for run in todo if run not in busy]
    ended = []

    def report(finished) -> None:
        ended.append(finished)
        line = _outcome(out, finished.run, finished.exit_code, out / LOG_DIR / f"{finished.run.name}.log")
        console.print(f"[{len(ended)}/{len(todo)}] {finished.run.label}: {line} ({finished.seconds:.0f} s)", markup=False)

    if todo:
        info(f"running {len(todo)} run(s) on {len(devices)} worker(s): {', '.join(dict.fromkeys(devices))}; "
             f"logs in {out / LOG_DIR}")
        LocalPool(out, devices, time_limit=limit, report=report).run(todo)


def _outcome(out: Path, run, code: int, log: Path) -> str:
    """One run's end in a few words: its accuracy, why it stopped, or why it failed (its log's last line)."""
    from benchmark.harness import rundir as R
    from benchmark.harness.sweep.status import FAILED, FINISHED, describe_exit, log_tail, summary_text

    state, words = describe_exit(code)
    if state == FAILED:
        tail = log_tail(str(log), 1)
        return f"FAILED, {words}" + (f": {tail[0]}" if tail else "")
    if state != FINISHED:
        return f"{words}; resumable"
    return summary_text(R.read_json(out / run.name / R.SUMMARY))


def _run_slurm(out: Path, todo, options, device: str, wait: bool, info) -> None:
    from benchmark.harness.sweep.record import now, set_jobs
    from benchmark.harness.sweep.slurm import submit
    from benchmark.harness.sweep.status import FINISHED, QUEUED, RUNNING, sweep_status

    # A run whose job still waits or runs, or that a process works on (a held lock), is not submitted again;
    # nor is one that finished since the sweep planned it (its job ended in between).
    statuses = sweep_status(out, names=[run.name for run in todo])
    in_flight = {s.name for s in statuses if s.state == RUNNING or (s.state == QUEUED and s.job not in (None, "local"))}
    finished = {s.name for s in statuses if s.state == FINISHED}
    for run in todo:
        if run.name in in_flight:
            info(f"note: {run.label}: it is queued or running already; not submitted again")
    skipped = in_flight | finished
    todo = [run for run in todo if run.name not in skipped]
    if todo:
        folder, jobs = submit(todo, out, options, device)
        rel = str(folder.relative_to(out))
        set_jobs(out, {name: {"executor": "slurm", "job_id": job_id, "folder": rel, "submitted": now()}
                       for name, job_id in jobs.items()})
        array = next(iter(jobs.values())).split("_")[0]
        click.echo(f"submitted job array {array}: {len(jobs)} run(s), logs in {folder}")
    if not wait:
        click.echo(f"watch it with: bench sweep --status --out {shlex.quote(str(out))}")
        return
    info("waiting for the jobs (Ctrl-C stops waiting; the jobs go on)")
    _wait(out, [run.name for run in todo] + sorted(in_flight))


def _wait(out: Path, names: list[str]) -> None:
    """Poll the cluster until every run has ended; print each change of a run's state as it happens."""
    from benchmark.cli.console import stdout_console
    from benchmark.harness.sweep.status import QUEUED, RUNNING, sweep_status

    console = stdout_console()
    seen: dict[str, tuple[str, str]] = {}
    unknown_since: dict[str, float] = {}
    while True:
        pending = 0
        for s in sweep_status(out, names=names):
            # A change of state, or of what a waiting run waits for (e.g. requeued): not every new iteration.
            key = (s.state, s.detail if s.state != RUNNING else "")
            if seen.get(s.name) != key:
                console.print(f"{s.state:<9}{s.label}: {s.detail}" + (f" [job {s.job}]" if s.job else ""), markup=False)
                for line in s.tail:
                    console.print(f"{'':9}| {line}", markup=False)
            seen[s.name] = key
            if s.state not in (QUEUED, RUNNING):
                continue
            if s.job is not None and "does not know the job" in s.detail:  # accounting lags a fresh job; not for ever
                if time.monotonic() - unknown_since.setdefault(s.name, time.monotonic()) > UNKNOWN_GIVE_UP_S:
                    continue
            else:
                unknown_since.pop(s.name, None)
            pending += 1
        if not pending:
            return
        time.sleep(POLL_S)


def _finish(out: Path, abs_out: Path, names: list[str], write_table: bool, info) -> None:
    """The end of a sweep: a one-line tally, where the table is (or the table), and exit code 2 on failures."""
    from benchmark.errors import BenchError
    from benchmark.harness.sweep.status import FAILED, FINISHED, counts, sweep_status

    statuses = sweep_status(abs_out, names=names)
    tally = counts(statuses)
    info("sweep " + ", ".join(f"{n} {state}" for state, n in tally.items() if n))
    if tally[FINISHED] and write_table:
        from benchmark.harness.atomic import atomic_write_bytes
        from benchmark.reporting.tables import make_table

        text = make_table([abs_out], fmt="markdown", warn=lambda m: click.echo(m, err=True))
        atomic_write_bytes(abs_out / "table.md", text.encode())
        click.echo(text, nl=False)
        info(f"wrote {out / 'table.md'}")
    elif tally[FINISHED]:
        click.echo(f"table: bench table {shlex.quote(str(out))}")
    if tally[FAILED]:
        raise BenchError(f"{tally[FAILED]} of {len(statuses)} runs failed: `bench sweep --status --out "
                         f"{shlex.quote(str(out))}` shows the end of their logs")


# -- status ---------------------------------------------------------------------------------------------------
def _print_status(out: Path, as_json: bool) -> None:
    from benchmark.harness.sweep.status import counts, sweep_status

    statuses = sweep_status(Path(out).absolute())
    tally = counts(statuses)
    if as_json:
        click.echo(json.dumps({"out": str(out), "counts": tally, "runs": [s.as_dict() for s in statuses]}, indent=2))
        return
    click.echo(f"sweep {out}: {len(statuses)} runs: " + ", ".join(f"{n} {state}" for state, n in tally.items()))
    width = max((len(s.label) for s in statuses), default=0)
    for s in statuses:
        job = f"  [job {s.job}]" if s.job and s.job != "local" else ""
        click.echo(f"{s.state:<9}{s.label:<{width}}  {s.detail}{job}")
        if s.tail:
            click.echo(f"{'':9}log {s.log}:")
            for line in s.tail:
                click.echo(f"{'':9}| {line}")
