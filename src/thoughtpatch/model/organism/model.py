"""The organisms' architecture: a tiny LLaMA (HF `LlamaForCausalLM`), plus CODI's `prj` for
the CODI organism.

Vocabulary layout follows each method: the tokenizer has V0 ids; the embedding (tied with
the LM head) has V0 + 3 rows. CODI: pad = V0, bot = V0 + 1, eot = V0 + 2 (ids only).
Coconut: <|start-latent|>, <|end-latent|>, <|latent|> = V0, V0 + 1, V0 + 2 (added tokens).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class OrganismConfig:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    mlp: int = 512
    max_positions: int = 256
    num_thoughts: int = 6  # K, as in the released CODI models
    prj_dim: int = 128
    prj_ln_init: float = 0.05  # LayerNorm gain: thoughts start at embedding scale
    init_std: float = 0.02
    fourier_numbers: bool = True  # structured init of the number embeddings (see below)

    def to_dict(self) -> dict:
        return asdict(self)


def llama_config(cfg: OrganismConfig, vocab_size: int, bos_id: int, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.mlp,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_positions,
        initializer_range=cfg.init_std,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=None,
        attn_implementation="eager",
    )


class Prj(nn.Sequential):
    """CODI's projection: Sequential(Dropout, Linear, GELU, Linear) + a child named `ln`,
    so its state-dict keys are prj.1.*, prj.3.*, prj.ln.*."""

    def __init__(self, hidden: int, prj_dim: int, ln_init: float = 1.0):
        super().__init__(nn.Dropout(0.0), nn.Linear(hidden, prj_dim), nn.GELU(), nn.Linear(prj_dim, hidden))
        self.add_module("ln", nn.LayerNorm(hidden, eps=1e-5))
        with torch.no_grad():
            self.ln.weight.fill_(ln_init)


def fourier_number_rows(numbers: list[int], dim: int, std: float, seed: int) -> torch.Tensor:
    """Embeddings for the integers `numbers`: a fixed random projection of n/200 and
    cos/sin(2 pi n / T) for several periods T, scaled to the init std. Numbers start ordered
    and periodic, which lets the teacher learn arithmetic far sooner than from random rows."""
    g = torch.Generator().manual_seed(seed)
    n = torch.tensor(numbers, dtype=torch.float64)[:, None]
    periods = torch.tensor([2, 3, 4, 5, 10, 20, 50, 100, 200], dtype=torch.float64)
    feats = torch.cat([n / 200, torch.cos(2 * math.pi * n / periods), torch.sin(2 * math.pi * n / periods)], 1)
    proj = torch.randn(feats.shape[1], dim, generator=g, dtype=torch.float64)
    rows = feats @ proj
    rows = (rows - rows.mean()) / rows.std() * std
    return rows.float()


def build_lm(cfg: OrganismConfig, tokenizer, seed: int, rows: int):
    """A fresh tied LlamaForCausalLM with `rows` embedding rows, number rows Fourier-initialised.
    Seeds torch's global generator with `seed` first (later draws, e.g. CODI's prj, follow it)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    hf = LlamaForCausalLM(llama_config(cfg, rows, tokenizer.bos_token_id, tokenizer.eos_token_id))
    if cfg.fourier_numbers:
        ids = [tokenizer.convert_tokens_to_ids(str(i)) for i in range(1000)]
        with torch.no_grad():
            hf.get_input_embeddings().weight[ids] = fourier_number_rows(list(range(1000)), cfg.hidden, cfg.init_std, seed)
    hf.tie_weights()
    return hf


def build_organism(cfg: OrganismConfig, tokenizer, seed: int):
    """Fresh CODI organism (base model with V0 + 3 embedding rows, prj). Deterministic for a seed."""
    hf = build_lm(cfg, tokenizer, seed, len(tokenizer) + 3)
    prj = Prj(cfg.hidden, cfg.prj_dim, cfg.prj_ln_init)  # the number rows above use their own generator
    return hf, prj


def build_coconut_organism(cfg: OrganismConfig, tokenizer, seed: int):
    """Fresh Coconut organism: `tokenizer` already holds the three markers (V0 + 3 ids); their
    rows start as copies of the "<<" row (tied, so the LM head's too), as in Coconut's run.py."""
    hf = build_lm(cfg, tokenizer, seed, len(tokenizer))
    src = tokenizer.convert_tokens_to_ids("<<")
    with torch.no_grad():
        w = hf.get_input_embeddings().weight
        w[-3:] = w[src]
    return hf
