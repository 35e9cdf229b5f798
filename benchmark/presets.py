"""Named protocols from papers: ``bench run --preset finn2017`` sets everything the paper fixed.

Explicit command-line options still win; a preset run with fewer iterations than the paper's is labelled
*reduced* in its config and in every table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from benchmark.errors import BenchError


@dataclass(frozen=True)
class Preset:
    """What a paper fixed, for one (way, shot) cell.

    Attributes:
        run: harness settings (query, episodes, iterations, protocol).
        learner_overrides: per learner name, config values the paper fixed (applied before ``-o``).
        notes: how our protocol differs from the paper's code, recorded with the run.
    """

    name: str
    run: dict[str, Any]
    learner_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: str = ""


def finn2017(way: int, shot: int) -> Preset:
    """Finn, Abbeel & Levine 2017, "Model-Agnostic Meta-Learning", Omniglot (Table 1).

    K query examples per class (the reference code samples 2K drawings per class and splits them), 600 test
    tasks, 60,000 meta-iterations, transductive batch norm; 5-way: inner lr 0.4, 1 step, meta-batch 32;
    20-way: inner lr 0.1, 5 steps, meta-batch 16; 10 adaptation steps at test time (the reference code).
    """
    if way not in (5, 20) or shot not in (1, 5):
        raise BenchError(f"the finn2017 preset covers 5- and 20-way, 1- and 5-shot (got {way}-way {shot}-shot)")
    maml = {"inner_lr": 0.4, "inner_steps": 1, "meta_batch_size": 32} if way == 5 else {
        "inner_lr": 0.1, "inner_steps": 5, "meta_batch_size": 16}
    maml["test_inner_steps"] = 10
    return Preset(
        name="finn2017",
        run={"query": shot, "episodes": 600, "iterations": 60000, "protocol": "vinyals"},
        learner_overrides={"maml": dict(maml), "fomaml": dict(maml)},
        notes=(
            "Class split: the Vinyals et al. split shipped with metabench (1028/172/423 characters), not the "
            "reference code's random 1200/423 split; rotations by 90/180/270 degrees are classes of their own. "
            "Test tasks: a fixed, hashed manifest of 600 episodes, identical for every learner."
        ),
    )


PRESETS = {"finn2017": finn2017}


def get_preset(name: str, way: int, shot: int) -> Preset:
    if name not in PRESETS:
        raise BenchError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name](way, shot)
