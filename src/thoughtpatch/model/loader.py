"""Load a CODI or Coconut checkpoint (or an organism) into a `ThoughtModel`.

CODI (CODI_SPEC §1.5): build the base from its config, resize the embeddings to the
checkpoint's rows, wrap LoRA with peft (r from tensor shapes, alpha a parameter), build
`prj` with prj_dim from the weights, load strictly, tie. Coconut (COCONUT_SPEC §3): the raw
state dict Coconut's run.py saves (`base_causallm.*` + `embedding.weight`), the three latent
markers added to the tokenizer, loaded strictly; no extra modules. Only config, tokenizer and
the non-persistent buffers come from the base; every weight comes from the checkpoint.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from thoughtpatch.errors import ThoughtpatchError
from thoughtpatch.model import checkpoint as ckpt
from thoughtpatch.model.families import CODI, COCONUT_MARKERS, arch_for, family_named
from thoughtpatch.model.runtime import ThoughtModel

TOY_DIR = Path(__file__).resolve().parent.parent / "toy"
TOY_COCONUT_DIR = Path(__file__).resolve().parent.parent / "toy_coconut"
ORGANISMS = {"toy": TOY_DIR, "toy-coconut": TOY_COCONUT_DIR}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_model(model: str | Path, base: str | Path | None) -> tuple[Path, str | Path]:
    """`toy` / `toy-coconut` mean the shipped organisms; a checkpoint dir (or a file in a dir)
    with a config.json is its own base."""
    if str(model) in ORGANISMS:
        d = ORGANISMS[str(model)]
        if not (d / "config.json").is_file():
            raise ThoughtpatchError(f"the organism '{model}' is not installed at {d} (train it: thoughtpatch toy train)")
        return d, base or d
    path = Path(model)
    if not path.exists():
        raise ThoughtpatchError(f"checkpoint '{model}' not found")
    if base is None:
        d = path if path.is_dir() else path.parent
        if (d / "config.json").is_file():
            return path, d
        raise ThoughtpatchError(f"{model}: no config.json beside the checkpoint; pass --base (the base model directory or hub id)")
    return path, base


def _looks_local(base: str | Path) -> bool:
    s = str(base)
    return isinstance(base, Path) or s.startswith((".", "/", "~")) or os.sep in s and s.count("/") != 1


def load_base_config_and_tokenizer(base: str | Path):
    from transformers import AutoConfig, AutoTokenizer

    if _looks_local(base) and not Path(base).expanduser().is_dir():
        raise ThoughtpatchError(f"base model directory '{base}' not found")
    try:
        config = AutoConfig.from_pretrained(str(base))
        tokenizer = AutoTokenizer.from_pretrained(str(base))
    except Exception as e:  # noqa: BLE001 - hub/network/file errors all mean "no usable base"
        raise ThoughtpatchError(f"base model '{base}' could not be loaded: {str(e).splitlines()[0]}") from None
    return config, tokenizer


def build_prj(hidden: int, prj_dim: int, layer_norm: bool = True) -> nn.Sequential:
    """CODI's projection: Dropout(0) → Linear(H,P) → GELU → Linear(P,H) → LayerNorm named `ln`."""
    prj = nn.Sequential(nn.Dropout(0.0), nn.Linear(hidden, prj_dim), nn.GELU(), nn.Linear(prj_dim, hidden))
    if layer_norm:
        prj.add_module("ln", nn.LayerNorm(hidden, eps=1e-5))
    return prj


def _key_list(keys, n: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_model(
    model: str | Path = "toy",
    base: str | Path | None = None,
    dtype: str | torch.dtype = "float32",
    lora_alpha: float | None = None,
    num_thoughts: int | None = None,
    device: str | torch.device = "cpu",
    family: str | None = None,
) -> ThoughtModel:
    """Load a continuous-thought checkpoint (dir or file; `toy` / `toy-coconut` = the organisms)
    on top of a base model (config + tokenizer). The family (CODI or Coconut) is read from the
    checkpoint's keys; `family` only confirms it."""
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    # oneDNN's AMX bf16 GEMMs round differently from its AVX-512 ones (what CODI's CPU reference used); only an env cap set before `import torch` picks the latter.
    amx = torch.device(device).type == "cpu" and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    if torch_dtype == torch.bfloat16 and amx and "ONEDNN_MAX_CPU_ISA" not in os.environ:
        warnings.warn("bf16 on an AMX CPU rounds matmuls unlike CODI's CPU reference; for bit-exact bf16 run with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16", stacklevel=2)
    ckpt_path, base = resolve_model(model, base)
    sd = ckpt.read_state_dict(ckpt_path)
    fam = ckpt.detect_family(sd, ckpt_path)
    if family is not None and family_named(family) is not fam:
        raise ThoughtpatchError(f"{ckpt_path}: its keys are those of a {fam.name} checkpoint, not {family}")
    sidecar = ckpt.read_sidecar(ckpt_path)
    config, tokenizer = load_base_config_and_tokenizer(base)
    arch = arch_for(config.model_type)
    if fam is CODI:
        net, hf, prj, v0, extra = _build_codi(sd, ckpt_path, config, tokenizer, arch, lora_alpha, sidecar)
    else:
        net, hf, v0 = _build_coconut(sd, ckpt_path, config, tokenizer)
        prj, extra = None, {}
    # CODI casts the whole module (LoRA, prj, float buffers such as rotary inv_freq) to bf16.
    net.to(device=device, dtype=torch_dtype).eval()
    if prj is not None:
        prj.to(device=device, dtype=torch_dtype).eval()
    return ThoughtModel(
        net=net,
        hf=hf,
        prj=prj,
        tokenizer=tokenizer,
        arch=arch,
        family=fam,
        base_vocab=v0,
        num_thoughts=num_thoughts if num_thoughts is not None else int(sidecar.get("num_thoughts", fam.default_thoughts)),
        answer_template=sidecar.get("answer_template", fam.answer_template),
        max_new_tokens=int(sidecar.get("max_new_tokens", fam.max_new_tokens)),
        source={"checkpoint": str(ckpt_path), "base": str(base), "dtype": str(torch_dtype).removeprefix("torch."), "family": fam.name, **extra},
    )


def _strict_load(net, lm_sd: dict, ckpt_path: Path, prefix: str, strip: str, tie: bool) -> None:
    """Load `lm_sd` into `net` refusing missing, unexpected or mis-shaped keys (a tied LM head
    may be absent); errors name keys as the checkpoint spells them."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in lm_sd]
    missing = [k for k in missing if not (tie and k.endswith("lm_head.weight"))]
    unexpected = [k for k in lm_sd if k not in expected]
    name = lambda k: prefix + k[len(strip):]  # noqa: E731
    if missing:
        raise ThoughtpatchError(f"{ckpt_path}: missing keys: {_key_list(name(k) for k in missing)}")
    if unexpected:
        raise ThoughtpatchError(f"{ckpt_path}: unexpected keys: {_key_list(name(k) for k in unexpected)}")
    for k, v in lm_sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ThoughtpatchError(f"{ckpt_path}: shape mismatch at {name(k)}: checkpoint {list(v.shape)}, model {list(expected[k].shape)}")
    net.load_state_dict({k: v.float() for k, v in lm_sd.items()}, strict=False)


def _embedding_key(lm_sd: dict, ckpt_path: Path, prefix: str) -> str:
    key = next((k for k in lm_sd if k.endswith(("embed_tokens.weight", "wte.weight"))), None)
    if key is None:
        raise ThoughtpatchError(f"{ckpt_path}: missing keys: no token embedding ({prefix}…embed_tokens.weight / {prefix}…wte.weight)")
    return key


def _build_codi(sd, ckpt_path, config, tokenizer, arch, lora_alpha, sidecar):
    """CODI_SPEC §1: base from config, embeddings resized to the checkpoint's rows (V0 + 3:
    pad, bot, eot), LoRA with r from the shapes, prj with prj_dim from the weights, strict."""
    from transformers import AutoModelForCausalLM

    lm_sd = {k[len(ckpt.LM_PREFIX):]: v for k, v in sd.items() if k.startswith(ckpt.LM_PREFIX)}
    prj_sd = {k[len("prj."):]: v for k, v in sd.items() if k.startswith("prj.")}
    stray = [k for k in sd if not k.startswith((ckpt.LM_PREFIX, "prj."))]
    if stray:
        raise ThoughtpatchError(f"{ckpt_path}: unexpected keys: {_key_list(stray)}")
    emb_key = _embedding_key(lm_sd, ckpt_path, ckpt.LM_PREFIX)
    if "1.weight" not in prj_sd:
        raise ThoughtpatchError(f"{ckpt_path}: missing keys: prj.1.weight (the projection module)")
    rows, hidden = lm_sd[emb_key].shape
    v0 = config.vocab_size
    if rows != v0 + 3:
        raise ThoughtpatchError(
            f"{ckpt_path}: shape mismatch: {ckpt.LM_PREFIX}{emb_key} has {rows} rows, expected base vocab {v0} + 3 (pad, bot, eot)"
        )

    hf = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    hf.resize_token_embeddings(rows, mean_resizing=False)
    r = ckpt.lora_rank(lm_sd)
    if r:
        from peft import LoraConfig, get_peft_model

        targets = sorted(ckpt.lora_modules(lm_sd))
        unknown = set(targets) - set(arch.lora_targets)
        if unknown:
            raise ThoughtpatchError(f"{ckpt_path}: unexpected LoRA targets {sorted(unknown)} for a {arch.name} model")
        alpha = lora_alpha if lora_alpha is not None else sidecar.get("lora_alpha", 32.0)
        lcfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none", task_type="CAUSAL_LM")
        net = get_peft_model(hf, lcfg)
        # peft names the wrapped LM `base_model.model.`; CODI's prefix already stripped that.
        lm_sd = {"base_model.model." + k: v for k, v in lm_sd.items()}
    else:
        net = hf
    _strict_load(net, lm_sd, ckpt_path, ckpt.LM_PREFIX, "base_model.model." if r else "", bool(config.tie_word_embeddings))
    net.tie_weights() if hasattr(net, "tie_weights") else hf.tie_weights()

    prj_dim = prj_sd["1.weight"].shape[0]
    prj = build_prj(hidden, prj_dim, layer_norm="ln.weight" in prj_sd)
    exp_prj = prj.state_dict()
    miss = [f"prj.{k}" for k in exp_prj if k not in prj_sd]
    extra = [f"prj.{k}" for k in prj_sd if k not in exp_prj]
    if miss:
        raise ThoughtpatchError(f"{ckpt_path}: missing keys: {_key_list(miss)}")
    if extra:
        raise ThoughtpatchError(f"{ckpt_path}: unexpected keys: {_key_list(extra)}")
    for k, v in prj_sd.items():
        if v.shape != exp_prj[k].shape:
            raise ThoughtpatchError(f"{ckpt_path}: shape mismatch at prj.{k}: checkpoint {list(v.shape)}, model {list(exp_prj[k].shape)}")
    prj.load_state_dict({k: v.float() for k, v in prj_sd.items()})

    if tokenizer.pad_token is None:  # as CODI: a literal [PAD] lands at id V0
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return net, hf, prj, v0, {"lora_r": r}


def _build_coconut(sd, ckpt_path, config, tokenizer):
    """COCONUT_SPEC §3: base from config with the checkpoint's V0 + 3 rows, the three markers
    added to the tokenizer in Coconut's order (ids V0, V0+1, V0+2; V0 = the base tokenizer's
    length), `embedding.weight` checked equal to the LM's input embedding and dropped, the
    `base_causallm.` keys loaded strictly. No extra parameters: thoughts are fed raw."""
    from transformers import AutoModelForCausalLM

    p = ckpt.COCONUT_PREFIX
    lm_sd = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    stray = [k for k in sd if not k.startswith(p) and k != "embedding.weight"]
    if stray:
        raise ThoughtpatchError(f"{ckpt_path}: unexpected keys: {_key_list(stray)}")
    emb_key = _embedding_key(lm_sd, ckpt_path, p)
    if "embedding.weight" not in sd:
        raise ThoughtpatchError(f"{ckpt_path}: missing keys: embedding.weight (Coconut's alias of the input embedding)")
    if not torch.equal(sd["embedding.weight"], lm_sd[emb_key]):
        raise ThoughtpatchError(f"{ckpt_path}: embedding.weight differs from {p}{emb_key} (they are one module in Coconut)")
    rows = lm_sd[emb_key].shape[0]
    v0 = len(tokenizer)
    if rows != v0 + 3:
        raise ThoughtpatchError(
            f"{ckpt_path}: shape mismatch: {p}{emb_key} has {rows} rows, expected the base tokenizer's {v0} + 3 latent markers"
        )
    tokenizer.add_tokens(list(COCONUT_MARKERS))
    got = tokenizer.convert_tokens_to_ids(list(COCONUT_MARKERS))
    if got != [v0, v0 + 1, v0 + 2]:
        raise ThoughtpatchError(f"{ckpt_path}: the base tokenizer gives Coconut's markers ids {got}, expected {[v0, v0 + 1, v0 + 2]}")
    if tokenizer.pad_token is None:  # as Coconut's run.py
        tokenizer.pad_token = tokenizer.eos_token
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    hf.resize_token_embeddings(rows, mean_resizing=False)
    _strict_load(hf, lm_sd, ckpt_path, p, "", bool(getattr(config, "tie_word_embeddings", False)))
    hf.tie_weights()
    return hf, hf, v0
