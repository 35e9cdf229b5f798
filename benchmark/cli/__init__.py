"""The ``bench`` command line. Subcommands are imported lazily so that ``bench --help`` never imports torch.

Each subcommand lives in its own module of this package and exposes a click command; ``main()`` turns
``BenchError`` into a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import errno
import importlib
import sys

import click

from benchmark import __version__

#: name -> ("module", "attribute", "one-line help shown by bench --help")
SUBCOMMANDS = {
    "data": ("benchmark.cli.data", "data", "Find, verify and cache the Omniglot data."),
    "plugins": ("benchmark.cli.plugins", "plugins", "List installed plugins and their status."),
    "learners": ("benchmark.cli.plugins", "learners", "List learners, or show one learner's config fields."),
    "run": ("benchmark.cli.run", "run", "Train a learner and evaluate it on the fixed test episodes."),
    "table": ("benchmark.cli.table", "table", "Summarize runs as a table with 95% confidence intervals."),
    "perf": ("benchmark.cli.perf", "perf", "Time a learner's meta-training step against the per-task loop."),
    "reproduce": ("benchmark.cli.reproduce", "reproduce", "Reproduce a paper's table in the harness."),
    "sweep": ("benchmark.cli.sweep", "sweep", "Run a grid of runs here or on a Slurm cluster; --status says how far."),
    "plot": ("benchmark.cli.plot", "plot", "Draw figures for a paper (PDF, PNG and their numbers as CSV)."),
    "report": ("benchmark.cli.report", "report", "Write one self-contained HTML page: tables, figures, provenance."),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported only when they are invoked."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        module, attr, _ = SUBCOMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Use the static help lines: importing each command to read its help would import torch.
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_line) for name, (_, _, help_line) in SUBCOMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="metabench")
def cli() -> None:
    """metabench: compare few-shot meta-learners on identical, seeded Omniglot episodes.

    \b
    bench data                       check and cache the data (downloads it if needed)
    bench learners                   the learners that plugins provide
    bench run --learner maml --way 20 --shot 1
    bench table results/ --reference maml
    bench plot all results/ --reference maml
    bench report results/ --reference maml
    """


#: OS errors that are the machine's state, not a bug: reported in one line with the path and the fix.
_STORAGE_ERRNOS = {errno.ENOSPC: "free some space or choose another --out", errno.EDQUOT: "free some space or "
                   "choose another --out", errno.EROFS: "choose a writable --out", errno.EACCES: "check the "
                   "permissions or choose another --out", errno.EPERM: "check the permissions or choose another --out"}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bench`` script: user errors become one line on stderr and exit code 2.

    Exit codes: 0 success; 1 a check failed (``bench data``); 2 bad input or a fault (one line on stderr);
    3 a run stopped by ``--time-limit``; 128+N a run stopped by signal N (130 Ctrl-C, 143 SIGTERM, 140
    SIGUSR2). Stopped runs checkpointed first: the same command resumes them.
    """
    from benchmark.errors import BenchError, RunStopped

    try:
        # With standalone_mode off, click returns the exit code of click.exceptions.Exit instead of raising it.
        result = cli.main(args=argv, prog_name="bench", standalone_mode=False)
    except RunStopped as exc:
        click.echo(f"Stopped: {exc}", err=True)
        return exc.exit_code
    except BenchError as exc:
        click.echo(f"Error: {exc}", err=True)
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in _STORAGE_ERRNOS:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        click.echo(f"Error: {exc.strerror}{where}: {_STORAGE_ERRNOS[exc.errno]}; an interrupted run resumes "
                   "when you run the same command again", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
