"""The harness settings of a run, with every default in one place.

``RunSettings`` is what a run's result depends on besides the learner and its config: the test cell, the
training episodes, how long it trains, which test episodes score it, how the weights to test are chosen.
Command-line options, paper presets and sweeps all produce one; the CLI reads its defaults from here for
``--help``. No torch here.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from benchmark.errors import BenchError

Selection = Literal["last", "best-val"]
SELECTIONS: tuple[str, ...] = ("last", "best-val")

#: Settings that only change how a run is logged and checkpointed, never its result.
NOT_IN_IDENTITY = ("log_every", "checkpoint_every")


@dataclass(frozen=True)
class RunSettings:
    """Harness settings of one run.

    Attributes:
        way, shot, query: the test cell: N classes, K support and Q query drawings per class.
        train_way, train_shot, train_query: training episodes (``None``: the test cell's).
        iterations: meta-training iterations.
        episodes: test episodes in the fixed manifest.
        episode_seed: seed of the test manifest (keep it fixed so learners are paired).
        protocol: the class split (``vinyals`` or ``lake``).
        select: which weights are tested: ``last`` (the final iterate) or ``best-val`` (the checkpoint
            with the best validation accuracy; validation uses its own fixed episodes only).
        ensemble: with ``best-val``, average the logits of this many best validation checkpoints (MAML++
            tests an ensemble of 5).
        val_every, val_episodes: validate every N iterations on this many validation episodes.
        log_every: read metrics back from the device (one log row) every N iterations.
        checkpoint_every: checkpoint every N iterations.
    """

    way: int = 5
    shot: int = 1
    query: int = 15
    train_way: int | None = None
    train_shot: int | None = None
    train_query: int | None = None
    iterations: int = 10_000
    episodes: int = 600
    episode_seed: int = 0
    protocol: str = "vinyals"
    select: Selection = "last"
    ensemble: int = 1
    val_every: int = 500
    val_episodes: int = 100
    log_every: int = 50
    checkpoint_every: int = 500

    @property
    def train_shape(self) -> tuple[int, int, int]:
        """(way, shot, query) of training episodes."""
        return (self.train_way or self.way, self.train_shot or self.shot, self.train_query or self.query)

    @property
    def trains_on_test_shape(self) -> bool:
        return self.train_shape == (self.way, self.shot, self.query)

    def identity(self) -> dict[str, Any]:
        """The settings that define the result (with training episodes resolved)."""
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_IN_IDENTITY}
        values["train_way"], values["train_shot"], values["train_query"] = self.train_shape
        return values

    def check(self) -> None:
        """Raise BenchError naming the option for values no run can have (episode limits of the data are
        checked by the protocol, once the split is known)."""
        counts = {"episodes": 1, "val_every": 1, "val_episodes": 1, "log_every": 1, "checkpoint_every": 1,
                  "iterations": 0}
        for name, low in counts.items():
            if getattr(self, name) < low:
                raise BenchError(f"--{name.replace('_', '-')} must be at least {low} (got {getattr(self, name)})")
        if self.select not in SELECTIONS:
            raise BenchError(f"--select must be one of {', '.join(SELECTIONS)} (got {self.select!r})")
        if self.ensemble < 1 or (self.ensemble > 1 and self.select != "best-val"):
            raise BenchError(f"--ensemble {self.ensemble} needs to be 1, or more with --select best-val (it averages "
                             "the best validation checkpoints)")


def settings_from(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Check that ``values`` names RunSettings fields (e.g. a preset's settings); returns them as a dict."""
    known = {f.name for f in dataclasses.fields(RunSettings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise BenchError(f"{source} sets unknown harness settings {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return dict(values)


def parse_cell(text: str) -> tuple[int, int]:
    """``"5w1s"`` -> (5, 1)."""
    match = re.fullmatch(r"\s*(\d+)w(\d+)s\s*", text)
    if not match:
        raise BenchError(f"cell {text!r} is not of the form <way>w<shot>s, e.g. 5w1s or 20w5s")
    return int(match.group(1)), int(match.group(2))


def parse_duration(text: str) -> float:
    """``"9m"``, ``"90s"``, ``"1h30m"``, ``"600"`` (seconds) -> seconds."""
    match = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not text.strip() or not match or not any(match.groups()):
        raise BenchError(f"time limit {text!r} is not a duration; write e.g. 9m, 90s, 1h30m or 600 (seconds)")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    total = 3600 * hours + 60 * minutes + seconds
    if total <= 0:
        raise BenchError(f"time limit {text!r} must be positive")
    return total
