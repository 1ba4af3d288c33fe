"""Figures and reports of the other grids, from tiny real runs: several sites in one run (attn
and the head grid) under a non-replace mode, attention knockout on both runs, causal tracing
on two sites; W&B keys name the site."""

from __future__ import annotations

import json
import re

import numpy as np

from tests.report.test_figures_reports import check_pages, check_reports, rebuilt_identically


def _manifest(run):
    return json.loads((run / "manifest.json").read_text())


def test_every_site_gets_its_figures_and_report_parts(sites_run):
    assert check_reports(sites_run) == ["position_patching.md", "iterative_patching.md", "layer_patching.md", "knockout.md"]
    pages = check_pages(sites_run)
    assert pages == sorted([f"{e}_{g}.html" for e in ("position", "iterative", "layer") for g in ("attn", "head")] + ["knockout_clean.html", "knockout_corrupted.html"])
    figures = {p.name for p in (sites_run / "figures").iterdir()}
    assert {"position_attn_heatmap_kl.png", "position_attn_heatmaps.png", "position_attn_per_pair_kl_1.png", "layer_attn_curve.png",
            "iterative_attn_trajectories.png", "comparison_attn_kl.png", "position_head_heatmap_kl.png", "position_head_heatmaps.png",
            "layer_head_heatmaps.png", "iterative_head_heatmap_kl.png"} <= figures
    assert not any(f.startswith(("position_heatmap", "layer_curve", "comparison_kl")) for f in figures)  # no resid grid here
    text = (sites_run / "reports" / "position_patching.md").read_text()
    for section in ("## Results", "## Figures", "## Top-5", "## Error analysis"):  # a part per site in each
        part = text.split(section)[1].split("\n## ")[0]
        assert part.count("### Site `attn`") == 1 and part.count("### Site `head`") == 1, section
        assert part.index("### Site `attn`") < part.index("### Site `head`")
    # the mode, its parameters and the pair-set statistics' n are in the methodology table
    stats_n = _manifest(sites_run)["mode"]["stats_n"]
    row = next(line for line in text.splitlines() if line.startswith("| mode |"))
    assert "noise" in row and "0.5" in row and f"n = {stats_n} pairs" in row and "site_stats.safetensors" in row
    assert "| sites | `attn`" in text and "`head` — head h's output" in text
    # the mode's parameters are settings, not metrics averaged over pairs
    summary = json.loads((sites_run / "position" / "summary.json").read_text())
    assert not {"noise_scale", "seed"} & set(summary["cells"][0]["metrics"])
    inventory = (sites_run / "DATA_INVENTORY.md").read_text()
    assert "| `site_stats.safetensors` |" in inventory and "pair-set statistics" in inventory
    assert re.search(r"\| `position/summary_correct.json` \|.*right on both sides only", inventory)
    journal = (sites_run / "research_journal.md").read_text()
    assert "Exp 1 [attn · noise (ν = 0.5, seed 0, n = 3)] top cells by KL" in journal and "Knockout [clean run" in journal


def test_head_grid_is_layers_by_heads(sites_run):
    from thoughtpatch.report.figures import _head_grids, head_sheet
    from thoughtpatch.report.rundata import load_run

    m = _manifest(sites_run)["model"]
    L, H, K = m["num_layers"], m["num_heads"], m["num_thoughts"]
    view = load_run(sites_run).only("position", "head")
    layers, heads, steps, G = _head_grids(view, "position", "kl")
    assert (layers, heads, steps) == (list(range(L)), list(range(H)), list(range(K)))
    assert G.shape == (K, L, H)
    l, h, k = L - 1, H - 1, K - 1
    assert G[k, l, h] == view.stat("position", view.key("position", loc=(l, h), thought=k), "kl")
    fig = head_sheet(view, "position", "kl")
    grids = [ax.images[0].get_array() for sub in fig.subfigs for ax in sub.axes if ax.images]
    assert len(grids) == K + 1 and all(g.shape == (L, H) for g in grids)  # a layer × head grid per thought, and the sum
    np.testing.assert_allclose(np.asarray(grids[-1]) * 10.0 ** _exponent(fig), np.nansum(G, axis=0), rtol=1e-12)
    shared = {(ax.images[0].norm.vmin, ax.images[0].norm.vmax) for ax in fig.subfigs[0].axes if ax.images}
    assert len(shared) == 1  # the per-thought grids share one colour scale
    report = (sites_run / "reports" / "position_patching.md").read_text()
    assert "| layer | head | thought 0 |" in report  # per-cell tables name layer and head
    assert "Σ over thoughts of the per-cell means" in (sites_run / "DATA_INVENTORY.md").read_text()


def _exponent(fig) -> int:
    """The power of ten the Σ panel's colour bar factors out (0 when none)."""
    label = fig.subfigs[1].axes[-1].get_ylabel()
    m = re.search(r"×10\$\^\{(-?\d+)\}\$", label)
    return int(m.group(1)) if m else 0


def test_knockout_heatmaps_per_run_name_the_readers(sites_run):
    from thoughtpatch.report.figures import _grid
    from thoughtpatch.report.rundata import load_run

    data = load_run(sites_run)
    m = _manifest(sites_run)["model"]
    assert data.groups("knockout") == ["clean", "corrupted"]
    for view in data.views("knockout"):
        assert view.grid_tag("knockout") == f" [{view.run} run · blocked readers: later thoughts + answer]"
        assert _grid(view, "kl", exp="knockout").shape == (m["num_layers"], m["num_thoughts"])  # L × K, no input row
        for metric in ("kl", "delta_logprob_diff", "away"):
            assert (sites_run / "figures" / f"knockout_{view.run}_heatmap_{metric}.png").is_file()
    text = (sites_run / "reports" / "knockout.md").read_text()
    assert "readers blocked: both" in text and "| readers blocked | both: the later thoughts and the answer positions |" in text
    assert "pre-softmax score → −inf" in text  # the methodology in DESIGN §8's words
    assert "### Knocked out in the clean run" in text and "### Knocked out in the corrupted run" in text
    assert "`knockout_without_readers`" in text and "moves away from the unpatched clean run's" in text


def test_trace_report_and_heatmaps_per_site(trace_run, tmp_path):
    assert check_reports(trace_run) == ["causal_tracing.md"]
    assert check_pages(trace_run) == ["trace.html", "trace_head.html"]
    figures = {p.name for p in (trace_run / "figures").iterdir()}
    for metric in ("kl", "logprob_clean", "restored", "flip"):
        assert {f"trace_heatmap_{metric}.png", f"trace_head_heatmap_{metric}.png"} <= figures
    assert {"trace_per_pair_delta_logprob_clean_1.png", "trace_heatmaps.png", "trace_head_heatmaps.png"} <= figures
    text = (trace_run / "reports" / "causal_tracing.md").read_text()
    assert "σ = 3 × the std of the embedding matrix" in text and "restored to the clean run's value" in text
    assert "### Site `resid`" in text and "### Site `head`" in text
    assert "#### restored share of log P(clean answer) (ratio of means)" in text and "#### flip-back rate (answer = clean run's again)" in text
    assert "flips back to the clean answer" in text and "gold corrupted" not in text
    assert "Causal tracing [head] top cells by restored" in (trace_run / "research_journal.md").read_text()
    rebuilt_identically(trace_run, tmp_path)


def test_wandb_keys_hold_the_site():
    from thoughtpatch.report.tracking import Tracker, cell_key

    base = {"pair_id": 3, "layer": 2, "thought": 1, "kl": 0.5, "flip": True}
    assert cell_key({"experiment": "position", **base}) == "layer_2/pos_1"  # the resid grid keeps the seed's keys
    assert cell_key({"experiment": "position", "site": "resid", **base}) == "layer_2/pos_1"
    assert cell_key({"experiment": "position", "site": "attn", **base}) == "attn/layer_2/pos_1"
    assert cell_key({"experiment": "position", "site": "head", "head": 1, **base}) == "head/layer_2/head_1/pos_1"
    assert cell_key({"experiment": "iterative", "site": "mlp", "layer": 0, "iteration": 4}) == "mlp/layer_0/iter_4"
    assert cell_key({"experiment": "layer", "site": "kv", "layer": 0}) == "kv/layer_0/all_pos"
    assert cell_key({"experiment": "knockout", "run": "corrupted", **base}) == "knockout/corrupted/layer_2/pos_1"
    assert cell_key({"experiment": "trace", "site": "resid", **base}) == "trace/layer_2/pos_1"
    assert cell_key({"experiment": "trace", "site": "head", "head": 0, **base}) == "trace/head/layer_2/head_0/pos_1"

    logged = []
    tracker = Tracker("disabled", None, {}, "")
    tracker.run = type("Run", (), {"log": lambda self, d: logged.append(d)})()
    tracker.log_pair([{"experiment": "position", "site": "attn", **base}, {"experiment": "knockout", "run": "clean", "delta_logprob_diff": -0.25, **base}])
    assert logged[-1] == {
        "pair_3/attn/layer_2/pos_1/kl_div": 0.5, "pair_3/attn/layer_2/pos_1/flip": 1.0,
        "pair_3/knockout/clean/layer_2/pos_1/kl_div": 0.5, "pair_3/knockout/clean/layer_2/pos_1/flip": 1.0,
        "pair_3/knockout/clean/layer_2/pos_1/delta_logprob_diff": -0.25,
    }


def test_wandb_summaries_of_every_experiment(sites_run, trace_run):
    from thoughtpatch.report.tracking import Tracker

    logged = []
    tracker = Tracker("disabled", None, {}, "")
    tracker.run = type("Run", (), {"log": lambda self, d: logged.append(d)})()
    for run in (sites_run, trace_run):
        for path in sorted(run.glob("*/summary.json")):
            doc = json.loads(path.read_text())
            tracker.log_summary(doc["experiment"], doc["cells"])
    keys = [k for d in logged for k in d]
    assert "aggregate/attn/layer_0/pos_0/mean_kl" in keys and "aggregate/head/layer_0/head_3/iter_1/recovered" in keys
    assert "aggregate/knockout/corrupted/layer_1/pos_1/mean_delta_logprob_diff" in keys
    assert "aggregate/trace/head/layer_2/head_1/pos_0/restored" in keys and "aggregate/trace/layer_input/pos_0/restored" in keys
    assert len(keys) == len(set(keys))
