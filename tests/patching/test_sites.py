"""Sites (input, resid, attn, mlp, head, kv) and attention knockout, on both families and both
architectures (LLaMA with grouped K/V: 2 KV heads for 4 query heads; GPT-2 with its fused
c_attn): each site means what DESIGN §8 says, and the batched engine equals the reference."""

from __future__ import annotations

import pytest
import torch

from tests.rows import assert_rows_close as _close
from tests.tiny import load_tiny
from thoughtpatch.data.schema import Pair, Problem
from thoughtpatch.model import INPUT, Site
from thoughtpatch.model.families import submodule
from thoughtpatch.patching.engine import BatchedEngine, Knockout, Patch, ReferenceEngine, Variant
from thoughtpatch.patching.experiments import Spec, all_layers, locations, pair_runs, patch_pair, site_at

PAIR = Pair(
    0,
    Problem("tom has 3 apples and he buys 5 more . how many apples has tom ?", 8),
    Problem("tom has 4 apples and he buys 5 more . how many apples has tom ?", 9),
)
KINDS = ("resid", "attn", "mlp", "head", "kv")


@pytest.fixture(scope="module", params=["codi-llama", "codi-gpt2", "coconut-llama", "coconut-gpt2"])
def model(request, tmp_path_factory):
    return load_tiny(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def runs(model):
    return pair_runs(model, PAIR, max_new_tokens=6)


def _spec(model, site: str) -> Spec:
    return Spec(site, tuple(all_layers(model)), tuple(range(model.num_thoughts)))


@pytest.mark.parametrize("site", KINDS)
def test_batched_equals_reference_every_site(model, runs, site):
    exps = ["layer", "position", "iterative"]
    bat = patch_pair(BatchedEngine(model), runs, exps, _spec(model, site))
    ref = patch_pair(ReferenceEngine(model), runs, exps, _spec(model, site))
    for e in exps:
        assert bat[e] and all(r["site"] == site for r in bat[e])
        _close(bat[e], ref[e])
    if site == "head":
        assert {r["head"] for r in bat["position"]} == set(range(model.num_heads))


@pytest.mark.parametrize("site", KINDS)
def test_self_patch_is_exact_every_site(model, runs, site):
    """The receiving run's own value written back at any site changes nothing, bit for bit."""
    receiving = runs.corrupted
    sites = [site_at(site, loc, k) for k in range(model.num_thoughts) for loc in locations(model, site, all_layers(model))]
    variants = [Variant((Patch(s, model.site_value(receiving.acts, s)),)) for s in sites]
    for ro in ReferenceEngine(model).run(runs.corrupted_prompt, variants, runs.target, record=(site,)):
        assert torch.equal(ro.decision_logits, receiving.decision_logits)
        assert ro.answer.token_ids == receiving.answer.token_ids


def test_all_heads_are_the_attention_output(model, runs):
    """Every head of block l at thought k from the source ≡ the attn site of block l at k."""
    l, k = 1, 1
    heads = Variant(tuple(Patch(Site("head", l, k, h), model.site_value(runs.clean.acts, Site("head", l, k, h))) for h in range(model.num_heads)))
    attn = Variant((Patch(Site("attn", l, k), model.site_value(runs.clean.acts, Site("attn", l, k))),))
    a, b = ReferenceEngine(model).run(runs.corrupted_prompt, [heads, attn], runs.target, record=("attn", "resid"))
    assert torch.allclose(a.acts["attn"][k, l], runs.clean.acts["attn"][k, l], atol=1e-6)
    assert torch.allclose(a.decision_logits, b.decision_logits, atol=1e-5)
    assert torch.allclose(a.resid, b.resid, atol=1e-5)


def test_one_head_changes_only_its_slice(model, runs):
    l, k, h = 2, 0, 1
    site = Site("head", l, k, h)
    (ro,) = ReferenceEngine(model).run(runs.corrupted_prompt, [Variant((Patch(site, model.site_value(runs.clean.acts, site)),))], runs.target, record=("head",))
    got = ro.acts["head"][k, l].reshape(model.num_heads, model.head_dim)
    src = runs.clean.acts["head"][k, l].reshape(model.num_heads, model.head_dim)
    rec = runs.corrupted.acts["head"][k, l].reshape(model.num_heads, model.head_dim)
    assert torch.equal(got[h], src[h])
    others = [i for i in range(model.num_heads) if i != h]
    assert torch.equal(got[others], rec[others]) and not torch.equal(src[h], rec[h])


def test_attn_and_mlp_with_own_values_is_a_no_op(model, runs):
    l, k = 1, 2
    own = lambda kind: Patch(Site(kind, l, k), model.site_value(runs.corrupted.acts, Site(kind, l, k)))  # noqa: E731
    (ro,) = ReferenceEngine(model).run(runs.corrupted_prompt, [Variant((own("attn"), own("mlp")))], runs.target)
    assert torch.equal(ro.decision_logits, runs.corrupted.decision_logits)


def _key_value(model, h_in: torch.Tensor, layer: int, position: int) -> torch.Tensor:
    """What block `layer` caches for an input h_in [H] at `position`, computed from the modules:
    LLaMA: k_proj/v_proj of the normed input, keys rotated; GPT-2: c_attn's k and v parts."""
    blk = model.blocks[layer]
    x = h_in[None, None].to(model.dtype)
    shape = (model.num_kv_heads, model.head_dim)
    with torch.inference_mode():
        if model.arch.name == "llama":
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            xn = blk.input_layernorm(x)
            key = blk.self_attn.k_proj(xn).view(1, 1, *shape).transpose(1, 2)
            value = blk.self_attn.v_proj(xn).view(1, 1, *shape).transpose(1, 2)
            cos, sin = model.body.rotary_emb(xn, torch.tensor([[position]]))
            _, key = apply_rotary_pos_emb(key, key, cos, sin)
            return torch.stack([key[0, :, 0], value[0, :, 0]])
        _, key, value = blk.attn.c_attn(blk.ln_1(x)).split(model.hidden_size, dim=2)
        return torch.stack([key.view(*shape), value.view(*shape)])


def test_kv_site_is_what_later_positions_read(model, runs):
    """The recorded kv of (l, k) is the key (after rotary) and value block l computes from its
    input at thought k; patching it leaves thought k's own residual stream untouched and
    changes what later thoughts compute."""
    ro = runs.corrupted
    pos = len(runs.corrupted_ids)
    for l in range(model.num_layers):
        for k in range(model.num_thoughts):
            if l:
                h_in = ro.acts["resid"][k, l - 1]
            else:  # the fed vector, plus the position embedding where the model adds one (GPT-2)
                h_in = ro.acts[INPUT][k] + (model.body.wpe.weight[pos + k] if model.arch.name == "gpt2" else 0)
            want = _key_value(model, h_in, l, pos + k).float()
            assert torch.allclose(ro.acts["kv"][k, l], want, atol=1e-5), (l, k)
    l, k = 1, 1
    site = Site("kv", l, k)
    (p,) = ReferenceEngine(model).run(runs.corrupted_prompt, [Variant((Patch(site, model.site_value(runs.clean.acts, site)),))], runs.target, record=("resid", "kv"))
    assert torch.equal(p.acts["resid"][: k + 1], ro.acts["resid"][: k + 1])  # thought k itself untouched
    assert torch.equal(p.acts["kv"][k, l], runs.clean.acts["kv"][k, l])
    assert not torch.equal(p.acts["resid"][k + 1], ro.acts["resid"][k + 1])  # its readers are not


# ---------------------------------------------------------------- knockout


def _causal(t: int) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool).tril()


@torch.inference_mode()
def _recompute(model, embeds: torch.Tensor, masks: dict[int, torch.Tensor]) -> torch.Tensor:
    """A no-cache forward over the whole sequence, block by block, with an explicit boolean
    attention mask per block (allowed[q, key]); returns the final-norm states [T, H]."""
    t = embeds.shape[0]
    pos = torch.arange(t)[None]
    h = embeds[None].to(model.dtype)
    body = model.body
    rotary = body.rotary_emb(h, pos) if model.arch.name == "llama" else None
    if model.arch.name == "gpt2":
        h = h + body.wpe(pos)
    for i, blk in enumerate(model.blocks):
        mask = masks.get(i, _causal(t))[None, None]
        out = blk(h, attention_mask=mask, position_ids=pos, position_embeddings=rotary) if rotary is not None else blk(h, attention_mask=mask)
        h = out[0] if isinstance(out, tuple) else out
    return (body.norm if model.arch.name == "llama" else body.ln_f)(h)[0]


@torch.inference_mode()
def _knocked_decision_logits(model, runs, ko: Knockout) -> torch.Tensor:
    """The loop recomputed from scratch at every step, with block ko.layer's attention from the
    readers to thought ko.thought's position removed."""
    ids = runs.clean_ids
    p, kk = len(ids), model.num_thoughts
    seq = model.embed(torch.tensor(ids)).float()

    for k in range(kk):
        t = seq.shape[0]
        m = _causal(t)
        if ko.readers in ("thoughts", "both") and p + ko.thought < t:  # the later thoughts read it
            m[p + ko.thought + 1 :, p + ko.thought] = False
        h = _recompute(model, seq, {ko.layer: m})[-1]
        seq = torch.cat([seq, model.thought_from(h[None].to(model.dtype)).float()])
    tail = [model.readout_id, *runs.target.clean[: runs.target.decision]]
    seq = torch.cat([seq, model.embed(torch.tensor(tail)).float()])
    t = seq.shape[0]
    m = _causal(t)
    if ko.readers in ("thoughts", "both"):
        m[p + ko.thought + 1 : p + kk, p + ko.thought] = False
    if ko.readers in ("answer", "both"):
        m[p + kk :, p + ko.thought] = False
    h = _recompute(model, seq, {ko.layer: m})[-1]
    return model.head(h[None].to(model.dtype))[0].float()


@pytest.mark.parametrize("readers", ["answer", "thoughts", "both"])
def test_knockout_equals_recompute_without_that_entry(model, runs, readers):
    kos = [Knockout(1, 0, readers), Knockout(2, 1, readers), Knockout(0, 2, readers)]
    variants = [Variant(knockouts=(ko,)) for ko in kos]
    ref = ReferenceEngine(model).run(runs.clean_ids, variants, runs.target)
    bat = BatchedEngine(model).run(runs.clean_ids, variants, runs.target)
    for ko, r, b in zip(kos, ref, bat):
        want = _knocked_decision_logits(model, runs, ko)
        assert (r.decision_logits - want).abs().max() <= 1e-5, ko
        assert (b.decision_logits - r.decision_logits).abs().max() <= 1e-5, ko
        # it did something: to the later thoughts, or (read-out readers) to the answer logits
        moved = (r.resid - runs.clean.resid).abs().max() if readers != "answer" else (r.decision_logits - runs.clean.decision_logits).abs().max()
        assert moved > 1e-6, ko


def test_knockout_without_readers_changes_nothing(model, runs):
    """Later-thought readers of the last thought: there are none, so nothing changes (one run
    alone, the unpatched run's own shapes: bit for bit)."""
    (ro,) = ReferenceEngine(model).run(runs.clean_ids, [Variant(knockouts=(Knockout(1, model.num_thoughts - 1, "thoughts"),))], runs.target)
    assert torch.equal(ro.decision_logits, runs.clean.decision_logits)


def test_knockout_experiment_grid(model, runs):
    spec = Spec("resid", tuple(all_layers(model)), tuple(range(model.num_thoughts)), readers="both", knock_on=("clean", "corrupted"))
    bat = patch_pair(BatchedEngine(model), runs, ["knockout"], spec)["knockout"]
    ref = patch_pair(ReferenceEngine(model), runs, ["knockout"], spec)["knockout"]
    _close(bat, ref)
    assert len(bat) == 2 * model.num_layers * model.num_thoughts
    assert {r["run"] for r in bat} == {"clean", "corrupted"} and all(r["readers"] == "both" for r in bat)
