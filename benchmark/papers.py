"""Papers as plugins: the presets a paper fixed, its published numbers and how to compare with them.

A plugin registers a paper through the ``bench_register_papers(register)`` hook::

    from benchmark import hookimpl
    from benchmark.papers import Anchor, Paper, Preset

    @hookimpl
    def bench_register_papers(register):
        register(Paper(name="snell2017", title="Snell, Swersky & Zemel 2017, Prototypical Networks",
                       learners=("protonet",), cells=((5, 1), (5, 5), (20, 1), (20, 5)),
                       preset=my_preset, anchors=(Anchor("protonet", 5, 1, 98.8, None, "Table 1", ...),)))

``bench run --preset NAME`` then applies the paper's settings to one test cell, and ``bench reproduce NAME``
runs every cell and puts the published numbers beside ours. The core never knows a paper or a learner by
name: everything it needs is declared here.

No torch here: ``bench reproduce --list`` imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

Selection = Literal["last", "best-val"]


@dataclass(frozen=True)
class Preset:
    """What a paper fixed for one test cell.

    Attributes:
        settings: harness settings by ``RunSettings`` field name, e.g. ``{"query": 1, "iterations": 60000,
            "train_way": 60, "select": "best-val"}``; explicit command-line options win over them.
        learners: per learner name, config values the paper fixed (typed Python values, checked against
            the learner's Config like ``-o`` values), applied before ``-o``.
        notes: how the harness protocol differs from the paper's released code, with file:line citations;
            recorded in every run's ``config.json``.
    """

    settings: Mapping[str, Any] = field(default_factory=dict)
    learners: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    notes: str = ""


@dataclass(frozen=True)
class Anchor:
    """One published number.

    Attributes:
        learner, way, shot: the learner name and test cell it belongs to.
        mean: published accuracy in percent.
        ci: the published ± in percent, or ``None`` when the paper gives none.
        ci_kind: what that ± is, e.g. "95% CI over 600 test episodes", "std over 3 seeds".
        source: paper, table and version, e.g. "Finn et al. 2017, Table 1".
        verified: whether the number was checked against the paper (unverified numbers are marked so).
        protocol: set when the number was measured under another protocol than this paper's preset (e.g.
            "Reptile's code and network"); such anchors are shown but never judged.
    """

    learner: str
    way: int
    shot: int
    mean: float
    ci: float | None
    ci_kind: str
    source: str
    verified: bool = True
    protocol: str = ""

    @property
    def is_95_ci(self) -> bool:
        """Whether ``ci`` is a 95% confidence half-width, the only kind an interval test can use."""
        return self.ci is not None and "95%" in self.ci_kind


@dataclass(frozen=True)
class Quick:
    """A reduced protocol for ``bench reproduce PAPER --quick``: a CPU smoke of the whole pipeline.

    Attributes:
        cells: the cells it runs.
        settings: harness settings on top of the preset (e.g. fewer iterations).
        learners: per learner name, config values on top of the preset (e.g. a smaller meta-batch).
        description: one line for the table caption, e.g. "600 iterations, meta-batch 8".
    """

    cells: tuple[tuple[int, int], ...]
    settings: Mapping[str, Any] = field(default_factory=dict)
    learners: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    description: str = ""


@dataclass(frozen=True)
class Paper:
    """A paper whose table the harness can reproduce.

    Attributes:
        name: what users type (``bench reproduce NAME``, ``--preset NAME``).
        title: authors, year and title, for tables and ``--list``.
        learners: the learners its table reports, in table order (plus baselines run beside them).
        cells: the (way, shot) test cells of its table.
        preset: the paper's settings for a cell: ``preset(way, shot) -> Preset``.
        anchors: the published numbers.
        selection: which weights the paper tested: ``"last"`` (the final iterate) or ``"best-val"``.
        notes: protocol notes for the table caption (what the paper's ± means, what differs).
        quick: the reduced CPU protocol of ``--quick``.
    """

    name: str
    title: str
    learners: tuple[str, ...]
    cells: tuple[tuple[int, int], ...]
    preset: Callable[[int, int], Preset]
    anchors: tuple[Anchor, ...] = ()
    selection: Selection = "last"
    notes: str = ""
    quick: Quick | None = None

    def preset_for(self, way: int, shot: int) -> Preset:
        """The preset of one cell, with the paper's model selection unless the preset sets its own."""
        preset = self.preset(way, shot)
        if "select" in preset.settings:
            return preset
        return Preset({**preset.settings, "select": self.selection}, preset.learners, preset.notes)

    def anchor(self, learner: str, way: int, shot: int) -> Anchor | None:
        return next((a for a in self.anchors if (a.learner, a.way, a.shot) == (learner, way, shot)), None)


def cell_label(way: int, shot: int) -> str:
    """``"5w1s"``: how cells are written on the command line."""
    return f"{way}w{shot}s"
