"""Coconut's latent loop over the organism's LlamaForCausalLM (COCONUT_SPEC section 2),
differentiable for training and greedy for the model card's accuracy table.

Layout: BOS question "\\n" <|start-latent|> <|latent|> x K <|end-latent|>, then "### N" eos.
Thought 1 is the final-norm state at <|start-latent|>, thought k + 1 the final-norm state at
latent k; each is written *raw* (no projection) as the input embedding of the next latent
position (RoPE rotates it there). The state at the last latent is not fed back.
<|end-latent|> is an ordinary token whose logits give the first answer token.

Decoding follows Coconut's run.py: argmax over every id; the first token is always kept;
later eos stops and is dropped; the answer is the text after the last "#" of
decode(prompt + generation, skip_special_tokens=True), commas removed, stripped, compared to
the gold answer as a string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from thoughtpatch.model.organism.latent import cache_kw, cache_of


@dataclass
class LatentPass:
    logits: torch.Tensor  # [B, 1 + S, V]: position j predicts suffix token j; the last predicts what follows
    cache: object
    fed: torch.Tensor  # [B, K, H] the thought vectors fed (after any edit)


def latent_pass(hf, prefix: torch.Tensor, k: int, suffix: torch.Tensor,
                edit: Callable[[int, torch.Tensor], torch.Tensor] | None = None, use_cache: bool = False) -> LatentPass:
    """Coconut's multi-pass forward for a batch whose rows share the prefix length: `prefix`
    (ending in <|start-latent|> when k > 0), k latents each fed the previous position's
    final-norm state, then `suffix` token ids. Passes: the prefix; one per latent 1..k-1; a
    last one over latent k and the suffix (Coconut's own split). Gradients flow through
    every thought. `edit(i, z)` may replace thought i's input ([B, H])."""
    body = hf.model
    if k == 0:
        out = body(input_ids=torch.cat([prefix, suffix], 1), use_cache=use_cache)
        h = out.last_hidden_state[:, prefix.shape[1] - 1 :]
        return LatentPass(hf.lm_head(h), cache_of(out) if use_cache else None, h.new_zeros(h.shape[0], 0, h.shape[-1]))
    kw = cache_kw(body)
    out = body(input_ids=prefix, use_cache=True)
    cache, z = cache_of(out), out.last_hidden_state[:, -1]
    fed = []
    for i in range(k):
        if edit is not None:
            z = edit(i, z)
        fed.append(z)
        if i < k - 1:
            out = body(inputs_embeds=z[:, None], use_cache=True, **{kw: cache})
            cache, z = cache_of(out), out.last_hidden_state[:, -1]
    emb = torch.cat([z[:, None], hf.get_input_embeddings()(suffix)], 1)
    out = body(inputs_embeds=emb, use_cache=True, **{kw: cache})
    return LatentPass(hf.lm_head(out.last_hidden_state), cache_of(out), torch.stack(fed, 1))


@torch.inference_mode()
def greedy(hf, first_logits: torch.Tensor, cache, max_new_tokens: int, eos: int) -> list[list[int]]:
    """Coconut's decoding from the logits that give token 1 ([B, V]): token 1 always kept,
    then up to max_new_tokens - 1 more; eos stops a row and is not kept."""
    kw = cache_kw(hf)
    nxt = first_logits.argmax(-1)
    toks = [[t] for t in nxt.tolist()]
    done = [False] * len(toks)
    for _ in range(max_new_tokens - 1):
        out = hf(input_ids=nxt[:, None], use_cache=True, **{kw: cache})
        cache, nxt = cache_of(out), out.logits[:, -1].argmax(-1)
        for r, t in enumerate(nxt.tolist()):
            if not done[r]:
                if t == eos:
                    done[r] = True
                else:
                    toks[r].append(t)
        if all(done):
            break
    return toks


def extract_answer(text: str) -> str:
    """Coconut's answer: the text after the last '#', commas removed, stripped."""
    return text.split("#")[-1].replace(",", "").strip()


def gold_string(answer: float | int | str) -> str:
    """The gold answer as Coconut compares it (integral numbers without a decimal point)."""
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    return str(answer).replace(",", "").strip()


def markers(tok) -> tuple[int, int, int]:
    """(start, end, latent) ids of a tokenizer that holds the three markers."""
    from thoughtpatch.model.organism.tokenizer import COCONUT_MARKERS

    return tuple(tok.convert_tokens_to_ids(list(COCONUT_MARKERS)))


@torch.no_grad()
def evaluate(hf, tok, problems, k: int, conditions: tuple[str, ...], max_new_tokens: int = 64, batch: int = 64) -> dict:
    """The model card's accuracy table for a Coconut model (same conditions and table format
    as `thoughtpatch.model.evaluate`): with_thoughts, thoughts_zeroed (every fed thought = 0),
    thoughts_mean (thought k = its mean over these problems), no_thoughts (K = 0: start and
    end markers only), cot (the question alone: greedy language CoT, then "### N")."""
    from thoughtpatch.model.evaluate import CONDITIONS, _buckets, table

    start, end, latent = markers(tok)
    eos = tok.eos_token_id
    qs = [tok(p.question + "\n")["input_ids"] for p in problems]
    mean = None
    acc = {}
    order = [c for c in CONDITIONS if c in conditions]
    if "thoughts_mean" in order and "with_thoughts" not in order:
        order.insert(0, "with_thoughts")
    for cond in order:
        correct = [False] * len(problems)
        total = None
        for chunk in _buckets([len(q) for q in qs], batch):
            q = torch.tensor([qs[i] for i in chunk])
            b = len(chunk)
            if cond == "cot":
                prefix, kk, suffix = q, 0, q.new_zeros(b, 0)
            else:
                prefix = torch.cat([q, q.new_full((b, 1), start)], 1)
                kk = 0 if cond == "no_thoughts" else k
                suffix = q.new_full((b, 1), end)
            edit = None
            if cond == "thoughts_zeroed":
                edit = lambda i, z: torch.zeros_like(z)  # noqa: E731
            elif cond == "thoughts_mean":
                edit = lambda i, z: mean[i].expand_as(z)  # noqa: E731
            lp = latent_pass(hf, prefix, kk, suffix, edit=edit, use_cache=True)
            if cond == "with_thoughts" and kk:
                s = lp.fed.sum(0)
                total = s if total is None else total + s
            gens = greedy(hf, lp.logits[:, -1], lp.cache, max_new_tokens, eos)
            latents = [] if cond == "cot" else [start] + [latent] * kk + [end]
            for i, g in zip(chunk, gens):
                text = tok.decode(qs[i] + latents + g, skip_special_tokens=True)
                correct[i] = extract_answer(text) == gold_string(problems[i].answer)
        if cond == "with_thoughts" and total is not None:
            mean = total / len(problems)
        if cond in conditions:
            acc[cond] = table(correct, problems)
    return {"n": len(problems), "accuracy": acc}
