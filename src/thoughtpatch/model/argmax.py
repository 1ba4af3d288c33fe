"""The fp32 LM head's greedy ids at bf16 cost, on CPUs with bf16 matrix units.

Greedy decoding needs only the argmax of each row's logits, and on the CPU the fp32 LM head
over the whole vocabulary is about a quarter of a read-out decode step. A bf16 product runs
~4× faster on AMX and gives every logit to within a bound; only ids whose upper bound
reaches the best lower bound can be the argmax, and those few are recomputed in fp32. The
answer is the fp32 head's argmax (ties → lowest id, as `torch.argmax`), not an estimate.
Candidates are looked for among each row's top `k` bf16 logits; a row with more is screened
over the whole vocabulary, and a row with more than `max_wide`, or with a non-finite value,
takes the plain fp32 head.

The bound, per row h and vocabulary row w, with u = 2⁻⁸ (bf16's unit roundoff: torch rounds
to nearest), γ = H·2⁻²⁴ (fp32 accumulation of H terms, in any order) and S = Σ|wᵢhᵢ| ≤
‖w‖·‖h‖: rounding w and h to bf16 moves the sum by ≤ (2u+u²)S, the kernel's fp32 accumulation
by ≤ γ(1+u)²S, the fp32 head's own logit is within γS of the exact sum, and rounding the
bf16 result â moves it by ≤ u|â|/(1-u). So |â − logit| ≤ E + u'|â| with E = (2u+u²+γ(1+u)²+γ)
· max‖w‖ · ‖h‖ and u' = u/(1−u)."""

from __future__ import annotations

import torch

U = 2.0**-8


def slack(hidden: int) -> float:
    """E / (max‖w‖·‖h‖) for rows of `hidden` values (see the module doc)."""
    g = hidden * 2.0**-24
    return 2 * U + U * U + g * (1 + U) ** 2 + g


def fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX): elsewhere a bf16 product
    is no cheaper than fp32 and the screen would only add work."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


class ArgmaxScreen:
    """Exact greedy ids of `weight` [V, H] (fp32, no bias) over its first `ids` rows. Holds a
    bf16 copy of those rows; `current` says whether it still matches the weight."""

    def __init__(self, weight: torch.Tensor, ids: int, k: int | None = None, max_wide: int = 1024):
        # top k: wide enough that a row rarely has more candidates (random logits, the flattest
        # case, have ~20 in 32k ids and ~25 in 128k), narrow enough to stay cheap to select
        k = min(128, max(32, ids // 1024)) if k is None else k
        weight = weight.detach()  # same storage and version counter: `current` still sees edits
        self.weight, self.ids, self.k, self.max_wide = weight, ids, min(k, ids), max_wide
        self.key = (weight.data_ptr(), weight._version, ids)
        w = weight[:ids]
        self.w16 = w.to(torch.bfloat16)
        # max‖w‖ rounded up: its own fp32 error is far below this
        self.scale = slack(weight.shape[1]) * float(w.double().norm(dim=-1).max()) * (1 + 1e-6)

    def current(self, weight: torch.Tensor, ids: int) -> bool:
        return (weight.data_ptr(), weight._version, ids) == self.key

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, H] fp32 → ids [B] (long)."""
        a = h.to(torch.bfloat16) @ self.w16.T  # [B, V]
        e = (self.scale * h.double().norm(dim=-1) * (1 + 1e-6)).float()[:, None]
        top, idx = a.topk(self.k, -1)  # descending
        top = top.float()
        cand = self._candidates(top, e)
        # the k-th value still a candidate: ids outside the top k may be too
        wide = ~torch.isfinite(e[:, 0]) | ~torch.isfinite(top).all(-1) | cand[:, -1]
        ids = self._best(h, idx, cand & ~wide[:, None])
        rest = wide.nonzero()[:, 0]
        if len(rest):  # the whole vocabulary as candidates, or the plain head
            a_rest = a[rest].float()
            full = self._candidates(a_rest, e[rest])
            plain = ~torch.isfinite(e[rest, 0]) | ~torch.isfinite(a_rest).all(-1) | (full.sum(-1) > self.max_wide)
            every = torch.arange(self.ids, device=h.device).expand(len(rest), -1)
            ids[rest] = self._best(h[rest], every, full & ~plain[:, None])
            if bool(plain.any()):
                p = rest[plain]
                ids[p] = torch.nn.functional.linear(h[p], self.weight[: self.ids]).argmax(-1)
        return ids

    @staticmethod
    def _candidates(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Which of the bf16 logits `a` [B, m] (descending if m < V) may be the fp32 argmax."""
        u = U / (1 - U)
        peak = a.max(-1, keepdim=True).values
        lower = peak - u * peak.abs() - e  # the argmax's fp32 logit is at least this
        return a + u * a.abs() + e >= lower

    def _best(self, h: torch.Tensor, idx: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """Per row, the candidate id (idx where cand) with the largest fp32 logit, lowest id on
        ties; rows without candidates get `ids` (out of range: the caller fills them)."""
        r, c = cand.nonzero(as_tuple=True)
        exact = torch.full(cand.shape, float("-inf"), device=h.device)
        exact[r, c] = (self.weight[idx[r, c]] * h[r]).sum(-1)
        best = exact.max(-1, keepdim=True).values
        return torch.where(cand & (exact == best), idx, self.ids).min(-1).values
