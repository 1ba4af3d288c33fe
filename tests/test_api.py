"""The Python API (DESIGN §9): the same engine and numbers as the CLI, short reprs, patches by
hand equal to the engine's."""

from __future__ import annotations

import json
import math
import pytest
import torch

import thoughtpatch as tp
from tests.conftest import run_cli
from tests.rows import assert_rows_close
from thoughtpatch.patching.engine import BatchedEngine, Patch, ReferenceEngine, Variant
from thoughtpatch.patching.experiments import pair_runs

EXPS = ["layer", "position", "iterative"]


@pytest.fixture(scope="module")
def toy():
    return tp.load("toy")


@pytest.fixture(scope="module")
def api_run(toy):
    return tp.run(toy, tp.load_pairs("toy")[:5], experiments=EXPS)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`thoughtpatch run --test-mode` on the organism: (run directory, what it printed on stderr)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    r = run_cli("run", "--test-mode", "--out", str(out), "--wandb", "disabled", "--no-report")
    assert r.returncode == 0, r.stderr
    return out, r.stderr


@pytest.fixture(scope="module")
def cli_dir(cli_run):
    return cli_run[0]


def test_import_and_reprs_are_short(toy, api_run):
    shown = str(toy)  # what print(tp.load("toy")) shows
    assert len(shown.splitlines()) == 1 and shown.startswith("ThoughtModel('toy'")
    for obj in (toy, tp.load_pairs("toy"), toy.run("tom has 3 apples . how many apples ?"), api_run):
        text = repr(obj)
        assert "\n" not in text and len(text) < 250 and "tensor(" not in text, text


def test_api_equals_cli_and_open_run(api_run, cli_dir):
    """tp.run on the first 5 pairs ≡ `thoughtpatch run --test-mode` ≡ tp.open_run(cli_dir),
    every metric of every row (one engine, one code path)."""
    cli = tp.open_run(cli_dir)
    assert cli.experiments == api_run.experiments == EXPS
    for exp in EXPS:
        a = api_run.to_pandas(exp).to_dict("records")
        b = cli.to_pandas(exp).to_dict("records")
        # the command and tp.run add in the same order (same shapes, same threads): equal
        assert_rows_close(a, b, tol=1e-6)
        assert_rows_close(a, api_run.data.rows[exp], tol=0.0)
    g1, g2 = api_run.grid("position", "kl"), cli.grid("position", "kl")
    assert g1.shape == (5, 6) and list(g1.index) == ["input", 0, 1, 2, 3] and (g1 - g2).abs().max().max() <= 1e-6
    assert set(cli.checks["verdict"]) <= {"pass", "warn", "fail", "info"} and len(cli.checks) == len(api_run.checks)


def test_no_baseline_warning_on_the_organisms_own_pairs(cli_run):
    """The organism solves its own pairs: the baseline gate (tests/test_keep.py) stays quiet."""
    out, err = cli_run
    assert "WARNING" not in err
    checks = {c["name"]: c for c in json.loads((out / "checks.json").read_text())["checks"]}
    assert checks["baseline_accuracy_clean"]["verdict"] == "pass"


def test_results_tables(api_run, tmp_path):
    df = api_run.to_pandas("position")
    assert len(df) == 5 * 5 * 6 and {"pair_id", "site", "layer", "thought", "kl", "recovered", "flip"} <= set(df.columns)
    s = api_run.summary("position")
    assert len(s) == 30 and {"kl", "kl_ci_low", "kl_ci_high", "kl_ci_method", "flip_n"} <= set(s.columns)
    lo, mean, hi = (api_run.grid("position", "kl", what) for what in ("ci_low", "mean", "ci_high"))
    assert ((lo <= mean + 1e-12) & (mean <= hi + 1e-12)).all().all()
    assert (api_run.grid("position", "kl", "n") == 5).all().all()
    fig = api_run.plot("position", "kl")
    assert type(fig).__name__ == "Figure" and fig.axes
    out = api_run.save(tmp_path / "saved", report=False)
    back = tp.open_run(out)
    assert_rows_close(back.to_pandas("iterative").to_dict("records"), api_run.data.rows["iterative"], tol=0.0)
    assert not (out / "reports").exists()
    with pytest.raises(tp.ThoughtpatchError, match="no 'knockout' results"):
        api_run.to_pandas("knockout")


def test_save_writes_the_clis_figures_and_reports(toy, tmp_path):
    """`.save` draws what the CLI draws (the same code at any size: here a small run, two
    pairs and one experiment, is quick to draw)."""
    out = tp.run(toy, tp.load_pairs("toy")[:2], experiments=["layer"]).save(tmp_path / "saved")
    assert (out / "reports" / "layer_patching.md").is_file() and (out / "figures" / "layer_curve.png").is_file()
    assert tp.open_run(out).experiments == ["layer"]


@pytest.mark.parametrize("site", [tp.Site("input", thought=3), tp.Site("resid", layer=2, thought=3)])
def test_patch_by_hand_equals_the_engine(toy, site):
    pair = tp.load_pairs("toy")[0]
    runs = pair_runs(toy, pair)
    value = toy.site_value(runs.clean.acts, site)
    variant = [Variant((Patch(site, value),))]
    (ro,) = ReferenceEngine(toy).run(runs.corrupted_prompt, variant, runs.target)
    tr = toy.run(pair.corrupted.question, patches={site: value})
    logits = tr.logits_after(list(runs.target.clean[: runs.target.decision]))
    assert (logits - ro.decision_logits).abs().max() <= 1e-6  # one run alone, the same shapes
    # the batched engine runs it beside its prefix row: other GEMM shapes, fp32 rounding
    (bat,) = BatchedEngine(toy).run(runs.corrupted_prompt, variant, runs.target)
    assert (logits - bat.decision_logits).abs().max() <= 1e-5
    assert tr.answer == ro.answer.number and tr.patched == (site,)
    assert torch.equal(tr[site], value.float())  # the patched value is what the run holds
    plain = toy.run(pair.corrupted.question)
    assert not torch.equal(plain[site], tr[site])


def test_patches_are_checked(toy):
    q = "tom has 3 apples . how many apples ?"
    with pytest.raises(tp.ThoughtpatchError, match="shape"):
        toy.run(q, patches={tp.Site("resid", layer=0, thought=0): torch.zeros(3)})
    with pytest.raises(tp.ThoughtpatchError, match="layer 9 out of range"):
        toy.run(q, patches={tp.Site("resid", layer=9, thought=0): torch.zeros(toy.hidden_size)})
    with pytest.raises(tp.ThoughtpatchError, match="no layer"):
        tp.Site("input", layer=1, thought=0)
    zeroed = toy.run(q, patches={tp.Site("attn", layer=1, thought=2): lambda a: a * 0})
    assert torch.count_nonzero(zeroed.attn[2, 1]) == 0 and zeroed.head.shape == (6, 4, 4, 32)


def test_trace_exposes_every_site(toy):
    tr = toy.run("tom has 3 apples . he buys 5 more . how many apples has tom ?")
    k, n_layers, h = toy.num_thoughts, toy.num_layers, toy.hidden_size
    assert tr.thoughts.shape == (k, h) and tr.resid.shape == (k, n_layers, h) and tr.kv.shape == (k, n_layers, 2, 2, 32)
    assert math.isfinite(tr.answer) and tr.text
    lens = tr.lens(top=3)
    assert list(lens.index) == ["<bot>", *[f"thought {i}" for i in range(k)]] and list(lens.columns[:2]) == ["top1", "p1"]


def test_run_options_are_the_clis(toy):
    pairs = tp.load_pairs("toy")[:2]
    with pytest.raises(tp.ThoughtpatchError, match="unknown option"):
        tp.run(toy, pairs, experiments=["position"], colour="red")
    with pytest.raises(tp.ThoughtpatchError, match="--site"):
        tp.run(toy, pairs, experiments=["position"], site="neuron")
    res = tp.run(toy, pairs, experiments=["position", "knockout"], site="attn,mlp", layers="0-1", thoughts="3-4", keep="correct")
    assert res.sites == ["attn", "mlp"] and len(res.to_pandas("position")) == 2 * 2 * 2 * 2
    assert res.grid("position", "kl", site="mlp").shape == (2, 2) and res.grid("knockout", "kl").shape == (2, 2)
    assert len(res.dropped.columns) >= 1
