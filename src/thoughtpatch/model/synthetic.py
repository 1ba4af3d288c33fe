"""Random-weight continuous-thought models (CODI or Coconut) of any LLaMA shape, built in
memory: for benchmarks and GPU scripts that must not download anything. Same runtime, same
loop; only the weights are random (and the tokenizer is a small word-level one)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from thoughtpatch.model.families import LLAMA, family_named
from thoughtpatch.model.runtime import ThoughtModel

WORDS = "the a of and to in is has how many what each more left total apples boxes eggs friends buys sells gives".split()


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int

    def describe(self) -> str:
        return f"L={self.layers} H={self.hidden} heads={self.heads}/{self.kv_heads} mlp={self.mlp} V={self.vocab}"


SHAPES = {
    "llama-3.2-1b": Shape(2048, 16, 32, 8, 8192, 128256),
    "mid": Shape(768, 8, 12, 4, 2048, 32000),
    "tiny": Shape(64, 2, 4, 2, 128, 512),
}


def word_tokenizer(vocab_size: int):
    """A word-level fast tokenizer: BOS, EOS, words and the numbers 0–999 as single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>"]
    toks = specials + WORDS + ["The", "answer", ":", "?", ".", ","] + [str(i) for i in range(1000)]
    toks = toks[:vocab_size]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(toks)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


def random_codi(shape: Shape, num_thoughts: int = 6, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
                family: str = "codi") -> ThoughtModel:
    """A model of this shape with N(0, 0.02) weights and K thoughts: CODI (prj_dim = hidden) or
    Coconut (no projection; its markers take the three extra rows)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from thoughtpatch.model.loader import build_prj

    cfg = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.mlp, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, max_position_embeddings=4096,
        tie_word_embeddings=True, rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        hf = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
        hf.resize_token_embeddings(shape.vocab + 3, mean_resizing=False)
        prj = build_prj(shape.hidden, shape.hidden)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in list(hf.named_parameters()) + list(prj.named_parameters()):
            if "norm" in name or name.startswith("4") or name.endswith("ln.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)
    hf.tie_weights()
    hf.to(dtype).eval()
    prj.to(dtype).eval()
    tok = word_tokenizer(shape.vocab)
    fam = family_named(family)
    return ThoughtModel(
        net=hf, hf=hf, prj=prj if fam.projects else None, tokenizer=tok, arch=LLAMA, family=fam, base_vocab=shape.vocab,
        num_thoughts=num_thoughts, answer_template="The answer is : {answer}", max_new_tokens=fam.max_new_tokens,
        source={"checkpoint": f"random {fam.name} {shape.describe()}", "base": "synthetic", "dtype": str(dtype).removeprefix("torch."), "lora_r": 0},
    )


def question(n_words: int, number: int, seed: int | None = None) -> str:
    """A deterministic question of about n_words words that mentions `number`; with `seed`,
    its words are drawn at random (different seeds, different words)."""
    n, rng = max(0, n_words - 6), random.Random(seed)
    words = [WORDS[(i * 7) % len(WORDS)] if seed is None else rng.choice(WORDS) for i in range(n)]
    return f"{' '.join(words)} has {number} apples . how many ?"
