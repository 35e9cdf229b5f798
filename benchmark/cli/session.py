"""Turn ``bench run`` options into validated RunSpecs and execute them with progress on stderr.

Order matters: every input is validated (learner, config, episode shape, device, data) before the first
file is written, so a bad command leaves nothing under --out.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from benchmark.errors import BenchError


@dataclasses.dataclass
class PlannedRun:
    spec: Any  # RunSpec
    run_dir: Path


def plan_runs(learner_name: str, way: int, shot: int, options: dict[str, Any]):
    """Validate the command line and return (planned runs, learner class, config, pools, device, extra record)."""
    from benchmark.cli.run import DEFAULTS
    from benchmark.config import apply_overrides
    from benchmark.data import load_omniglot
    from benchmark.plugins import load_registry
    from benchmark.presets import get_preset
    from benchmark.protocol import EpisodeSpec, get_protocol
    from benchmark.runner import RunSpec, load_pools, resolve_device

    registry = load_registry(options.get("plugin_files") or ())
    learner_cls = registry.get(learner_name)

    preset = get_preset(options["preset"], way, shot) if options.get("preset") else None
    base = dict(DEFAULTS, **(preset.run if preset else {}))
    explicit = {k: options[k] for k in ("query", "iterations", "episodes", "protocol") if options.get(k) is not None}
    settings = {**base, **explicit}
    reduced = bool(preset and settings["iterations"] < preset.run["iterations"])

    config = learner_cls.default_config(way, shot)
    preset_overrides = (preset.learner_overrides.get(learner_name, {}) if preset else {})
    config = apply_overrides(config, [f"{k}={v}" for k, v in preset_overrides.items()])
    config = apply_overrides(config, list(options.get("overrides") or ()))

    protocol = get_protocol(settings["protocol"])
    episode_spec = EpisodeSpec(way, shot, settings["query"])
    episode_spec.validate()
    if settings["episodes"] < 1:
        raise BenchError(f"--episodes must be at least 1 (got {settings['episodes']})")
    if settings["iterations"] < 0:
        raise BenchError(f"--iterations must be at least 0 (got {settings['iterations']})")
    for name in ("val_every", "val_episodes", "log_every", "checkpoint_every"):
        if options[name] < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1 (got {options[name]})")
    device = resolve_device(options["device"])

    data = load_omniglot(options.get("data_dir"))
    pools = load_pools(data, protocol, device)
    for split in ("train", "val", "test"):
        episode_spec.validate(getattr(pools, split).num_classes, split)

    # Build the learner once now: its constructor validates the config (e.g. -o meta_batch_size=0) before
    # anything exists under --out.
    from benchmark.runner import build_learner

    build_learner(learner_cls, config, RunSpec(learner_name, {}, way, shot, settings["query"], 0, 1, 0, 0,
                                               protocol.name), device, pools)

    out: Path = options["out"]
    seeds = options.get("seeds") or (0,)
    name = options.get("name")
    if name and len(seeds) > 1:
        raise BenchError("--name names one run directory; drop it to run several --seed values")
    if name and (name in (".", "..") or not re.fullmatch(r"[A-Za-z0-9._+=-]+", name)):
        raise BenchError(f"--name {name!r} must be one folder name (letters, digits, . _ + = -), not a path")
    runs = []
    for seed in seeds:
        spec = RunSpec(
            learner=learner_name, learner_config=dataclasses.asdict(config), way=way, shot=shot,
            query=settings["query"], iterations=settings["iterations"], episodes=settings["episodes"], seed=seed,
            episode_seed=options["episode_seed"], protocol=protocol.name, preset=preset.name if preset else None,
            reduced=reduced, val_every=options["val_every"], val_episodes=options["val_episodes"],
            notes=preset.notes if preset else "",
        )
        runs.append(PlannedRun(spec, out / (options.get("name") or spec.dirname)))
    return runs, learner_cls, config, pools, device


def execute_runs(learner_name: str, way: int, shot: int, options: dict[str, Any]) -> list:
    """Plan, then run every seed; prints one summary line per run on stdout."""
    from benchmark.cli.console import stderr_console, stdout_console
    from benchmark.results import check_writable
    from benchmark.runner import Runner

    runs, learner_cls, config, pools, device = plan_runs(learner_name, way, shot, options)
    check_writable(options["out"])
    out_console, err_console = stdout_console(), stderr_console()
    outcomes = []
    for planned in runs:
        progress = None if options.get("quiet") else ProgressReporter(err_console, planned.spec)
        runner = Runner(
            planned.spec, learner_cls, config, pools, device, planned.run_dir,
            log_every=options["log_every"], checkpoint_every=options["checkpoint_every"],
            progress=progress, extra_config={"command": options.get("command_line") or shlex.join(["bench", *sys.argv[1:]])},
        )
        try:
            outcome = runner.run(force=options.get("force", False))
        finally:
            if progress:
                progress.close()
        s = outcome.summary
        if outcome.skipped:
            verb = "already finished (use --force to redo)"
        elif outcome.resumed_from:
            verb = f"resumed from iteration {outcome.resumed_from}"
        else:
            verb = "done"
        out_console.print(
            f"{planned.spec.learner} {planned.spec.way}-way {planned.spec.shot}-shot seed {planned.spec.seed}: "
            f"{100 * s['accuracy_mean']:.2f} ± {100 * s['ci95']:.2f} % over {s['n']} test episodes, {verb}: "
            f"{outcome.path}",
            markup=False,
        )
        outcomes.append(outcome)
    return outcomes


class ProgressReporter:
    """A rich progress bar on stderr: iteration, loss, train accuracy, last validation accuracy, it/s, ETA."""

    def __init__(self, console, spec):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn(f"{spec.learner} {spec.way}w{spec.shot}s seed {spec.seed}", markup=False),
            BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[metrics]}", markup=False),
            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console, transient=False,
        )
        self.task = self.progress.add_task("train", total=spec.iterations, metrics="", rate="")
        self.progress.start()

    def __call__(self, event: dict[str, Any]) -> None:
        if event["event"] == "start":
            self.progress.update(self.task, completed=event["iteration"])
        elif event["event"] == "log":
            row = event["row"]
            parts = [f"{k} {row[k]:.3f}" for k in ("loss", "accuracy") if k in row]
            if event.get("last_val") is not None:
                parts.append(f"val {event['last_val']:.3f}")
            rate = 1.0 / row["seconds_per_iteration"] if row.get("seconds_per_iteration") else 0.0
            self.progress.update(self.task, completed=row["iteration"], metrics="  ".join(parts), rate=f"{rate:.1f} it/s")

    def close(self) -> None:
        self.progress.stop()
