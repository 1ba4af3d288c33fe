"""`thoughtpatch trace` and `inspect` on the golden reference model."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FIXTURES, run_cli


@pytest.fixture(scope="module")
def ref():
    root = FIXTURES / "codi"
    return root, json.loads((root / "manifest.json").read_text())


def test_trace_writes_codi_tensors(ref, tmp_path):
    from safetensors.torch import load_file

    root, manifest = ref
    q = manifest["questions"][1]["question"]
    out = tmp_path / "t.safetensors"
    r = run_cli("trace", "--model", str(root / "ckpt/llama"), "--base", str(root / "bases/tiny-llama"), "--lora-alpha", "4", "--question", q, "--out", str(out))
    assert r.returncode == 0, r.stderr[-1500:]
    assert "answer:" in r.stdout and "number:" in r.stdout
    t = load_file(str(out))
    want = load_file(str(root / "reference_llama.safetensors"))
    assert t["input_ids"].tolist() == want["fp32_b1.q1.input_ids"].tolist()
    assert t["latent_inputs"].shape == (6, 64) and t["latent_hidden_states"].shape == (6, 5, 64)
    assert (t["first_answer_logits"] - want["fp32_b1.q1.first_answer_logits"]).abs().max() <= 1e-4
    assert t["answer_token_ids"].tolist() == want["fp32_b1.q1.answer_token_ids"].tolist()


def test_trace_thoughts_flag(ref, tmp_path):
    root, manifest = ref
    from safetensors.torch import load_file

    out = tmp_path / "t2.safetensors"
    r = run_cli("trace", "--model", str(root / "ckpt/gpt2"), "--base", str(root / "bases/tiny-gpt2"), "--lora-alpha", "4", "-q", "A box holds 12 eggs.", "--out", str(out), "--num-thoughts", "2", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr[-1500:]
    t = load_file(str(out))
    assert t["latent_inputs"].shape[0] == 2 and t["answer_token_ids"].numel() == 4
    # --thoughts selects patched thoughts in runs; with -q it is refused, naming the K option
    r = run_cli("trace", "--model", str(root / "ckpt/gpt2"), "--base", str(root / "bases/tiny-gpt2"), "-q", "x", "--out", str(out), "--thoughts", "2")
    assert r.returncode == 2 and "--num-thoughts" in r.stderr and r.stderr.strip().count("\n") == 0


def test_inspect_prints_lens_table(ref):
    root, manifest = ref
    r = run_cli("inspect", "--model", str(root / "ckpt/llama"), "--base", str(root / "bases/tiny-llama"), "--lora-alpha", "4", "-q", manifest["questions"][0]["question"], "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr[-1500:]
    for row in ("<bot>", "thought 0", "thought 5", "answer:"):
        assert row in r.stdout


def test_bad_dtype_is_one_line(ref, tmp_path):
    root, _ = ref
    r = run_cli("trace", "--model", str(root / "ckpt/llama"), "--base", str(root / "bases/tiny-llama"), "-q", "x", "--out", str(tmp_path / "x.safetensors"), "--dtype", "float8")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --dtype") and r.stderr.strip().count("\n") == 0
