"""Logit lens over the latent loop, as CODI's probe script reads it: softmax of the LM head
applied to the final-norm state at the prompt's last token (<bot>) and at each thought, over
the full vocabulary."""

from __future__ import annotations

import torch

from thoughtpatch.model.runtime import LatentState, ThoughtModel


@torch.inference_mode()
def lens_logits(model: ThoughtModel, state: LatentState) -> torch.Tensor:
    """[B, 1+K, V] fp32: row 0 = the prompt's last token (<bot> / <|start-latent|>), rows 1… = thoughts."""
    head = model.hf.get_output_embeddings()
    h = torch.stack([state.bot_hidden, *[hs[:, -1] for hs in state.hidden]], 1)
    return head(h).float()


def probe_top_k(model: ThoughtModel, state: LatentState, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k token ids and probabilities at <bot> and each thought: ([B,1+K,k], [B,1+K,k])."""
    probs = lens_logits(model, state).softmax(-1)
    top = probs.topk(k, dim=-1)
    return top.indices, top.values


def token_label(model: ThoughtModel, tid: int) -> str:
    """Readable token text; the family's marker ids get names."""
    if tid in model.markers:
        return model.markers[tid]
    return model.tokenizer.decode([tid]) or f"<{tid}>"
