"""The latent loop: cache faithfulness, self-patch null check, intervention semantics."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import make_tiny_codi
from thoughtpatch.model import INPUT, Intervention, Site, extract_number, load_model


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tmp_path_factory):
    ckpt, base = make_tiny_codi(tmp_path_factory.mktemp(request.param), request.param)
    return load_model(ckpt, base=base)


Q = "tom has 3 apples and he buys 5 more . how many apples has tom ?"


def test_cached_loop_equals_full_recompute(model):
    """Every thought's hidden states equal one no-cache forward over the whole sequence."""
    ids = model.prompt_ids(Q)
    st = model.think(model.encode(ids))
    emb = torch.cat([model.embed(torch.tensor([ids])), st.latent_inputs()], 1)
    with torch.inference_mode():
        out = model.net(inputs_embeds=emb, use_cache=False, output_hidden_states=True)
    full = torch.stack(out.hidden_states, 2)[0, len(ids):]  # [K, L+1, H]
    assert (full - st.latent_hidden()[0]).abs().max().item() <= 1e-5
    # and the answer position: eot after the thoughts
    eot = model.embed(torch.tensor([[model.readout_id]]))
    with torch.inference_mode():
        out2 = model.net(inputs_embeds=torch.cat([emb, eot], 1), use_cache=False)
    _, first = model.generate(st, max_new_tokens=1)
    assert (out2.logits[0, -1].float() - first[0]).abs().max().item() <= 1e-5


def test_self_patch_changes_nothing(model):
    """Writing back the run's own activation at every site (and input) is exactly a no-op."""
    ids = model.prompt_ids(Q)
    st = model.think(model.encode(ids))
    gens, first = model.generate(st)
    resid, inputs = st.latent_resid()[0], st.latent_inputs()[0]
    ivs = [Intervention.replace(Site("resid", l, k), resid[k, l]) for k in range(model.num_thoughts) for l in range(model.num_layers)]
    ivs += [Intervention.replace(Site(INPUT, thought=k), inputs[k]) for k in range(model.num_thoughts)]
    st2 = model.think(model.encode(ids), ivs)
    gens2, first2 = model.generate(st2)
    assert torch.equal(first, first2)
    assert torch.equal(st.latent_hidden(), st2.latent_hidden())
    assert gens2[0].token_ids == gens[0].token_ids


def test_patch_reaches_later_thoughts_only(model):
    """A patch at (l, k) leaves thoughts < k untouched and changes thought k+1's input."""
    ids = model.prompt_ids(Q)
    st = model.think(model.encode(ids))
    k, l = 1, 0
    st2 = model.think(model.encode(ids), [Intervention.zero(Site("resid", l, k))])
    assert torch.equal(st.latent_hidden()[:, :k], st2.latent_hidden()[:, :k])
    assert torch.equal(st2.latent_resid()[0, k, l], torch.zeros(model.hidden_size))
    assert not torch.equal(st.latent_inputs()[:, k + 1], st2.latent_inputs()[:, k + 1])


def test_rows_and_fork(model):
    """Patching some rows of a forked batch equals patching a batch-1 run; other rows untouched."""
    ids = model.prompt_ids(Q)
    base = model.encode(ids)
    ref = model.think(base.fork())
    batch = model.think(base.fork(3), [Intervention.zero(Site("resid", 1, 0), rows=(1,))])
    single = model.think(base.fork(), [Intervention.zero(Site("resid", 1, 0))])
    assert (batch.latent_hidden()[0] - ref.latent_hidden()[0]).abs().max() <= 1e-5
    assert (batch.latent_hidden()[1] - single.latent_hidden()[0]).abs().max() <= 1e-5
    assert (batch.latent_hidden()[2] - ref.latent_hidden()[0]).abs().max() <= 1e-5


def test_score_matches_generate_and_leaves_state(model):
    ids = model.prompt_ids(Q)
    st = model.think(model.encode(ids))
    before = st.cache.get_seq_length()
    logits = model.score(st, [5, 6])
    assert st.cache.get_seq_length() == before
    _, first = model.generate(st, max_new_tokens=3)
    assert (logits[0, 0] - first[0]).abs().max() <= 1e-5
    assert logits.shape == (1, 3, model.vocab_size)


def test_greedy_never_picks_eot(model):
    ids = model.prompt_ids(Q)
    st = model.think(model.encode(ids))
    gens, _ = model.generate(st, max_new_tokens=20)
    assert model.readout_id not in gens[0].token_ids


def test_zero_thoughts_goes_straight_to_eot(model):
    ids = model.prompt_ids(Q)
    st = model.think(model.encode(ids), until=0)
    assert st.step == 0 and st.cache.get_seq_length() == len(ids)
    gens, _ = model.generate(st, max_new_tokens=2)
    assert len(gens[0].token_ids) >= 1


@pytest.mark.parametrize(
    "text,num",
    [("The answer is: 18", 18.0), ("The answer is: 1,200", 1200.0), ("-3 and 4.5", 4.5), ("none", float("inf")), ("x 7.", 7.0)],
)
def test_extract_number_as_codi(text, num):
    assert extract_number(text) == num


def test_the_greedy_screen_sees_a_changed_head(model, monkeypatch):
    """The read-out's greedy ids through the bf16 screen (model/argmax.py) are the head's argmax,
    and the screen (a bf16 copy of the head) is rebuilt when the head is edited in place."""
    monkeypatch.setattr(model, "SCREEN", True)
    monkeypatch.setattr(model, "SCREEN_MIN_VOCAB", 0)
    lm = model.hf.get_output_embeddings()
    h = torch.randn(5, model.hidden_size, dtype=model.dtype, device=model.device)
    plain = lambda: model.head(h)[:, : model.argmax_ids].argmax(-1)  # noqa: E731
    saved = lm.weight.detach().clone()
    try:
        before = model._greedy(h)
        assert torch.equal(before, plain())
        with torch.no_grad():
            lm.weight[int(before[0])] -= 100 * h[0] / h[0].norm()  # row 0's winner loses
        after = model._greedy(h)
        assert int(after[0]) != int(before[0]) and torch.equal(after, plain())
    finally:
        with torch.no_grad():
            lm.weight.copy_(saved)
