"""Figures and reports of a tiny real run: every section, every image link a valid PNG, the
offline HTML pages, the journal and the inventory; `thoughtpatch report` on the results alone
reproduces the same bytes."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

from thoughtpatch.report.rundata import MAIN_METRICS
from thoughtpatch.report.markdown import INVENTORY, JOURNAL, REPORT_FILES, SECTIONS, update_journal

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RESULT_FILES = ("manifest.json", "pairs.json", "checks.json", "*/results.jsonl", "*/summary.json")


def _outputs(d: Path) -> dict[str, bytes]:
    files = [p for sub in ("figures", "reports") for p in (d / sub).rglob("*") if p.is_file()] + [d / JOURNAL]
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(files)}


def check_reports(run: Path) -> list[str]:
    """Every report of a run: every section, every image link a valid PNG, every other link
    alive, every check in the checklist, a top-5 table per main metric (per grid)."""
    from matplotlib.image import imread

    from thoughtpatch.report.rundata import metrics_of

    checks = json.loads((run / "checks.json").read_text())["checks"]
    names = []
    for exp, name in REPORT_FILES.items():
        path = run / "reports" / name
        if not (run / exp / "results.jsonl").exists():
            assert not path.exists(), name
            continue
        names.append(name)
        text = path.read_text()
        for section in SECTIONS:
            assert re.search(rf"^{re.escape(section)}", text, re.M), f"{name}: missing '{section}'"
        images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
        assert images, f"{name}: no embedded figure"
        for link in images:
            target = (path.parent / link).resolve()
            data = target.read_bytes()
            assert data.startswith(PNG_MAGIC) and len(data) > 1000, f"{name}: {link} is not a PNG"
            h, w = imread(target).shape[:2]
            assert h > 100 and w > 100, link
        for link in re.findall(r"(?<!!)\[[^\]]*\]\(([^)#]+)\)", text):  # every other relative link resolves
            assert (path.parent / link).exists(), f"{name}: dead link {link}"
        for c in checks:
            assert f"`{c['name']}`" in text
        grids = max(1, len(re.findall(r"^### ", text.split("## Top-5")[1].split("## Validation")[0], re.M)))
        assert len(re.findall(r"^\| 1 \| ", text.split("## Top-5")[1].split("## Validation")[0], re.M)) == grids * len(metrics_of(exp))
        assert "Baseline" in text and "never move" in text
    return names


def test_reports_have_every_section_and_valid_images(run_dir):
    assert check_reports(run_dir) == ["position_patching.md", "iterative_patching.md", "layer_patching.md"]
    # a run on the resid grid keeps the file names it had before sites existed
    figures = {p.name for p in (run_dir / "figures").iterdir()}
    assert figures == {
        "comparison_kl.png", "comparison_logprob_diff.png", "iterative.html", "iterative_activations.png", "iterative_trajectories.png",
        "layer.html", "layer_curve.png", "plotly.min.js", "position.html", "position_heatmaps.png", "position_per_pair_delta_logprob_diff_1.png",
        "position_per_pair_kl_1.png", *(f"position_heatmap_{m}.png" for m in MAIN_METRICS),
    }
    text = (run_dir / "reports" / "position_patching.md").read_text()
    assert "| mode | replace: a patched site gets the source run's activation |" in text and "### Site" not in text


def check_pages(run: Path) -> list[str]:
    from plotly.offline import get_plotlyjs

    from tests.report.pages import plotly_figures
    from thoughtpatch.report.intervals import metric_range

    figures = run / "figures"
    assert (figures / "plotly.min.js").read_text(encoding="utf-8") == get_plotlyjs()
    pages = sorted(figures.glob("*.html"))
    for page in pages:
        text = page.read_text()
        assert page.stat().st_size < 1_000_000  # plotly is not inlined
        assert "Plotly.newPlot" in text
        # the only script loaded is the copy beside the page, by a relative path (offline)
        assert re.findall(r"<script[^>]+src=['\"]([^'\"]+)", text) == ["plotly.min.js"]
        for fig in plotly_figures(page):
            meta = fig["layout"]["meta"]
            lines = not any(t["type"] == "heatmap" for t in fig["data"])
            if meta["metric"].startswith("kl") and lines:  # KL line plots: a linear/log switch
                labels = [b["label"] for menu in fig["layout"]["updatemenus"] for b in menu["buttons"]]
                assert {"linear", "log"} <= set(labels), fig["id"]
            if lines and metric_range(meta["metric"])[0] == 0:  # no axis padding below 0 (a rate's −0.02 tick)
                assert fig["layout"]["yaxis"].get("rangemode") == "nonnegative", (page.name, fig["id"])
    return [p.name for p in pages]


def test_html_pages_share_one_plotly_and_stay_small(run_dir):
    assert check_pages(run_dir) == ["iterative.html", "layer.html", "position.html"]


def test_position_page_one_colour_scale_and_pair_hovers(run_dir, tmp_path):
    from tests.report.pages import plotly_figures
    from thoughtpatch.report.figures import position_html
    from thoughtpatch.report.rundata import load_run

    data = load_run(run_dir)
    rows = data.rows["position"]
    for r in rows[:: max(1, len(rows) // 4)]:  # the tiny model flips nothing itself: mark a few cells
        r["flip"] = True
    (page,) = position_html(data, tmp_path)
    pairs = data.pairs
    for fig in plotly_figures(page):
        heat = [t for t in fig["data"] if t["type"] == "heatmap"]
        assert len(heat) == 1 + len(pairs)
        assert all(t["coloraxis"] == "coloraxis" for t in heat)  # one colour scale for the mean and every pair
        ca = fig["layout"]["coloraxis"]
        vals = [v for t in heat[1:] for row in t["z"] for v in row if v is not None]
        if fig["layout"]["meta"]["metric"] != "recovered":  # per-pair ratios may saturate
            assert ca["cmin"] <= min(vals) and max(vals) <= ca["cmax"]
        assert "n = %{customdata[1]}" in heat[0]["hovertemplate"] and "95 % CI" in heat[0]["hovertemplate"]
        for t, p in zip(heat[1:], pairs):
            assert p["clean"]["question"] in t["hovertemplate"] and f"(answer {p['corrupted']['answer']})" in t["hovertemplate"]
            marked = sum(cell.endswith("●") for row in t["text"] for cell in row)  # flips marked as in the PNG
            assert marked == sum(bool(r["flip"]) for r in rows if r["pair_id"] == p["pair_id"]) > 0


def test_log_axis_rule():
    from thoughtpatch.report.figures import cell_text, log_wanted

    assert log_wanted("kl", [1.0, 1e-3, 1e-8]) and not log_wanted("kl", [1.0, 0.5, 0.02])
    assert not log_wanted("logprob_diff", [1.0, 1e-8]) and not log_wanted("kl", [0.0, 1.0])
    assert cell_text(5.53e-6) == "5.5e-6" and cell_text(0.1234) == "0.123" and cell_text(float("nan")) == ""


def test_exp2_kl_page_starts_on_log_when_the_decay_spans_decades(run_dir, tmp_path):
    """The tiny run with each Exp 2 KL set within one decade starts linear; with each
    iteration's KL 100× below the last (10 decades, as Exp 2's chain decays) it starts on log.
    (The tiny run's own KLs sit at fp32's floor, where their span depends on the machine.)"""
    from tests.report.pages import plotly_figures
    from thoughtpatch.report.figures import iterative_html, log_wanted
    from thoughtpatch.report.results import read_rows, write_summary
    from thoughtpatch.report.rundata import load_run

    def kl_axes(page: Path) -> list[tuple[str, bool, int]]:
        """(y axis type, whether the rule asks for log, active scale button) of each KL line plot."""
        out = []
        for fig in plotly_figures(page):
            if fig["layout"]["meta"]["metric"] == "kl":
                ys = [v for t in fig["data"] for v in t["y"] if v is not None]
                out.append((fig["layout"]["yaxis"]["type"], log_wanted("kl", ys), fig["layout"]["updatemenus"][-1]["active"]))
        return out

    def page_with(name: str, kl) -> Path:
        """The iterative page of a copy of the run whose Exp 2 rows have KL kl(row), and its
        layer and Exp 1 rows (drawn beside Exp 2) KLs within one decade."""
        copy = tmp_path / name
        copy.mkdir()
        for f in ("manifest.json", "pairs.json", "checks.json"):
            shutil.copy2(run_dir / f, copy / f)
        for exp in ("layer", "position", "iterative"):
            rows = read_rows(run_dir / exp / "results.jsonl")
            rows = [r | {"kl": kl(r) if exp == "iterative" else 0.3 + 0.01 * r["pair_id"]} for r in rows]
            (copy / exp).mkdir()
            (copy / exp / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            write_summary(copy / exp / "summary.json", rows, exp)
        (page,) = iterative_html(load_run(copy), tmp_path / f"{name}-figures")
        return page

    assert kl_axes(page_with("flat", lambda r: 0.2 + 0.1 * r["iteration"] + 0.01 * r["pair_id"])) == [("linear", False, 0)] * 2
    decay = page_with("decay", lambda r: 0.0 if (r["layer"], r["iteration"]) == (0, 3) else (0.5 + 0.01 * r["pair_id"]) * 100.0 ** -r["iteration"])
    assert kl_axes(decay) == [("log", True, 1)] * 2
    # layer 0's mean at iteration 3 is exactly 0: the log axis cannot draw it, and the title says so
    lines = next(f for f in plotly_figures(decay) if f["layout"]["meta"] == {"metric": "kl", "experiment": "iterative"})
    assert "1 mean exactly 0, not drawn on the log axis" in lines["layout"]["title"]["text"]


def test_per_pair_sheets_readable_at_report_width(run_dir, tmp_path):
    """13 pairs: two sheets a metric (12 + 1), each titled ≥ 10 px when shown 900 px wide."""
    from matplotlib.image import imread

    from thoughtpatch.report.figures import DPI, PAIR_TITLE_PT, PAIRS_PER_PAGE, PER_PAIR, position_per_pair
    from thoughtpatch.report.markdown import report
    from thoughtpatch.report.results import read_rows, write_summary
    from thoughtpatch.report.rundata import load_run

    copy = tmp_path / "many"
    copy.mkdir()
    for name in ("manifest.json", "checks.json"):
        shutil.copy2(run_dir / name, copy / name)
    pairs = json.loads((run_dir / "pairs.json").read_text())
    many = [p | {"pair_id": i} for i, p in zip(range(13), pairs * 5)]
    (copy / "pairs.json").write_text(json.dumps(many))
    for exp in ("layer", "position", "iterative"):
        rows = read_rows(run_dir / exp / "results.jsonl")
        by_pair = {p["pair_id"]: [r for r in rows if r["pair_id"] == p["pair_id"]] for p in pairs}
        new = [r | {"pair_id": q["pair_id"]} for q, p in zip(many, pairs * 5) for r in by_pair[p["pair_id"]]]
        (copy / exp).mkdir()
        (copy / exp / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in new))
        write_summary(copy / exp / "summary.json", read_rows(copy / exp / "results.jsonl"), exp)
    data = load_run(copy)
    paths = position_per_pair(data, copy / "figures")
    text = report(data, "position", {"position": paths})
    for metric in PER_PAIR:
        sheets = sorted((copy / "figures").glob(f"position_per_pair_{metric}_*.png"))
        assert [p.name for p in sheets] == [f"position_per_pair_{metric}_{i}.png" for i in (1, 2)]
        assert PAIRS_PER_PAGE <= 12
        for sheet in sheets:
            width = imread(sheet).shape[1]
            assert PAIR_TITLE_PT * DPI / 72 * 900 / width >= 10, (sheet.name, width)
            assert f"](../figures/{sheet.name})" in text and sheet in paths


def test_journal_and_inventory(run_dir):
    journal = (run_dir / JOURNAL).read_text()
    assert journal.count("<!-- entry: ") == 1
    assert "Exp 1 top cells by KL" in journal and "Iterative vs parallel" in journal
    inv = (run_dir / INVENTORY).read_text()
    listed = dict(re.findall(r"^\| `([^`]+)` \| [\d,]+ \| `([0-9a-f]{64})` \|", inv, re.M))
    on_disk = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file() and p.name != INVENTORY}
    assert set(listed) == on_disk
    for rel, sha in listed.items():
        assert hashlib.sha256((run_dir / rel).read_bytes()).hexdigest() == sha, rel


def test_report_from_results_alone_is_identical(run_dir, tmp_path):
    rebuilt_identically(run_dir, tmp_path)


def rebuilt_identically(run_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from thoughtpatch.cli import app

    copy = tmp_path / run_dir.name  # same directory name: the run id is name@start time
    for pattern in RESULT_FILES:
        for p in run_dir.glob(pattern):
            (copy / p.relative_to(run_dir)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, copy / p.relative_to(run_dir))
    r = CliRunner().invoke(app, ["report", str(copy)])
    assert r.exit_code == 0, r.output
    want, got = _outputs(run_dir), _outputs(copy)
    assert sorted(got) == sorted(want)
    for rel in want:
        assert got[rel] == want[rel], f"{rel} differs when rebuilt from results"
    assert not (copy / "clean_activations.safetensors").exists()


def test_journal_one_entry_per_run(tmp_path):
    path = tmp_path / JOURNAL
    a1 = "## 2026-01-01 · a\n<!-- entry: a@1 -->\nfirst\n<!-- /entry: a@1 -->\n"
    b = "## 2026-01-02 · b\n<!-- entry: b@2 -->\nother run\n<!-- /entry: b@2 -->\n"
    a2 = a1.replace("first", "regenerated")
    update_journal(path, a1, "a@1")
    update_journal(path, b, "b@2")
    update_journal(path, a2, "a@1")
    text = path.read_text()
    assert text.count("<!-- entry: a@1 -->") == 1 and text.count("<!-- entry: b@2 -->") == 1
    assert "regenerated" in text and "first" not in text
    assert text.index("a@1") < text.index("b@2")  # replaced in place, order kept
