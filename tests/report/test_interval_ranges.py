"""Acceptance: no interval in a run's summaries, interactive pages or reports leaves the
range its metric can take (flip in [0, 1], KL ≥ 0, cosines in [−1, 1], …), and each names
its method."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from tests.report.pages import INTERVAL, plotly_figures, report_intervals
from thoughtpatch.report.intervals import METHODS, metric_range

TOL = 1e-9  # the pages round to 6 significant digits; the ends are computed from rounded values


def _inside(metric: str, lo: float, hi: float) -> bool:
    a, b = metric_range(metric)
    return a - TOL <= lo <= hi <= b + TOL


def summary_violations(run: Path) -> list[str]:
    bad = []
    for path in sorted(run.glob("*/summary.json")):
        for cell in json.loads(path.read_text())["cells"]:
            for metric, s in cell["metrics"].items():
                for entry, name in ((s, metric), (s.get("per_pair"), "recovered_per_pair")):
                    if entry is None:
                        continue
                    if not {"ci_low", "ci_high", "ci_method"} <= entry.keys() or entry["ci_method"] not in METHODS:
                        bad.append(f"{path}: {name} in {cell} has no named interval")
                    elif entry["ci_low"] is not None and not _inside(name, entry["ci_low"], entry["ci_high"]):
                        bad.append(f"{path}: {name} [{entry['ci_low']}, {entry['ci_high']}]")
    return bad


def page_violations(run: Path) -> tuple[list[str], int]:
    bad, seen = [], 0
    for page in sorted((run / "figures").glob("*.html")):
        for fig in plotly_figures(page):
            metric = fig["layout"]["meta"]["metric"]
            for t in fig["data"]:
                err = t.get("error_y") or {}
                if t.get("type") == "scatter" and err.get("visible"):
                    for y, up, down in zip(t["y"], err["array"], err["arrayminus"]):
                        if None not in (y, up, down):
                            seen += 1
                            if not _inside(metric, y - down, y + up):
                                bad.append(f"{page.name} {fig['id']} {t['name']}: [{y - down}, {y + up}]")
                if t.get("type") == "heatmap" and t.get("name") == "mean":
                    for row in t["customdata"]:
                        for cell in row:
                            m = INTERVAL.fullmatch(cell[0])
                            if m:
                                seen += 1
                                if not _inside(metric, float(m.group(1)), float(m.group(2))):
                                    bad.append(f"{page.name} {fig['id']} mean: {cell[0]}")
    return bad, seen


def _check_run(run: Path, metrics: set[str]) -> None:
    assert summary_violations(run) == []
    bad, seen = page_violations(run)
    assert seen > 100 and bad == []
    shown = [iv for report in sorted((run / "reports").glob("*.md")) for iv in report_intervals(report)]
    assert len(shown) > 100
    assert {m for m, *_ in shown} >= metrics
    assert [iv for iv in shown if not _inside(iv[0], iv[1], iv[2])] == []


def test_no_interval_leaves_its_range(run_dir):
    _check_run(run_dir, {"kl", "flip", "away", "recovered", "logprob_diff", "cos_clean", "norm"})


def test_no_interval_leaves_its_range_on_other_grids(sites_run, trace_run):
    """Several sites (the head grid too), knockout on both runs, causal tracing (log P(clean
    answer) ≤ 0, restored, flip back)."""
    _check_run(sites_run, {"kl", "flip", "away", "recovered", "delta_logprob_diff", "logprob_diff", "cos_clean", "norm"})
    _check_run(trace_run, {"kl", "kl_to_clean", "logprob_clean", "restored", "flip", "away"})
    assert metric_range("logprob_clean") == (-math.inf, 0.0)


def test_the_check_catches_an_interval_out_of_range(run_dir, tmp_path):
    """The same checks, on a copy whose summary and page hold the old mean ± 1.96·sd/√n
    interval of a flip rate of 1 in 3 (−0.27…0.93): both are caught."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("*.safetensors", "wandb"))
    path = copy / "position" / "summary.json"
    doc = json.loads(path.read_text())
    doc["cells"][0]["metrics"]["flip"] |= {"ci_low": -0.27, "ci_high": 0.93}
    path.write_text(json.dumps(doc))
    assert len(summary_violations(copy)) == 1
    page = copy / "figures" / "position.html"
    flip = next(i for i, f in enumerate(plotly_figures(page)) if f["layout"]["meta"]["metric"] == "flip")
    text = page.read_text()
    m = INTERVAL.search(text, re.search(rf'Plotly\.newPlot\(\s*"fig{flip}"', text).end())  # the mean view's first cell
    page.write_text(text[:m.start()] + "[-0.27, 0.93]" + text[m.end():])
    bad, _ = page_violations(copy)
    assert len(bad) == 1 and "-0.27" in bad[0]


def test_summaries_without_intervals_are_recomputed_on_load(run_dir, tmp_path):
    """A run written before summaries carried intervals still gets them in its figures."""
    import shutil

    from thoughtpatch.report.rundata import load_run

    copy = tmp_path / "old"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("*.safetensors", "wandb", "figures", "reports"))
    for path in copy.glob("*/summary.json"):
        doc = json.loads(path.read_text())
        for cell in doc["cells"]:
            for m in cell["metrics"].values():
                for k in ("ci_low", "ci_high", "ci_method"):
                    m.pop(k, None)
        path.write_text(json.dumps(doc))
    data = load_run(copy)
    assert data.ci_method("position", "flip") == "wilson" and data.ci_method("iterative", "kl") == "bootstrap"
    assert data.summaries["position"]["cells"] == json.loads((run_dir / "position" / "summary.json").read_text())["cells"]
