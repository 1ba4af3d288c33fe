"""Golden test: our runtime against tensors recorded from Coconut's own run.py eval path
(tests/fixtures/coconut: a tiny random GPT-2 Coconut checkpoint in Coconut's raw
`checkpoint_N` format, five questions, K = 6, fp32, max_new_tokens 64)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import FIXTURES, run_cli
from thoughtpatch.model import load_model

TOL = 1e-4


@pytest.fixture(scope="module")
def golden():
    from safetensors.torch import load_file

    root = FIXTURES / "coconut"
    manifest = json.loads((root / "manifest.json").read_text())
    info = manifest["families"]["gpt2"]
    # no family flag: the raw file's keys say Coconut
    model = load_model(root / info["checkpoint_file"], base=root / info["base_dir"])
    return model, manifest, info, load_file(str(root / info["reference_file"]))


def test_loader_reads_coconuts_layout(golden):
    m, manifest, info, _ = golden
    special = info["special_tokens"]
    assert m.family.name == "coconut" and m.prj is None
    assert (m.open_id, m.readout_id, m.latent_id) == (special["start_latent"]["id"], special["end_latent"]["id"], special["latent"]["id"])
    assert m.num_thoughts == manifest["settings"]["num_latents"] and m.max_new_tokens == manifest["settings"]["max_new_tokens"]


def test_fp32_matches_coconut(golden):
    m, manifest, info, t = golden
    for i, q in enumerate(manifest["questions"]):
        p = f"fp32_b1.q{i}."
        prompt = m.prompt_ids(q["question"])
        assert m.layout_ids(prompt) == t[p + "input_ids"].tolist(), f"q{i}: prompt ids differ"
        st = m.think(m.encode(prompt))
        gens, logits = m.generate(st, keep_logits=True)
        # the <|end-latent|> step: its hidden states, from a teacher-forced pass of that one token
        end = m.embed(torch.tensor([[m.readout_id]]))
        with torch.inference_mode():
            out = m.net(inputs_embeds=end, use_cache=True, output_hidden_states=True, **{m._cache_kw: st.cache})
        m.rewind(st)
        for name, ours in (
            ("latent_inputs", st.latent_inputs()[0]),
            ("latent_hidden_states", st.latent_hidden()[0]),
            ("end_hidden_states", torch.stack(out.hidden_states, 1)[0, :, -1]),
            ("first_answer_logits", logits[0, 0]),
        ):
            err = (ours.float() - t[p + name].float()).abs().max().item()
            assert err <= TOL, f"q{i} {name}: max |Δ| = {err:.2e}"
        assert gens[0].token_ids == t[p + "answer_token_ids"].tolist(), f"q{i}: greedy ids differ"
        rec = info["runs"]["fp32_b1"]["records"][i]
        assert gens[0].answer == rec["extracted_answer"], f"q{i}: extracted answer differs"
        # Coconut's own identities: thought 1 = the final-norm state at <|start-latent|>, thought
        # k+1 = the final-norm state at latent k, fed raw
        assert torch.equal(st.latent_inputs()[0, 1:], st.latent_hidden()[0, :-1, -1])


def test_prompt_pass_matches_coconut(golden):
    m, manifest, _, t = golden
    st = m.encode(m.prompt_ids(manifest["questions"][0]["question"]), record=True)
    err = (st.prompt_hidden[0].float() - t["fp32_b1.q0.prompt_hidden_states"].float()).abs().max().item()
    assert err <= TOL


def test_trace_cli_writes_coconuts_tensors_with_no_family_flag(golden, tmp_path):
    from safetensors.torch import load_file

    _, manifest, info, t = golden
    root = FIXTURES / "coconut"
    out = tmp_path / "q0.safetensors"
    r = run_cli("trace", "--model", str(root / info["checkpoint_file"]), "--base", str(root / info["base_dir"]),
                "-q", manifest["questions"][0]["question"], "--out", str(out))
    assert r.returncode == 0, r.stderr
    got = load_file(str(out))
    assert got["input_ids"].tolist() == t["fp32_b1.q0.input_ids"].tolist()  # the whole eval prompt, markers included
    assert (got["latent_inputs"] - t["fp32_b1.q0.latent_inputs"]).abs().max() <= TOL
    assert got["answer_token_ids"].tolist() == t["fp32_b1.q0.answer_token_ids"].tolist()
    assert "family: coconut" in r.stdout
