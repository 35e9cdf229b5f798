"""`bench table --layout`: the same numbers in every layout, and LaTeX that fits the page it is made for
(compiled with pdflatex; an overfull box wider than a few points fails)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_tables import accuracies, write_run

from benchmark.cli import main
from benchmark.reporting.layouts import view
from benchmark.reporting.tables import build_table, display_frame, load_runs, make_table

#: An overfull \hbox up to this wide is invisible in print; anything wider runs into the margin.
OVERFULL_TOLERANCE_PT = 3.0


def describe(learner: str, way: int) -> dict[str, str]:
    """The protocol facts the first-party learners report (see plugins/), per cell."""
    steps = f"{1 if way == 5 else 5}/10"
    if learner == "finetune":
        return {"batch norm": "transductive", "embedding": "conv4, stride 2",
                "head": f"linear, {200 if way == 5 else 500} SGD steps"}
    return {"order": "first" if learner == "fomaml" else "second", "inner steps (train/test)": steps,
            "batch norm": "transductive"}


@pytest.fixture
def readme_table(tmp_path: Path) -> Path:
    """Three learners in 5w1s and 20w1s, as the README's table with --reference maml."""
    runs = tmp_path / "runs"
    for i, learner in enumerate(("maml", "fomaml", "finetune")):
        for way in (5, 20):
            write_run(runs, f"{learner}-{way}", accuracies(10 * i + way), learner=learner, way=way,
                      manifest=f"m{way}", describe=describe(learner, way), learner_config={"lr": 0.1})
    return runs


def overfull_points(tex: str, documentclass: str, folder: Path) -> list[float]:
    """Compile ``tex`` in ``documentclass`` (a ``\\documentclass`` argument list) and return how far each
    overfull \\hbox runs past its line, in points."""
    (folder / "t.tex").write_text(f"\\documentclass{documentclass}\n\\begin{{document}}\n{tex}\\end{{document}}\n")
    result = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=folder,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]
    log = (folder / "t.log").read_text(errors="replace")
    return [float(x) for x in re.findall(r"Overfull \\hbox \(([\d.]+)pt too wide\)", log)]


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed (Debian: texlive-latex-base)")
@pytest.mark.parametrize("layout, documentclass", [
    ("compact", "{article}"),  # the text width of a one-column paper
    ("narrow", "[twocolumn]{article}"),  # one column of a two-column paper
    ("narrow", "{article}"),
])
def test_layout_fits_the_page_it_is_for(readme_table, tmp_path, layout, documentclass):
    tex = make_table([readme_table], fmt="latex", reference="maml", layout=layout)
    over = overfull_points(tex, documentclass, tmp_path)
    assert all(points <= OVERFULL_TOLERANCE_PT for points in over), f"{layout} in {documentclass}: {over} pt too wide"


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed (Debian: texlive-latex-base)")
def test_wide_layout_still_compiles_but_runs_off_the_page(readme_table, tmp_path):
    tex = make_table([readme_table], fmt="latex", reference="maml", layout="wide")
    assert max(overfull_points(tex, "{article}", tmp_path)) > 100  # why the other layouts exist


def test_every_layout_shows_the_same_numbers(readme_table):
    table = build_table(load_runs([readme_table]), reference="maml")
    wide = display_frame(table).set_index("learner")
    compact, narrow = view(table, "compact").frame, view(table, "narrow").frame
    for column in ("5-way 1-shot", "20-way 1-shot"):
        for row in table.rows:
            mean, diff = wide.at[row, column], wide.at[row, f"{column} Δ"]
            label = compact["learner"].str.startswith(row)
            expected = f"{mean} (ref)" if diff == "ref" else f"{mean} (Δ {diff})"
            assert compact.loc[label, column].item() == expected
            at = narrow.index[narrow["learner"].str.startswith(row)].item()
            assert narrow.at[at, column] == mean
            assert narrow.at[at + 1, column] == ("ref" if diff == "ref" else f"Δ {diff}")


def test_differing_protocol_facts_become_footnote_marks(readme_table):
    table = build_table(load_runs([readme_table]), reference="maml")
    laid_out = view(table, "compact")
    assert list(laid_out.frame.columns) == ["learner", "5-way 1-shot", "20-way 1-shot"]  # no protocol columns
    assert list(laid_out.frame["learner"]) == ["mamlᵃ", "finetuneᵇ", "fomamlᶜ"]
    marks = {note[0]: note for note in laid_out.footnotes if note[0] in "ᵃᵇᶜ"}
    assert "order second" in marks["ᵃ"] and "inner steps (train/test) 5w1s: 1/10; 20w1s: 5/10" in marks["ᵃ"]
    assert "head 5w1s: linear, 200 SGD steps" in marks["ᵇ"] and "not reported: order" in marks["ᵇ"]
    assert "batch norm transductive" in laid_out.caption  # equal for all rows: in the caption
    latex = make_table([readme_table], fmt="latex", reference="maml", layout="narrow")
    assert r"maml\textsuperscript{a}" in latex and r"\footnotesize" in latex and r"\setlength{\tabcolsep}{3pt}" in latex


def test_layout_cli_and_csv(readme_table, capsys):
    assert main(["table", str(readme_table), "--reference", "maml", "--layout", "compact"]) == 0
    out = capsys.readouterr().out
    assert "(ref)" in out and "(Δ " in out and "mamlᵃ" in out
    assert main(["table", str(readme_table), "--format", "html", "--layout", "narrow"]) == 0
    assert "<caption>" in capsys.readouterr().out
    assert main(["table", str(readme_table), "--format", "csv", "--layout", "narrow"]) == 2
    assert "csv always has one row per learner and cell" in capsys.readouterr().err


def test_compact_puts_delta_inside_the_seed_counts_parentheses(readme_table):
    write_run(readme_table, "fomaml-5-seed1", accuracies(99), learner="fomaml", way=5, seed=1, manifest="m5",
              describe=describe("fomaml", 5), learner_config={"lr": 0.1})
    table = build_table(load_runs([readme_table]), reference="maml")
    frame = view(table, "compact").frame.set_index("learner")
    cell = frame.loc[frame.index.str.startswith("fomaml"), "5-way 1-shot"].item()
    wide = display_frame(table).set_index("learner")
    mean, diff = wide.at["fomaml", "5-way 1-shot"], wide.at["fomaml", "5-way 1-shot Δ"]
    assert mean.endswith(" (2 seeds)") and cell == f"{mean[:-1]}; Δ {diff})"
