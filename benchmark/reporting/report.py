"""``bench report``: one static HTML page for a results folder, to read in any browser or send to someone.

The page holds the table (``bench table``'s, rendered by :func:`benchmark.reporting.tables.render_html`, with
its caption and footnotes), every figure that the runs allow (PNG data URIs, each with its numbers as a CSV
download), and one row of provenance per run (config, versions, device, git commit, wall time, plugin and
code hash) with links to the run's files. Everything but those links is inside the file: no server, no
script, no network.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import os
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from benchmark.errors import BenchError
from benchmark.harness.rundir import CONFIG, RunDirError, read_json
from benchmark.reporting import figures, series, style
from benchmark.reporting.tables import Warn, build_table, csv_frame, format_cell, load_runs, render_html

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; max-width: 1200px;
       margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
.meta { color: #666; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
caption { caption-side: top; text-align: left; color: #444; padding-bottom: 0.5em; max-width: 1000px; }
th, td { border-bottom: 1px solid #e3e3e3; padding: 0.3em 0.7em; text-align: left; vertical-align: top; }
thead th { border-bottom: 2px solid #999; }
ul.footnotes { color: #555; font-size: 0.88em; }
figure { margin: 1.5em 0; } figure img { width: min(100%, 820px); height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.92em; }
.skipped { color: #8a5a00; }
code { font-size: 0.9em; }
details pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; border-radius: 2px; margin-right: 0.35em; }
.scroll { overflow-x: auto; }
table.runs { font-size: 0.85em; } table.runs td { white-space: nowrap; }
table.runs tr.run td { border-bottom: none; } table.runs tr.files td { padding-top: 0; color: #555; }
table.runs tr.files a { margin-right: 0.6em; }
"""


def _data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def _csv_link(frame: pd.DataFrame, filename: str, text: str = "data (CSV)") -> str:
    uri = _data_uri(frame.to_csv(index=False).encode(), "text/csv")
    return f'<a download="{escape(filename)}" href="{uri}">{escape(text)}</a>'


# -- sections ----------------------------------------------------------------------------------------------
def _table_section(runs: pd.DataFrame, reference: str | None, warn: Warn) -> str:
    table = build_table(runs, reference=reference, warn=warn)
    return ("<h2>Table</h2>\n" + render_html(table)
            + f"<p>{_csv_link(csv_frame(table), 'table.csv', 'The table as CSV')} (percent, full precision, one row "
              "per learner and cell: what <code>bench table --format csv</code> gives).</p>\n")


def _figure_section(runs: pd.DataFrame, reference: str | None, size: style.PaperSize, warn: Warn) -> str:
    parts = ["<h2>Figures</h2>"]
    for name, kind in figures.FIGURES.items():
        try:
            drawn = figures.make(name, runs, size, reference=reference, warn=warn)
        except BenchError as exc:
            parts.append(f'<p class="skipped">Not drawn: {escape(kind.help.rstrip("."))}, because {escape(str(exc))}.</p>')
            continue
        for figure in drawn:
            png = _data_uri(style.png_bytes(figure.figure, figure.size), "image/png")
            parts.append(
                f'<figure id="figure-{escape(figure.name)}">\n<img src="{png}" alt="{escape(figure.title)}">\n'
                f"<figcaption><b>{escape(figure.title)}.</b> {escape(figure.caption)} "
                f"{_csv_link(figure.data, figure.name + '.csv')}</figcaption>\n</figure>")
    return "\n".join(parts) + "\n"


def _short(value: Any, length: int = 12) -> str:
    text = "—" if value in (None, "") else str(value)
    return text if len(text) <= length else text[:length] + "…"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _file_links(run_dir: Path, output: Path) -> str:
    """Relative links from the report to the run's files (they work where the report sits beside the
    results, as ``bench report`` writes it by default)."""
    links = []
    for path in sorted(p for p in run_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
        href = quote(os.path.relpath(path, output.parent).replace(os.sep, "/"))
        links.append(f'<a href="{href}">{escape(path.name)}</a>')
    return " ".join(links)


def _runs_section(runs: pd.DataFrame, output: Path, palette: style.Palette, warn: Warn) -> str:
    head = ("<tr><th>run</th><th>cell</th><th>seed</th><th>test accuracy (%)</th><th>device</th><th>wall time</th>"
            "<th>git commit</th><th>metabench / torch / CUDA / Python</th><th>plugin (code hash)</th></tr>")
    rows, details = [], []
    for _, run in runs.sort_values(["row", "way", "shot", "seed"]).iterrows():
        path = Path(run["path"])
        try:
            config = read_json(path / CONFIG)
        except RunDirError as exc:
            warn(f"note: no provenance for {path} in the report: {exc}")
            config = {}
        versions = " / ".join(_short(config.get(k), 16) for k in
                              ("metabench_version", "torch_version", "cuda_version", "python_version"))
        plugin = config.get("plugin") or {}
        swatch = f'<span class="swatch" style="background:{palette.color(run["row"])}"></span>'
        rows.append(
            f"<tr class=\"run\"><td>{swatch}<a href=\"#run-{escape(path.name)}\">{escape(str(run['row']))}</a></td>"
            f"<td>{run['way']}w{run['shot']}s</td><td>{run['seed']}</td><td>{escape(run['mean_text'])}</td>"
            f"<td>{escape(str(config.get('device_name') or '—'))} ({escape(str(config.get('device') or '?'))})</td>"
            f"<td>{_duration(run['wall_time_s'])}</td>"
            f"<td><code>{escape(_short(config.get('git_commit')))}</code></td><td>{escape(versions)}</td>"
            f"<td>{escape(str(plugin.get('distribution') or plugin.get('file') or '—'))} "
            f"{escape(str(plugin.get('version') or ''))} (<code>{escape(_short(plugin.get('code_sha256'), 10))}</code>)</td>"
            f'</tr>\n<tr class="files"><td></td><td colspan="8">files: {_file_links(path, output)}</td></tr>')
        details.append(
            f'<details id="run-{escape(path.name)}"><summary><code>{escape(str(path))}</code></summary>'
            f"<pre>{escape(json.dumps(config, indent=2, sort_keys=True, default=str))}</pre></details>")
    return ("<h2>Runs</h2>\n<p>Where and how each run ran, and its files (links relative to this page). The full "
            "<code>config.json</code> of each run is below the table.</p>\n"
            f'<div class="scroll"><table class="runs"><thead>{head}</thead><tbody>\n' + "\n".join(rows)
            + "\n</tbody></table></div>\n"
            + "\n".join(details) + "\n")


# -- the page ----------------------------------------------------------------------------------------------
def build_report(paths: Sequence[str | Path], output: Path, reference: str | None = None,
                 size: str = "one-column", title: str | None = None, warn: Warn = print) -> str:
    """The HTML page for the runs below ``paths``, as it will be written to ``output`` (links are relative to
    it). Raises BenchError when there is no finished run or ``reference`` is not a learner of the runs."""
    from benchmark import __version__

    paths = list(paths)
    runs = series.labelled(load_runs(paths, warn=warn))
    palette = style.Palette(runs["row"])
    runs = runs.assign(mean_text=[_run_accuracy(r) for _, r in runs.iterrows()])
    where = ", ".join(str(p) for p in paths)
    title = title or f"metabench results: {where}"
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cells = sorted({(int(w), int(s)) for w, s in zip(runs["way"], runs["shot"])})
    summary = (f"{_count(len(runs), 'finished run')} of {_count(runs['row'].nunique(), 'learner')} in "
               f"{_count(len(cells), 'cell')}; made {now} by metabench {__version__} (<code>bench report</code>)"
               + (f"; differences to {escape(reference)}" if reference else "") + ".")
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="meta">{summary}</p>',
        _table_section(runs, reference, warn),
        _figure_section(runs, reference, style.paper_size(size), warn),
        _runs_section(runs, output, palette, warn),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "</body>\n</html>\n")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _run_accuracy(run: pd.Series) -> str:
    """One run's accuracy as the table would show it for one seed."""
    one = build_table(pd.DataFrame([run]).drop(columns=["row"]), warn=lambda _: None)
    return format_cell(next(iter(one.cells.values())))


def write_report(paths: Sequence[str | Path], output: Path, reference: str | None = None,
                 size: str = "one-column", title: str | None = None, warn: Warn = print) -> Path:
    """Build the page and write it to ``output`` (its folder is created)."""
    page = build_report(paths, output, reference=reference, size=size, title=title, warn=warn)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise BenchError(f"cannot write {output} ({exc.strerror or exc}); choose another --output") from None
    return output
