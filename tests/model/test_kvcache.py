"""The growing KV cache: bit-identical to transformers' plain concatenating cache through
every operation the engines use, and never shared between forks."""

from __future__ import annotations

import pytest
import torch

import thoughtpatch.model.runtime as runtime
from tests.tiny import make_tiny_codi
from thoughtpatch.model import Intervention, Site, load_model
from thoughtpatch.model.kvcache import DynamicLayer

Q = "tom has 3 apples and he buys 5 more . how many apples has tom ?"


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tmp_path_factory):
    ckpt, base = make_tiny_codi(tmp_path_factory.mktemp(request.param), request.param)
    return load_model(ckpt, base=base)


def _scenario(model) -> list[torch.Tensor]:
    """Encode, fork, think part-way, add copies of a row, patch, think on, add more rows
    (into new room, then in place), take rows and extend them, teacher-force, rewind,
    teacher-force other tokens, decode."""
    base = model.encode(model.prompt_ids(Q))
    a = model.think(base.fork(), until=2)
    b = a.join(0, 2)  # a new buffer with exactly these rows
    b = model.think(b, [Intervention.zero(Site("resid", 1, 2), rows=(1,))], until=3)
    b = b.join(1, 1, room=2)  # no room: a new buffer, with room for two more rows ...
    b = b.join(0, 2)  # ... which this join fills in place
    b = model.think(b, [Intervention.zero(Site("resid", 0, 3), rows=(4,))])
    out = [b.latent_hidden()]
    d = b.take([2, 0])  # a taken state grows on its own, never into b's room
    out.append(model.teacher_force(d, [model.readout_id, 9, 9], keep=3))
    out.append(model.teacher_force(b, [model.readout_id, 5, 6], keep=2))
    model.rewind(b)
    out.append(model.teacher_force(b, [model.readout_id, 7], keep=1))
    model.rewind(b, extra=1)
    out.append(model.teacher_force(b, [8], keep=1))
    model.rewind(b)
    gens, logits = model.generate(b, max_new_tokens=6, keep_logits=True)
    out.append(logits)
    out.append(torch.tensor([g.token_ids for g in gens]))
    c = model.think(base.fork())  # the base's cache is untouched by all of the above
    out.append(c.latent_hidden())
    return out


def test_growing_cache_equals_plain_cache(model, monkeypatch):
    grown = _scenario(model)
    monkeypatch.setattr(runtime, "make_growing", lambda cache: cache)
    plain = _scenario(model)
    for g, p in zip(grown, plain, strict=True):
        assert torch.equal(g, p)


@pytest.mark.skipif(DynamicLayer is None, reason="this transformers has no per-layer cache objects")
def test_forks_do_not_share_buffers(model):
    st = model.think(model.encode(model.prompt_ids(Q)), until=1)
    assert type(st.cache.layers[0]).__name__ == "GrowingLayer"
    twin = st.fork()
    model.think(st)  # appends into st's buffer ...
    want = model.think(model.think(model.encode(model.prompt_ids(Q)), until=1))
    assert torch.equal(model.think(twin).latent_hidden(), want.latent_hidden())  # ... never into twin's


def test_grouped_attention_with_mask_is_exact(model, monkeypatch):
    """Teacher forcing lets CPU attention read grouped K/V heads despite its mask: the same
    bits as transformers' repeated heads, and the switch is gone afterwards."""
    import contextlib
    import os

    fast = _scenario(model)
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
    monkeypatch.setattr(runtime, "_gqa_despite_mask", lambda device: contextlib.nullcontext())
    for f, s in zip(fast, _scenario(model), strict=True):
        assert torch.equal(f, s)


@pytest.mark.skipif(DynamicLayer is None, reason="this transformers has no per-layer cache objects")
def test_a_taken_batch_owns_its_room(model):
    """`take` gathers whole buffer rows: the taken cache writes its next positions in place
    (no copy of the cache), into a buffer of its own (never the source's)."""
    st = model.think(model.encode(model.prompt_ids(Q)), until=1).join(0, 3)
    src_bufs = [lay._kbuf.data_ptr() for lay in st.cache.layers]
    sub = st.take([3, 0])
    bufs = [lay._kbuf.data_ptr() for lay in sub.cache.layers]
    assert not set(bufs) & set(src_bufs)
    assert all(lay.keys.data_ptr() == b for lay, b in zip(sub.cache.layers, bufs))
    sub = model.think(sub, until=2)
    assert [lay._kbuf.data_ptr() for lay in sub.cache.layers] == bufs  # grown in place
    alone = model.think(model.think(model.encode(model.prompt_ids(Q)), until=1), until=2)
    assert torch.allclose(sub.latent_hidden(), alone.latent_hidden().expand_as(sub.latent_hidden()), atol=1e-6)
