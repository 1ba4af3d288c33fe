"""Training the organism: the loss falls, a seed gives bit-identical weights, the saved
directory reloads through the CODI loader and the runtime reproduces the training loop."""

import json

import torch

from thoughtpatch.model.organism.model import OrganismConfig
from thoughtpatch.model.organism.train import TrainConfig, mode_at, steps_for_minutes, train

TINY = OrganismConfig(hidden=32, layers=2, heads=2, kv_heads=1, mlp=64, prj_dim=32, num_thoughts=4, max_positions=128)


def tiny(steps: int, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, batch=8, warmup=2, lr=3e-3, threads=1, model=TINY, **kw)


def test_schedule_is_in_steps():
    cfg = TrainConfig(steps=100)
    assert [mode_at(s, cfg) for s in (0, 14, 15, 29, 30, 44, 45, 99)] == [0, 0, 1, 1, 2, 2, -1, -1]
    assert steps_for_minutes(30) == TrainConfig.steps and steps_for_minutes(15) == TrainConfig.steps // 2


def test_student_sequences():
    from thoughtpatch.model.organism.tokenizer import build_tokenizer
    from thoughtpatch.model.organism.train import Encoder, student_answer_ids

    tok = build_tokenizer()
    e = Encoder(tok).example("Tom has 12 apples. He buys 5 more. He loses 3 apples. How many apples are left?",
                             "<<12+5=17>> <<17-3=14>>", 14, [17, 14])
    eot = len(tok) + 2
    text = lambda ids: tok.decode(ids[1:], skip_special_tokens=True)  # noqa: E731
    assert student_answer_ids(e, -1, eot)[0] == eot
    assert text(student_answer_ids(e, -1, eot)) == "The answer is : 14"  # full latent: no CoT at all
    assert text(student_answer_ids(e, 1, eot)) == "<< 17 - 3 = 14 >> The answer is : 14"
    assert text(student_answer_ids(e, 2, eot)) == "The answer is : 14"
    assert e.ans[-1] == tok.eos_token_id and e.q[0] == tok.bos_token_id


def test_loss_falls_all_modes():
    # Full latent mode (all four losses) from the first step.
    _, _, _, log = train(tiny(40, teacher_only=0.0, stages=(0.0, 0.0, 0.0)), progress=False)
    assert all(r["mode"] == -1 and {"teacher", "student", "distill", "aux"} <= r.keys() for r in log)
    first = sum(r["loss"] for r in log[:5]) / 5
    last = sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_deterministic_for_a_seed():
    cfg = tiny(8, teacher_only=0.25, stages=(0.25, 0.5, 0.75))  # every mode once or twice
    a = train(cfg, progress=False)
    b = train(cfg, progress=False)
    assert [r["loss"] for r in a[3]] == [r["loss"] for r in b[3]]
    for (k, va), vb in zip(a[0].state_dict().items(), b[0].state_dict().values()):
        assert torch.equal(va, vb), k
    assert all(torch.equal(x, y) for x, y in zip(a[1].parameters(), b[1].parameters()))
    c = train(tiny(8, seed=1, teacher_only=0.25, stages=(0.25, 0.5, 0.75)), progress=False)
    assert [r["loss"] for r in c[3]] != [r["loss"] for r in a[3]]


def test_checkpoint_reloads(tmp_path):
    from thoughtpatch.model import load_model
    from thoughtpatch.model.organism.latent import latent_loop

    hf, prj, tok, _ = train(tiny(6, teacher_only=0.0, stages=(0.0, 0.0, 0.0)), out_dir=tmp_path, progress=False, eval_problems=3)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "model.safetensors",
            "thoughtpatch.json", "MODEL_CARD.md", "heldout.json", "pairs.json"} <= names
    side = json.loads((tmp_path / "thoughtpatch.json").read_text())
    assert side["num_thoughts"] == 4 and "{answer}" in side["answer_template"] and side["family"] == "llama"
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == len(tok)
    assert len(json.loads((tmp_path / "pairs.json").read_text())) == 57
    assert len(json.loads((tmp_path / "heldout.json").read_text())) >= 300

    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert "codi.base_model.model.model.embed_tokens.weight" in keys and "codi.base_model.model.lm_head.weight" in keys
    assert {"prj.1.weight", "prj.1.bias", "prj.3.weight", "prj.3.bias", "prj.ln.weight", "prj.ln.bias"} <= keys
    assert not any("lora" in k or "base_layer" in k for k in keys)

    m = load_model(str(tmp_path))
    assert m.num_thoughts == 4 and m.open_id == len(tok) + 1 and m.readout_id == len(tok) + 2
    q = "Tom has 12 apples. He buys 5 more. How many apples are left?"
    ids = m.prompt_ids(q)
    assert ids == tok(q)["input_ids"] + [len(tok) + 1]
    st = m.think(m.encode(torch.tensor([ids])))
    with torch.no_grad():
        ref = latent_loop(hf, prj, torch.tensor([ids]), 4)
    torch.testing.assert_close(torch.stack(st.inputs, 1), ref.fed, atol=1e-5, rtol=1e-4)
