"""Sweep grids: the runs a sweep asks for, from command-line options and a TOML sweep file.

A grid is the product learners x cells x learner-option values x seeds; each point is one ordinary run.
Command line: ``--learner maml --learner protonet --cell 5w1s --cell 20w1s --seed 0..2 -o inner_lr=0.4,2.0``.
A comma separates the values of an axis; a list- or tuple-valued option takes one value in brackets per
point (``-o widths=[32,64],[64,64]``). A sweep file says the same for larger grids::

    learners = ["maml", "fomaml", "finetune"]
    cells = ["5w1s", "20w1s"]
    seeds = "0..2"              # or [0, 1, 2]
    preset = "finn2017"         # optional

    [settings]                  # harness settings of every run (bench run's options, with underscores)
    iterations = 2000
    episodes = 600

    [options]                   # learner options of every learner; a list is an axis
    meta_batch_size = 8

    [learner.maml]              # options of one learner only (it must be in learners)
    inner_lr = [0.4, 2.0]

Given both, the command line wins: its ``--learner``/``--cell``/``--seed`` replace the file's lists, its
``-o`` keys and run settings replace the file's. No torch here: the grid is checked before anything loads.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from benchmark.errors import BenchError
from benchmark.harness.settings import RunSettings, parse_cell, settings_from

#: Top-level keys of a sweep file.
FILE_KEYS = ("learners", "cells", "seeds", "preset", "settings", "options", "learner")
#: Run settings a grid may not set: the cells axis sets them.
CELL_SETTINGS = ("way", "shot")


@dataclass(frozen=True)
class GridPoint:
    """One run of a grid: a learner on a cell with one value per option axis and a seed.

    Attributes:
        overrides: ``key=value`` strings for the learner's config, in axis order (``bench run -o``).
    """

    learner: str
    way: int
    shot: int
    seed: int
    overrides: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """How a person names the run: ``maml 5w1s seed 0 inner_lr=0.4``."""
        return " ".join([self.learner, f"{self.way}w{self.shot}s", f"seed {self.seed}", *self.overrides])


@dataclass(frozen=True)
class Grid:
    """A sweep's grid.

    Attributes:
        learners: learner names (one axis).
        cells: (way, shot) pairs (one axis).
        seeds: training seeds (one axis).
        options: learner option axes for every learner: key -> values (strings, as ``-o`` takes them).
        learner_options: option axes of one learner: learner -> key -> values (they win over ``options``).
        settings: harness settings of every run (``RunSettings`` fields other than way and shot).
        preset: a paper whose preset applies to every run.
    """

    learners: tuple[str, ...]
    cells: tuple[tuple[int, int], ...] = ((5, 1),)
    seeds: tuple[int, ...] = (0,)
    options: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    learner_options: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    preset: str | None = None

    def points(self) -> list[GridPoint]:
        """Every point, ordered learner, cell, option values, seed (so a table fills row by row)."""
        points = []
        for learner in self.learners:
            axes = {**self.options, **self.learner_options.get(learner, {})}
            keys = list(axes)
            for (way, shot), values in itertools.product(self.cells, itertools.product(*axes.values())):
                overrides = tuple(f"{k}={v}" for k, v in zip(keys, values))
                points.extend(GridPoint(learner, way, shot, seed, overrides) for seed in self.seeds)
        return points

    def describe(self) -> dict[str, Any]:
        """The grid as JSON (for the sweep record)."""
        return {"learners": list(self.learners), "cells": [f"{w}w{s}s" for w, s in self.cells],
                "seeds": list(self.seeds), "options": {k: list(v) for k, v in self.options.items()},
                "learner_options": {name: {k: list(v) for k, v in axes.items()}
                                    for name, axes in self.learner_options.items()},
                "settings": dict(self.settings), "preset": self.preset}


# -- parsing command-line values ----------------------------------------------------------------------------
def parse_seeds(texts: Iterable[str], source: str = "--seed") -> tuple[int, ...]:
    """``["0..2", "7"]`` or ``["0,3,5"]`` -> (0, 1, 2, 7) / (0, 3, 5); ranges include both ends; repeats are
    dropped, the order kept."""
    seeds: list[int] = []
    for text in texts:
        for part in str(text).split(","):
            match = re.fullmatch(r"\s*(-?\d+)\s*(?:\.\.\s*(-?\d+)\s*)?", part)
            if not match:
                raise BenchError(f"{source} {text!r}: write a seed (3), a range (0..4) or a comma list (0,2,5)")
            low = int(match.group(1))
            high = int(match.group(2)) if match.group(2) is not None else low
            if high < low:
                raise BenchError(f"{source} {text!r}: the range {low}..{high} is empty; write the lower seed first")
            seeds.extend(s for s in range(low, high + 1) if s not in seeds)
    if not seeds:
        raise BenchError(f"{source} names no seed; write e.g. {source} 0..2")
    return tuple(seeds)


def parse_cells(texts: Iterable[str]) -> tuple[tuple[int, int], ...]:
    """``["5w1s", "20w1s,20w5s"]`` -> ((5, 1), (20, 1), (20, 5)), repeats dropped."""
    cells: list[tuple[int, int]] = []
    for text in texts:
        for part in str(text).split(","):
            cell = parse_cell(part)
            if cell not in cells:
                cells.append(cell)
    if not cells:
        raise BenchError("--cell names no cell; write e.g. --cell 5w1s")
    return tuple(cells)


def split_values(raw: str) -> list[str]:
    """Split an axis at the commas outside brackets: ``"0.4,2.0"`` -> two values, ``"[1,2],[3,4]"`` -> two."""
    values, depth, current = [], 0, []
    for char in raw:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    values.append("".join(current).strip())
    return values


def parse_option_axes(texts: Iterable[str], source: str = "-o") -> dict[str, tuple[str, ...]]:
    """``["inner_lr=0.4,2.0", "meta_batch_size=8"]`` -> {"inner_lr": ("0.4", "2.0"), "meta_batch_size": ("8",)}."""
    axes: dict[str, tuple[str, ...]] = {}
    for text in texts:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise BenchError(f"{source} {text!r} is not of the form KEY=VALUE[,VALUE...]; write e.g. -o inner_lr=0.4,2.0")
        values = split_values(raw)
        if any(not v for v in values):
            raise BenchError(f"{source} {text!r} has an empty value; write e.g. {key}=0.4,2.0")
        if key in axes:
            raise BenchError(f"{source} sets {key!r} twice; give its values once, comma-separated ({key}=a,b)")
        if len(set(values)) != len(values):
            raise BenchError(f"{source} {text!r} repeats a value")
        axes[key] = tuple(values)
    return axes


# -- the sweep file -----------------------------------------------------------------------------------------
def load_sweep_file(path: str | Path) -> dict[str, Any]:
    """A TOML sweep file as the parts of a grid it gives (keys of ``Grid``); every key and value checked.

    Raises:
        BenchError: a missing or unreadable file, bad TOML, an unknown key or a value of the wrong type.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise BenchError(f"cannot read the sweep file {path} ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise BenchError(f"the sweep file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise BenchError(f"the sweep file {path} is not valid TOML: {exc}") from None
    where = str(path)
    unknown = sorted(set(data) - set(FILE_KEYS))
    if unknown:
        raise BenchError(f"{where}: unknown key(s) {', '.join(unknown)}; a sweep file may set {', '.join(FILE_KEYS)}")
    parts: dict[str, Any] = {}
    if "learners" in data:
        parts["learners"] = tuple(_strings(data["learners"], f"{where}: learners"))
    if "cells" in data:
        parts["cells"] = parse_cells(_strings(data["cells"], f"{where}: cells"))
    if "seeds" in data:
        seeds = data["seeds"]
        items = seeds if isinstance(seeds, list) else [seeds]
        if not all(isinstance(s, (int, str)) and not isinstance(s, bool) for s in items):
            raise BenchError(f"{where}: seeds must be a list of integers or a range string such as \"0..4\"")
        parts["seeds"] = parse_seeds([str(s) for s in items], f"{where}: seeds")
    if "preset" in data:
        if not isinstance(data["preset"], str):
            raise BenchError(f"{where}: preset must be a paper name (a string)")
        parts["preset"] = data["preset"]
    if "settings" in data:
        parts["settings"] = _settings(_table(data["settings"], f"{where}: [settings]"), f"{where}: [settings]")
    if "options" in data:
        parts["options"] = _option_table(_table(data["options"], f"{where}: [options]"), f"{where}: [options]")
    if "learner" in data:
        per = _table(data["learner"], f"{where}: [learner]")
        parts["learner_options"] = {}
        for name, table in per.items():
            section = f"{where}: [learner.{name}]"
            parts["learner_options"][name] = _option_table(_table(table, section), section)
    return parts


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BenchError(f"{where} must be a table")
    return value


def _strings(value: Any, where: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) and v for v in items):
        raise BenchError(f"{where} must be a list of names, e.g. [\"maml\", \"fomaml\"]")
    return items


def _settings(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Scalar run settings; way and shot belong to the cells axis."""
    for key in CELL_SETTINGS:
        if key in values:
            raise BenchError(f"{where} sets {key}; give the test cells as cells = [\"5w1s\", ...] instead")
    checked = settings_from(values, where)
    # The annotations are strings ("int", "int | None", "str", "Selection"): integer fields say so.
    wants_int = {f.name: "int" in str(f.type) for f in dataclasses.fields(RunSettings)}
    for key, value in checked.items():
        if isinstance(value, (list, dict)):
            raise BenchError(f"{where}: {key} must be a single value; settings are the same for every run of a "
                             "sweep (sweep learner options, cells and seeds)")
        kind = int if wants_int[key] else str
        if isinstance(value, bool) or not isinstance(value, kind):
            raise BenchError(f"{where}: {key} must be {'an integer' if kind is int else 'a string'}, got {value!r}")
    return checked


def _option_table(values: Mapping[str, Any], where: str) -> dict[str, tuple[str, ...]]:
    """TOML option values as ``-o`` strings: a list is an axis; a list inside it is one list-typed value."""
    axes = {}
    for key, value in values.items():
        items = value if isinstance(value, list) else [value]
        if not items:
            raise BenchError(f"{where}: {key} is an empty list; give at least one value")
        strings = tuple(_option_string(v, f"{where}: {key}") for v in items)
        if len(set(strings)) != len(strings):
            raise BenchError(f"{where}: {key} repeats a value")
        axes[key] = strings
    return axes


def _option_string(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return repr(value) if isinstance(value, float) else str(value)
    if isinstance(value, list):
        return "[" + ",".join(_option_string(v, where) for v in value) + "]"
    raise BenchError(f"{where}: {value!r} is not a number, string, boolean or list")


# -- merging ------------------------------------------------------------------------------------------------
def build_grid(file_parts: Mapping[str, Any], *, learners: tuple[str, ...] = (), cells: tuple[str, ...] = (),
               seeds: tuple[str, ...] = (), options: tuple[str, ...] = (), settings: Mapping[str, Any] | None = None,
               preset: str | None = None) -> Grid:
    """The grid from a sweep file's parts and the command line's values (which win).

    Raises:
        BenchError: no learner, a per-learner table for a learner the grid does not run, bad values.
    """
    settings = dict(settings or {})
    for key in CELL_SETTINGS:
        settings.pop(key, None)
    grid_learners = tuple(dict.fromkeys(learners)) or tuple(dict.fromkeys(file_parts.get("learners", ())))
    if not grid_learners:
        raise BenchError("name the learners to sweep: --learner NAME (repeatable), or learners = [...] in --file")
    per_learner = dict(file_parts.get("learner_options", {}))
    strangers = sorted(set(per_learner) - set(grid_learners))
    if strangers:
        raise BenchError(f"the sweep file has options for {', '.join(strangers)}, which the sweep does not run "
                         f"(learners: {', '.join(grid_learners)})")
    return Grid(
        learners=grid_learners,
        cells=parse_cells(cells) if cells else file_parts.get("cells", ((5, 1),)),
        seeds=parse_seeds(seeds) if seeds else file_parts.get("seeds", (0,)),
        options={**file_parts.get("options", {}), **parse_option_axes(options)},
        learner_options=per_learner,
        settings={**file_parts.get("settings", {}), **settings},
        preset=preset or file_parts.get("preset"),
    )
