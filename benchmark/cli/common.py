"""Click options shared by several commands (``--plugin`` and ``-o``), so every command spells them the same.

No torch here: command modules import this at ``bench <command> --help`` time.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import click

F = TypeVar("F", bound=Callable[..., object])


def plugin_option(func: F) -> F:
    """``--plugin FILE.py`` (repeatable): load a plugin from a file without packaging it.

    The command receives ``plugin_files: tuple[str, ...]``. Existence is checked by
    ``benchmark.plugins.get_plugin_manager`` so that the error reads like every other plugin error.
    """
    return click.option(
        "--plugin",
        "plugin_files",
        multiple=True,
        metavar="FILE.py",
        type=click.Path(dir_okay=False),
        help="Load a plugin from a Python file (repeatable); no packaging needed.",
    )(func)


def override_option(func: F) -> F:
    """``-o/--option KEY=VALUE`` (repeatable): override one field of the learner's config.

    The command receives ``overrides: tuple[str, ...]``; pass it to ``benchmark.config.apply_overrides``.
    """
    return click.option(
        "-o",
        "--option",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a learner config field (repeatable); `bench learners NAME` lists the fields.",
    )(func)
