"""A sweep's plan: each grid point resolved to the ``bench run`` command of one run and its run directory.

The run directory is the one ``bench run`` names (learner, cell, protocol, seed and config hash), resolved
by the same code (``benchmark.harness.plan.resolve_plans``), so a run made by a sweep and one made by hand
are the same run: each skips or resumes the other. Every run is checked here (learner, preset, settings,
config values, episode shapes) before any is started, without a device or the data; ``check_environment``
then checks the data and, for runs on this machine, the device.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from benchmark.errors import BenchError
from benchmark.harness.sweep.grid import Grid, GridPoint

#: Seconds a sweep's run waits for another process on the same run (e.g. a status probe) before refusing.
WAIT_FOR_LOCK_S = 10


def bench_process(args: Sequence[str]) -> list[str]:
    """The process that runs ``bench ARGS`` with this interpreter (so a job uses the sweep's environment)."""
    return [sys.executable, "-m", "benchmark", *args]


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep.

    Attributes:
        point: the grid point.
        name: the run directory's name under the sweep's folder.
        config_hash: the hash of everything the result depends on (the end of ``name``).
        args: ``bench`` arguments that make the run, without ``--device`` (the executor places it).
    """

    point: GridPoint
    name: str
    config_hash: str
    args: tuple[str, ...]

    @property
    def label(self) -> str:
        return self.point.label

    def command(self, device: str) -> list[str]:
        """The ``bench`` arguments for running on ``device``."""
        return [*self.args, "--device", device]

    def shell_command(self, device: str) -> str:
        return shlex.join(["bench", *self.command(device)])


@dataclass(frozen=True)
class SweepTarget:
    """Where and with what a sweep's runs go (the same for every run).

    Attributes:
        out: the sweep's folder (absolute, so jobs on other machines find it).
        data_dir: the Omniglot folder (absolute) or None (``BENCH_DATA_DIR``, then the cache).
        plugin_files: ``--plugin`` files (absolute).
    """

    out: Path
    data_dir: str | None = None
    plugin_files: tuple[str, ...] = ()

    @staticmethod
    def of(out: Path, data_dir: str | None, plugin_files: Sequence[str]) -> SweepTarget:
        return SweepTarget(Path(out).absolute(), str(Path(data_dir).absolute()) if data_dir else None,
                           tuple(str(Path(f).absolute()) for f in plugin_files))


def plan_sweep(grid: Grid, target: SweepTarget, registry: Any) -> tuple[list[SweepRun], int]:
    """Resolve every grid point; returns the runs (in grid order) and how many points were duplicates of an
    earlier one (an option value equal to the default makes the same run).

    Raises:
        BenchError: the first point that ``bench run`` would refuse, named.
    """
    from benchmark.harness.plan import RunRequest, check_shapes, resolve_plans
    from benchmark.harness.protocol import SPLITS, get_protocol

    runs: dict[str, SweepRun] = {}
    duplicates = 0
    checked_shapes: set[Any] = set()
    for point in grid.points():
        request = RunRequest(learner=point.learner, settings={"way": point.way, "shot": point.shot, **grid.settings},
                             overrides=point.overrides, preset=grid.preset, seeds=(point.seed,), out=target.out,
                             plugin_files=target.plugin_files)
        try:
            (plan,) = resolve_plans(request, registry)
            shape_key = (plan.settings.protocol, plan.settings.way, plan.settings.shot, plan.settings.query,
                         plan.settings.train_shape)
            if shape_key not in checked_shapes:
                protocol = get_protocol(plan.settings.protocol)
                check_shapes(plan.settings, {split: protocol.num_classes(split) for split in SPLITS})
                checked_shapes.add(shape_key)
        except BenchError as exc:
            raise BenchError(f"{point.label}: {exc}") from None
        if plan.dirname in runs:
            duplicates += 1
            continue
        runs[plan.dirname] = SweepRun(point, plan.dirname, plan.config_hash, _run_args(point, grid, target, plan.dirname))
    return list(runs.values()), duplicates


def _run_args(point: GridPoint, grid: Grid, target: SweepTarget, name: str) -> tuple[str, ...]:
    """``bench run`` arguments of one point. ``--name`` pins the directory the sweep planned (the run refuses it
    if its own plan differs), ``-q`` keeps progress bars out of the logs (``progress.json`` says how far a run
    is), and a short lock wait lets a run start while a status probe holds its lock for an instant."""
    args = ["run", "--learner", point.learner, "--way", str(point.way), "--shot", str(point.shot),
            "--seed", str(point.seed)]
    for key, value in grid.settings.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    if grid.preset:
        args += ["--preset", grid.preset]
    for override in point.overrides:
        args += ["-o", override]
    if target.data_dir:
        args += ["--data-dir", target.data_dir]
    for plugin in target.plugin_files:
        args += ["--plugin", plugin]
    args += ["--out", str(target.out), "--name", name, "--wait-for-lock", str(WAIT_FOR_LOCK_S), "-q"]
    return tuple(args)


def check_environment(target: SweepTarget, device: str | None) -> None:
    """Check that the data is there (loading it builds the cache once for every run) and, when runs go to
    this machine, that ``device`` exists here.

    Raises:
        BenchError: missing data or an absent device, with the fix.
    """
    from benchmark.harness.data import load_omniglot

    if device is not None:
        from benchmark.harness.runtime import resolve_device

        resolve_device(device)
    load_omniglot(target.data_dir)
