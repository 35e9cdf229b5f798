"""The plugin manager factory and the learner registry.

Nothing happens at import time: ``get_plugin_manager()`` builds a fresh manager on every call, so tests and
``--plugin`` files never leak into each other. The steps, in order:

1. add the hook specifications of ``benchmark.hookspecs``;
2. read ``BENCH_DISABLE_PLUGINS`` (comma-separated entry-point names, or ``*``/``all``);
3. load the entry points of group ``bench`` in a guarded loop: a plugin that fails to import is recorded
   (with its entry point, distribution and error) and shown by ``bench plugins``, but does not break
   commands that do not need it;
4. register ``--plugin FILE.py`` modules; here any error is fatal, since the user asked for the file;
5. ``check_pending()``, so that a misspelt ``@hookimpl`` fails loudly instead of being silently ignored.

``load_registry()`` then asks every plugin for its learners and remembers where each came from.

This module must not import torch at import time (``bench --help`` imports the CLI, not this), and it never
imports the first-party ``plugins`` package: those learners load through entry points like anyone's.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import importlib.util
import inspect
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import pluggy

from benchmark import PROJECT_NAME
from benchmark.errors import PluginError

#: The entry-point group that plugin distributions declare in ``[project.entry-points.bench]``.
ENTRY_POINT_GROUP = "bench"
#: Comma-separated entry-point names to skip, or ``*``/``all`` to skip every installed plugin.
DISABLE_ENV = "BENCH_DISABLE_PLUGINS"

#: Learner names appear on the command line and in result file names: keep them to a safe alphabet.
_LEARNER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

Status = Literal["loaded", "disabled", "failed"]


@dataclass
class PluginRecord:
    """What we know about one plugin, whether it loaded or not (one row of ``bench plugins``).

    Attributes:
        name: the entry-point name, or the file path for ``--plugin`` files.
        source: ``"entry point"``, ``"file"`` or ``"inline"`` (registered directly, e.g. in a test).
        entry_point: ``"name = module"`` for entry-point plugins.
        distribution, version: the installed distribution that declares the entry point.
        file: the path of a ``--plugin`` file.
        status: ``loaded``, ``disabled`` (by ``BENCH_DISABLE_PLUGINS``) or ``failed``.
        error: why it failed, as ``"ExceptionType: message"``.
        learners: the learner names it registered (filled in by ``load_registry``).
    """

    name: str
    source: str
    status: Status = "loaded"
    entry_point: str | None = None
    distribution: str | None = None
    version: str | None = None
    file: str | None = None
    error: str | None = None
    learners: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """A short phrase naming the plugin and where it comes from, for error messages."""
        if self.source == "file":
            return f"plugin file {self.file}"
        if self.distribution:
            version = f" {self.version}" if self.version else ""
            return f"plugin {self.name!r} (distribution {self.distribution}{version})"
        return f"plugin {self.name!r}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "entry_point": self.entry_point,
            "distribution": self.distribution,
            "version": self.version,
            "file": self.file,
            "status": self.status,
            "error": self.error,
            "learners": list(self.learners),
        }


class BenchPluginManager(pluggy.PluginManager):
    """A pluggy manager that also remembers every plugin it tried to load (``records``, by plugin name)."""

    def __init__(self) -> None:
        super().__init__(PROJECT_NAME)
        self.records: dict[str, PluginRecord] = {}

    def record_for(self, plugin: object) -> PluginRecord:
        """The record of a registered plugin; plugins registered directly get an ``inline`` record."""
        name = self.get_name(plugin) or repr(plugin)
        if name not in self.records:
            self.records[name] = PluginRecord(name=name, source="inline")
        return self.records[name]


# -- the manager --------------------------------------------------------------------------------------------
def get_plugin_manager(
    plugin_files: Sequence[str | os.PathLike[str]] = (),
    *,
    extra_plugins: Iterable[object] = (),
) -> BenchPluginManager:
    """Build a plugin manager: specs, installed entry points, ``--plugin`` files, then validation.

    Args:
        plugin_files: paths of ``.py`` files to load as plugins (``bench ... --plugin FILE.py``).
        extra_plugins: plugin objects (modules, classes, instances with ``@hookimpl`` methods) to register
            as well, e.g. from tests; see ``benchmark.testing.register_learner_plugin``.

    Raises:
        PluginError: a ``--plugin`` file is missing or fails to import, or a plugin implements a hook that
            does not exist (usually a misspelt name).
    """
    from benchmark import hookspecs

    pm = BenchPluginManager()
    pm.add_hookspecs(hookspecs)
    _load_entry_points(pm, _disabled_names())
    for path in _unique_paths(plugin_files):
        _load_plugin_file(pm, path)
    for plugin in extra_plugins:
        pm.register(plugin)
    check_hooks(pm)
    _check_defaults(pm)
    return pm


def check_hooks(pm: pluggy.PluginManager) -> None:
    """``pm.check_pending()`` with a message that names the plugin, the unknown hook and the likely fix."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        known = sorted(name for name in pm.hook.__dict__ if not name.startswith("_") and getattr(pm.hook, name).has_spec())
        plugin_name = pm.get_name(exc.plugin) or repr(exc.plugin)
        unknown = [
            name
            for name, caller in pm.hook.__dict__.items()
            if not name.startswith("_")
            and not caller.has_spec()
            and any(impl.plugin is exc.plugin for impl in caller.get_hookimpls())
        ]
        hook = unknown[0] if unknown else "?"
        close = difflib.get_close_matches(hook, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise PluginError(
            f"plugin {plugin_name!r} implements unknown hook {hook!r}; {hint}"
            f"fix the name of its @hookimpl function (known hooks: {', '.join(known)})"
        ) from exc


def _check_defaults(pm: pluggy.PluginManager) -> None:
    """Reject hook arguments with default values: pluggy never passes them, so ``register=None`` stays None."""
    for hook_name, caller in pm.hook.__dict__.items():
        if hook_name.startswith("_") or not caller.has_spec():
            continue
        spec_args = set(caller.spec.argnames)
        for impl in caller.get_hookimpls():
            try:
                params = inspect.signature(impl.function).parameters
            except (TypeError, ValueError):
                continue
            defaulted = [n for n, p in params.items() if n in spec_args and p.default is not inspect.Parameter.empty]
            if defaulted:
                raise PluginError(
                    f"plugin {impl.plugin_name!r}: argument {defaulted[0]!r} of {hook_name} has a default value, "
                    "so pluggy never passes it; remove the default"
                )


def _disabled_names() -> set[str] | Literal["all"]:
    raw = os.environ.get(DISABLE_ENV, "").strip()
    names = {part.strip() for part in raw.split(",") if part.strip()}
    if names & {"*", "all"}:
        return "all"
    return names


def _entry_points() -> Iterator[tuple[importlib.metadata.EntryPoint, str | None, str | None]]:
    """Every entry point of our group with its distribution's name and version.

    Distributions are walked one by one (rather than ``entry_points(group=...)``) so each entry point
    comes with the distribution that declares it, for ``bench plugins`` and for error messages.
    """
    for dist in importlib.metadata.distributions():
        eps = [ep for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP]
        if not eps:
            continue
        meta = dist.metadata
        dist_name = meta["Name"] if meta is not None and "Name" in meta else None
        for ep in eps:
            yield ep, dist_name, dist.version


def _load_entry_points(pm: BenchPluginManager, disabled: set[str] | Literal["all"]) -> None:
    seen: dict[str, PluginRecord] = {}
    for ep, dist_name, version in _entry_points():
        spec = f"{ep.name} = {ep.value}"
        previous = seen.get(ep.name)
        if previous is not None:
            # An editable install can expose the same distribution twice (site-packages metadata plus an
            # .egg-info in the source tree): identical entry points are one plugin.
            if previous.entry_point == spec:
                continue
            clash = PluginRecord(
                name=f"{ep.name} ({dist_name})", source="entry point", entry_point=spec,
                distribution=dist_name, version=version, status="failed",
                error=f"entry point name {ep.name!r} is already used by {previous.describe()}; "
                "uninstall one of the two distributions",
            )
            pm.records[clash.name] = clash
            continue
        record = PluginRecord(
            name=ep.name, source="entry point", entry_point=spec, distribution=dist_name, version=version
        )
        seen[ep.name] = pm.records[ep.name] = record
        if disabled == "all" or ep.name in disabled:
            record.status = "disabled"
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break unrelated commands
            record.status = "failed"
            record.error = f"{type(exc).__name__}: {exc}"


def _unique_paths(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    unique: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser().resolve()
        if path not in unique:
            unique.append(path)
    return unique


def _load_plugin_file(pm: BenchPluginManager, path: Path) -> None:
    """Import ``path`` as a module under a unique name in ``sys.modules`` and register it."""
    if not path.is_file():
        raise PluginError(f"plugin file {path} does not exist; check the path given to --plugin")
    if path.suffix != ".py":
        raise PluginError(f"plugin file {path} is not a .py file; pass a Python file to --plugin")
    # A stable, unique module name: two files called learner.py in different folders must not collide,
    # and pickling/introspection need the module to be findable in sys.modules.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"bench_plugin_file_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot import plugin file {path}; pass a Python file to --plugin")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise PluginError(
            f"plugin file {path} failed to import{_line_in(exc, path)}: {type(exc).__name__}: {exc}; "
            "fix the file or drop --plugin"
        ) from exc
    name = str(path)
    pm.records[name] = PluginRecord(name=name, source="file", file=str(path))
    try:
        pm.register(module, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin file {path} has an invalid hook implementation: {exc}") from exc


def _line_in(exc: BaseException, path: Path) -> str:
    """`` (line N)`` of the deepest traceback frame inside ``path``, to point the user at their code."""
    if isinstance(exc, SyntaxError) and exc.lineno:
        return f" (line {exc.lineno})"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
    return f" (line {frames[-1].lineno})" if frames else ""


# -- the learner registry -----------------------------------------------------------------------------------
class LearnerRegistry:
    """Learner classes by name, each with the plugin it came from."""

    def __init__(self, records: Iterable[PluginRecord] = ()) -> None:
        self._learners: dict[str, tuple[type, PluginRecord]] = {}
        self.records: list[PluginRecord] = list(records)

    def add(self, learner_cls: Any, record: PluginRecord) -> None:
        """Record one learner class; raises PluginError for a non-learner, a bad name or a duplicate."""
        from benchmark.learner import Learner  # imports torch: only once learners are actually wanted

        where = record.describe()
        if not (isinstance(learner_cls, type) and issubclass(learner_cls, Learner)):
            raise PluginError(
                f"{where} registered {learner_cls!r}, which is not a subclass of benchmark.learner.Learner; "
                "register the learner class itself"
            )
        name = getattr(learner_cls, "name", "")
        if not isinstance(name, str) or not _LEARNER_NAME.match(name):
            raise PluginError(
                f"{where} registered {learner_cls.__qualname__} with name {name!r}; set the class attribute "
                "`name` to a short identifier such as 'protonet' (letters, digits, _ . + -)"
            )
        if name in self._learners:
            other_cls, other = self._learners[name]
            raise PluginError(
                f"two learners are named {name!r}: {other_cls.__qualname__} from {other.describe()} and "
                f"{learner_cls.__qualname__} from {where}; rename one, or disable a plugin with "
                f"{DISABLE_ENV}=<entry point name>"
            )
        self._learners[name] = (learner_cls, record)
        record.learners.append(name)

    def get(self, name: str) -> type:
        """The learner class called ``name``; raises PluginError listing the known ones."""
        if name in self._learners:
            return self._learners[name][0]
        known = ", ".join(self.names()) or "(none)"
        message = f"unknown learner {name!r}; known learners: {known}"
        close = difflib.get_close_matches(name, self.names(), n=1)
        if close:
            message += f"; did you mean {close[0]!r}?"
        same = [r for r in self.failed if r.name == name]
        if same:
            message += f"; plugin {name!r} failed to load ({same[0].error}): fix or reinstall it"
        failed = [r.name for r in self.failed]
        if failed:
            message += f" (plugins that failed to load: {', '.join(failed)}; run `bench plugins` to see why)"
        raise PluginError(message)

    def __contains__(self, name: object) -> bool:
        return name in self._learners

    def __len__(self) -> int:
        return len(self._learners)

    def names(self) -> list[str]:
        return sorted(self._learners)

    def origin(self, name: str) -> PluginRecord:
        """The plugin record of learner ``name`` (distribution, version, file)."""
        self.get(name)
        return self._learners[name][1]

    def items(self) -> list[tuple[str, type]]:
        """(name, class) pairs sorted by name."""
        return [(name, self._learners[name][0]) for name in self.names()]

    @property
    def failed(self) -> list[PluginRecord]:
        return [r for r in self.records if r.status == "failed"]


def load_registry(
    plugin_files: Sequence[str | os.PathLike[str]] = (),
    *,
    pm: BenchPluginManager | None = None,
) -> LearnerRegistry:
    """Build the manager (unless given) and collect every plugin's learners.

    Each plugin's ``bench_register_learners`` is called on its own, so every learner is tied to the plugin
    that registered it. An installed plugin whose hook raises is recorded as failed; a ``--plugin`` file
    whose hook raises is fatal, like its import.

    Raises:
        PluginError: duplicate learner names, a registered object that is not a Learner subclass, or a
            failing ``--plugin`` file.
    """
    pm = pm if pm is not None else get_plugin_manager(plugin_files)
    hook_name = "bench_register_learners"
    registry = LearnerRegistry()
    for _, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked with pm.set_blocked
            continue
        if not any(impl.plugin is plugin for impl in getattr(pm.hook, hook_name).get_hookimpls()):
            continue
        record = pm.record_for(plugin)
        # Call this plugin's implementation alone, so each learner is tied to the plugin that registered it.
        caller = pm.subset_hook_caller(hook_name, remove_plugins=[p for p in pm.get_plugins() if p is not plugin])
        pending: list[Any] = []
        try:
            caller(register=pending.append)
        except Exception as exc:  # noqa: BLE001
            if record.source != "entry point":
                raise PluginError(
                    f"{record.describe()} raised {type(exc).__name__} in {hook_name}: {exc}; fix the plugin"
                ) from exc
            record.status = "failed"
            record.error = f"{type(exc).__name__} in {hook_name}: {exc}"
            continue
        # Added only after the hook returned, so a plugin that fails halfway registers nothing.
        for learner_cls in pending:
            registry.add(learner_cls, record)
    registry.records = list(pm.records.values())
    return registry


def plugin_report(
    plugin_files: Sequence[str | os.PathLike[str]] = (),
    *,
    pm: BenchPluginManager | None = None,
) -> list[dict[str, Any]]:
    """One record per plugin (name, distribution, version, status, error, learners), for ``bench plugins``."""
    registry = load_registry(plugin_files, pm=pm)
    return [record.as_dict() for record in sorted(registry.records, key=lambda r: r.name)]
