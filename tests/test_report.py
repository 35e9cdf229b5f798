"""`bench report` on real tiny runs: one self-contained page with the table, the figures and each run's
provenance, checked by parsing it and by rendering it in a real headless browser."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest

from benchmark.cli import main

pytestmark = pytest.mark.realdata

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class Page(HTMLParser):
    """The parts of the page the tests look at."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.row_headers: list[str] = []
        self.scripts = 0
        self._in_row_header = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        elif tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        elif tag == "th" and attrs.get("scope") == "row":
            self._in_row_header = True
            self.row_headers.append("")
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag == "th":
            self._in_row_header = False

    def handle_data(self, data):
        if self._in_row_header:
            self.row_headers[-1] += data


@pytest.fixture(scope="module")
def report(tiny_results, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    results = folder / "results"
    shutil.copytree(tiny_results, results)
    assert main(["report", str(results), "--reference", "maml"]) == 0
    return results / "report.html"


def test_report_holds_the_table_every_figure_and_each_runs_provenance(report):
    text = report.read_text()
    page = Page()
    page.feed(text)
    assert page.scripts == 0 and "http://" not in text and "https://" not in text  # nothing to fetch
    assert page.row_headers == ["maml", "finetune"]  # the table, reference first, as bench table
    assert "Δ: paired difference to maml" in text and "95% confidence interval" in text
    assert {image["alt"].split(",")[0] for image in page.images} == {
        "Learning curves", "Accuracy with 95% intervals and differences to maml", "Accuracy against compute",
        "Accuracy against adaptation steps"}
    for image in page.images:
        payload = base64.b64decode(image["src"].removeprefix("data:image/png;base64,"))
        assert payload[:8] == b"\x89PNG\r\n\x1a\n" and len(payload) > 10_000
    runs = sorted(p for p in report.parent.iterdir() if p.is_dir())
    assert len(runs) == 3
    for run in runs:
        assert f'id="run-{run.name}"' in text  # its config.json, in full
        for name in ("config.json", "summary.json", "episodes.csv", "train_log.csv"):
            assert f"{run.name}/{name}" in page.links
    for link in page.links:
        if not link.startswith(("data:", "#")):
            assert (report.parent / unquote(link)).is_file(), link
    config = (runs[0] / "config.json").read_text()
    commit = re.search(r'"git_commit": "([0-9a-f]{12})', config)
    assert commit is None or commit.group(1) in text


def test_report_renders_in_a_headless_browser(report, tmp_path):
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        pytest.skip("no headless browser (apt-get install chromium; scripts/ci/system_packages.sh does it in CI)")
    # A copy with a probe that writes what the browser decoded into the DOM, for --dump-dom to show.
    probe = ("<script>window.addEventListener('load', () => { for (const img of document.images) "
             "img.setAttribute('data-decoded-width', img.naturalWidth); document.body.setAttribute("
             "'data-table-rows', document.querySelectorAll('table:not(.runs) tbody tr').length); document.body."
             "setAttribute('data-run-rows', document.querySelectorAll('table.runs tr.run').length); });</script>")
    page = tmp_path / "report.html"
    page.write_text(report.read_text().replace("</body>", probe + "</body>"))
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    widths = [int(w) for w in re.findall(r'data-decoded-width="(\d+)"', dom)]
    assert len(widths) == 4 and all(w > 0 for w in widths), widths
    assert re.search(r'data-table-rows="(\d+)"', dom).group(1) == "2"  # maml and finetune
    assert re.search(r'data-run-rows="(\d+)"', dom).group(1) == "3"  # one per run
    assert "finetune" in dom and "Accuracy against compute" in dom


def test_a_figure_the_runs_do_not_allow_is_named_with_the_reason(tiny_results, tmp_path):
    for run in tiny_results.iterdir():
        if run.name.startswith("finetune-"):
            shutil.copytree(run, tmp_path / "results" / run.name)
    output = tmp_path / "page.html"
    assert main(["report", str(tmp_path / "results"), "--output", str(output)]) == 0
    text = output.read_text()
    assert "Not drawn: Test accuracy against adaptation steps" in text and "predict_steps" in text
    assert text.count("<img ") == 3  # curves, intervals, compute
