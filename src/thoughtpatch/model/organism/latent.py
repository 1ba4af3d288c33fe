"""The families' latent loops over an HF causal LM, differentiable, for training the
organisms. The inference runtime (with intervention sites) lives in `thoughtpatch.model`;
these are the same loops:
* CODI (CODI_SPEC section 2): prompt pass -> z_1 = prj(h_bot) -> K single-position passes on
  the cache, each fed the projection of the previous final-norm state;
* Coconut (COCONUT_SPEC section 2): the prompt ends in <|start-latent|>; latent k's input is
  the final-norm state of the position before it, fed raw; then <|end-latent|> and the text.
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


@dataclass
class LatentPass:
    logits: torch.Tensor  # [B, 1 + S, V]: position j predicts suffix token j; the last predicts what follows
    fed: torch.Tensor  # [B, K, H] the thought vectors fed


def coconut_pass(hf, prefix: torch.Tensor, k: int, suffix: torch.Tensor) -> LatentPass:
    """Coconut's multi-pass forward for a batch whose rows share the prefix length: `prefix`
    (ending in <|start-latent|> when k > 0), k latents each fed the previous position's
    final-norm state, then `suffix` token ids. Passes: the prefix; one per latent 1..k-1; a
    last one over latent k and the suffix (Coconut's own split). Gradients flow through
    every thought."""
    body = hf.model
    if k == 0:
        h = body(input_ids=torch.cat([prefix, suffix], 1)).last_hidden_state[:, prefix.shape[1] - 1 :]
        return LatentPass(hf.lm_head(h), h.new_zeros(h.shape[0], 0, h.shape[-1]))
    kw = cache_kw(body)
    out = body(input_ids=prefix, use_cache=True)
    cache, z = cache_of(out), out.last_hidden_state[:, -1]
    fed = [z]
    for _ in range(k - 1):
        out = body(inputs_embeds=z[:, None], use_cache=True, **{kw: cache})
        cache, z = cache_of(out), out.last_hidden_state[:, -1]
        fed.append(z)
    out = body(inputs_embeds=torch.cat([z[:, None], hf.get_input_embeddings()(suffix)], 1), **{kw: cache})
    return LatentPass(hf.lm_head(out.last_hidden_state), torch.stack(fed, 1))
