"""The clean (and corrupted) activation cache: each pair's unpatched run — activations at
every site kind (input, resid, attn, mlp, head, kv), the decision-position logits, the
continuation log-probs, the prompt and the greedy answer — stored with metadata that a later
experiment checks before reusing it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from thoughtpatch.data.schema import atomic_path
from thoughtpatch.errors import ThoughtpatchError
from thoughtpatch.model.runtime import ThoughtModel
from thoughtpatch.patching.engine import Readout

CHECKED = ("model", "pairs_sha256", "num_thoughts", "num_layers", "hidden_size", "dtype", "max_new_tokens", "stop_ids", "role")


def save_cache(path: Path, runs: dict[int, tuple[list[int], Readout]], meta: dict) -> None:
    """`runs`: pair id → (prompt ids, unpatched readout)."""
    from safetensors.torch import save_file

    tensors = {}
    for pid, (prompt, ro) in runs.items():
        for kind, t in ro.acts.items():
            tensors[f"p{pid}.act.{kind}"] = t.contiguous()
        tensors[f"p{pid}.prompt_ids"] = torch.tensor(prompt, dtype=torch.long)
        tensors[f"p{pid}.decision_logits"] = ro.decision_logits.contiguous()
        tensors[f"p{pid}.logprobs"] = torch.tensor([ro.logprob_clean, ro.logprob_corrupted], dtype=torch.float64)
        tensors[f"p{pid}.answer_ids"] = torch.tensor(ro.answer.token_ids, dtype=torch.long)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"thoughtpatch": json.dumps(meta | {"pair_ids": sorted(runs)})})


def open_cache(path: Path):
    """(safetensors handle, metadata) of a cache file; a one-line error for anything else."""
    from safetensors import safe_open

    try:
        f = safe_open(str(path), "pt")
        return f, json.loads(f.metadata()["thoughtpatch"])
    except Exception as e:  # noqa: BLE001
        raise ThoughtpatchError(f"{path}: not a thoughtpatch activation cache ({type(e).__name__})") from None


def load_cache(path: Path, model: ThoughtModel, expect: dict) -> dict[int, Readout]:
    """Read a cache, refusing one made by another model, pair set or setting."""
    f, meta = open_cache(path)
    for key in CHECKED:
        if key in expect and meta.get(key) != expect[key]:
            raise ThoughtpatchError(f"{path}: made with {key} = {meta.get(key)!r}, this run has {expect[key]!r}; refusing to reuse it")
    out = {}
    keys = set(f.keys())
    for pid in meta["pair_ids"]:
        ids = f.get_tensor(f"p{pid}.answer_ids").tolist()
        lp = f.get_tensor(f"p{pid}.logprobs").tolist()
        prefix = f"p{pid}.act."
        out[pid] = Readout(
            decision_logits=f.get_tensor(f"p{pid}.decision_logits"),
            logprob_clean=lp[0],
            logprob_corrupted=lp[1],
            answer=model.generation(f.get_tensor(f"p{pid}.prompt_ids").tolist(), ids),
            acts={k[len(prefix):]: f.get_tensor(k) for k in sorted(keys) if k.startswith(prefix)},
        )
    return out
