"""The typed run plan: built once from a request (command line, paper preset, overrides), validated once,
handed to the runner and written once to ``config.json``.

``RunRequest`` is what a command asked for; ``plan_runs`` resolves it against the registry, the preset and
the data into one ``RunPlan`` per seed, sharing one ``Session`` (device, class pools). Every input is
checked here, before anything is written, so a bad command leaves nothing under ``--out``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from benchmark.errors import BenchError
from benchmark.harness.settings import RunSettings, settings_from


@dataclass(frozen=True)
class RunRequest:
    """What a command asked for, before anything is resolved.

    Attributes:
        learner: the learner name.
        settings: harness settings given explicitly (``RunSettings`` field names); they win over a preset.
        overrides: ``-o key=value`` strings for the learner's config (applied last).
        config_values: typed config values applied after the preset and before ``overrides`` (e.g. a
            paper's ``--quick`` protocol).
        preset: a registered paper whose preset for this cell applies.
        seeds: one run per training seed.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        data_dir: where the Omniglot zips are (``None``: ``BENCH_DATA_DIR``, then the cache).
        out: the folder of run directories.
        name: the run directory's name (one seed only); default ``RunPlan.dirname``.
        plugin_files: ``--plugin`` files.
        command: the command line, recorded in ``config.json``.
    """

    learner: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    config_values: Mapping[str, Any] = field(default_factory=dict)
    preset: str | None = None
    seeds: tuple[int, ...] = (0,)
    device: str = "auto"
    data_dir: str | None = None
    out: Path = Path("results")
    name: str | None = None
    plugin_files: tuple[str, ...] = ()
    command: str = ""


@dataclass(frozen=True)
class RunPlan:
    """One resolved run: what it computes (``identity``) and where it goes.

    Attributes:
        learner: the learner name; ``learner_cls`` its class; ``config`` its resolved Config.
        settings: the harness settings.
        seed: the training seed.
        preset: the paper whose preset applied; ``reduced`` when it ran fewer iterations than the paper's.
        notes: the preset's notes on how the protocol differs from the paper's code.
        provenance: the learner's plugin, distribution, version and code hash.
        run_dir: the run directory.
    """

    learner: str
    learner_cls: type
    config: Any
    settings: RunSettings
    seed: int
    run_dir: Path
    preset: str | None = None
    reduced: bool = False
    notes: str = ""
    provenance: Mapping[str, Any] = field(default_factory=dict)
    command: str = ""

    def identity(self) -> dict[str, Any]:
        """Everything the result depends on (JSON-friendly): two plans with equal identities compute the same
        run, so a finished one is skipped and an unfinished one resumed."""
        from benchmark.config import json_value

        config = {f.name: json_value(getattr(self.config, f.name)) for f in dataclasses.fields(self.config) if f.init}
        return {"learner": self.learner, "learner_config": config, **self.settings.identity(), "seed": self.seed,
                "preset": self.preset, "reduced": self.reduced}

    @property
    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]

    @property
    def dirname(self) -> str:
        s = self.settings
        return f"{self.learner}-{s.way}w{s.shot}s-{s.protocol}-seed{self.seed}-{self.config_hash}"


@dataclass
class Session:
    """What the runs of one command share: the device, the data's class pools, the registry."""

    device: Any
    pools: Any
    registry: Any


def resolve_config(learner_cls: type, way: int, shot: int, preset_values: Mapping[str, Any],
                   config_values: Mapping[str, Any], overrides: tuple[str, ...], preset_name: str | None) -> Any:
    """The learner's defaults for the cell, then the preset's values, typed values, and ``-o`` overrides."""
    from benchmark.config import apply_overrides, check_config, replace_fields

    config = learner_cls.default_config(way, shot)
    config = replace_fields(config, preset_values, f"preset {preset_name}")
    config = replace_fields(config, config_values, "the command")
    config = apply_overrides(config, list(overrides))
    check_config(config)
    return config


def resolve_settings(request: RunRequest, preset_settings: Mapping[str, Any]) -> RunSettings:
    """Defaults, then the preset's settings, then what the request gave explicitly."""
    explicit = settings_from(request.settings, "the command")
    settings = RunSettings(**{**settings_from(preset_settings, f"preset {request.preset}"), **explicit})
    settings.check()
    return settings


def plan_runs(request: RunRequest, *, registry: Any = None) -> tuple[list[RunPlan], Session]:
    """Validate a request and resolve it into one plan per seed, plus the session they share.

    Order matters: learner, preset, config and settings first (cheap, no torch work), then the device and
    the data, then the episode shapes against the splits.

    Raises:
        BenchError: any invalid input, with a one-line message naming it and the fix.
    """
    from benchmark.harness.plugins import load_registry

    registry = registry if registry is not None else load_registry(request.plugin_files)
    plans = resolve_plans(request, registry)
    session = open_session(request.device, request.data_dir, plans[0].settings, registry)
    return plans, session


def resolve_plans(request: RunRequest, registry: Any) -> list[RunPlan]:
    """The request's plans (one per seed) with their run directories, without a device or the data: what a
    sweep needs to name and check hundreds of runs before it starts any (``plan_runs`` adds the session).

    Raises:
        BenchError: an unknown learner or preset, a bad setting or config value, a bad ``--name``.
    """
    learner_cls = registry.get(request.learner)
    way, shot = request.settings.get("way", RunSettings.way), request.settings.get("shot", RunSettings.shot)
    preset_settings: Mapping[str, Any] = {}
    preset_values: Mapping[str, Any] = {}
    notes, paper_iterations = "", None
    if request.preset:
        preset = registry.paper(request.preset).preset_for(way, shot)
        preset_settings, notes = preset.settings, preset.notes
        preset_values = preset.learners.get(request.learner, {})
        paper_iterations = preset.settings.get("iterations")
    settings = resolve_settings(request, preset_settings)
    config = resolve_config(learner_cls, way, shot, preset_values, request.config_values, request.overrides,
                            request.preset)
    reduced = paper_iterations is not None and settings.iterations < paper_iterations
    _check_name(request)
    provenance = registry.provenance(request.learner)
    plans = []
    for seed in request.seeds or (0,):
        plan = RunPlan(request.learner, learner_cls, config, settings, seed, Path(), request.preset, reduced, notes,
                       provenance, request.command)
        plans.append(dataclasses.replace(plan, run_dir=Path(request.out) / (request.name or plan.dirname)))
    return plans


def open_session(device_name: str, data_dir: str | None, settings: RunSettings, registry: Any) -> Session:
    """Resolve the device, load the data onto it and check the episode shapes against every split."""
    from benchmark.harness.data import load_omniglot
    from benchmark.harness.protocol import get_protocol, load_pools
    from benchmark.harness.runtime import resolve_device

    protocol = get_protocol(settings.protocol)
    check_shapes(settings)
    device = resolve_device(device_name)
    pools = load_pools(load_omniglot(data_dir), protocol, device)
    check_shapes(settings, {split: getattr(pools, split).num_classes for split in ("train", "val", "test")})
    return Session(device, pools, registry)


def check_shapes(settings: RunSettings, num_classes: Mapping[str, int] | None = None) -> None:
    """Check the training and test episode shapes, and, given the classes per split, that each split can
    serve them (training episodes come from ``train``, validation and test episodes from ``val``/``test``).

    Raises:
        ProtocolError: an episode that cannot be drawn, naming the limit.
    """
    from benchmark.harness.protocol import EpisodeSpec

    test_spec, train_spec = EpisodeSpec(settings.way, settings.shot, settings.query), EpisodeSpec(*settings.train_shape)
    if num_classes is None:
        test_spec.validate()
        train_spec.validate()
        return
    train_spec.validate(num_classes["train"], "train")
    for split in ("val", "test"):
        test_spec.validate(num_classes[split], split)


def _check_name(request: RunRequest) -> None:
    name = request.name
    if name and len(request.seeds) > 1:
        raise BenchError("--name names one run directory; drop it to run several --seed values")
    if name and (name in (".", "..") or not re.fullmatch(r"[A-Za-z0-9._+=-]+", name)):
        raise BenchError(f"--name {name!r} must be one folder name (letters, digits, . _ + = -), not a path")
