"""Read back what a run's pages and reports show: the plotly figures of a page (the JSON
handed to Plotly.newPlot) and every interval in the reports, with the metric it belongs to."""

from __future__ import annotations

import json
import re
from pathlib import Path

from thoughtpatch.report.rundata import LABELS, LABELS_OF, SHORT, SHORT_OF

_DEC = json.JSONDecoder()


def plotly_figures(page: Path) -> list[dict]:
    """[{"id", "data", "layout"}] in page order."""
    text = page.read_text(encoding="utf-8")
    figs = []
    for m in re.finditer(r"Plotly\.newPlot\(\s*", text):
        i = m.end()
        parts = []
        for _ in range(3):  # div id, data, layout
            obj, i = _DEC.raw_decode(text, i)
            parts.append(obj)
            i = re.compile(r"\s*,\s*").match(text, i).end()
        figs.append(dict(zip(("id", "data", "layout"), parts)))
    return figs


NUM = r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?"
INTERVAL = re.compile(rf"\[({NUM}), ({NUM})\]")


def report_intervals(report: Path) -> list[tuple[str, float, float, str]]:
    """(metric, low, high, where) of every `mean [low, high]` cell in a report's tables. The
    metric is the column's (a header "flip rate (Wilson)") or else the section's
    ("### <label>", "#### <label>" or "**<label>**")."""
    by_label = {v: k for k, v in LABELS.items()} | {v: k for of in LABELS_OF.values() for k, v in of.items()}
    by_short = {v: k for k, v in SHORT.items()} | {v: k for of in SHORT_OF.values() for k, v in of.items()}
    out, section, header = [], None, None
    for n, line in enumerate(report.read_text(encoding="utf-8").splitlines(), 1):
        head = re.match(r"^(?:#{2,4}\s+(.+)|\*\*(.+)\*\*)$", line)
        if head:  # a metric's table, or another section (whose tables name their metric per column)
            section = by_label.get((head.group(1) or head.group(2)).strip())
            header = None
            continue
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if header is None:
            header = [by_short.get(re.sub(r" \(.*\)$", "", c)) for c in cells]
            continue
        for col, cell in zip(header, cells):
            m = re.fullmatch(rf"{NUM} {INTERVAL.pattern}", cell)
            if m and (col or section):
                out.append((col or section, float(m.group(1)), float(m.group(2)), f"{report.name}:{n}"))
    return out
