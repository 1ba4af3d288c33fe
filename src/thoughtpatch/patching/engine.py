"""Run many patched variants of one receiving run.

A `Variant` is a set of patches (site → vector). The batched engine computes the receiving
run's prompt once, advances one unpatched prefix thought by thought, and lets the variants
whose first patch is at thought k join the batch at k from a fork of that prefix (nothing
before k can differ), so every variant of a pair finishes in one batched pass of K thoughts
plus read-out. The reference engine runs each variant alone from scratch; the two must agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from thoughtpatch.model.runtime import CodiModel, Generation, Intervention, LatentState, Site


@dataclass(frozen=True)
class Patch:
    site: Site
    value: torch.Tensor  # [H]
    mode: Literal["replace", "add"] = "replace"


@dataclass(frozen=True)
class Variant:
    patches: tuple[Patch, ...] = ()

    def start(self, num_thoughts: int) -> int:
        """First thought this variant changes (K for the unpatched run)."""
        return min((p.site.thought for p in self.patches), default=num_thoughts)


@dataclass(frozen=True)
class Target:
    """What to read out: two teacher-forced continuations after <eot> (clean and corrupted
    answer, each ending in eos) and the decision position where they first differ."""

    clean: tuple[int, ...]
    corrupted: tuple[int, ...]
    decision: int
    max_new_tokens: int = 256
    stop_ids: tuple[int, ...] | None = None

    @staticmethod
    def for_answers(model: CodiModel, clean_answer, corrupted_answer, **kw) -> "Target":
        eos = model.eos_ids[0]
        c = (*model.answer_ids(clean_answer), eos)
        r = (*model.answer_ids(corrupted_answer), eos)
        d = next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), None)
        if d is None:
            raise ValueError(f"answers {clean_answer!r} and {corrupted_answer!r} tokenise identically")
        return Target(c, r, d, **kw)


@dataclass
class Readout:
    """One variant's measurements, fp32."""

    decision_logits: torch.Tensor  # [V] next-token logits at the decision position
    logprob_clean: float  # Σ log P(clean continuation tokens from the decision position on)
    logprob_corrupted: float
    answer: Generation
    resid: torch.Tensor  # [K,L,H] block outputs at each thought (after patches)
    inputs: torch.Tensor  # [K,H] fed thought vectors


def read_out(model: CodiModel, st: LatentState, target: Target) -> list[Readout]:
    """Score both continuations, decode greedily, and split the batch into per-row readouts."""
    lps, decision = [], None
    for cont in (target.clean, target.corrupted):
        logits = model.score(st, list(cont))  # [B, n+1, V]; row t predicts cont[t]
        # Only positions from the decision on matter (the shared prefix cancels); float64 so
        # the sum adds no rounding of its own to a difference of two similar numbers.
        tail = logits[:, target.decision : -1].double()
        idx = torch.tensor(cont[target.decision :], device=tail.device)[None, :, None].expand(tail.shape[0], -1, 1)
        lps.append((tail.gather(-1, idx).squeeze(-1) - tail.logsumexp(-1)).sum(-1))
        if decision is None:
            decision = logits[:, target.decision]
    gens, _ = model.generate(st, max_new_tokens=target.max_new_tokens, stop_ids=target.stop_ids)
    resid, inputs = (st.latent_resid(), st.latent_inputs()) if st.step else (None, None)
    return [
        Readout(
            decision_logits=decision[b],
            logprob_clean=float(lps[0][b]),
            logprob_corrupted=float(lps[1][b]),
            answer=gens[b],
            resid=resid[b].float() if resid is not None else torch.zeros(0),
            inputs=inputs[b].float() if inputs is not None else torch.zeros(0),
        )
        for b in range(st.batch_size)
    ]


def interventions_at(variants: list[Variant], thought: int) -> list[Intervention]:
    """One intervention per (site, mode) at this thought, covering all rows that patch it."""
    groups: dict[tuple, tuple[list[int], list[torch.Tensor]]] = {}
    for row, v in enumerate(variants):
        for p in v.patches:
            if p.site.thought == thought:
                rows, vals = groups.setdefault((p.site, p.mode), ([], []))
                rows.append(row)
                vals.append(p.value)
    out = []
    for (site, mode), (rows, vals) in groups.items():
        value = torch.stack(vals)
        make = Intervention.replace if mode == "replace" else Intervention.add
        out.append(make(site, value, rows=tuple(rows)))
    return out


class ReferenceEngine:
    """One variant at a time, each from its own prompt pass: slow, obviously right."""

    def __init__(self, model: CodiModel):
        self.model = model

    def run(self, prompt_ids: list[int], variants: list[Variant], target: Target) -> list[Readout]:
        m = self.model
        out = []
        for v in variants:
            st = m.think(m.encode(prompt_ids), _all_interventions(v), record_logits=False)
            out.extend(read_out(m, st, target))
        return out


def _all_interventions(v: Variant) -> list[Intervention]:
    thoughts = sorted({p.site.thought for p in v.patches})
    return [iv for k in thoughts for iv in interventions_at([v], k)]


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


class BatchedEngine:
    """All variants of one receiving run in staggered batches sharing the prompt and prefix."""

    def __init__(self, model: CodiModel, max_batch: int | None = None):
        self.model = model
        self.max_batch = max_batch  # None = everything in one batch; halves on CUDA OOM

    def run(self, prompt_ids: list[int], variants: list[Variant], target: Target) -> list[Readout]:
        if not variants:
            return []
        m = self.model
        k_total = m.num_thoughts
        order = sorted(range(len(variants)), key=lambda i: variants[i].start(k_total))
        base = m.encode(prompt_ids)
        results: list[Readout | None] = [None] * len(variants)
        pos = 0
        while pos < len(order):
            size = self.max_batch or len(order)
            chunk = order[pos : pos + size]
            try:
                outs = self._run_chunk(base, [variants[i] for i in chunk], target)
            except RuntimeError as e:
                if not _is_oom(e) or size == 1:
                    raise
                torch.cuda.empty_cache()
                self.max_batch = max(1, len(chunk) // 2)
                continue
            for i, r in zip(chunk, outs):
                results[i] = r
            pos += len(chunk)
        return results  # type: ignore[return-value]

    def _run_chunk(self, base: LatentState, variants: list[Variant], target: Target) -> list[Readout]:
        """`variants` sorted by start thought; each joins the batch when its first patch is due."""
        m = self.model
        k_total = m.num_thoughts
        starts = [v.start(k_total) for v in variants]
        prefix = base.fork()
        running: LatentState | None = None
        joined = 0
        for k in range(k_total + 1):
            n_new = sum(1 for s in starts if s == k)
            if n_new:
                fresh = prefix.fork(repeat=n_new)
                running = fresh if running is None else LatentState.concat([running, fresh])
                joined += n_new
            if k == k_total:
                break
            if running is not None:
                ivs = interventions_at(variants[:joined], k)
                running = m.think(running, ivs, until=k + 1, record_logits=False)
            if joined < len(variants):  # later variants still need the unpatched prefix
                prefix = m.think(prefix, until=k + 1, record_logits=False)
        assert running is not None and running.batch_size == len(variants)
        return read_out(m, running, target)
