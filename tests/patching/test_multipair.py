"""Several pairs in one batch (prompts of different lengths, left-padded) and the verified
read-out: every row computes what it computes alone, on both families and architectures."""

from __future__ import annotations

import pytest
import torch

from tests.rows import assert_rows_close as _close
from tests.tiny import load_tiny
from thoughtpatch.data.schema import Pair, Problem
from thoughtpatch.patching.engine import BatchedEngine, Prompt, Target
from thoughtpatch.patching.experiments import (
    PairRuns, Spec, all_layers, pair_runs, pairs_runs, patch_pair, patch_pairs, trace_noise, unpatched_run, unpatched_runs,
)

# prompts of 9 to 21 tokens; in pair 2 the two questions differ in length too
QS = [
    ("tom has 3 apples . how many ?", 3, "tom has 4 apples . how many ?", 4),
    ("tom has 7 apples and he buys 2 more . how many apples has tom ?", 9, "tom has 7 apples and he buys 3 more . how many apples has tom ?", 10),
    ("he has 12 apples and tom buys 5 more and he buys 1 more . how many apples has he left ?", 18, "he has 10 apples . how many apples has he ?", 10),
]
PAIRS = [Pair(i, Problem(a, x), Problem(b, y)) for i, (a, x, b, y) in enumerate(QS)]


# both families, both architectures (Coconut on LLaMA adds no batching path of its own)
@pytest.fixture(scope="module", params=["codi-llama", "codi-gpt2", "coconut-gpt2"])
def model(request, tmp_path_factory):
    return load_tiny(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def runs(model):
    """Batch-1 unpatched runs; pair 1's continuations differ in length (a corrupted answer
    of two tokens), so the read-out's two branches are ragged."""
    out = [pair_runs(model, p, max_new_tokens=6) for p in PAIRS]
    r = out[1]
    eos = model.eos_ids[0]
    c = (*model.answer_ids(9), eos)
    x = (*model.answer_ids(10), *model.answer_ids(1)[-1:], eos)
    d = next(i for i, (a, b) in enumerate(zip(c, x)) if a != b)
    target = Target(c, x, d, max_new_tokens=6)
    out[1] = PairRuns(r.pair, r.clean_ids, r.corrupted_prompt, target, unpatched_run(model, r.clean_ids, target), unpatched_run(model, r.corrupted_prompt, target))
    return out


def _acts_close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= tol * max(1.0, float(b[k].abs().max())), k


def test_unpatched_runs_equal_one_at_a_time(model, runs):
    """Many prompts of different lengths (and a noised one, as causal tracing feeds) in one
    padded batch, or in batches of a few: each run is its own run within fp32 rounding."""
    noised = Prompt(tuple(runs[2].clean_ids), trace_noise(model, runs[2].clean_ids, 2))
    prompts = [Prompt(tuple(r.clean_ids)) for r in runs] + [r.corrupted_prompt for r in runs] + [noised]
    targets = [r.target for r in runs] * 2 + [runs[2].target]
    assert len({len(p.ids) for p in prompts}) >= 4
    alone = [unpatched_run(model, p, t) for p, t in zip(prompts, targets)]
    for budget in (None, 100):  # one batch; batches of two or three prompts
        for got, want in zip(unpatched_runs(model, prompts, targets, max_tokens=budget), alone, strict=True):
            assert (got.decision_logits - want.decision_logits).abs().max() <= 1e-5
            assert abs(got.logprob_clean - want.logprob_clean) <= 1e-5 and abs(got.logprob_corrupted - want.logprob_corrupted) <= 1e-5
            assert got.answer.token_ids == want.answer.token_ids
            _acts_close(got.acts, want.acts)
    batched = pairs_runs(model, PAIRS, max_new_tokens=6)
    for b, r in zip(batched, [pair_runs(model, p, max_new_tokens=6) for p in PAIRS]):
        assert (b.clean.decision_logits - r.clean.decision_logits).abs().max() <= 1e-5 and b.corrupted.answer.token_ids == r.corrupted.answer.token_ids


EXPS = ["layer", "position", "iterative", "knockout"]


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_many_pairs_equal_one_pair_at_a_time(model, runs, direction):
    """Every experiment (Exp 2's linked variants and knockouts included) for three pairs in
    one engine call equals each pair alone; in small batches that mix prompts, too. (A pair
    alone equals the reference engine: tests/patching/test_engine.py and test_sites.py.)"""
    spec = Spec("resid", tuple(all_layers(model)), tuple(range(model.num_thoughts)), direction, readers="both", knock_on=("clean", "corrupted"))
    want = [patch_pair(BatchedEngine(model), r, EXPS, spec) for r in runs]
    for engine in (BatchedEngine(model), BatchedEngine(model, max_tokens=400)):
        got = patch_pairs(engine, runs, EXPS, spec)
        assert len(got) == len(runs)
        for g, w in zip(got, want):
            assert g.keys() == w.keys() == set(EXPS)
            for e in EXPS:
                _close(g[e], w[e])


@pytest.mark.parametrize("site", ["attn", "head", "kv"])
def test_many_pairs_equal_one_pair_every_site(model, runs, site):
    spec = Spec(site, tuple(all_layers(model)), tuple(range(model.num_thoughts)), "denoising")
    exps = ["layer", "position", "iterative"]
    got = patch_pairs(BatchedEngine(model, max_tokens=2000), runs, exps, spec)
    for g, r in zip(got, runs):
        w = patch_pair(BatchedEngine(model), r, exps, spec)
        for e in exps:
            _close(g[e], w[e])


# ---------------------------------------------------------------- verified read-out


def _cases(model, prompts: list[list[int]], n: int):
    """(prompt, clean, corrupted, decision, max_new_tokens, stop_ids) rows whose greedy path
    follows the clean continuation to the end, leaves it early, follows the corrupted one
    instead, stops early on a stop id (also on the very first id, which Coconut keeps), or
    runs into max_new_tokens inside what was verified."""
    out = []
    for p in prompts:
        (g,), _ = model.generate(model.think(model.encode(p)), max_new_tokens=n)
        ids = g.token_ids
        other = next(t for t in range(model.base_vocab) if t not in ids)
        out += [
            (p, ids, [*ids[:1], other], 1, n, None),  # all of the clean continuation
            (p, [*ids[:2], other, ids[3]], ids, 2, n, None),  # the corrupted one, after the decision
            (p, [*ids[:2], other], [*ids[:1], other, other], 1, n, None),  # leaves both: decoded on
            (p, [other, *ids[1:]], [other, *ids[1:]], 0, n, None),  # leaves at once (one continuation)
            (p, ids, [*ids[:1], other], 1, n, (ids[2],)),  # a stop id inside the verified part
            (p, ids, [*ids[:1], other], 1, n, (ids[0],)),  # the first id a stop id
            (p, [*ids[:2], other], ids, 1, n, (ids[4],)),  # a stop id in the decoded part
            (p, ids, [*ids[:1], other], 1, 3, None),  # max_new_tokens inside the verified part
            (p, [other], [other + 1], 0, 1, None),  # one token
        ]
    return out



def test_read_decodes_on_the_tree_it_needs(model, runs, monkeypatch):
    """Rows that all leave their continuations at the same answer index decode on a cache
    holding only the tree positions they read (no mask over the rest): the ids `generate`
    gives, in a left-padded batch, when every row decodes and when some need no decoding."""
    prompts = [r.clean_ids for r in runs] + [list(runs[2].corrupted_prompt.ids)]
    n = 6
    leave, verified = [], []
    for p in prompts:
        (g,), _ = model.generate(model.think(model.encode(p)), max_new_tokens=n)
        ids = g.token_ids
        other = next(t for t in range(model.base_vocab) if t not in ids)
        leave.append((p, [other, *ids[1:]], [other, *ids[1:]], 0))  # leaves at once: decodes from <readout> alone
        verified.append((p, ids, [*ids[:1], other], 1))  # its whole answer verified: nothing to decode
    seen = []
    decode = model._decode_rest
    monkeypatch.setattr(model, "_decode_rest", lambda st, todo, *a: seen.append((st.cache.get_seq_length(), len(todo))) or decode(st, todo, *a))
    for cases in (leave, leave + verified):
        st = model.think(model.encode([c[0] for c in cases]), record_logits=False)
        sc = model.read(st, [c[1] for c in cases], [c[2] for c in cases], [c[3] for c in cases], n, check_every=2)
        assert seen[-1] == (st.prompt_len + model.num_thoughts + 1, len(leave))  # <readout> kept, the rest of the tree gone
        for row, (p, *_rest) in enumerate(cases):
            (want,), _ = model.generate(model.think(model.encode(p)), max_new_tokens=n)
            assert sc.generations[row].token_ids == want.token_ids, row


def test_read_decodes_what_generate_decodes(model, runs, monkeypatch):
    """`read` on a padded batch of many prompts gives every row the ids `generate` gives the
    prompt alone (same stop ids, same limit), and the log-probs of teacher forcing; with its
    LM head in slices of the vocabulary, or its greedy ids screened in bf16 (as on CPU for a
    real vocabulary), it reads the same."""
    prompts = [r.clean_ids for r in runs] + [list(runs[2].corrupted_prompt.ids)]
    cases = _cases(model, prompts, 8)
    st = model.think(model.encode([c[0] for c in cases]), record_logits=False)
    args = ([c[1] for c in cases], [c[2] for c in cases], [c[3] for c in cases], [c[4] for c in cases], [c[5] for c in cases])
    sc = model.read(st, *args, check_every=2)
    assert st.cache.get_seq_length() == st.prompt_len + model.num_thoughts  # left as it was
    monkeypatch.setattr(model, "HEAD_SLICE", 7)  # tiny vocabularies are narrower than the default slice
    h = torch.randn(3, model.hidden_size, dtype=model.dtype, device=model.device)
    assert (model._read_head(h) - model.head(h)).abs().max() <= 1e-6  # every slice, the last a partial one
    sliced = model.read(st, *args, check_every=2)
    assert [g.token_ids for g in sliced.generations] == [g.token_ids for g in sc.generations]
    assert (sliced.logprob - sc.logprob).abs().max() <= 1e-6 and (sliced.decision_logits - sc.decision_logits).abs().max() <= 1e-6
    # greedy ids through the bf16 screen (model/argmax.py), as on a CPU with AMX and a real vocabulary
    monkeypatch.setattr(model, "SCREEN", True)
    monkeypatch.setattr(model, "SCREEN_MIN_VOCAB", 0)
    screened = model.read(st, *args, check_every=2)
    assert model._screen is not None  # it ran
    assert [g.token_ids for g in screened.generations] == [g.token_ids for g in sc.generations]
    decoded = verified = 0
    for row, (p, clean, corrupted, d, n, stop) in enumerate(cases):
        alone = model.think(model.encode(p))
        (want,), _ = model.generate(alone, max_new_tokens=n, stop_ids=stop)
        assert sc.generations[row].token_ids == want.token_ids, (row, clean, corrupted, stop)
        logits = model.score(alone, clean).double().log_softmax(-1)[0]
        lp = sum(float(logits[i, clean[i]]) for i in range(d, len(clean)))
        assert abs(float(sc.logprob[row, 0]) - lp) <= 1e-5
        assert (sc.decision_logits[row] - model.score(alone, clean[:d])[0, d]).abs().max() <= 1e-5
        decoded += len(want.token_ids) > 2 and stop is None and clean[:3] != want.token_ids[:3]
        verified += stop is None and want.token_ids[:len(clean)] == clean
    assert decoded and verified  # both kinds of rows were there


def test_read_follows_drafts_to_what_generate_decodes(model, runs, monkeypatch):
    """Drafts only change the work: rows that follow a draft to its end, leave it part-way,
    fit only a second draft, fit none, have one too short, stop inside it (Coconut: an
    unkept stop), hit max_new_tokens inside it, or reach it after verifying part of their
    continuation, all get the ids `generate` gives; the scores do not move."""
    n = 8
    prompts = [r.clean_ids for r in runs] + [list(runs[2].corrupted_prompt.ids)]
    rows = []  # (prompt, clean, corrupted, decision, max_new_tokens, stop_ids, drafts, finished by the draft)
    for p in prompts:
        (g,), _ = model.generate(model.think(model.encode(p)), max_new_tokens=n)
        ids = g.token_ids
        o = next(t for t in range(model.base_vocab) if t not in ids)
        leave = ([o, *ids[1:]], [o, *ids[1:]], 0)  # the tree verifies nothing: all decoding
        cases = [  # (..., whether the draft finishes the row)
            (p, *leave, n, None, [ids], True),  # the whole draft
            (p, *leave, n, None, [[*ids[:3], o, *ids[4:]]], False),  # leaves it after three ids
            (p, *leave, n, None, [[o] * n, ids], True),  # only the second draft fits
            (p, *leave, n, None, [[o] * n], False),  # no draft fits
            (p, *leave, n, None, [ids[:4]], False),  # a draft shorter than the answer
            (p, *leave, 3, None, [ids], True),  # max_new_tokens inside the draft
            (p, *leave, n, None, [], False),  # none given
            (p, [*ids[:2], o], [*ids[:1], o, o], 1, n, None, [ids], True),  # the tree verifies two ids, the draft the rest
        ]
        k = next((k for k in range(2, n - 1) if ids[k] not in ids[:k]), None)
        if k is not None:  # a stop id first met inside the draft (Coconut: ends there, unkept)
            cases.append((p, *leave, n, (ids[k],), [ids], True))
        rows += cases
    st = model.think(model.encode([r[0] for r in rows]), record_logits=False)
    args = [[r[i] for r in rows] for i in range(1, 6)]
    follow, finished = model._follow, []

    def spy(sub, todo, *a):
        _tok, _idx, alive = out = follow(sub, todo, *a)
        finished.append(set(todo[~alive].tolist()))
        return out

    monkeypatch.setattr(model, "_follow", spy)
    sc = model.read(st, *args, check_every=2, drafts=[r[6] for r in rows])
    assert st.cache.get_seq_length() == st.prompt_len + model.num_thoughts  # left as it was
    for i, (p, *_, lim, stop, _d, _f) in enumerate(rows):
        (want,), _ = model.generate(model.think(model.encode(p)), max_new_tokens=lim, stop_ids=stop)
        assert sc.generations[i].token_ids == want.token_ids, i
    # the rows whose whole answer a draft holds need no token-by-token step (later calls follow loops)
    assert finished[0] == {i for i, r in enumerate(rows) if r[7]}
    monkeypatch.setattr(model, "LOOP_PERIODS", 0)
    assert [g.token_ids for g in model.read(st, *args, check_every=2, drafts=[r[6] for r in rows]).generations] == [g.token_ids for g in sc.generations]
    plain = model.read(st, *args, check_every=2)
    assert torch.equal(plain.logprob, sc.logprob) and torch.equal(plain.decision_logits, sc.decision_logits)
    assert [g.token_ids for g in plain.generations] == [g.token_ids for g in sc.generations]


def test_loops_are_drafted_to_go_on(model):
    """A path (ids before idx) ending in the same cycle twice gets itself and the cycle
    repeated as its draft, up to its limit and the draft length; other rows get none."""
    ids = torch.full((5, 12), -1)
    ids[0, :4] = torch.tensor([7, 3, 3, 3])  # period 1
    ids[1, :6] = torch.tensor([1, 2, 5, 2, 5, 9])  # no loop at its end
    ids[2, :7] = torch.tensor([4, 1, 2, 6, 1, 2, 6])  # period 3
    ids[3, :2] = torch.tensor([8, 8])  # period 1, its limit close
    ids[4, :3] = torch.tensor([5, 5, 5])  # finished: no draft
    idx = torch.tensor([4, 6, 7, 2, 3])
    lim = torch.tensor([12, 12, 12, 4, 12])
    alive = torch.tensor([True, True, True, True, False])
    d = model._loops(ids, torch.arange(5), idx, lim, alive)[:, 0]
    assert d[0].tolist() == [7, 3, 3, 3] + [3] * 8
    assert (d[1] == -1).all() and (d[4] == -1).all()
    assert d[2].tolist() == [4, 1, 2, 6, 1, 2, 6, 1, 2, 6, 1, 2]
    assert d[3].tolist() == [8, 8, 8, 8] + [-1] * 8
    assert model._loops(ids, torch.arange(5), idx, lim, torch.zeros(5, dtype=torch.bool)) is None
