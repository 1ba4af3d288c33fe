"""Modes (replace, zero, mean, resample, add, noise) and causal tracing: each means what DESIGN
§8 says, on both families, and the batched engine equals the reference for every mode."""

from __future__ import annotations

import math

import pytest
import torch

from tests.rows import assert_rows_close as _close
from tests.tiny import load_tiny
from thoughtpatch.data.schema import Pair, Problem
from thoughtpatch.model import INPUT, Site
from thoughtpatch.patching.engine import BatchedEngine, Patch, ReferenceEngine, Variant
from thoughtpatch.patching.experiments import Spec, all_layers, pair_runs, patch_pair, site_at, trace_runs
from thoughtpatch.patching.modes import Mode, ModeContext, SiteStats, noise_for

QS = [
    ("tom has 3 apples and he buys 5 more . how many apples has tom ?", 8, "tom has 4 apples and he buys 5 more . how many apples has tom ?", 9),
    ("tom has 7 apples and he buys 2 more . how many apples has tom ?", 9, "tom has 7 apples and he buys 3 more . how many apples has tom ?", 10),
    ("he has 12 apples and tom buys 5 more . how many apples has he ?", 17, "he has 10 apples and tom buys 5 more . how many apples has he ?", 15),
]
PAIRS = [Pair(i, Problem(a, x), Problem(b, y)) for i, (a, x, b, y) in enumerate(QS)]


@pytest.fixture(scope="module", params=["codi-llama", "coconut-gpt2"])
def model(request, tmp_path_factory):
    return load_tiny(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def runs(model):
    return [pair_runs(model, p, max_new_tokens=6) for p in PAIRS]


@pytest.fixture(scope="module")
def stats(runs):
    return SiteStats.of([r.corrupted.acts for r in runs], [r.clean.acts for r in runs])


def _spec(model, site="resid", mode=Mode(), layers=None) -> Spec:
    return Spec(site, tuple(layers or all_layers(model)), tuple(range(model.num_thoughts)), mode=mode)


def _one(model, runs, site: Site, mode: Mode, stats=None, partner=None, record=("resid", INPUT)):
    ctx = ModeContext(mode, stats=stats)
    value, how = ctx.value(model, site, runs.clean.acts, runs.corrupted.acts, partner.corrupted.acts if partner else None, runs.pair.pair_id)
    (ro,) = ReferenceEngine(model).run(runs.corrupted_prompt, [Variant((Patch(site, value, how),))], runs.target, record=record)
    return ro, value


def test_zero_writes_zeros(model, runs):
    r = runs[0]
    ro, _ = _one(model, r, Site("resid", 1, 2), Mode("zero"))
    assert torch.count_nonzero(ro.resid[2, 1]) == 0 and torch.count_nonzero(r.corrupted.resid[2, 1]) > 0
    ro, _ = _one(model, r, Site(INPUT, thought=1), Mode("zero"))
    assert torch.count_nonzero(ro.inputs[1]) == 0


def test_mean_is_the_mean_of_the_receiving_runs(model, runs, stats):
    site = Site("mlp", 2, 1)
    ro, value = _one(model, runs[0], site, Mode("mean"), stats=stats, record=("mlp",))
    want = torch.stack([model.site_value(r.corrupted.acts, site) for r in runs]).mean(0)
    assert torch.allclose(value, want, atol=1e-6) and stats.n == len(runs)
    assert torch.allclose(model.site_value(ro.acts, site), want, atol=1e-6)


def test_resample_takes_the_recorded_partner(model, runs):
    spec = _spec(model, mode=Mode("resample"))
    out = patch_pair(BatchedEngine(model), runs[0], ["position"], spec, partner=runs[1])["position"]
    assert all(row["resample_pair"] == 1 and row["mode"] == "resample" for row in out)
    site = Site("resid", 0, 3)
    ro, value = _one(model, runs[0], site, Mode("resample"), partner=runs[1])
    assert torch.equal(value, model.site_value(runs[1].corrupted.acts, site))
    assert torch.equal(ro.resid[3, 0], runs[1].corrupted.resid[3, 0])


def test_add_with_alpha_zero_is_a_no_op(model, runs, stats):
    for vector in ("diff",):
        ro, _ = _one(model, runs[0], Site("attn", 1, 1), Mode("add", alpha=0.0, vector=vector), stats=stats)
        assert torch.equal(ro.decision_logits, runs[0].corrupted.decision_logits)
    ro, v = _one(model, runs[0], Site("resid", 1, 1), Mode("add", alpha=2.0, vector="diff"), stats=stats)
    want = 2.0 * (stats.mean_source["resid"][1, 1] - stats.mean_receiving["resid"][1, 1])
    assert torch.allclose(v, want) and not torch.equal(ro.decision_logits, runs[0].corrupted.decision_logits)


def test_add_reads_vectors_from_a_file(model, runs, tmp_path):
    from safetensors.torch import save_file

    from thoughtpatch.errors import ThoughtpatchError

    v = torch.randn(model.hidden_size)
    save_file({"resid.1.2": v}, str(tmp_path / "v.safetensors"))
    ctx = ModeContext(Mode("add", alpha=0.5, vector=str(tmp_path / "v.safetensors")), vectors=ModeContext.load_vectors(tmp_path / "v.safetensors"))
    value, how = ctx.value(model, Site("resid", 1, 2), runs[0].clean.acts, runs[0].corrupted.acts, None, 0)
    assert how == "add" and torch.equal(value, 0.5 * v)
    with pytest.raises(ThoughtpatchError, match="no vector for site key 'resid.0.2'"):
        ctx.value(model, Site("resid", 0, 2), runs[0].clean.acts, runs[0].corrupted.acts, None, 0)


def test_noise_scale_zero_is_a_no_op_and_a_seed_reproduces(model, runs, stats):
    site = Site("resid", 2, 0)
    ro, _ = _one(model, runs[0], site, Mode("noise", noise_scale=0.0), stats=stats)
    assert torch.equal(ro.decision_logits, runs[0].corrupted.decision_logits)
    a, va = _one(model, runs[0], site, Mode("noise", noise_scale=1.0, seed=3), stats=stats)
    b, vb = _one(model, runs[0], site, Mode("noise", noise_scale=1.0, seed=3), stats=stats)
    assert torch.equal(va, vb) and torch.equal(a.decision_logits, b.decision_logits)
    assert not torch.equal(va, _one(model, runs[0], site, Mode("noise", noise_scale=1.0, seed=4), stats=stats)[1])
    assert not torch.equal(noise_for(3, 0, site, (4,)), noise_for(3, 1, site, (4,)))
    sigma = float(stats.spread["resid"][0, 2])
    assert sigma > 0 and abs(float(va.std()) / sigma - 1) < 0.5  # σ = ν × the site's spread


# Every mode on resid, and each mode on one of the other hook kinds (head: inside attention;
# kv: the cache): how a site receives its value is the same code for every mode, and
# tests/patching/test_sites.py compares every site kind's whole grid with the reference engine;
# here the other kinds patch the last block's grid (every head, every thought).
@pytest.mark.parametrize(
    "mode, site",
    [(m, "resid") for m in ("zero", "mean", "resample", "add", "noise")]
    + [("zero", "head"), ("mean", "kv"), ("resample", "head"), ("add", "kv"), ("noise", "head"), ("noise", "kv")],
)
def test_batched_equals_reference_every_mode(model, runs, stats, mode, site):
    m = Mode(mode, vector="diff" if mode == "add" else None)
    ctx = ModeContext(m, stats=stats)
    exps = ["layer", "position", "iterative"]
    spec = _spec(model, site, m, layers=None if site == "resid" else (model.num_layers - 1,))
    bat = patch_pair(BatchedEngine(model), runs[0], exps, spec, ctx, partner=runs[1])
    ref = patch_pair(ReferenceEngine(model), runs[0], exps, spec, ctx, partner=runs[1])
    for e in exps:
        assert all(r["mode"] == mode for r in bat[e])
        _close(bat[e], ref[e])


# ---------------------------------------------------------------- causal tracing


def test_trace_with_zero_noise_changes_nothing(model):
    tr = trace_runs(model, PAIRS[0], scale=0.0, max_new_tokens=6)
    assert torch.equal(tr.corrupted.decision_logits, tr.clean.decision_logits)
    assert tr.corrupted.answer.token_ids == tr.clean.answer.token_ids
    rows = patch_pair(BatchedEngine(model), tr, ["trace"], _spec(model))["trace"]
    assert all(r["kl"] <= 1e-6 and r["flip"] for r in rows)


def test_trace_noise_lands_on_number_tokens_only(model):
    tr = trace_runs(model, PAIRS[0], max_new_tokens=6)
    noise = tr.corrupted_prompt.noise
    noisy = [i for i in range(noise.shape[0]) if noise[i].abs().sum() > 0]
    words = [model.tokenizer.decode([t]) for t in tr.clean_ids]
    assert noisy and all(any(c.isdigit() for c in words[i]) for i in noisy)
    again = trace_runs(model, PAIRS[0], max_new_tokens=6)
    assert torch.equal(again.corrupted_prompt.noise, noise)  # seeded


def test_trace_restoring_every_thought_site_gives_the_clean_thoughts(model):
    tr = trace_runs(model, PAIRS[0], max_new_tokens=6)
    sites = [site_at("resid", loc, k) for k in range(model.num_thoughts) for loc in all_layers(model)]
    v = Variant(tuple(Patch(s, model.site_value(tr.clean.acts, s)) for s in sites))
    (ro,) = ReferenceEngine(model).run(tr.corrupted_prompt, [v], tr.target)
    assert torch.equal(ro.resid, tr.clean.resid) and torch.equal(ro.inputs, tr.clean.inputs)
    bat = patch_pair(BatchedEngine(model), tr, ["trace"], _spec(model))["trace"]
    ref = patch_pair(ReferenceEngine(model), tr, ["trace"], _spec(model))["trace"]
    for ra, rb in zip(bat, ref, strict=True):
        assert abs(ra["kl"] - rb["kl"]) <= 1e-5 and ra["answer"] == rb["answer"] or (math.isnan(ra["answer"]) and math.isnan(rb["answer"]))
    assert {"restored", "logprob_clean", "flip"} <= set(bat[0])
