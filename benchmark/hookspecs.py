"""Hook specifications: how plugins tell metabench what they provide.

Hooks are for discovery only: they run once when the plugin manager is built. Per-step work is a plain
method call on the learner object.
"""

from __future__ import annotations

from typing import Callable

from benchmark import hookspec


@hookspec
def bench_register_learners(register: Callable[[type], None]) -> None:
    """Register learner classes.

    Call ``register(LearnerClass)`` once per learner. The class must subclass
    ``benchmark.learner.Learner`` and set a unique ``name``; a second learner with the same name is an
    error that names both plugins.

    :param register: the callback that records one learner class.
    """


@hookspec
def bench_register_papers(register: Callable[[object], None]) -> None:
    """Register papers whose tables the harness can reproduce.

    Call ``register(Paper(...))`` once per paper (``benchmark.papers.Paper``: its presets per cell,
    published numbers with sources, model selection). A second paper with the same name is an error that
    names both plugins. ``bench reproduce NAME`` and ``bench run --preset NAME`` then use it.

    :param register: the callback that records one paper.
    """
