"""The interactive pages in a real browser: Debian's headless Chromium driven by playwright
(never a downloaded browser build). Each page loads offline with no console error and no
request leaving the run directory, every plot draws SVG; hovering a heatmap cell shows mean,
interval and n; moving the slider shows another pair on the same colour scale.

Needs /usr/bin/chromium (Debian package `chromium`; `.ci/run` installs it) or $CHROMIUM. In
CI (CI=true, or THOUGHTPATCH_REQUIRE_BROWSER=1 as .ci/run sets) a missing browser fails the
test; elsewhere it skips, saying why."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAGES = ("position", "iterative", "layer")
# What a drawn plot holds in its SVG: a heatmap's image or a line's path.
DRAWN = "svg.main-svg .heatmaplayer image, svg.main-svg .scatterlayer .trace path"


def _require(ok: bool, why: str) -> None:
    if not ok:
        if os.environ.get("CI", "").lower() == "true" or os.environ.get("THOUGHTPATCH_REQUIRE_BROWSER") == "1":
            pytest.fail(why + " (required in CI: .ci/run installs Debian's chromium)")
        pytest.skip(why)


@pytest.fixture(scope="session")  # session, as run_dir: so it is set up (or skipped) first, by argument order
def browser(tmp_path_factory):
    _require(CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK), f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _require(False, "the python package playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), args=ARGS, headless=True,
            offline=True, viewport={"width": 1280, "height": 900},
        )
        yield ctx
        ctx.close()


def _open(browser, path: Path):
    """Open a page; returns it with the console errors and the requests that left the run dir."""
    page = browser.new_page()
    errors, outside = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    root = path.parent.parent.resolve().as_uri()

    local = lambda url: url.startswith((root + "/", "data:", "blob:"))  # noqa: E731
    page.on("request", lambda r: None if local(r.url) else outside.append(r.url))
    page.route("**/*", lambda r: r.continue_() if local(r.request.url) else r.abort())
    page.goto(path.resolve().as_uri())
    n = len(re.findall(r"Plotly\.newPlot\(", path.read_text(encoding="utf-8")))
    page.wait_for_function(f"[...document.querySelectorAll('.js-plotly-plot')].filter(d => d.querySelector({DRAWN!r})).length === {n}", timeout=30_000)
    return page, errors, outside, n


def test_pages_load_offline_and_draw(browser, run_dir):
    for name in PAGES:
        page, errors, outside, n = _open(browser, run_dir / "figures" / f"{name}.html")
        assert n > 3
        drawn = page.evaluate(f"() => [...document.querySelectorAll('.js-plotly-plot')].map(d => d.querySelectorAll({DRAWN!r}).length)")
        assert len(drawn) == n and all(k > 0 for k in drawn), (name, drawn)
        assert errors == [], (name, errors)
        assert outside == [], (name, outside)
        page.close()


def _state(page) -> dict:
    return page.evaluate(
        """() => { const g = document.getElementById('fig0');
        return {active: g._fullLayout.sliders[0].active,
                shown: g._fullData.filter(t => t.visible === true && t.type === 'heatmap').map(t => t.name),
                title: g._fullLayout.title.text,
                cmin: g._fullLayout.coloraxis.cmin, cmax: g._fullLayout.coloraxis.cmax,
                ticks: [...g.querySelectorAll('.colorbar .cbaxis text, .colorbar text')].map(e => e.textContent)}; }"""
    )


def _hover_cell(page, row: int, col: int, rows: int, cols: int) -> str:
    """Move the mouse onto one heatmap cell (row 0 = bottom) and return the hover box's text."""
    box = page.locator("#fig0 .nsewdrag").first.bounding_box()
    page.mouse.move(0, 0)
    page.mouse.move(box["x"] + box["width"] * (col + 0.5) / cols, box["y"] + box["height"] * (1 - (row + 0.5) / rows))
    page.wait_for_selector("#fig0 .hoverlayer .hovertext", timeout=10_000)
    return page.locator("#fig0 .hoverlayer .hovertext").first.text_content()


def test_heatmap_hover_and_slider(browser, run_dir):
    summary = json.loads((run_dir / "position" / "summary.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    pairs = json.loads((run_dir / "pairs.json").read_text())
    rows, cols = len(manifest["layers"]), len(manifest["thoughts"])
    page, errors, _, _ = _open(browser, run_dir / "figures" / "position.html")

    # fig0 is the KL heatmap; its bottom-left cell is (input, thought 0)
    text = _hover_cell(page, 0, 0, rows, cols)
    cell = next(c for c in summary["cells"] if c["layer"] == "input" and c["thought"] == 0)["metrics"]["kl"]
    assert f"mean {cell['mean']:.4g}" in text, text
    assert f"95 % CI: bootstrap [{cell['ci_low']:.4g}, {cell['ci_high']:.4g}]" in text, text
    assert f"n = {cell['n']}" in text, text

    before = _state(page)
    assert before["active"] == 0 and before["shown"] == ["mean"] and before["ticks"]
    # drag the slider's grip to the third step (pair 1): press on the grip, release over the step's label
    label = page.locator("#fig0 .slider-label-group text").nth(2)
    assert label.text_content() == f"pair {pairs[1]['pair_id']}"
    grip = page.locator("#fig0 .slider-grip-rect").bounding_box()
    target = label.bounding_box()
    page.mouse.move(grip["x"] + grip["width"] / 2, grip["y"] + grip["height"] / 2)
    page.mouse.down()
    page.mouse.move(target["x"] + target["width"] / 2, grip["y"] + grip["height"] / 2, steps=8)
    page.mouse.up()
    page.wait_for_function("document.getElementById('fig0')._fullLayout.sliders[0].active === 2", timeout=10_000)
    after = _state(page)
    assert after["shown"] == [f"pair {pairs[1]['pair_id']}"] and pairs[1]["clean"]["question"][:20] in after["title"]
    assert (after["cmin"], after["cmax"], after["ticks"]) == (before["cmin"], before["cmax"], before["ticks"])  # same colour scale
    text = _hover_cell(page, 0, 0, rows, cols)
    assert f"pair {pairs[1]['pair_id']}" in text and "patched answer" in text and f"(answer {pairs[1]['corrupted']['answer']})" in text, text
    assert errors == []
    page.close()


def test_new_grid_pages_load_draw_and_hover(browser, sites_run, trace_run):
    """The knockout page (one run's L × K grid) and the head site's causal-tracing page."""
    summary = json.loads((sites_run / "knockout" / "summary.json").read_text())
    manifest = json.loads((sites_run / "manifest.json").read_text())
    rows, cols = manifest["model"]["num_layers"], len(manifest["thoughts"])
    page, errors, outside, n = _open(browser, sites_run / "figures" / "knockout_clean.html")
    assert n >= 4 and outside == []
    text = _hover_cell(page, 0, 0, rows, cols)  # fig0: KL, bottom-left = (block 0, thought 0)
    cell = next(c for c in summary["cells"] if c["run"] == "clean" and c["layer"] == 0 and c["thought"] == 0)["metrics"]["kl"]
    assert f"mean {cell['mean']:.4g}" in text and f"[{cell['ci_low']:.4g}, {cell['ci_high']:.4g}]" in text and f"n = {cell['n']}" in text, text
    assert errors == []
    page.close()
    page, errors, outside, n = _open(browser, trace_run / "figures" / "trace_head.html")
    drawn = page.evaluate(f"() => [...document.querySelectorAll('.js-plotly-plot')].map(d => d.querySelectorAll({DRAWN!r}).length)")
    assert len(drawn) == n and all(k > 0 for k in drawn) and errors == [] and outside == []
    page.close()
