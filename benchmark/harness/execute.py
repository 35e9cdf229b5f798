"""Execute planned runs one after another: what ``bench run`` and ``bench reproduce`` share."""

from __future__ import annotations

from typing import Any, Callable, Iterator

from benchmark.harness.plan import RunPlan, Session
from benchmark.harness.runner import RunOutcome, Runner

#: Makes a progress callback for one plan (or None for no progress).
ProgressFactory = Callable[[RunPlan], "Progress | None"]


class Progress:
    """What the runner reports to (a progress bar): called with events; closed when the run ends."""

    def __call__(self, event: dict[str, Any]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - interface
        pass


def execute_plans(plans: list[RunPlan], session: Session, *, force: bool = False,
                  progress: ProgressFactory | None = None, time_limit: float | None = None,
                  wait_for_lock: float = 0.0) -> Iterator[tuple[RunPlan, RunOutcome]]:
    """Run every plan (skipping finished ones unless ``force``); yields each plan with its outcome.

    ``time_limit`` counts from the first run's start and is shared by all of them.
    """
    from benchmark.harness.provenance import environment

    env = environment(session.device)  # asks git once per command
    import time

    deadline = None if time_limit is None else time.monotonic() + time_limit
    for plan in plans:
        reporter = progress(plan) if progress else None
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        runner = Runner(plan, session, progress=reporter, time_limit=remaining, environment=env)
        try:
            outcome = runner.run(force=force, wait_for_lock=wait_for_lock)
        finally:
            if reporter is not None:
                reporter.close()
        yield plan, outcome
