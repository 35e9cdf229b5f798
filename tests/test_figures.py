"""`bench plot` on real tiny runs: every figure is a valid PDF and PNG, the CSV beside it holds what the run
files and `bench table` say, mixes of protocols are separated and impossible figures refused."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmark.cli import main
from benchmark.reporting.style import OKABE_ITO, PNG_DPI, SIZES, Palette

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("curves-5w1s", "intervals", "compute", "steps")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def run_dirs(results: Path, learner: str) -> list[Path]:
    return sorted(p for p in results.iterdir() if p.name.startswith(f"{learner}-"))


@pytest.fixture(scope="module")
def plotted(tiny_results, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("figures")
    assert main(["plot", "all", str(tiny_results), "--reference", "maml", "--out", str(out)]) == 0
    return out


@pytest.mark.realdata
def test_every_figure_is_a_pdf_with_truetype_fonts_and_a_png_with_its_csv(plotted):
    for name in FIGURES:
        pdf = (plotted / f"{name}.pdf").read_bytes()
        assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF"), name
        # pdf.fonttype 42: TrueType fonts embedded whole (FontFile2), never Type 3 bitmaps.
        assert b"/FontFile2" in pdf and b"/Type3" not in pdf, name
        width, height = png_size(plotted / f"{name}.png")
        assert width == pytest.approx(SIZES["one-column"].width * PNG_DPI, abs=2) and height > 200, name
        assert len(pd.read_csv(plotted / f"{name}.csv")) > 0, name


@pytest.mark.realdata
def test_curves_csv_holds_each_seeds_log_and_their_mean_and_range(plotted, tiny_results):
    curves = pd.read_csv(plotted / "curves-5w1s.csv")
    logs = [pd.read_csv(d / "train_log.csv") for d in run_dirs(tiny_results, "finetune")]
    finetune = curves[curves["row"] == "finetune"].set_index("iteration")
    assert list(finetune.index) == list(logs[0]["iteration"]) and (finetune["seeds"] == 2).all()
    for metric, column, scale in (("train_loss", "loss", 1), ("train_accuracy", "accuracy", 100),
                                  ("val_accuracy", "val_accuracy", 100)):
        values = np.stack([scale * log[column].to_numpy() for log in logs])
        np.testing.assert_allclose(finetune[f"{metric}_mean"], values.mean(0), rtol=1e-9)
        np.testing.assert_allclose(finetune[f"{metric}_min"], values.min(0), rtol=1e-9)
        np.testing.assert_allclose(finetune[f"{metric}_max"], values.max(0), rtol=1e-9)
    times = np.stack([(log["seconds_per_iteration"] * log["iteration"].diff().fillna(log["iteration"][0])).cumsum()
                      for log in logs])
    np.testing.assert_allclose(finetune["train_time_s"], times.mean(0), rtol=1e-9)
    maml = curves[curves["row"] == "maml"]
    log = pd.read_csv(run_dirs(tiny_results, "maml")[0] / "train_log.csv")
    assert (maml["seeds"] == 1).all()
    np.testing.assert_allclose(maml["train_loss_mean"], log["loss"], rtol=1e-9)
    np.testing.assert_allclose(maml["val_accuracy_max"], 100 * log["val_accuracy"], rtol=1e-9)


@pytest.mark.realdata
def test_interval_csv_is_bench_tables_csv(plotted, tiny_results, capsys):
    capsys.readouterr()
    assert main(["table", str(tiny_results), "--format", "csv", "--reference", "maml"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    pd.testing.assert_frame_equal(pd.read_csv(plotted / "intervals.csv"), table)
    assert list(table["row"]) == ["maml", "finetune"] and table["diff"].notna().sum() == 1
    assert list(table["seeds"]) == [1, 2]


@pytest.mark.realdata
def test_compute_csv_is_each_runs_wall_time_and_accuracy(plotted, tiny_results):
    points = pd.read_csv(plotted / "compute.csv")
    assert len(points) == 3  # one point per run
    for run in tiny_results.iterdir():
        summary = json.loads((run / "summary.json").read_text())
        config = json.loads((run / "config.json").read_text())
        point = points[(points["learner"] == config["run"]["learner"]) & (points["seed"] == config["run"]["seed"])]
        assert point["wall_time_s"].item() == pytest.approx(summary["wall_time_s"])
        assert point["device_hours"].item() == pytest.approx(summary["wall_time_s"] / 3600)
        assert point["mean"].item() == pytest.approx(100 * summary["accuracy_mean"])
        assert point["device_name"].item() == config["device_name"] and not point["gpu"].item()


@pytest.mark.realdata
def test_steps_csv_is_the_table_at_every_step(plotted, tiny_results):
    steps = pd.read_csv(plotted / "steps.csv")
    assert set(steps["row"]) == {"maml"} and list(steps["step"]) == [0, 1]  # finetune has no steps.csv
    per_step = pd.read_csv(run_dirs(tiny_results, "maml")[0] / "steps.csv").pivot(
        index="step", columns="episode", values="accuracy").to_numpy()
    # One seed: the mean and 1.96 s/sqrt(n) over the test episodes, at each step.
    np.testing.assert_allclose(steps["mean"], 100 * per_step.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(steps["ci"], 100 * 1.96 * per_step.std(axis=1, ddof=1) / np.sqrt(per_step.shape[1]),
                               rtol=1e-9)
    table = pd.read_csv(plotted / "intervals.csv").set_index("row")
    last = steps.iloc[-1]  # after the last step: the table's cell
    assert (last["mean"], last["ci_low"], last["ci_high"]) == pytest.approx(
        (table.at["maml", "mean"], table.at["maml", "ci_low"], table.at["maml", "ci_high"]))


@pytest.mark.realdata
def test_two_column_size_png_only_at_another_resolution(tiny_results, tmp_path):
    assert main(["plot", "intervals", str(tiny_results), "--size", "two-column", "--format", "png", "--dpi", "100",
                 "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["intervals.csv", "intervals.png"]
    assert png_size(tmp_path / "intervals.png")[0] == pytest.approx(SIZES["two-column"].width * 100, abs=2)


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = data
        for parent in parents:
            node = node[parent]
        node[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.realdata
def test_other_protocols_are_separate_series_and_impossible_figures_are_refused(tiny_results, tmp_path, capsys):
    maml, finetune = run_dirs(tiny_results, "maml")[0], run_dirs(tiny_results, "finetune")[0]
    mix = tmp_path / "mix"
    shutil.copytree(maml, mix / "maml-vinyals")
    shutil.copytree(maml, mix / "maml-lake")
    _edit_json(mix / "maml-lake" / "config.json", run__protocol="lake", protocol__split_hash="feedbeef" * 8)
    assert main(["plot", "curves", str(mix), "--out", str(tmp_path / "f"), "--format", "png"]) == 0
    rows = pd.read_csv(tmp_path / "f" / "curves-5w1s.csv").groupby("row")["seeds"].max()
    assert len(rows) == 2 and (rows == 1).all()  # two series of one run each, never averaged
    assert all(r.startswith("maml (") and "protocol=" in r for r in rows.index)  # labelled by what differs

    capsys.readouterr()
    only_finetune = tmp_path / "finetune"
    shutil.copytree(finetune, only_finetune / "finetune")
    assert main(["plot", "steps", str(only_finetune), "--out", str(tmp_path / "g")]) == 2
    assert "predict_steps" in capsys.readouterr().err

    unpaired = tmp_path / "unpaired"
    shutil.copytree(maml, unpaired / "maml")
    shutil.copytree(finetune, unpaired / "finetune")
    for name in ("config.json", "summary.json"):
        _edit_json(unpaired / "finetune" / name, manifest_hash="another-manifest")
    assert main(["plot", "intervals", str(unpaired), "--reference", "maml", "--out", str(tmp_path / "h")]) == 2
    err = capsys.readouterr().err
    assert "no run can be paired with maml" in err and "other test episodes" in err and len(err.splitlines()) == 1
    assert main(["plot", "intervals", str(unpaired), "--reference", "protonet", "--out", str(tmp_path / "h")]) == 2
    assert "protonet" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()


def test_help_lists_every_figure_without_importing_matplotlib_or_torch():
    code = ("import sys; from benchmark.cli import main; main(['--help']); main(['plot', '--help']); "
            "print('IMPORTED', 'matplotlib' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "IMPORTED False False" in out
    for name in ("curves", "intervals", "compute", "steps", "all"):
        assert f"bench plot {name} results/" in out
    assert "plot" in out.split("Commands:")[1] and "report" in out.split("Commands:")[1]


def test_palette_keeps_a_colour_per_learner_for_the_whole_folder():
    folder = Palette(["maml", "fomaml", "finetune", "protonet"])
    assert Palette(["protonet", "finetune", "fomaml", "maml"]).color("maml") == folder.color("maml")
    assert [folder.color(x) for x in ("finetune", "fomaml", "maml", "protonet")] == list(OKABE_ITO[:4])
    many = Palette([f"learner{i:02d}" for i in range(10)])
    styles = {(s.color, s.linestyle) for s in (many[f"learner{i:02d}"] for i in range(10))}
    assert len(styles) == 10  # past seven colours the line style differs


def test_learning_curves_tell_repeated_colours_apart_by_marker():
    """Past seven rows the colours repeat; in the learning curves line style means training or validation,
    so the repeats differ by marker (on both lines), never by a dashed training line."""
    from benchmark.reporting.figures import _curve_marker
    from benchmark.reporting.style import Palette

    labels = [f"learner{i}" for i in range(9)]
    palette = Palette(labels)
    assert palette["learner0"].color == palette["learner7"].color
    assert _curve_marker(palette, "learner0") is None
    assert _curve_marker(palette, "learner7") not in (None, "o") and palette["learner7"].lap == 1
