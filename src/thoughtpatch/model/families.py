"""Per-architecture facts, keyed on `config.model_type` (never on a name string)."""

from __future__ import annotations

from dataclasses import dataclass

from thoughtpatch.errors import ThoughtpatchError


@dataclass(frozen=True)
class Family:
    name: str
    lora_targets: tuple[str, ...]  # CODI's LoRA target modules for this family
    blocks_path: str  # attribute path from the causal LM to its list of decoder blocks


LLAMA = Family("llama", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), "model.layers")
GPT2 = Family("gpt2", ("c_attn", "c_proj", "c_fc"), "transformer.h")

# LLaMA-like decoders share module names (CODI's own list: llama|mistral|falcon|qwen).
_BY_TYPE = {t: LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")} | {"gpt2": GPT2}


def family_for(model_type: str) -> Family:
    try:
        return _BY_TYPE[model_type]
    except KeyError:
        known = ", ".join(sorted(_BY_TYPE))
        raise ThoughtpatchError(f"unknown model type '{model_type}' (supported: {known})") from None
