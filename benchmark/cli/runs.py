"""How runs look on the terminal: a progress bar on stderr, one result line per run on stdout.

Shared by every command that executes runs (``run``, ``reproduce``, ``sweep``); not a command itself.
"""

from __future__ import annotations

from typing import Any


class ProgressBar:
    """A rich progress bar on stderr: iteration (moved every step), loss, train accuracy, last validation
    accuracy, iterations per second and the time remaining; notes (e.g. "this run takes 9 hours") above it."""

    def __init__(self, console: Any, plan: Any) -> None:
        self.console, self.plan = console, plan
        self.progress: Any = None  # drawn at the run's first event: a skipped run shows no bar

    def _start(self, total: int, completed: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        s = self.plan.settings
        self.progress = Progress(
            TextColumn(f"{self.plan.learner} {s.way}w{s.shot}s seed {self.plan.seed}", markup=False),
            BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[metrics]}", markup=False),
            _rate_column(), TimeRemainingColumn(elapsed_when_finished=True),
            console=self.console, transient=False, speed_estimate_period=60,
        )
        # A resumed run starts part-way: the speed (and time remaining) count only this session's steps.
        self.task = self.progress.add_task("train", total=total, completed=completed, metrics="")
        self.progress.start()

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "start":
            self._start(event["total"], event["iteration"])
        elif self.progress is None:
            return
        elif kind == "step":
            self.progress.update(self.task, completed=event["iteration"])
        elif kind == "log":
            row = event["row"]
            parts = [f"{k} {row[k]:.3f}" for k in ("loss", "accuracy") if k in row]
            if event.get("last_val") is not None:
                parts.append(f"val {event['last_val']:.3f}")
            self.progress.update(self.task, completed=row["iteration"], metrics="  ".join(parts))
        elif kind == "note":
            self.progress.console.print(event["text"], markup=False, style="yellow")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _rate_column() -> Any:
    """Iterations per second over the last minute (rich's estimate from the per-step updates)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed:.2f} it/s" if task.speed else "- it/s")

    return Rate()


def progress_factory(quiet: bool):
    """A factory of progress bars for ``execute_plans`` (None when quiet)."""
    if quiet:
        return None
    from benchmark.cli.console import stderr_console

    console = stderr_console()
    return lambda plan: ProgressBar(console, plan)


def outcome_line(plan: Any, outcome: Any) -> str:
    """One line per run: the result, what happened (done, resumed, skipped) and where it is."""
    s = outcome.summary
    if outcome.skipped:
        verb = "already finished (use --force to redo)"
        if outcome.code_changed:
            verb = ("already finished, but with other code of its plugin than is installed now "
                    "(use --force to redo it with the current code)")
    elif outcome.resumed_from:
        verb = f"resumed from iteration {outcome.resumed_from}"
    else:
        verb = "done"
    mean, ci = s.get("accuracy_mean"), s.get("ci95")
    ci_text = "n/a" if ci is None else f"{100 * ci:.2f}"
    return (f"{plan.learner} {plan.settings.way}-way {plan.settings.shot}-shot seed {plan.seed}: "
            f"{100 * mean:.2f} ± {ci_text} % over {s['n']} test episodes, {verb}: {outcome.path}")
