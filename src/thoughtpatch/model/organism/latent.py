"""A differentiable CODI latent loop over an HF causal LM + prj, for training. The
inference runtime (with intervention sites) lives in `thoughtpatch.model`; this is the same
loop (CODI_SPEC section 2): prompt pass -> z_1 = prj(h_bot) -> K single-position passes on
the cache, each fed the projection of the previous final-norm state.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch


def cache_kw(hf) -> str:
    """transformers 5 renamed `past_key_values` to `cache`; speak whichever this one knows."""
    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


def cache_of(out):
    return out.get("cache") if "cache" in out else out.past_key_values


@dataclass
class LatentOut:
    cache: object
    h_last: torch.Tensor  # [B, H] final-norm state at the last fed position
    fed: torch.Tensor  # [B, K, H] the thought vectors fed (after any intervention)
    thought_logits: torch.Tensor | None  # [B, K, V] LM head at each thought's output


def latent_loop(hf, prj, prompt_ids: torch.Tensor, k: int, edit: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                want_logits: bool = False, cache=None) -> LatentOut:
    """Prompt pass (ids incl. <bot>; on top of `cache` when given), then k thoughts.
    `edit(k, z)` may replace thought k's input."""
    kw = cache_kw(hf)
    out = hf(input_ids=prompt_ids, use_cache=True, output_hidden_states=True, **({kw: cache} if cache is not None else {}))
    cache, h = cache_of(out), out.hidden_states[-1][:, -1]
    fed, logits = [], []
    for i in range(k):
        z = prj(h)
        if edit is not None:
            z = edit(i, z)
        fed.append(z)
        out = hf(inputs_embeds=z[:, None], use_cache=True, output_hidden_states=True, **{kw: cache})
        cache, h = cache_of(out), out.hidden_states[-1][:, -1]
        if want_logits:
            logits.append(out.logits[:, -1])
    b, hdim = prompt_ids.shape[0], h.shape[-1]
    return LatentOut(
        cache, h, torch.stack(fed, 1) if fed else h.new_zeros(b, 0, hdim), torch.stack(logits, 1) if logits else None
    )
