"""The plugin system: entry points (faked), --plugin files, broken and misspelt plugins, the CLI listings.

Entry points are faked by replacing ``importlib.metadata.distributions`` (as pluggy's own tests do), so these
tests see only the plugins they create. The tests marked "installed" at the bottom use the real metadata of
this checkout (``pip install -e .``) and check our first-party learners.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark.cli import main
from benchmark.errors import PluginError
from benchmark.harness.plugins import get_plugin_manager, load_registry, plugin_report

LEARNER_SOURCE = '''
from dataclasses import dataclass, field

from benchmark import hookimpl
from benchmark.learner import Episodes, Learner


class {cls}(Learner):
    """{doc}

    More text that the one-line listing leaves out.
    """

    name = "{name}"

    @dataclass(frozen=True)
    class Config:
        scale: float = field(default=1.0, metadata={{"help": "multiplies the logits"}})
        mode: str = field(default="mean", metadata={{"help": "how to pool"}})

    def training(self):
        return [Episodes(tasks=1)]

    def meta_train_step(self, batch):
        return {{}}

    def predict(self, support_x, support_y, query_x):
        raise NotImplementedError

    def state_dict(self):
        return {{}}

    def load_state_dict(self, state):
        pass


@hookimpl
def {hook}(register):
    register({cls})
'''

_counter = itertools.count()


def learner_source(name: str, *, cls: str = "Fake", doc: str = "A fake learner.", hook: str = "bench_register_learners") -> str:
    return LEARNER_SOURCE.format(name=name, cls=cls, doc=doc, hook=hook)


class FakeDistribution:
    """Just what the loader reads from an importlib.metadata.Distribution."""

    def __init__(self, name: str, version: str, entry_points: dict[str, str]) -> None:
        self.metadata = {"Name": name}
        self.version = version
        self.entry_points = [importlib.metadata.EntryPoint(n, v, "bench") for n, v in entry_points.items()]
        # An unrelated group must be ignored.
        self.entry_points.append(importlib.metadata.EntryPoint("other", "nonexistent_module", "console_scripts"))


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    """Returns ``(make_module, set_dists)``: write importable modules, and choose the installed distributions."""
    # torch reads entry points of its own when first imported: import it before the metadata is faked.
    import benchmark.learner  # noqa: F401

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("BENCH_DISABLE_PLUGINS", raising=False)
    made: list[str] = []

    def make_module(source: str) -> str:
        name = f"bench_fake_plugin_{next(_counter)}"
        (tmp_path / f"{name}.py").write_text(source)
        made.append(name)
        return name

    def set_dists(*dists: FakeDistribution) -> None:
        monkeypatch.setattr(importlib.metadata, "distributions", lambda: list(dists))

    set_dists()  # nothing installed unless the test says so
    yield make_module, set_dists
    for name in made:
        sys.modules.pop(name, None)


def write_plugin(tmp_path: Path, filename: str, source: str) -> Path:
    path = tmp_path / filename
    path.write_text(source)
    return path


# -- entry points -------------------------------------------------------------------------------------------
def test_entry_point_learner_is_registered_with_its_distribution(fake_env):
    make_module, set_dists = fake_env
    module = make_module(learner_source("fakemean"))
    set_dists(FakeDistribution("bench-fake", "1.2.3", {"fake": module}))
    registry = load_registry()
    assert registry.names() == ["fakemean"]
    assert registry.get("fakemean").__module__ == module
    origin = registry.origin("fakemean")
    assert (origin.name, origin.distribution, origin.version) == ("fake", "bench-fake", "1.2.3")
    [record] = plugin_report()
    assert record["status"] == "loaded" and record["learners"] == ["fakemean"]
    assert record["entry_point"] == f"fake = {module}"


def test_identical_entry_points_from_an_editable_install_load_once(fake_env):
    make_module, set_dists = fake_env
    module = make_module(learner_source("fakemean"))
    dist = FakeDistribution("bench-fake", "1.0", {"fake": module})
    set_dists(dist, FakeDistribution("bench-fake", "1.0", {"fake": module}))
    registry = load_registry()  # a second registration would be a duplicate-name error
    assert registry.names() == ["fakemean"]
    assert len(registry.records) == 1


def test_same_entry_point_name_from_two_distributions_is_reported(fake_env):
    make_module, set_dists = fake_env
    a, b = make_module(learner_source("one")), make_module(learner_source("two"))
    set_dists(FakeDistribution("dist-a", "1", {"x": a}), FakeDistribution("dist-b", "1", {"x": b}))
    registry = load_registry()
    assert registry.names() == ["one"]
    [failed] = registry.failed
    assert "dist-a" in failed.error and failed.distribution == "dist-b"


def test_broken_plugin_is_reported_and_others_still_work(fake_env, capsys):
    make_module, set_dists = fake_env
    good = make_module(learner_source("good"))
    broken = make_module("raise ImportError('bench-broken needs the package frobnicate')\n")
    set_dists(FakeDistribution("bench-good", "1.0", {"good": good}), FakeDistribution("bench-broken", "0.1", {"broken": broken}))

    registry = load_registry()
    assert registry.names() == ["good"]
    [failed] = registry.failed
    assert (failed.name, failed.distribution, failed.status) == ("broken", "bench-broken", "failed")
    assert failed.error == ("ImportError: bench-broken needs the package frobnicate; fix or reinstall it, or skip it "
                            "with BENCH_DISABLE_PLUGINS=broken")
    with pytest.raises(PluginError, match=r"unknown learner 'nope'; known learners: good.*failed to load: broken"):
        registry.get("nope")

    assert main(["plugins", "--json"]) == 0
    report = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert report["broken"]["status"] == "failed" and "frobnicate" in report["broken"]["error"]
    assert report["good"]["learners"] == ["good"]

    assert main(["learners", "--json"]) == 0
    out, err = capsys.readouterr()
    assert [row["name"] for row in json.loads(out)] == ["good"]
    assert "broken" in err and "frobnicate" in err  # the user learns why a learner may be missing


def test_entry_point_whose_hook_raises_is_recorded_as_failed(fake_env):
    make_module, set_dists = fake_env
    raising = make_module(
        "from benchmark import hookimpl\n\n@hookimpl\ndef bench_register_learners(register):\n"
        "    raise RuntimeError('boom')\n"
    )
    good = make_module(learner_source("good"))
    set_dists(FakeDistribution("d", "1", {"raising": raising, "good": good}))
    registry = load_registry()
    assert registry.names() == ["good"]
    assert registry.failed[0].error == ("RuntimeError in bench_register_learners: boom; fix the plugin or skip it "
                                        "with BENCH_DISABLE_PLUGINS=raising")


@pytest.mark.parametrize("value", ["fake", " other , fake ", "*", "all"])
def test_bench_disable_plugins_skips_entry_points_without_importing_them(fake_env, monkeypatch, value):
    make_module, set_dists = fake_env
    fake = make_module(learner_source("fakemean"))
    other = make_module(learner_source("othermean"))
    set_dists(FakeDistribution("bench-fake", "1.0", {"fake": fake, "other": other}))
    monkeypatch.setenv("BENCH_DISABLE_PLUGINS", value)
    registry = load_registry()
    status = {r.name: r.status for r in registry.records}
    assert status["fake"] == "disabled"
    assert fake not in sys.modules
    expected_other = "loaded" if value == "fake" else "disabled"
    assert status["other"] == expected_other
    assert registry.names() == (["othermean"] if expected_other == "loaded" else [])


# -- --plugin files -----------------------------------------------------------------------------------------
def test_plugin_file_learner_is_registered(fake_env, tmp_path):
    path = write_plugin(tmp_path, "my_learner.py", learner_source("filemean"))
    registry = load_registry([path])
    assert registry.names() == ["filemean"]
    origin = registry.origin("filemean")
    assert (origin.source, origin.file) == ("file", str(path.resolve()))
    module = sys.modules[registry.get("filemean").__module__]  # findable, e.g. for pickling and inspect
    assert module.__file__ == str(path)
    # The same file passed twice is one plugin, not a duplicate learner.
    assert load_registry([path, str(path)]).names() == ["filemean"]


def test_cli_learners_lists_a_plugin_file_and_shows_its_fields(fake_env, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps table cells at the terminal width
    path = write_plugin(tmp_path, "my_learner.py", learner_source("filemean", doc="Nearest mean on [raw] pixels."))
    assert main(["learners", "--plugin", str(path)]) == 0
    out = capsys.readouterr().out
    assert "filemean" in out and "Nearest mean on [raw] pixels." in out  # markup off: [raw] survives

    assert main(["learners", "filemean", "--plugin", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["file"] == str(path.resolve())
    assert info["description"] == "Nearest mean on [raw] pixels."
    assert info["fields"] == [
        {"name": "scale", "type": "float", "default": 1.0, "help": "multiplies the logits"},
        {"name": "mode", "type": "str", "default": "mean", "help": "how to pool"},
    ]

    assert main(["learners", "filemean", "--plugin", str(path)]) == 0
    out = capsys.readouterr().out
    assert "multiplies the logits" in out and "scale" in out


def test_cli_unknown_learner_lists_known_ones(fake_env, tmp_path, capsys):
    path = write_plugin(tmp_path, "my_learner.py", learner_source("filemean"))
    assert main(["learners", "filmean", "--plugin", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown learner 'filmean'; known learners: filemean; did you mean 'filemean'?" in err


def test_missing_plugin_file_is_fatal(fake_env, tmp_path, capsys):
    with pytest.raises(PluginError, match=r"plugin file .*nothere\.py does not exist"):
        get_plugin_manager([tmp_path / "nothere.py"])
    assert main(["plugins", "--plugin", str(tmp_path / "nothere.py")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_plugin_file_import_error_is_fatal_and_points_at_the_line(fake_env, tmp_path):
    path = write_plugin(tmp_path, "bad.py", "import os\n\nimport frobnicate_not_installed\n")
    with pytest.raises(PluginError, match=r"bad\.py failed to import \(line 3\): ModuleNotFoundError"):
        get_plugin_manager([path])
    assert not any(name.startswith("bench_plugin_file_bad_") for name in sys.modules)
    syntax = write_plugin(tmp_path, "syntax.py", "def broken(:\n")
    with pytest.raises(PluginError, match=r"syntax\.py failed to import \(line 1\): SyntaxError"):
        get_plugin_manager([syntax])


def test_misspelt_hook_fails_loudly_naming_plugin_and_hook(fake_env, tmp_path):
    path = write_plugin(tmp_path, "typo.py", learner_source("typo", hook="bench_register_learner"))
    with pytest.raises(PluginError) as info:
        get_plugin_manager([path])
    message = str(info.value)
    assert str(path.resolve()) in message
    assert "unknown hook 'bench_register_learner'" in message
    assert "did you mean 'bench_register_learners'" in message and "fix the name" in message


def test_misspelt_hook_in_an_installed_plugin_is_shown_as_failed(fake_env, capsys):
    """An installed plugin with a misspelt hook must not stop every command: `bench plugins` shows what is
    wrong (and how to skip the plugin), and the other plugins keep working."""
    make_module, set_dists = fake_env
    typo = make_module(learner_source("typo", hook="bench_register_learner"))
    good = make_module(learner_source("good"))
    set_dists(FakeDistribution("bench-typo", "1.0", {"typo": typo}), FakeDistribution("bench-good", "1.0", {"good": good}))
    report = {r["name"]: r for r in plugin_report()}
    assert report["typo"]["status"] == "failed" and report["good"]["status"] == "loaded"
    assert "implements unknown hook 'bench_register_learner'" in report["typo"]["error"]
    assert "did you mean 'bench_register_learners'" in report["typo"]["error"]
    assert "BENCH_DISABLE_PLUGINS=typo" in report["typo"]["error"]
    assert main(["plugins"]) == 0
    assert "failed" in capsys.readouterr().out
    assert load_registry().names() == ["good"]


def test_hook_argument_with_a_default_is_rejected(fake_env, tmp_path):
    source = learner_source("dflt").replace("(register):", "(register=None):")
    path = write_plugin(tmp_path, "dflt.py", source)
    with pytest.raises(PluginError, match=r"argument 'register' of bench_register_learners has a default value"):
        get_plugin_manager([path])


def test_duplicate_learner_name_names_both_origins(fake_env, tmp_path):
    make_module, set_dists = fake_env
    module = make_module(learner_source("same", cls="Installed"))
    set_dists(FakeDistribution("bench-installed", "2.0", {"inst": module}))
    path = write_plugin(tmp_path, "mine.py", learner_source("same", cls="Mine"))
    with pytest.raises(PluginError) as info:
        load_registry([path])
    message = str(info.value)
    assert "two learners are named 'same'" in message
    assert "Installed from plugin 'inst' (distribution bench-installed 2.0)" in message
    assert f"Mine from plugin file {path.resolve()}" in message


@pytest.mark.parametrize(
    ("registered", "match"),
    [
        ("object()", "not a subclass of benchmark.learner.Learner"),
        ("Nameless", "with name ''; set the class attribute `name`"),
        ("Spaced", "with name 'two words'"),
    ],
)
def test_registering_a_bad_class_fails(fake_env, tmp_path, registered, match):
    source = (
        "from benchmark import hookimpl\nfrom benchmark.learner import Learner\n\n"
        "class Nameless(Learner):\n    pass\n\n"
        "class Spaced(Learner):\n    name = 'two words'\n\n"
        f"@hookimpl\ndef bench_register_learners(register):\n    register({registered})\n"
    )
    path = write_plugin(tmp_path, "bad_class.py", source)
    with pytest.raises(PluginError, match=match):
        load_registry([path])


def test_plugin_file_whose_hook_raises_is_fatal(fake_env, tmp_path):
    path = write_plugin(
        tmp_path, "raises.py",
        "from benchmark import hookimpl\n\n@hookimpl\ndef bench_register_learners(register):\n    raise KeyError('k')\n",
    )
    with pytest.raises(PluginError, match=r"raises\.py raised KeyError in bench_register_learners"):
        load_registry([path])


def test_register_learner_plugin_helper(fake_env, tmp_path):
    from benchmark.testing import register_learner_plugin

    path = write_plugin(tmp_path, "mine.py", learner_source("filemean"))
    module_cls = load_registry([path]).get("filemean")
    pm = get_plugin_manager()
    register_learner_plugin(pm, module_cls, name="inline-test")
    registry = load_registry(pm=pm)
    assert registry.get("filemean") is module_cls
    assert registry.origin("filemean").name == "inline-test"


def test_cli_plugins_table_shows_status(fake_env, capsys):
    make_module, set_dists = fake_env
    good = make_module(learner_source("good"))
    set_dists(FakeDistribution("bench-good", "4.5.6", {"good": good}))
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "bench-good" in out and "4.5.6" in out and "loaded" in out


# -- no torch for help --------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--help"], ["plugins", "--help"], ["learners", "--help"]])
def test_help_does_not_import_torch(argv):
    code = (
        "import sys\nfrom benchmark.cli import main\n"
        f"rc = main({argv!r})\n"
        "assert rc == 0, rc\n"
        "heavy = [m for m in ('torch', 'plugins', 'benchmark.learner') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


# -- the installed first-party plugins (need `pip install -e .` and the modules of plugins/) ---------------
def test_installed_first_party_plugins_load(monkeypatch):
    monkeypatch.delenv("BENCH_DISABLE_PLUGINS", raising=False)
    report = {r["name"]: r for r in plugin_report()}
    first_party = {"maml": {"maml", "fomaml"}, "finetune": {"finetune"}, "reptile": {"reptile"}, "anil": {"anil"},
                   "metasgd": {"metasgd"}, "mamlpp": {"mamlpp"}}
    for name, learners in first_party.items():
        assert name in report, f"entry point {name!r} missing: run `pip install -e .`"
        assert report[name]["status"] == "loaded", report[name]["error"]
        assert report[name]["distribution"] == "metabench"
        assert learners <= set(report[name]["learners"])


def test_installed_maml_shows_its_fields(monkeypatch, capsys):
    monkeypatch.delenv("BENCH_DISABLE_PLUGINS", raising=False)
    assert main(["learners", "maml", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["plugin"] == "maml" and info["distribution"] == "metabench"
    assert info["fields"], "maml has no config fields"
    for field in info["fields"]:
        assert field["type"] and field["help"], f"field {field['name']!r} lacks a type or a help line"
    assert main(["learners", "maml"]) == 0
    assert info["fields"][0]["name"] in capsys.readouterr().out
