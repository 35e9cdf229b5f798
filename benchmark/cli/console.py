"""One place for terminal output: tables and JSON to stdout, progress and warnings to stderr.

rich reads ``[...]`` as markup, so user strings (paths, error text) are printed with markup off.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def stdout_console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(obj: Any) -> None:
    """Plain JSON on stdout (no colours), for scripts."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
