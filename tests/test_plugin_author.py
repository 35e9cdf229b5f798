"""The plugin author's path, as a new user takes it: the README tutorial's learner, and every mistake the
issue tracker saw authors make, each caught early with a one-line error that names the fix.

The tutorial's code is read from README.md itself, so the README cannot drift from what works.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmark.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = ["--way", "5", "--shot", "1", "--query", "2", "--iterations", "3", "--episodes", "4", "--val-every", "3",
        "--val-episodes", "2", "--device", "cpu", "-q"]


def readme_block(caption: str) -> str:
    """The fenced code block that follows the line ```caption```: in README.md."""
    text = README.read_text()
    match = re.search(re.escape(f"`{caption}`:") + r"\s*```\w*\n(.*?)```", text, re.S)
    assert match, f"README.md has no code block after `{caption}`:"
    return match.group(1)


TUTORIAL = readme_block("bench-tinyproto/bench_tinyproto.py")


def write(tmp_path: Path, source: str, name: str = "bench_tinyproto.py") -> Path:
    path = tmp_path / name
    path.write_text(source)
    return path


def variant(old: str, new: str) -> str:
    assert old in TUTORIAL, f"the tutorial no longer contains {old!r}"
    return TUTORIAL.replace(old, new)


def test_the_tutorial_learner_keeps_the_contract(tmp_path):
    from benchmark.harness.plugins import load_registry
    from benchmark.testing import check_learner

    tinyproto = load_registry([write(tmp_path, TUTORIAL)]).get("tinyproto")
    assert check_learner(tinyproto)["logits_shape"] == (2, 10, 5)
    test_block = readme_block("bench-tinyproto/tests/test_tinyproto.py")
    assert "check_learner(TinyProto)" in test_block


@pytest.mark.realdata
def test_the_tutorial_runs_through_bench_run_and_bench_table(tmp_path, omniglot_dir, capsys):
    plugin = write(tmp_path, TUTORIAL)
    out = tmp_path / "out"
    base = ["run", "--plugin", str(plugin), *TINY, "--data-dir", str(omniglot_dir), "--out", str(out)]
    assert main([*base, "--learner", "tinyproto"]) == 0
    assert main(["run", "--learner", "fomaml", *TINY, "-o", "meta_batch_size=2", "--data-dir", str(omniglot_dir),
                 "--out", str(out)]) == 0
    capsys.readouterr()
    [run] = [p for p in out.iterdir() if p.name.startswith("tinyproto")]
    config = json.loads((run / "config.json").read_text())
    assert config["plugin"]["file"] == str(plugin.resolve()) and len(config["plugin"]["code_sha256"]) == 64
    assert config["describe"] == {"batch norm": "transductive", "distance": "squared Euclidean"}
    assert main(["table", str(out), "--reference", "fomaml", "--format", "csv"]) == 0
    csv = capsys.readouterr().out
    assert "tinyproto" in csv and config["plugin"]["code_sha256"] in csv and "squared Euclidean" in csv
    # The learner's code changes after the run finished: the same command says so instead of skipping silently.
    plugin.write_text(TUTORIAL.replace("Class means of conv4", "Class means (edited) of conv4"))
    assert main([*base, "--learner", "tinyproto"]) == 0
    assert "with other code of its plugin than is installed now" in capsys.readouterr().out


# -- mistakes caught when the plugin registers -------------------------------------------------------------
REGISTRATION_MISTAKES = {
    "a field without a help line": (
        variant('lr: float = option(1e-3, "Adam learning rate", min=0, min_inclusive=False)', "lr: float = 1e-3"),
        r"Config field 'lr' has no help line; declare it with benchmark.config.option"),
    "a bare tuple field": (
        variant("        tasks: int = option(", '        widths: tuple = option((32, 32), "widths")\n        tasks: int = option('),
        r"Config field 'widths': a bare tuple cannot be parsed from -o; annotate the item type"),
    "a Config that is not frozen": (
        variant("    @dataclass(frozen=True)\n    class Config:", "    @dataclass\n    class Config:"),
        r"Config must be frozen"),
    "no training()": (
        variant("    def training(self):", "    def _unused_training(self):"),
        r"does not define training \(return e.g. \[Episodes"),
    "no @hookimpl marker": (
        variant("@hookimpl\ndef bench_register_learners", "def bench_register_learners"),
        r"bench_register_learners has no @hookimpl marker, so it is never called; add `from benchmark import hookimpl`"),
    "a misspelt hook": (
        variant("def bench_register_learners(register):", "def bench_register_learner(register):"),
        r"implements unknown hook 'bench_register_learner'; did you mean 'bench_register_learners'"),
}


@pytest.mark.parametrize("mistake", list(REGISTRATION_MISTAKES))
def test_registration_mistakes_are_one_line_errors(mistake, tmp_path, capsys):
    source, message = REGISTRATION_MISTAKES[mistake]
    plugin = write(tmp_path, source)
    assert main(["learners", "--plugin", str(plugin)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err


def test_enum_and_list_fields_work_from_the_command_line(tmp_path, capsys):
    source = variant("from benchmark import hookimpl\n", "import enum\n\nfrom benchmark import hookimpl\n")
    source = source.replace("ARCH = Conv4Arch", "class Metric(enum.Enum):\n    EUCLIDEAN = 'euclidean'\n    COSINE = 'cosine'\n\n\nARCH = Conv4Arch")
    source = source.replace("        tasks: int = option(", "        metric: Metric = option(Metric.EUCLIDEAN, 'distance')\n"
                            "        widths: list[int] = option(None, 'widths', default_factory=lambda: [64, 64])\n"
                            "        tasks: int = option(")
    plugin = write(tmp_path, source)
    assert main(["learners", "tinyproto", "--plugin", str(plugin), "--json"]) == 0
    fields = {f["name"]: f for f in json.loads(capsys.readouterr().out)["fields"]}
    assert fields["metric"]["default"] == "euclidean" and fields["metric"]["type"] == "one of: EUCLIDEAN, COSINE"
    assert fields["widths"]["default"] == [64, 64] and fields["widths"]["type"] == "list of int (comma-separated)"
    from benchmark.config import apply_overrides
    from benchmark.harness.plugins import load_registry
    from benchmark.learner import config_as_dict

    cls = load_registry([plugin]).get("tinyproto")
    config = apply_overrides(cls.Config(), ["metric=cosine", "widths=32,16"])
    assert config_as_dict(config)["metric"] == "cosine" and config.widths == [32, 16]
    json.dumps(config_as_dict(config))  # config.json can hold it


# -- mistakes caught by the preflight, before anything is written ---------------------------------------------
PREFLIGHT_MISTAKES = {
    "logits of the wrong shape": (
        variant("        return self._logits(support_x, support_y, query_x)\n",
                "        return self._logits(support_x, support_y, query_x).flatten(1)\n"),
        r"predict returned logits of shape \[1, 50\] for one episode, expected \[1, 10, 5\]"),
    "predict changes batch-norm running statistics": (
        variant("        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=config.lr)\n",
                "        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=config.lr)\n"
                "        self.norm = torch.nn.BatchNorm1d(784).to(context.device)\n").replace(
            "        return self._logits(support_x, support_y, query_x)\n",
            "        self.norm(query_x.flatten(0, 1).flatten(1))\n        return self._logits(support_x, support_y, query_x)\n"),
        r"predict changed 'norm.running_mean'; predict must leave parameters and buffers alone"),
    "weights from the global generator": (
        variant("        self.params = {k: v.requires_grad_()", "        params['conv1.weight'] = torch.randn_like(params['conv1.weight'])\n"
                "        self.params = {k: v.requires_grad_()"),
        r"draws from global random state: two learners built with the same seed hold different 'params.conv1.weight'"),
    "a non-finite metric": (
        variant('        return {"loss": loss.detach(), "accuracy": accuracy}',
                '        return {"loss": loss.detach() * float("nan"), "accuracy": accuracy}'),
        r"metric 'loss' is nan after one trial step on real data"),
}


@pytest.mark.realdata
@pytest.mark.parametrize("mistake", list(PREFLIGHT_MISTAKES))
def test_preflight_mistakes_are_one_line_errors_and_write_nothing(mistake, tmp_path, omniglot_dir, capsys):
    source, message = PREFLIGHT_MISTAKES[mistake]
    plugin = write(tmp_path, source)
    out = tmp_path / "out"
    code = main(["run", "--learner", "tinyproto", "--plugin", str(plugin), *TINY, "--data-dir", str(omniglot_dir),
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and re.search(message, err), err
    assert not out.exists()
