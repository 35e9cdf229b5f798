"""The plugin manager factory and the registry of learners and papers.

Nothing happens at import time: ``get_plugin_manager()`` builds a fresh manager on every call, so tests and
``--plugin`` files never leak into each other. The steps, in order:

1. add the hook specifications of ``benchmark.hookspecs``;
2. read ``BENCH_DISABLE_PLUGINS`` (comma-separated entry-point names, or ``*``/``all``);
3. load the entry points of group ``bench`` in a guarded loop: a plugin that fails to import, implements a
   hook that does not exist (a misspelt name), or has no ``@hookimpl`` marker at all is recorded (with its
   entry point, distribution and error) and shown by ``bench plugins``, but does not break commands that
   do not need it;
4. register ``--plugin FILE.py`` modules with the same checks; here any error is fatal, since the user
   asked for the file.

``load_registry()`` then asks every plugin for its learners and papers and remembers where each came from.

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
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import pluggy

from benchmark import PROJECT_NAME
from benchmark.errors import ConfigError, PluginError

#: The entry-point group that plugin distributions declare in ``[project.entry-points.bench]``.
ENTRY_POINT_GROUP = "bench"
#: Comma-separated entry-point names to skip, or ``*``/``all`` to skip every installed plugin.
DISABLE_ENV = "BENCH_DISABLE_PLUGINS"
#: Learner and paper names appear on the command line and in result file names: keep them to a safe alphabet.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
#: The methods a learner class must define itself (the base class only raises).
_REQUIRED_METHODS = ("training", "meta_train_step", "predict", "state_dict", "load_state_dict")

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
        error: why it failed, as one line that names the fix.
        learners, papers: the names it registered (filled in by ``load_registry``).
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
    papers: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """A short phrase naming the plugin and where it comes from, for error messages."""
        if self.source == "file":
            return f"plugin file {self.file}"
        if self.distribution:
            version = f" {self.version}" if self.version else ""
            return f"plugin {self.name!r} (distribution {self.distribution}{version})"
        return f"plugin {self.name!r}"

    @property
    def fatal(self) -> bool:
        """Whether this plugin's errors stop the command: the user named it (a file) or a test registered it."""
        return self.source != "entry point"

    def fail(self, error: str) -> None:
        self.status, self.error = "failed", error
        self.learners, self.papers = [], []

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "source": self.source, "entry_point": self.entry_point,
            "distribution": self.distribution, "version": self.version, "file": self.file,
            "status": self.status, "error": self.error, "learners": list(self.learners),
            "papers": list(self.papers),
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
        PluginError: a ``--plugin`` file (or an extra plugin) is missing, fails to import, implements a hook
            that does not exist (usually a misspelt name) or carries no ``@hookimpl`` marker.
    """
    from benchmark import hookspecs

    pm = BenchPluginManager()
    pm.add_hookspecs(hookspecs)
    _load_entry_points(pm, _disabled_names())
    for path in _unique_paths(plugin_files):
        _load_plugin_file(pm, path)
    for plugin in extra_plugins:
        pm.register(plugin)
        _check_plugin(pm, plugin, pm.record_for(plugin))
    return pm


def _check_plugin(pm: BenchPluginManager, plugin: object, record: PluginRecord) -> None:
    """Validate one registered plugin; a broken installed plugin is unregistered and recorded as failed
    (so ``bench plugins`` can show it), any other raises PluginError."""
    problem = _hook_problem(pm, plugin, record)
    if problem is None:
        return
    if record.fatal:
        raise PluginError(problem)
    pm.unregister(plugin)
    record.fail(f"{problem}; until then, skip it with {DISABLE_ENV}={record.name}")


def _hook_problem(pm: pluggy.PluginManager, plugin: object, record: PluginRecord) -> str | None:
    """What is wrong with a plugin's hook implementations, as one line naming the fix, or None."""
    where = record.describe()
    known = sorted(name for name in pm.hook.__dict__ if not name.startswith("_") and getattr(pm.hook, name).has_spec())
    impls = [(caller, impl) for caller in (pm.get_hookcallers(plugin) or [])
             for impl in caller.get_hookimpls() if impl.plugin is plugin]
    for caller, impl in impls:
        if not caller.has_spec():
            close = difflib.get_close_matches(caller.name, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            return (f"{where} implements unknown hook {caller.name!r}; {hint}fix the name of its @hookimpl "
                    f"function (known hooks: {', '.join(known)})")
        defaulted = _defaulted_arguments(impl.function, caller.spec.argnames)
        if defaulted:
            return (f"{where}: argument {defaulted[0]!r} of {caller.name} has a default value, so pluggy never "
                    "passes it; remove the default")
    if not impls:
        unmarked = [n for n in dir(plugin) if n.startswith("bench_") and callable(getattr(plugin, n, None))]
        if unmarked:
            return (f"{where}: {unmarked[0]} has no @hookimpl marker, so it is never called; add "
                    "`from benchmark import hookimpl` and decorate it with @hookimpl (a marker made by another "
                    "project is ignored)")
        return (f"{where} implements no hook; define bench_register_learners(register) (or "
                "bench_register_papers) decorated with @hookimpl from benchmark")
    return None


def _defaulted_arguments(function: Any, spec_args: Sequence[str]) -> list[str]:
    """Hook arguments with a default value: pluggy never passes them, so ``register=None`` stays None."""
    try:
        params = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return []
    return [n for n, p in params.items() if n in spec_args and p.default is not inspect.Parameter.empty]


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
            record.fail(f"{type(exc).__name__}: {exc}; fix or reinstall it, or skip it with {DISABLE_ENV}={ep.name}")
            continue
        _check_plugin(pm, plugin, record)


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
    record = pm.records[name] = PluginRecord(name=name, source="file", file=str(path))
    try:
        pm.register(module, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin file {path} has an invalid hook implementation: {exc}") from exc
    _check_plugin(pm, module, record)


def _line_in(exc: BaseException, path: Path) -> str:
    """`` (line N)`` of the deepest traceback frame inside ``path``, to point the user at their code."""
    if isinstance(exc, SyntaxError) and exc.lineno:
        return f" (line {exc.lineno})"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
    return f" (line {frames[-1].lineno})" if frames else ""


# -- the registry -----------------------------------------------------------------------------------------
class Registry:
    """Learner classes and papers by name, each with the plugin it came from."""

    def __init__(self, records: Iterable[PluginRecord] = ()) -> None:
        self._learners: dict[str, tuple[type, PluginRecord]] = {}
        self._papers: dict[str, tuple[Any, PluginRecord]] = {}
        self.records: list[PluginRecord] = list(records)

    # -- learners ----------------------------------------------------------------------------------------
    def get(self, name: str) -> type:
        """The learner class called ``name``; raises PluginError listing the known ones."""
        if name in self._learners:
            return self._learners[name][0]
        raise PluginError(self._unknown("learner", name, self.names(), "bench learners"))

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

    def provenance(self, name: str) -> dict[str, Any]:
        """Where learner ``name``'s code comes from, for every run's ``config.json``: the plugin, its
        distribution and version (or file), and a hash of the learner's source files."""
        cls, record = self._learners[name]
        return {
            "plugin": record.name, "distribution": record.distribution, "version": record.version,
            "file": record.file, "class": f"{cls.__module__}.{cls.__qualname__}", "code_sha256": code_hash(cls),
        }

    # -- papers ------------------------------------------------------------------------------------------
    def paper(self, name: str) -> Any:
        """The paper called ``name``; raises PluginError listing the known ones."""
        if name in self._papers:
            return self._papers[name][0]
        raise PluginError(self._unknown("paper", name, self.paper_names(), "bench reproduce --list"))

    def paper_names(self) -> list[str]:
        return sorted(self._papers)

    def paper_origin(self, name: str) -> PluginRecord:
        self.paper(name)
        return self._papers[name][1]

    # -- shared ----------------------------------------------------------------------------------------
    @property
    def failed(self) -> list[PluginRecord]:
        return [r for r in self.records if r.status == "failed"]

    def _unknown(self, kind: str, name: str, known: list[str], listing: str) -> str:
        message = f"unknown {kind} {name!r}; known {kind}s: {', '.join(known) or '(none)'}"
        close = difflib.get_close_matches(name, known, n=1)
        if close:
            message += f"; did you mean {close[0]!r}?"
        same = [r for r in self.failed if r.name == name]
        if same:
            message += f"; plugin {name!r} failed to load ({same[0].error})"
        failed = [r.name for r in self.failed]
        if failed:
            message += f" (plugins that failed to load: {', '.join(failed)}; run `bench plugins` to see why)"
        elif not close:
            message += f" (see `{listing}`)"
        return message

    def _add(self, kind: str, table: dict[str, tuple[Any, PluginRecord]], name: str, obj: Any,
             record: PluginRecord, label: str) -> None:
        if name in table:
            other, other_record = table[name]
            error = PluginError(
                f"two {kind}s are named {name!r}: {_label(other)} from {other_record.describe()} and {label} "
                f"from {record.describe()}; rename one, or disable a plugin with {DISABLE_ENV}=<entry point name>"
            )
            # A clash with a plugin the user named (a --plugin file) stops the command, whichever came first.
            error.involves_fatal = other_record.fatal  # type: ignore[attr-defined]
            raise error
        table[name] = (obj, record)

    def add_learner(self, learner_cls: Any, record: PluginRecord) -> None:
        check_learner_class(learner_cls, record.describe())
        self._add("learner", self._learners, learner_cls.name, learner_cls, record, learner_cls.__qualname__)
        record.learners.append(learner_cls.name)

    def add_paper(self, paper: Any, record: PluginRecord) -> None:
        from benchmark.papers import Paper

        where = record.describe()
        if not isinstance(paper, Paper):
            raise PluginError(f"{where} registered {paper!r} as a paper; register a benchmark.papers.Paper")
        if not _NAME.match(paper.name):
            raise PluginError(f"{where} registered a paper named {paper.name!r}; use letters, digits, _ . + -")
        self._add("paper", self._papers, paper.name, paper, record, f"paper {paper.name!r}")
        record.papers.append(paper.name)


#: The old name, kept for plugin authors' tests written against it.
LearnerRegistry = Registry


def _label(obj: Any) -> str:
    return obj.__qualname__ if isinstance(obj, type) else f"paper {getattr(obj, 'name', obj)!r}"


def check_learner_class(learner_cls: Any, where: str) -> None:
    """Raise PluginError if ``learner_cls`` cannot be a learner: not a Learner subclass, a bad name, a
    Config the command line cannot set, or a required method left to the base class."""
    from benchmark.learner import Learner  # imports torch: only once learners are actually wanted

    if not (isinstance(learner_cls, type) and issubclass(learner_cls, Learner)):
        raise PluginError(
            f"{where} registered {learner_cls!r}, which is not a subclass of benchmark.learner.Learner; "
            "register the learner class itself"
        )
    name = getattr(learner_cls, "name", "")
    if not isinstance(name, str) or not _NAME.match(name):
        raise PluginError(
            f"{where} registered {learner_cls.__qualname__} with name {name!r}; set the class attribute "
            "`name` to a short identifier such as 'protonet' (letters, digits, _ . + -)"
        )
    owner = f"learner {name!r} ({where})"
    try:
        from benchmark.config import check_config_class

        check_config_class(learner_cls.Config, owner)
    except ConfigError as exc:
        raise PluginError(str(exc)) from None
    missing = [m for m in _REQUIRED_METHODS if getattr(learner_cls, m) is getattr(Learner, m)]
    if missing:
        hint = " (return e.g. [Episodes(tasks=self.config.meta_batch_size)])" if "training" in missing else ""
        raise PluginError(f"{owner} does not define {', '.join(missing)}{hint}; see `benchmark.learner.Learner`")


def code_hash(cls: type) -> str:
    """sha256 over the source files a learner class is made of: the modules of its classes (bases
    included) and the modules of the same package they use, so an edit to the learner's code is noticed."""
    files = sorted({str(f) for f in _code_files(cls)})
    h = hashlib.sha256()
    for path in files:
        try:
            h.update(Path(path).read_bytes())
        except OSError:
            h.update(path.encode())
    return h.hexdigest()


def _code_files(cls: type) -> set[str]:
    """The source files of ``cls``'s own package that its module graph reaches (benchmark's core excluded:
    its version and git commit are recorded separately)."""
    roots = [sys.modules.get(k.__module__) for k in cls.__mro__ if k.__module__.split(".")[0] not in
             ("benchmark", "builtins")]
    files: set[str] = set()
    seen: set[str] = set()
    queue = [m for m in roots if m is not None]
    while queue:
        module = queue.pop()
        if module.__name__ in seen:
            continue
        seen.add(module.__name__)
        top = module.__name__.split(".")[0]
        source = getattr(module, "__file__", None)
        if source:
            files.add(source)
        for value in vars(module).values():
            target = value if isinstance(value, types.ModuleType) else sys.modules.get(getattr(value, "__module__", "") or "")
            if target is not None and target.__name__.split(".")[0] == top and top not in ("benchmark", "builtins"):
                queue.append(target)
    return files


def load_registry(
    plugin_files: Sequence[str | os.PathLike[str]] = (),
    *,
    pm: BenchPluginManager | None = None,
) -> Registry:
    """Build the manager (unless given) and collect every plugin's learners and papers.

    Each plugin's hooks are called on their own, so every learner and paper is tied to the plugin that
    registered it, and a plugin is all or nothing: an installed plugin whose hook raises or registers
    something invalid (a bad class, a duplicate name) is recorded as failed and contributes nothing; a
    ``--plugin`` file (or a plugin a test registered) with such a problem is fatal, like its import.

    Raises:
        PluginError: a failing ``--plugin`` file or inline plugin.
    """
    pm = pm if pm is not None else get_plugin_manager(plugin_files)
    registry = Registry()
    # Registration order: installed plugins, then --plugin files, then inline ones (pluggy keeps it).
    for _, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked with pm.set_blocked
            continue
        record = pm.record_for(plugin)
        try:
            learners = _call_one(pm, plugin, "bench_register_learners")
            papers = _call_one(pm, plugin, "bench_register_papers")
        except _HookRaised as exc:
            if record.fatal:
                raise PluginError(f"{record.describe()} raised {exc}; fix the plugin") from exc.__cause__
            record.fail(f"{exc}; fix the plugin or skip it with {DISABLE_ENV}={record.name}")
            continue
        trial = Registry()
        trial._learners, trial._papers = dict(registry._learners), dict(registry._papers)
        try:
            for learner_cls in learners:
                trial.add_learner(learner_cls, record)
            for paper in papers:
                trial.add_paper(paper, record)
        except PluginError as exc:
            if record.fatal or getattr(exc, "involves_fatal", False):
                raise
            record.fail(f"{exc}; skip it with {DISABLE_ENV}={record.name}")
            continue
        registry._learners, registry._papers = trial._learners, trial._papers
    registry.records = list(pm.records.values())
    return registry


class _HookRaised(Exception):
    """A plugin's registration hook raised; the text is "<Type> in <hook>: <message>"."""


def _call_one(pm: BenchPluginManager, plugin: object, hook_name: str) -> list[Any]:
    """Call one plugin's implementation of a registration hook alone; returns what it registered."""
    caller = getattr(pm.hook, hook_name)
    if not any(impl.plugin is plugin for impl in caller.get_hookimpls()):
        return []
    subset = pm.subset_hook_caller(hook_name, remove_plugins=[p for p in pm.get_plugins() if p is not plugin])
    pending: list[Any] = []
    try:
        subset(register=pending.append)
    except Exception as exc:  # noqa: BLE001
        raise _HookRaised(f"{type(exc).__name__} in {hook_name}: {exc}") from exc
    return pending


def plugin_report(
    plugin_files: Sequence[str | os.PathLike[str]] = (),
    *,
    pm: BenchPluginManager | None = None,
) -> list[dict[str, Any]]:
    """One record per plugin (name, distribution, version, status, error, learners, papers)."""
    registry = load_registry(plugin_files, pm=pm)
    return [record.as_dict() for record in sorted(registry.records, key=lambda r: r.name)]
