"""Checkpoint files: read (pytorch_model.bin, model.safetensors or Coconut's raw
`checkpoint_N`), write, and tell the family from the keys.

CODI's keys follow its `CODI` module: `codi.base_model.model.<HF name>` for the (PEFT-wrapped)
LM — LoRA-wrapped layers as `<module>.base_layer.*` and `<module>.lora_{A,B}.default.weight` —
and `prj.{1,3,ln}.*` for the projection. Coconut's follow its `Coconut` module:
`base_causallm.<HF name>` for the LM and `embedding.weight` (the same input embedding again).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from thoughtpatch.errors import ThoughtpatchError

LM_PREFIX = "codi.base_model.model."
COCONUT_PREFIX = "base_causallm."
LEGACY_PREFIX = "coconut."  # an older name of the same module, accepted as an alias
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # CODI's own order of preference
SIDECAR = "thoughtpatch.json"


def find_checkpoint_file(path: str | Path) -> Path:
    """The weights file: `path` itself, or in a directory model.safetensors, pytorch_model.bin,
    or a single Coconut `checkpoint_<epoch>` file."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raw = sorted(p for p in path.glob("checkpoint_*") if p.is_file() and p.name.split("_", 1)[1].isdigit())
        if len(raw) == 1:
            return raw[0]
        if raw:
            raise ThoughtpatchError(f"{path}: several Coconut checkpoints ({', '.join(p.name for p in raw)}); name the file")
        raise ThoughtpatchError(f"{path}: no {' or '.join(WEIGHT_FILES)} or checkpoint_<epoch> in this directory")
    raise ThoughtpatchError(f"{path}: checkpoint not found")


# torch's weights-only refusal wraps the cause in advice (re-run with weights_only=False,
# allowlist the global) that this project never follows: a pickle must not run code.
_ADVICE = re.compile(
    r"weights_only|Weights only load failed|torch\.serialization|PyTorch 2\.6|will likely succeed|arbitrary code|trust|"
    r"file an issue|documentation|recommended steps|This is an internal|This can happen if"
)


def load_failure(e: Exception) -> str:
    """The cause of a failed checkpoint read in one line, without torch's advice."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # terminal colours
    sentences = [x.strip() for x in re.split(r"(?<=[.!?])\s+|\n+", text) if x.strip()]
    cause = [re.sub(r"^(\(\d\)\s*|WeightsUnpickler error:\s*)", "", x) for x in sentences if not _ADVICE.search(x)]
    cause = " ".join(c for c in cause if c)
    if "Weights only load failed" in text:
        cause = f"not a plain state dict of tensors, refused by the weights-only loader: {cause or 'no reason given'}"
    return f"{type(e).__name__}: {cause}" if cause else type(e).__name__


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    f = find_checkpoint_file(path)
    try:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(f))
        else:
            # weights_only: a pickle from the internet must not be able to run code.
            sd = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file for the user
        raise ThoughtpatchError(f"{f}: cannot read checkpoint ({load_failure(e)})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ThoughtpatchError(f"{f}: not a state dict of tensors")
    return {(k.replace(LEGACY_PREFIX, "codi.", 1) if k.startswith(LEGACY_PREFIX) else k): v for k, v in sd.items()}


def detect_family(sd: dict[str, torch.Tensor], path: str | Path):
    """CODI or Coconut, from the key layout (the two are disjoint)."""
    from thoughtpatch.model.families import COCONUT, CODI

    if any(k.startswith("codi.") for k in sd) or any(k.startswith("prj.") for k in sd):
        return CODI
    if any(k.startswith(COCONUT_PREFIX) for k in sd):
        return COCONUT
    if any(k.endswith(("embed_tokens.weight", "wte.weight")) for k in sd):
        raise ThoughtpatchError(
            f"{path}: a plain language-model state dict (no codi./prj. or base_causallm. keys; e.g. a Coconut CoT-stage "
            "checkpoint): it has no latent thoughts to patch"
        )
    raise ThoughtpatchError(f"{path}: neither a CODI (codi.*, prj.*) nor a Coconut (base_causallm.*) checkpoint: {', '.join(sorted(sd)[:3])} ...")


def read_sidecar(path: str | Path) -> dict:
    """Optional `thoughtpatch.json` next to the weights (K, answer template, ...)."""
    d = Path(path)
    d = d if d.is_dir() else d.parent
    f = d / SIDECAR
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ThoughtpatchError(f"{f}: malformed JSON at line {e.lineno}: {e.msg}") from None


def lora_rank(sd: dict[str, torch.Tensor]) -> int:
    """r from tensor shapes (lora_A is [r, in]); 0 when the checkpoint has no adapters."""
    ranks = {v.shape[0] for k, v in sd.items() if ".lora_A." in k}
    if len(ranks) > 1:
        raise ThoughtpatchError(f"checkpoint has LoRA adapters of different ranks {sorted(ranks)}")
    return ranks.pop() if ranks else 0


def lora_modules(sd: dict[str, torch.Tensor]) -> set[str]:
    """Leaf module names that carry adapters (e.g. q_proj, c_attn)."""
    return {k.split(".lora_A.")[0].rsplit(".", 1)[-1] for k in sd if ".lora_A." in k}


def save_codi_checkpoint(out_dir: str | Path, hf_model: torch.nn.Module, prj: torch.nn.Module, sidecar: dict | None = None) -> Path:
    """Write a plain (LoRA-free) model in CODI's key format as `model.safetensors`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {LM_PREFIX + k: v for k, v in hf_model.state_dict().items()}
    sd |= {"prj." + k: v for k, v in prj.state_dict().items()}
    # safetensors refuses shared storage: the tied LM head is stored as its own copy.
    sd = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "codi"})
    if sidecar is not None:
        (out / SIDECAR).write_text(json.dumps(sidecar, indent=1) + "\n")
    return out / "model.safetensors"


def save_coconut_checkpoint(out_dir: str | Path, hf_model: torch.nn.Module) -> Path:
    """Write a model in Coconut's key format as `model.safetensors`: `base_causallm.<HF name>`
    for every LM parameter and `embedding.weight` (the input embedding again), each its own
    copy as in the files Coconut's run.py saves."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {COCONUT_PREFIX + k: v for k, v in hf_model.state_dict().items()}
    sd["embedding.weight"] = hf_model.get_input_embeddings().weight
    sd = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "coconut"})
    return out / "model.safetensors"
