"""The CODI loader: formats, strictness, and one-line errors for every way a load goes wrong."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli
from tests.tiny import make_tiny_codi
from thoughtpatch.errors import ThoughtpatchError
from thoughtpatch.model import load_model
from thoughtpatch.model.checkpoint import read_state_dict


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_codi(tmp_path_factory.mktemp("tiny"), "llama")


def _rewrite(ckpt, fn):
    sd = read_state_dict(ckpt)
    fn(sd)
    (ckpt / "pytorch_model.bin").unlink()
    torch.save(sd, ckpt / "pytorch_model.bin")


def _copy(tiny, tmp_path):
    import shutil

    ckpt, base = tiny
    shutil.copytree(ckpt, tmp_path / "ckpt")
    return tmp_path / "ckpt", base


def test_loads_bin_and_safetensors_alike(tmp_path):
    a_ckpt, a_base = make_tiny_codi(tmp_path / "a", "gpt2", fmt="bin")
    b_ckpt, b_base = make_tiny_codi(tmp_path / "b", "gpt2", fmt="safetensors")
    a, b = load_model(a_ckpt, base=a_base), load_model(b_ckpt, base=b_base)
    ids = a.prompt_ids("how many apples ?")
    ga, _ = a.generate(a.think(a.encode(ids)), max_new_tokens=5)
    gb, _ = b.generate(b.think(b.encode(ids)), max_new_tokens=5)
    assert ga[0].token_ids == gb[0].token_ids


def test_reads_rank_alpha_prj_dim_and_k(tiny):
    m = load_model(*tiny)
    assert m.source["lora_r"] == 4
    assert m.prj[1].out_features == 24 and m.hidden_size == 32  # prj_dim != hidden
    assert m.num_thoughts == 4  # from thoughtpatch.json
    lora = [mod for name, mod in m.net.named_modules() if name.endswith("q_proj")][0]
    assert lora.scaling["default"] == pytest.approx(8 / 4)
    assert m.open_id == m.pad_id + 1 == m.readout_id - 1


def test_lora_alpha_changes_the_model(tiny):
    ckpt, base = tiny
    a, b = load_model(ckpt, base=base, lora_alpha=8), load_model(ckpt, base=base, lora_alpha=1)
    ids = a.prompt_ids("how many apples ?")
    assert not torch.allclose(a.encode(ids).bot_hidden, b.encode(ids).bot_hidden)


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda sd: sd.pop("codi.base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight"), "missing keys: codi.base_model.model.model.layers.0.mlp.up_proj.lora_A"),
        (lambda sd: sd.pop("prj.ln.bias"), "missing keys: prj.ln.bias"),
        (lambda sd: sd.__setitem__("codi.base_model.model.model.layers.0.extra.weight", torch.zeros(2)), "unexpected keys: codi.base_model.model.model.layers.0.extra.weight"),
        (lambda sd: sd.__setitem__("optimizer.state", torch.zeros(2)), "unexpected keys: optimizer.state"),
        (lambda sd: sd.__setitem__("codi.base_model.model.model.norm.weight", torch.zeros(7)), "shape mismatch at codi.base_model.model.model.norm.weight"),
        (lambda sd: sd.__setitem__("prj.3.bias", torch.zeros(5)), "shape mismatch at prj.3.bias"),
    ],
    ids=["missing-lm", "missing-prj", "unexpected-lm", "unexpected-other", "shape-lm", "shape-prj"],
)
def test_key_errors_name_the_key(tiny, tmp_path, mutate, needle):
    ckpt, base = _copy(tiny, tmp_path)
    _rewrite(ckpt, mutate)
    with pytest.raises(ThoughtpatchError) as e:
        load_model(ckpt, base=base)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_missing_keys_list_is_short(tiny, tmp_path):
    ckpt, base = _copy(tiny, tmp_path)
    _rewrite(ckpt, lambda sd: [sd.pop(k) for k in [k for k in sd if ".layers.1." in k]])
    with pytest.raises(ThoughtpatchError, match=r"missing keys: .*\(\+\d+ more\)"):
        load_model(ckpt, base=base)


def test_unknown_model_type(tiny, tmp_path):
    import shutil

    ckpt, base = tiny
    shutil.copytree(base, tmp_path / "base")
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    cfg["model_type"] = "bert"
    cfg["architectures"] = ["BertForMaskedLM"]
    (tmp_path / "base" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ThoughtpatchError, match="unknown model type 'bert'"):
        load_model(ckpt, base=tmp_path / "base")


def test_missing_base(tiny, tmp_path):
    ckpt, _ = tiny
    with pytest.raises(ThoughtpatchError, match="base model directory .* not found"):
        load_model(ckpt, base=tmp_path / "nope")
    with pytest.raises(ThoughtpatchError, match="pass --base"):
        load_model(ckpt)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ThoughtpatchError, match="not found"):
        load_model(tmp_path / "nothing", base=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ThoughtpatchError, match="no model.safetensors or pytorch_model.bin"):
        load_model(tmp_path / "empty", base=tmp_path)


def test_pickle_with_code_is_refused(tmp_path, tiny):
    """weights_only=True: a checkpoint that would run code on load is rejected, not executed."""
    ckpt, base = _copy(tiny, tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (ckpt / "pytorch_model.bin").unlink()
    torch.save({"x": Evil()}, ckpt / "pytorch_model.bin")
    with pytest.raises(ThoughtpatchError, match="cannot read checkpoint") as e:
        load_model(ckpt, base=base)
    # One line with the real cause (the global it refers to), not torch's advice to load it
    # with weights_only=False — advice this project never follows.
    msg = str(e.value)
    assert "\n" not in msg and "GLOBAL print" in msg and "weights_only" not in msg, msg


def test_damaged_checkpoint_names_the_cause(tmp_path, tiny):
    ckpt, base = _copy(tiny, tmp_path)
    data = (ckpt / "pytorch_model.bin").read_bytes()
    (ckpt / "pytorch_model.bin").write_bytes(data[: len(data) // 2])  # a torn download
    with pytest.raises(ThoughtpatchError, match=r"pytorch_model.bin: cannot read checkpoint \(RuntimeError: .*zip archive") as e:
        load_model(ckpt, base=base)
    assert "\n" not in str(e.value)


def test_cli_error_is_one_line(tiny, tmp_path):
    ckpt, _ = tiny
    r = run_cli("trace", "--model", str(ckpt), "--base", str(tmp_path / "nope"), "--question", "x", "--out", str(tmp_path / "t.safetensors"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "not found" in r.stderr
    assert not (tmp_path / "t.safetensors").exists()
