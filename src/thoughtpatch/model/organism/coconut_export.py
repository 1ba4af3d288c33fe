"""Write a trained Coconut organism as a directory that is both a Coconut checkpoint and its
own base: config.json (vocab = V0, no markers), tokenizer files (no markers: they are added
at load time with `add_tokens`, as Coconut's run.py does), model.safetensors in Coconut's
key layout (`base_causallm.<HF name>` + `embedding.weight`, V0 + 3 rows), thoughtpatch.json,
heldout.json, pairs.json (the CODI organism's), train_log.json and MODEL_CARD.md."""

from __future__ import annotations

import copy
import json
import platform
from pathlib import Path

import torch

from thoughtpatch.data.schema import atomic_write_text, save_pairs
from thoughtpatch.errors import ThoughtpatchError
from thoughtpatch.model.organism.export import CONDITIONS, accuracy_markdown
from thoughtpatch.model.organism.tokenizer import (
    COCONUT_ANSWER_TEMPLATE, COCONUT_EXTRA, COCONUT_MARKERS, add_coconut_markers, build_tokenizer, save_tokenizer,
)

PREFIX = "base_causallm."
EMBEDDING = "embedding.weight"  # Coconut's `embedding` child: the LM's input embedding again
MAX_NEW_TOKENS = 64  # Coconut's GSM8K setting
SIDECAR = "thoughtpatch.json"


def coconut_state_dict(hf) -> dict[str, torch.Tensor]:
    """Coconut's checkpoint keys for an HF causal LM (each tensor its own copy, as FSDP saves)."""
    sd = {PREFIX + k: v for k, v in hf.state_dict().items()}
    sd[EMBEDDING] = hf.get_input_embeddings().weight
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def load_coconut_organism(path: str | Path):
    """(hf, tokenizer with the markers, sidecar) from an organism directory: the LM built from
    config.json with V0 + 3 rows, loaded strictly from the `base_causallm.*` keys."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d = Path(path)
    f = d / "model.safetensors"
    if not f.is_file():
        raise ThoughtpatchError(f"{d}: no model.safetensors")
    sd = load_file(str(f))
    stray = [k for k in sd if not k.startswith(PREFIX) and k != EMBEDDING]
    if stray or EMBEDDING not in sd:
        raise ThoughtpatchError(f"{f}: not a Coconut checkpoint (keys {sorted(stray)[:3] or 'without ' + EMBEDDING})")
    config = AutoConfig.from_pretrained(str(d))
    tok = AutoTokenizer.from_pretrained(str(d))
    add_coconut_markers(tok)
    config.vocab_size = len(tok)
    hf = AutoModelForCausalLM.from_config(config)
    lm = {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}
    missing, unexpected = hf.load_state_dict(lm, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ThoughtpatchError(f"{f}: missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
    if not torch.equal(sd[EMBEDDING], hf.get_input_embeddings().weight):
        raise ThoughtpatchError(f"{f}: {EMBEDDING} differs from {PREFIX}model.embed_tokens.weight")
    hf.tie_weights()
    hf.eval()
    sidecar = json.loads((d / SIDECAR).read_text()) if (d / SIDECAR).is_file() else {}
    return hf, tok, sidecar


def save_coconut_organism(out_dir, hf, tok, v0: int, cfg, heldout, pairs, log, wall_s: float,
                          eval_problems: int | None = None) -> dict:
    """Write everything, reload the directory and measure the accuracy table on it."""
    from safetensors.torch import save_file

    from thoughtpatch.model.evaluate import EvalProblem, spread
    from thoughtpatch.model.organism import coconut

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_tok = build_tokenizer(COCONUT_EXTRA)
    assert len(base_tok) == v0 and len(tok) == v0 + 3
    save_tokenizer(base_tok, out)
    config = copy.deepcopy(hf.config)
    config.vocab_size = v0  # the base's vocabulary; the checkpoint holds V0 + 3 rows (the markers)
    config.save_pretrained(str(out))
    atomic_write_text(out / "heldout.json", json.dumps(heldout, indent=1) + "\n")
    save_pairs(pairs, out / "pairs.json")
    every = max(1, len(log) // 200)
    atomic_write_text(out / "train_log.json", json.dumps([r for i, r in enumerate(log) if i % every == 0 or i == len(log) - 1]) + "\n")
    save_file(coconut_state_dict(hf), str(out / "model.safetensors"), metadata={"format": "coconut"})

    sidecar = {
        "family": "coconut",
        "num_thoughts": cfg.num_thoughts,
        "answer_template": COCONUT_ANSWER_TEMPLATE,
        "organism": True,
        "max_new_tokens": MAX_NEW_TOKENS,
        "base_vocab": v0,
        "markers": dict(zip(COCONUT_MARKERS, range(v0, v0 + 3))),
        "parameters": sum(p.numel() for p in hf.parameters()),
        "train": cfg.to_dict(),
        "train_wall_s": round(wall_s, 1),
        "train_steps_per_s": round(len(log) / max(wall_s, 1e-9), 3),
        "torch": torch.__version__,
    }
    m, mtok, _ = load_coconut_organism(out)
    probs = [EvalProblem(p["question"], p["answer"], p["meta"]["n_steps"]) for p in heldout]
    res = coconut.evaluate(m, mtok, spread(probs, eval_problems), cfg.num_thoughts, CONDITIONS, MAX_NEW_TOKENS)
    sidecar |= {"eval_n": res["n"], "accuracy": res["accuracy"]}
    atomic_write_text(out / SIDECAR, json.dumps(sidecar, indent=1) + "\n")
    atomic_write_text(out / "MODEL_CARD.md", model_card(cfg, sidecar, len(heldout), len(pairs), log, wall_s))
    return sidecar


def model_card(cfg, sc: dict, n_heldout: int, n_pairs: int, log: list[dict], wall_s: float) -> str:
    return "TODO\n\n" + accuracy_markdown(sc["accuracy"]) + "\n"
