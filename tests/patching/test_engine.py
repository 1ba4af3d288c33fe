"""The batched engine against the reference engine, and the experiments' null checks."""

from __future__ import annotations

import math

import pytest
import torch

from tests.rows import assert_rows_close as _close
from tests.tiny import make_tiny_codi
from thoughtpatch.data.schema import Pair, Problem
from thoughtpatch.model import INPUT, load_model
from thoughtpatch.patching.engine import BatchedEngine, Patch, ReferenceEngine, Variant, _distinct
from thoughtpatch.patching.experiments import Spec, all_layers, iterative_patching, layer_patching, pair_runs, patch_pair, position_patching, site_at
from thoughtpatch.model.kvcache import grows
from thoughtpatch.model.runtime import Site

PAIR = Pair(
    0,
    Problem("tom has 3 apples and he buys 5 more . how many apples has tom ?", 8),
    Problem("tom has 4 apples and he buys 5 more . how many apples has tom ?", 9),
)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tmp_path_factory):
    ckpt, base = make_tiny_codi(tmp_path_factory.mktemp(request.param), request.param)
    return load_model(ckpt, base=base)


@pytest.fixture(scope="module")
def runs(model):
    return pair_runs(model, PAIR, max_new_tokens=8)


# Each experiment in its own engine call, noising. Denoising: every experiment in one call,
# test_all_experiments_in_one_call_equal_reference below (and every site, test_sites.py).
@pytest.mark.parametrize("direction", ["noising"])
def test_batched_equals_reference(model, runs, direction):
    layers, thoughts = all_layers(model), list(range(model.num_thoughts))
    ref, bat = ReferenceEngine(model), BatchedEngine(model)
    _close(position_patching(bat, runs, layers, thoughts, direction), position_patching(ref, runs, layers, thoughts, direction))
    _close(layer_patching(bat, runs, layers, thoughts, direction), layer_patching(ref, runs, layers, thoughts, direction))
    _close(iterative_patching(bat, runs, layers, model.num_thoughts, direction), iterative_patching(ref, runs, layers, model.num_thoughts, direction))


def test_prefix_reuse_skips_the_blocks_below_the_first_patch(model, runs):
    """A variant joining at thought k with its first patch at block l takes its prefix row's
    blocks below l at k (and their keys and values) instead of computing them: block 0 sees
    fewer rows, and every metric is what the engine gives without reuse. A transformers
    without per-layer cache objects (4.52) cannot join rows part-way: there the engine
    computes every block, and says so by computing as many rows as without reuse."""
    layers, thoughts = all_layers(model), list(range(model.num_thoughts))
    seen = []
    hook = model.blocks[0].register_forward_hook(lambda mod, args, out: seen.append((out[0] if isinstance(out, tuple) else out).shape[0]))
    try:
        rows = {}
        for reuse in (False, True):
            seen.clear()
            rows[reuse] = position_patching(BatchedEngine(model, reuse=reuse), runs, layers, thoughts)
            rows[reuse, "block0"] = sum(seen)
    finally:
        hook.remove()
    _close(rows[True], rows[False])
    if grows(model.encode(runs.clean_ids).cache):
        assert rows[True, "block0"] < rows[False, "block0"], (rows[True, "block0"], rows[False, "block0"])
    else:
        assert rows[True, "block0"] == rows[False, "block0"]


def test_small_batches_equal_one_batch(model, runs):
    layers, thoughts = all_layers(model), list(range(model.num_thoughts))
    _close(position_patching(BatchedEngine(model, max_batch=3), runs, layers, thoughts), position_patching(BatchedEngine(model), runs, layers, thoughts))


def test_iteration0_equals_exp1(model, runs):
    layers = all_layers(model)
    exp1 = {r["layer"]: r for r in position_patching(ReferenceEngine(model), runs, layers, [0])}
    exp2 = [r for r in iterative_patching(ReferenceEngine(model), runs, layers, model.num_thoughts) if r["iteration"] == 0]
    for r in exp2:
        e = exp1[r["layer"]]
        for k in ("kl", "kl_to_clean", "answer_logit_diff", "logprob_diff", "answer", "flip"):
            assert r[k] == e[k] or (isinstance(r[k], float) and math.isnan(r[k]) and math.isnan(e[k]))


def test_self_patch_changes_nothing(model, runs):
    """Corrupted activations into the corrupted run, at every single site: exactly no effect."""
    ids, receiving = runs.corrupted_ids, runs.corrupted
    variants = [
        Variant((Patch(site_at("resid", l, k), receiving.inputs[k] if l == INPUT else receiving.resid[k, l]),))
        for k in range(model.num_thoughts)
        for l in all_layers(model)
    ]
    for ro in ReferenceEngine(model).run(ids, variants, runs.target):
        assert torch.equal(ro.decision_logits, receiving.decision_logits)
        assert ro.answer.token_ids == receiving.answer.token_ids


def test_all_sites_clean_reproduces_clean_thoughts(model, runs):
    """Every thought site patched with clean: the thoughts *are* the clean thoughts; and with
    the clean prompt too, the whole run is the clean run."""
    sites = [(l, k) for k in range(model.num_thoughts) for l in all_layers(model)]
    v = Variant(tuple(Patch(site_at("resid", l, k), runs.clean.inputs[k] if l == INPUT else runs.clean.resid[k, l]) for l, k in sites))
    (ro,) = ReferenceEngine(model).run(runs.corrupted_ids, [v], runs.target)
    assert (ro.resid - runs.clean.resid).abs().max() == 0
    assert (ro.inputs - runs.clean.inputs).abs().max() == 0
    (ro2,) = ReferenceEngine(model).run(runs.clean_ids, [v], runs.target)
    assert torch.equal(ro2.decision_logits, runs.clean.decision_logits)
    assert ro2.answer.token_ids == runs.clean.answer.token_ids


def test_input_row_is_layer_rows_shifted(model, runs):
    """Patching the input of thought k+1 with clean equals patching the output that makes it
    (last layer of thought k) only through z_{k+1}: the fed vectors agree exactly."""
    ref = ReferenceEngine(model)
    k = 1
    last = model.num_layers - 1
    (a,) = ref.run(runs.corrupted_ids, [Variant((Patch(Site(INPUT, thought=k + 1), runs.clean.inputs[k + 1]),))], runs.target)
    (b,) = ref.run(runs.corrupted_ids, [Variant((Patch(Site("resid", last, k), runs.clean.resid[k, last]),))], runs.target)
    assert torch.allclose(a.inputs[k + 1], b.inputs[k + 1], atol=1e-6)


def test_out_of_memory_halves_the_batch(model, runs, monkeypatch):
    """A CUDA OOM on a big batch is retried with half its positions; the results do not change."""
    layers, thoughts = all_layers(model), list(range(model.num_thoughts))
    want = position_patching(BatchedEngine(model), runs, layers, thoughts)
    engine = BatchedEngine(model)
    real = BatchedEngine._run_chunk
    sizes = []

    def flaky(self, ids, *rest):
        sizes.append(len(ids))
        if len(ids) > 5:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, ids, *rest)

    monkeypatch.setattr(BatchedEngine, "_run_chunk", flaky)
    _close(position_patching(engine, runs, layers, thoughts), want)
    n = len(want)
    # 16 variants + the prefix row → 8 rows (7 variants) → 3 variants a batch; the budget stays halved
    assert sizes[:3] == [n, 7, 3] and all(s <= 3 for s in sizes[3:]) and sum(sizes[2:]) == n
    seq = len(runs.corrupted_ids) + model.num_thoughts + len(runs.target.clean) + len(runs.target.corrupted)
    assert engine.max_tokens == 4 * seq  # halved twice from what the first batch held


def test_all_experiments_in_one_call_equal_reference(model, runs):
    """One engine call for all three experiments (as `thoughtpatch run`): the duplicate
    variants (Exp 2 iteration 0 = Exp 1 thought 0) run once and read out like the rest."""
    layers, thoughts = all_layers(model), list(range(model.num_thoughts))
    exps = ["layer", "position", "iterative"]
    bat = patch_pair(BatchedEngine(model), runs, exps, Spec("resid", tuple(layers), tuple(thoughts)))
    ref = patch_pair(ReferenceEngine(model), runs, exps, Spec("resid", tuple(layers), tuple(thoughts)))
    for e in exps:
        _close(bat[e], ref[e])


def test_identical_variants_run_once(model, runs):
    a = runs.clean.resid[0, 1]
    v = Variant((Patch(Site("resid", 1, 0), a),))
    chain = Variant((Patch(Site("resid", 1, 1), None, from_variant=1),))
    distinct, index = _distinct([v, Variant((Patch(Site("resid", 1, 0), runs.clean.resid[0, 1]),)), chain, Variant((Patch(Site("resid", 1, 0), a.clone()),))])
    # the same view runs once (and the chain's reference follows it); an equal copy runs again
    assert index == [0, 0, 1, 2] and distinct[1].patches[0].from_variant == 0
    out = BatchedEngine(model).run(runs.corrupted_ids, [v, v, chain], runs.target)
    assert out[0] is out[1]
    with pytest.raises(ValueError, match="variant 0 refers to variant 1"):
        _distinct([Variant((Patch(Site("resid", 1, 1), None, from_variant=1),)), v])


def test_readout_decode_equals_plain_generate(model, runs):
    """The read-out decodes from the logits of its own <eot> step: same tokens as CODI's
    decode from scratch."""
    st = model.think(model.encode(runs.corrupted_ids), record_logits=False)
    gens, _ = model.generate(st, max_new_tokens=8)
    assert runs.corrupted.answer.token_ids == gens[0].token_ids


def test_readouts_carry_their_own_distributions():
    """A batch's read-outs get each row's log-softmax and probabilities computed for the batch
    at once: each row's own (not a neighbour's), and a read-out rebuilt with other logits
    computes its own again; KL from them is the definition's."""
    import dataclasses

    from thoughtpatch.model.synthetic import SHAPES, question, random_codi
    from thoughtpatch.patching import metrics as M
    from thoughtpatch.patching.engine import Target

    model = random_codi(SHAPES["tiny"])  # its answers move with a patch (the tiny CODI's barely do)
    v = 10 * torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(0))
    site = site_at("resid", 0, 0)
    ros = BatchedEngine(model).run(model.prompt_ids(question(20, 3, seed=1)), [Variant(), Variant((Patch(site, v),)), Variant((Patch(site, -v),))], Target.for_answers(model, 3, 7))
    lps = [torch.log_softmax(ro.decision_logits.float(), -1) for ro in ros]
    for i, ro in enumerate(ros):
        assert torch.allclose(ro.log_probs(), lps[i], atol=1e-6) and torch.allclose(ro.probs(), lps[i].exp(), atol=1e-7)
        assert all((ro.log_probs() - lps[j]).abs().max() > 1e-4 for j in range(3) if j != i)  # rows differ: a swap would show
        other = dataclasses.replace(ro, decision_logits=ro.decision_logits.flip(-1))
        assert torch.allclose(other.log_probs(), lps[i].flip(-1), atol=1e-6) and torch.allclose(other.probs(), lps[i].flip(-1).exp(), atol=1e-7)
    for p, q in [(ros[1], ros[0]), (ros[0], ros[2]), (ros[2], ros[1])]:
        lp, lq = torch.log_softmax(p.decision_logits.double(), -1), torch.log_softmax(q.decision_logits.double(), -1)
        want = float((lp.exp() * (lp - lq)).sum())
        assert want > 1e-5 and M.kl_runs(p, q) == pytest.approx(want, rel=1e-2)
    assert M.kl_runs(ros[1], ros[1]) == 0.0
