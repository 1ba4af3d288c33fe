"""`thoughtpatch trace` and `inspect` on the golden reference model."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import FIXTURES


@pytest.fixture
def _run(monkeypatch, capsys):
    """The `thoughtpatch` entry point in this process (a subprocess would spend seconds on
    imports): returncode, stdout and stderr as subprocess.run gives them."""
    from types import SimpleNamespace

    from thoughtpatch.cli import main

    def run(*args: str):
        monkeypatch.setattr(sys, "argv", ["thoughtpatch", *args])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code or 0
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run


@pytest.fixture(scope="module")
def ref():
    root = FIXTURES / "codi"
    return root, json.loads((root / "manifest.json").read_text())


def test_trace_writes_codi_tensors(ref, tmp_path, _run):
    from safetensors.torch import load_file

    root, manifest = ref
    q = manifest["questions"][1]["question"]
    out = tmp_path / "t.safetensors"
    r = _run("trace", "--model", str(root / "ckpt/llama"), "--base", str(root / "bases/tiny-llama"), "--lora-alpha", "4", "--question", q, "--out", str(out))
    assert r.returncode == 0, r.stderr[-1500:]
    assert "answer:" in r.stdout and "number:" in r.stdout
    t = load_file(str(out))
    want = load_file(str(root / "reference_llama.safetensors"))
    assert t["input_ids"].tolist() == want["fp32_b1.q1.input_ids"].tolist()
    assert t["latent_inputs"].shape == (6, 64) and t["latent_hidden_states"].shape == (6, 5, 64)
    assert (t["first_answer_logits"] - want["fp32_b1.q1.first_answer_logits"]).abs().max() <= 1e-4
    assert t["answer_token_ids"].tolist() == want["fp32_b1.q1.answer_token_ids"].tolist()


def test_trace_thoughts_flag(ref, tmp_path, _run):
    root, manifest = ref
    from safetensors.torch import load_file

    out = tmp_path / "t2.safetensors"
    r = _run("trace", "--model", str(root / "ckpt/gpt2"), "--base", str(root / "bases/tiny-gpt2"), "--lora-alpha", "4", "-q", "A box holds 12 eggs.", "--out", str(out), "--num-thoughts", "2", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr[-1500:]
    t = load_file(str(out))
    assert t["latent_inputs"].shape[0] == 2 and t["answer_token_ids"].numel() == 4
    # --thoughts selects patched thoughts in runs; with -q it is refused, naming the K option
    r = _run("trace", "--model", str(root / "ckpt/gpt2"), "--base", str(root / "bases/tiny-gpt2"), "-q", "x", "--out", str(out), "--thoughts", "2")
    assert r.returncode == 2 and "--num-thoughts" in r.stderr and r.stderr.strip().count("\n") == 0


def test_inspect_prints_lens_table(ref, _run):
    root, manifest = ref
    r = _run("inspect", "--model", str(root / "ckpt/llama"), "--base", str(root / "bases/tiny-llama"), "--lora-alpha", "4", "-q", manifest["questions"][0]["question"], "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr[-1500:]
    for row in ("<bot>", "thought 0", "thought 5", "answer:"):
        assert row in r.stdout


def test_bad_dtype_is_one_line(ref, tmp_path, _run):
    root, _ = ref
    r = _run("trace", "--model", str(root / "ckpt/llama"), "--base", str(root / "bases/tiny-llama"), "-q", "x", "--out", str(tmp_path / "x.safetensors"), "--dtype", "float8")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --dtype") and r.stderr.strip().count("\n") == 0
