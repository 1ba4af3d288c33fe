"""Tiny checkpoints built inside the tests (no downloads): a word-level tokenizer, a random
LLaMA or GPT-2 base; for CODI LoRA adapters with random B and CODI's prj, for Coconut the raw
`base_causallm.*` + `embedding.weight` state dict its run.py saves."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["the", "answer", "is", ":", "how", "many", "apples", "has", "tom", "he", "buys", "more", "?", ".", "and", "left"]
NUMBERS = [str(i) for i in range(0, 101)]


def make_tokenizer(out: Path, bos: bool) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS + NUMBERS + ["#"])}  # '#': Coconut's answer marker
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    return len(vocab)


def _tiny_base(root: Path, family: str, seed: int):
    """Seed, make base/ (tokenizer) and ckpt/ under root; (base, ckpt, V0, the tiny config)."""
    from transformers import GPT2Config, LlamaConfig

    torch.manual_seed(seed)
    base, ckpt = root / "base", root / "ckpt"
    base.mkdir(parents=True, exist_ok=True)
    ckpt.mkdir(parents=True, exist_ok=True)
    v0 = make_tokenizer(base, bos=family == "llama")
    if family == "llama":
        cfg = LlamaConfig(
            vocab_size=v0, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        )
    else:
        cfg = GPT2Config(vocab_size=v0, n_embd=32, n_layer=3, n_head=4, n_positions=512, bos_token_id=2, eos_token_id=2)
    return base, ckpt, v0, cfg


def make_tiny_codi(
    root: Path, family: str = "llama", lora_r: int = 4, prj_dim: int = 24, seed: int = 0, fmt: str = "bin"
) -> tuple[Path, Path]:
    """Write base/ (config + tokenizer) and ckpt/ (CODI state dict) under root; return both."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from thoughtpatch.model.loader import build_prj

    base, ckpt, v0, cfg = _tiny_base(root, family, seed)
    if family == "llama":
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    else:
        targets = ["c_attn", "c_proj", "c_fc"]
    cfg.save_pretrained(base)
    lm = AutoModelForCausalLM.from_config(cfg)
    lm.resize_token_embeddings(v0 + 3, mean_resizing=False)
    sd: dict[str, torch.Tensor]
    if lora_r:
        net = get_peft_model(lm, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=targets, task_type="CAUSAL_LM"))
        for n, p in net.named_parameters():
            if "lora_B" in n:  # B starts at zero: randomise so the adapters do something
                p.data.normal_(0, 0.2)
        sd = {"codi." + k: v for k, v in net.state_dict().items()}
    else:
        sd = {"codi.base_model.model." + k: v for k, v in lm.state_dict().items()}
    prj = build_prj(cfg.hidden_size, prj_dim)
    with torch.no_grad():
        prj.ln.weight.normal_(1.0, 0.1)
    sd |= {"prj." + k: v for k, v in prj.state_dict().items()}
    sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
    if fmt == "bin":
        torch.save(sd, ckpt / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(sd, str(ckpt / "model.safetensors"))
    (ckpt / "thoughtpatch.json").write_text(json.dumps({"lora_alpha": 2 * lora_r, "num_thoughts": 4}))
    return ckpt, base


def make_tiny_coconut(root: Path, family: str = "gpt2", seed: int = 0) -> tuple[Path, Path]:
    """Write base/ (config + tokenizer, no markers) and ckpt/checkpoint_3 (Coconut's raw
    state dict, fp32, V0 + 3 rows) under root; return (checkpoint file, base)."""
    from transformers import AutoModelForCausalLM

    base, ckpt, v0, cfg = _tiny_base(root, family, seed)
    cfg.save_pretrained(base)
    lm = AutoModelForCausalLM.from_config(cfg)
    lm.resize_token_embeddings(v0 + 3, mean_resizing=False)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    sd = {"base_causallm." + k: v.detach().clone().contiguous() for k, v in lm.state_dict().items()}
    sd["embedding.weight"] = lm.get_input_embeddings().weight.detach().clone()
    path = ckpt / "checkpoint_3"
    torch.save(sd, path)
    return path, base


def load_tiny(root: Path, name: str):
    """A loaded tiny model by name, `codi-llama`, `codi-gpt2`, `coconut-llama` or `coconut-gpt2`
    (Coconut with K = 4: enough thoughts for every experiment, fewer variants)."""
    from thoughtpatch.model import load_model

    family, arch = name.split("-")
    if family == "codi":
        ckpt, base = make_tiny_codi(root, arch)
        return load_model(ckpt, base=base)
    ckpt, base = make_tiny_coconut(root, arch)
    return load_model(ckpt, base=base, num_thoughts=4)
