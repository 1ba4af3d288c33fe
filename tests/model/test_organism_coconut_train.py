"""Training the Coconut organism: its sequences per stage, the multi-pass forward against a
full recompute (values and gradients), Coconut's decoding rules, the loss falling through
every stage, bit-identical weights for a seed, and the exported checkpoint's keys."""

import json

import pytest
import torch

from thoughtpatch.model.organism.coconut_train import CoconutTrainConfig, sequences, stage_at, train_coconut
from thoughtpatch.model.organism.model import OrganismConfig

TINY = OrganismConfig(hidden=32, layers=2, heads=2, kv_heads=1, mlp=64, max_positions=128)
Q = "Tom has 12 apples. He buys 5 more. He loses 3 apples. How many apples are left?"


def tiny(steps: int, **kw) -> CoconutTrainConfig:
    return CoconutTrainConfig(steps=steps, batch=8, warmup=2, lr=3e-3, threads=1, model=TINY, **kw)


@pytest.fixture(scope="module")
def tok():
    from thoughtpatch.model.families import COCONUT_MARKERS
    from thoughtpatch.model.organism.tokenizer import COCONUT_EXTRA, build_tokenizer

    t = build_tokenizer(COCONUT_EXTRA)
    t.add_tokens(list(COCONUT_MARKERS))
    return t


def _markers(tok) -> tuple[int, int, int]:
    from thoughtpatch.model.families import COCONUT_MARKERS

    return tuple(tok.convert_tokens_to_ids(list(COCONUT_MARKERS)))


def test_tokenizer_keeps_codi_ids(tok):
    from thoughtpatch.model.families import COCONUT_MARKERS
    from thoughtpatch.model.organism.tokenizer import build_tokenizer

    codi = build_tokenizer()
    v0 = len(codi) + 1
    assert {w: i for w, i in tok.get_vocab().items() if i < len(codi)} == codi.get_vocab()
    assert tok.convert_tokens_to_ids("#") == v0 - 1
    assert tok.convert_tokens_to_ids(list(COCONUT_MARKERS)) == [v0, v0 + 1, v0 + 2]
    assert tok(Q + "\n")["input_ids"] == codi(Q)["input_ids"]  # same question ids as the CODI organism
    # Markers are ordinary added tokens: decode(skip_special_tokens=True) keeps them.
    ids = tok(Q + "\n")["input_ids"] + [v0, v0 + 2, v0 + 1] + tok("### 14", add_special_tokens=False)["input_ids"]
    text = tok.decode(ids, skip_special_tokens=True)
    assert "<|start-latent|>" in text and text.split("#")[-1].strip() == "14"


def test_schedule_and_sequences(tok):
    from thoughtpatch.model.families import COCONUT
    from thoughtpatch.model.organism.train import Encoder

    cfg = CoconutTrainConfig(steps=100)
    assert cfg.num_thoughts == 6 and cfg.model.num_thoughts == 6 and cfg.max_latent_stage == 3
    assert [stage_at(s, cfg) for s in (0, 14, 15, 19, 20, 34, 35, 49, 50, 99)] == [-1, -1, 0, 0, 1, 1, 2, 2, 3, 3]
    e = Encoder(tok, COCONUT.answer_template, "\n").example(Q, "<<12+5=17>> <<17-3=14>>", 14, [17, 14])
    ids = _markers(tok)
    start, end, _ = ids
    text = lambda x: tok.decode(x, skip_special_tokens=True)  # noqa: E731
    pre, k, suf, lab = sequences(e, -1, 2, ids)  # language CoT, no markers
    assert pre == e.q and k == 0 and text(suf) == "<< 12 + 5 = 17 >> << 17 - 3 = 14 >> # # # 14" and lab == suf
    pre, k, suf, lab = sequences(e, 0, 2, ids)  # markers, no latents
    assert pre == e.q + [start] and k == 0 and suf[0] == end and lab[0] == -100 and lab[1:] == suf[1:]
    assert text(suf[1:]) == "<< 12 + 5 = 17 >> << 17 - 3 = 14 >> # # # 14"
    assert text(sequences(e, 1, 2, ids)[2][1:]) == "<< 17 - 3 = 14 >> # # # 14" and sequences(e, 1, 2, ids)[1] == 2
    for s in (2, 3):  # every step latent; c_thought * s latents even for a 2-step problem
        pre, k, suf, lab = sequences(e, s, 2, ids)
        assert k == 2 * s and text(suf[1:]) == "# # # 14" and suf[-1] == tok.eos_token_id
    assert e.q[0] == tok.bos_token_id


def _full_recompute(hf, prefix, k, suffix):
    """Coconut's semantics the slow way: re-run the whole sequence for every thought."""
    emb = hf.get_input_embeddings()
    x = emb(prefix)
    for _ in range(k):
        x = torch.cat([x, hf.model(inputs_embeds=x).last_hidden_state[:, -1:]], 1)
    x = torch.cat([x, emb(suffix)], 1)
    return hf.lm_head(hf.model(inputs_embeds=x).last_hidden_state)[:, prefix.shape[1] + k - 1 :]


@pytest.mark.parametrize("k", [0, 1, 4])
def test_coconut_pass_is_coconuts_loop(tok, k):
    from thoughtpatch.model.organism.latent import coconut_pass
    from thoughtpatch.model.organism.model import build_coconut_organism

    hf = build_coconut_organism(TINY, tok, 0)
    with torch.no_grad():  # make the weights less trivial than N(0, 0.02)
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    prefix = torch.tensor([tok(Q + "\n")["input_ids"] + [len(tok) - 3]] * 2)
    suffix = torch.tensor([[len(tok) - 2, 5, 9, 2], [len(tok) - 2, 7, 2, 2]])
    lp = coconut_pass(hf, prefix, k, suffix)
    ref = _full_recompute(hf, prefix, k, suffix)
    assert lp.logits.shape == ref.shape == (2, 1 + suffix.shape[1], len(tok)) and lp.fed.shape == (2, k, 32)
    torch.testing.assert_close(lp.logits, ref, atol=1e-5, rtol=1e-4)
    # Gradients flow through the thoughts exactly as through the recomputed sequence.
    g1 = torch.autograd.grad(lp.logits.square().mean(), list(hf.parameters()))
    g2 = torch.autograd.grad(ref.square().mean(), list(hf.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("w_aux", [0.0, 1.0])
def test_loss_falls_through_every_stage(w_aux):
    _, _, log = train_coconut(tiny(40, stages=(0.05, 0.1, 0.15, 0.2), w_aux=w_aux), progress=False)
    assert {r["mode"] for r in log} == {-1, 0, 1, 2, 3}
    final = [r for r in log if r["mode"] == 3]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    for k, f in [("loss", 0.8), ("ce", 0.8)] + ([("aux", 0.9)] if w_aux else []):
        assert mean(final[-5:], k) < f * mean(final[:5], k), (k, final)
    assert log[-1]["ce"] < 0.7 * log[0]["ce"]
    # The auxiliary loss exists only with latents (stage >= 1) and only when asked for.
    assert all(("aux" in r) == (w_aux > 0 and r["mode"] >= 1) for r in log)


def test_aux_targets(tok):
    from thoughtpatch.model.organism.coconut_train import aux_targets
    from thoughtpatch.model.families import COCONUT
    from thoughtpatch.model.organism.train import Encoder

    enc = Encoder(tok, COCONUT.answer_template, "\n")
    e3 = enc.example(Q, "<<12+5=17>> <<17-3=14>> <<14*2=28>>", 28, [17, 14, 28])
    e1 = enc.example(Q, "<<12+5=17>>", 17, [17])
    y = [tok.convert_tokens_to_ids(str(v)) for v in (17, 14, 28)]
    # Thought 2j (the state at latent 2j - 1) decodes y_j for every step the stage replaced.
    assert aux_targets([e3, e1], 2, 2, 4).tolist() == [[-100, y[0], -100, y[1]], [-100, y[0], -100, -100]]
    assert aux_targets([e3], 3, 2, 6).tolist() == [[-100, y[0], -100, y[1], -100, y[2]]]
    assert aux_targets([e3], 1, 2, 2).tolist() == [[-100, y[0]]]


def test_deterministic_for_a_seed():
    cfg = tiny(10, stages=(0.2, 0.4, 0.6, 0.8))  # every phase twice, with an optimizer reset between
    a = train_coconut(cfg, progress=False)
    b = train_coconut(cfg, progress=False)
    assert [r["loss"] for r in a[2]] == [r["loss"] for r in b[2]]
    for (k, va), vb in zip(a[0].state_dict().items(), b[0].state_dict().values()):
        assert torch.equal(va, vb), k
    c = train_coconut(tiny(10, seed=1, stages=(0.2, 0.4, 0.6, 0.8)), progress=False)
    assert [r["loss"] for r in c[2]] != [r["loss"] for r in a[2]]


def test_optimizer_resets_at_each_stage(monkeypatch):
    import thoughtpatch.model.organism.train as tr

    made = []
    real = tr.adamw
    monkeypatch.setattr(tr, "adamw", lambda params, cfg: made.append(1) or real(params, cfg))
    train_coconut(tiny(10, stages=(0.2, 0.4, 0.6, 0.8)), progress=False)
    assert len(made) == 5  # the CoT phase and stages 0..3


def test_checkpoint_has_coconuts_keys_and_runs_in_the_runtime(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from thoughtpatch.model import load_model
    from thoughtpatch.model.organism.latent import coconut_pass

    hf, tok, _ = train_coconut(tiny(4, stages=(0.0, 0.0, 0.0, 0.0)), out_dir=tmp_path, progress=False, eval_problems=3)
    v0 = len(tok) - 3
    sd = load_file(str(tmp_path / "model.safetensors"))
    layer = ["input_layernorm.weight", "post_attention_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight",
             "mlp.up_proj.weight"] + [f"self_attn.{p}_proj.weight" for p in "qkvo"]
    want = {"embedding.weight", "base_causallm.lm_head.weight", "base_causallm.model.embed_tokens.weight",
            "base_causallm.model.norm.weight"} | {f"base_causallm.model.layers.{i}.{n}" for i in range(2) for n in layer}
    assert set(sd) == want
    assert sd["embedding.weight"].shape == (v0 + 3, 32)
    assert torch.equal(sd["embedding.weight"], sd["base_causallm.model.embed_tokens.weight"])
    assert torch.equal(sd["embedding.weight"], sd["base_causallm.lm_head.weight"])
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == v0
    base = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(base) == v0 and "<|latent|>" not in base.get_vocab()  # markers come at load time
    side = json.loads((tmp_path / "thoughtpatch.json").read_text())
    assert side["family"] == "coconut" and side["num_thoughts"] == 6 and side["answer_template"] == "### {answer}"
    assert side["organism"] and side["max_new_tokens"] == 64 and side["eval_n"] == 3
    assert set(side["accuracy"]) == {"with_thoughts", "thoughts_zeroed", "thoughts_mean", "thoughts_resample", "no_thoughts", "cot"}
    assert {how: len(a) for how, a in side["per_thought"].items()} == {"zero": 6, "mean": 6, "resample": 6}
    assert side["train"]["c_thought"] == 2 and side["train"]["max_latent_stage"] == 3 and side["train"]["w_aux"] == 0.0  # Coconut's plain recipe by default
    assert len(json.loads((tmp_path / "pairs.json").read_text())) == 57
    assert "Coconut's plain recipe" in (tmp_path / "MODEL_CARD.md").read_text() and "Not plain Coconut" not in (tmp_path / "MODEL_CARD.md").read_text()

    # The runtime loads it as Coconut (family from the keys) and runs the loop training used.
    m = load_model(str(tmp_path))
    assert m.family.name == "coconut" and m.num_thoughts == 6 and _markers(m.tokenizer) == _markers(tok) == (v0, v0 + 1, v0 + 2)
    ids = m.prompt_ids(Q)
    assert ids == tok(Q + "\n")["input_ids"] + [v0]
    st = m.think(m.encode(torch.tensor([ids])), record=("input",))
    gens, first = m.generate(st, max_new_tokens=3)
    with torch.no_grad():
        ref = coconut_pass(hf, torch.tensor([ids]), 6, torch.tensor([[v0 + 1]]))
    torch.testing.assert_close(st.latent_inputs(), ref.fed, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(first, ref.logits[:, -1], atol=1e-4, rtol=1e-4)


def test_marker_rows_start_from_the_open_bracket(tok):
    from thoughtpatch.model.organism.model import build_coconut_organism

    hf = build_coconut_organism(TINY, tok, 0)
    w = hf.get_input_embeddings().weight
    src = w[tok.convert_tokens_to_ids("<<")]
    assert all(torch.equal(w[i], src) for i in range(len(tok) - 3, len(tok)))
    assert hf.lm_head.weight.data_ptr() == w.data_ptr()


def test_cli_dispatches_on_family(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import thoughtpatch.cli.toy  # noqa: F401  (registers `toy`)
    import thoughtpatch.model.organism.coconut_train as ct
    from thoughtpatch.cli import app
    from thoughtpatch.errors import ThoughtpatchError

    r = CliRunner().invoke(app, ["toy", "train", "--family", "cocnut", "--out", str(tmp_path / "x")])
    assert isinstance(r.exception, ThoughtpatchError) and "cocnut" in str(r.exception)
    assert not (tmp_path / "x").exists()
    got = {}

    def fake(cfg, out_dir, eval_problems):  # the training itself is tested above
        got.update(cfg=cfg, eval_problems=eval_problems)
        out_dir.mkdir()
        (out_dir / "thoughtpatch.json").write_text(json.dumps({"accuracy": {"cot": {"all": 0.5, "steps": {"1": 0.5}}}}))

    monkeypatch.setattr(ct, "train_coconut", fake)
    r = CliRunner().invoke(app, ["toy", "train", "--family", "coconut", "--minutes", "15", "--seed", "3", "--eval-n", "9",
                                 "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    cfg = got["cfg"]
    assert isinstance(cfg, CoconutTrainConfig) and cfg.steps == CoconutTrainConfig.steps // 2 and cfg.seed == 3
    assert got["eval_problems"] == 9 and "explicit CoT (no markers)" in r.output
