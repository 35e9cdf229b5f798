"""``bench plugins`` and ``bench learners``: what is installed, where it came from, and what it accepts.

Nothing heavy at import time: the registry (which imports learner modules, hence torch) is built only when
a command runs, so ``bench plugins --help`` stays fast.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import click

from benchmark.cli.options import plugin_option
from benchmark.cli.console import print_json, stderr_console, stdout_console


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@plugin_option
def plugins(as_json: bool, plugin_files: tuple[str, ...]) -> None:
    """List installed plugins: distribution, version, status and the learners each registers.

    Plugins that failed to import are listed with their error; BENCH_DISABLE_PLUGINS=name1,name2 (or "all")
    skips installed plugins.
    """
    from benchmark.harness.plugins import plugin_report

    records = plugin_report(plugin_files)
    if as_json:
        print_json(records)
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title="Plugins")
    for column in ("plugin", "distribution", "version", "status", "learners", "papers"):
        table.add_column(column)
    for r in records:
        status = r["status"] if r["status"] != "failed" else f"failed: {r['error']}"
        table.add_row(
            Text(r["name"]), Text(r["distribution"] or r["source"]), Text(r["version"] or ""),
            Text(status, style="red" if r["status"] == "failed" else ""), Text(", ".join(r["learners"])),
            Text(", ".join(r["papers"])),
        )
    if not records:
        stderr_console().print("No plugins found: install one, or pass --plugin FILE.py.", markup=False)
    stdout_console().print(table)


@click.command("learners")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--way", default=5, show_default=True, help="Way for which to show the learner's defaults.")
@click.option("--shot", default=1, show_default=True, help="Shot for which to show the learner's defaults.")
@plugin_option
def learners(name: str | None, as_json: bool, way: int, shot: int, plugin_files: tuple[str, ...]) -> None:
    """List learners with the plugin that provides each, or show one learner's config fields.

    \b
    bench learners                 every learner, its plugin and a one-line description
    bench learners maml            maml's options (-o KEY=VALUE), with types, defaults and help
    """
    from benchmark.harness.plugins import load_registry

    registry = load_registry(plugin_files)
    _warn_failed(registry)
    if name is None:
        rows = [_summary(registry, n) for n in registry.names()]
        if as_json:
            print_json(rows)
        else:
            _print_learner_table(rows)
        return
    learner_cls = registry.get(name)  # PluginError listing the known learners
    info = _summary(registry, name)
    from benchmark.config import describe_fields

    config = learner_cls.default_config(way, shot)
    info["defaults_for"] = {"way": way, "shot": shot}
    info["fields"] = describe_fields(config)
    if as_json:
        print_json(info)
        return
    _print_learner_detail(info)


def _summary(registry: Any, name: str) -> dict[str, Any]:
    cls = registry.get(name)
    record = registry.origin(name)
    doc = inspect.getdoc(cls) or ""
    return {
        "name": name,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "plugin": record.name,
        "distribution": record.distribution,
        "version": record.version,
        "file": record.file,
        "paper": getattr(cls, "paper", ""),
        "description": doc.strip().splitlines()[0] if doc.strip() else "",
        "doc": doc,
    }


def _origin(row: dict[str, Any]) -> str:
    if row["file"]:
        return row["file"]
    if row["distribution"]:
        return f"{row['plugin']} ({row['distribution']} {row['version'] or ''})".replace(" )", ")")
    return row["plugin"]


def _print_learner_table(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title="Learners")
    for column in ("learner", "plugin", "paper", "description"):
        table.add_column(column)
    for row in rows:
        table.add_row(Text(row["name"]), Text(_origin(row)), Text(row["paper"]), Text(row["description"]))
    if not rows:
        stderr_console().print("No learners found: install a plugin, or pass --plugin FILE.py.", markup=False)
    stdout_console().print(table)


def _print_learner_detail(info: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    console = stdout_console()
    console.print(f"{info['name']}  ({info['class']}, from {_origin(info)})", markup=False)
    if info["doc"]:
        console.print(info["doc"], markup=False)
    console.print("")
    shape = info["defaults_for"]
    table = Table(title=f"Options (-o KEY=VALUE); defaults for {shape['way']}-way {shape['shot']}-shot")
    for column in ("option", "type", "default", "range", "help"):
        table.add_column(column)
    for f in info["fields"]:
        table.add_row(Text(f["name"]), Text(f["type"]), Text(json.dumps(f["default"], default=str)),
                      Text(f.get("range", "")), Text(f["help"]))
    if not info["fields"]:
        console.print("This learner has no options.", markup=False)
    else:
        console.print(table)


def _warn_failed(registry: Any) -> None:
    """One stderr line per broken plugin: its learners are missing, and the user should know why."""
    err = stderr_console()
    for record in registry.failed:
        err.print(f"Warning: {record.describe()} failed to load: {record.error}", markup=False, style="yellow")
