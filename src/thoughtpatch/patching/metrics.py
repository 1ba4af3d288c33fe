"""Metric definitions (DESIGN §3), all fp32, all read at the answer — never averaged over
unrelated positions. "Receiving" = the unpatched run being patched (corrupted when
denoising); "source" = the run the activations come from (clean when denoising)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from thoughtpatch.patching.engine import Readout, Target


def kl_of_log_probs(lp: torch.Tensor, lq: torch.Tensor, p: torch.Tensor | None = None) -> float:
    """KL(P ‖ Q) of two next-token distributions given as fp32 log-probs (p: exp(lp), if known)."""
    p = lp.exp() if p is None else p
    return float((p * (lp - lq)).sum().clamp_min(0.0))


def kl_runs(p: Readout, q: Readout) -> float:
    """KL(P ‖ Q) at the decision position of two read-outs (each one's log-softmax computed once)."""
    return kl_of_log_probs(p.log_probs(), q.log_probs(), p.probs())


def answer_logit_diff(logits: torch.Tensor, target: Target) -> tuple[float, float, float]:
    """At the decision position: logit of the clean answer's token minus the corrupted one's.

    The seed averaged logits over a window of positions, mixing unrelated ones; we read the
    one position where the two answers diverge (for single-token numbers that is the number
    itself; for 143+0 vs 143+1 the digit after the shared 143)."""
    c = float(logits[target.clean[target.decision]])
    r = float(logits[target.corrupted[target.decision]])
    return c - r, c, r


def logprob_diff(ro: Readout) -> float:
    """log P(clean answer) − log P(corrupted answer), teacher-forced, summed over tokens."""
    return ro.logprob_clean - ro.logprob_corrupted


def recovered(m_patched: float, m_receiving: float, m_source: float) -> float:
    """Fraction of the source–receiving gap closed; NaN when the runs do not differ."""
    den = m_source - m_receiving
    return (m_patched - m_receiving) / den if den != 0 else math.nan


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def norm(a: torch.Tensor) -> float:
    return float(a.float().norm())


def readout_metrics(ro: Readout, receiving: Readout, source: Readout, target: Target) -> dict[str, float | bool]:
    """Every per-variant metric of DESIGN §3 for one patched run. Answers compare by the
    family's own rule (CODI: the number; Coconut: the text after the last '#')."""
    ald, cs, rs = answer_logit_diff(ro.decision_logits, target)
    m = logprob_diff(ro)
    return {
        "kl": kl_runs(ro, receiving),
        "kl_to_clean": kl_runs(source, ro),
        "answer_logit_diff": ald,
        "clean_score": cs,
        "corrupted_score": rs,
        "logprob_diff": m,
        "recovered": recovered(m, logprob_diff(receiving), logprob_diff(source)),
        "answer": ro.answer.number,
        "flip": ro.answer.same(source.answer),
        "away": not ro.answer.same(receiving.answer),
    }


def trace_metrics(ro: Readout, noised: Readout, clean: Readout) -> dict[str, float | bool]:
    """Causal tracing, relative to the clean answer: `restored` = the share of log P(clean
    answer) lost to the noise that the restored site brings back; `flip` = the answer is the
    clean run's again."""
    lp = ro.logprob_clean
    return {
        "kl": kl_runs(ro, noised),
        "kl_to_clean": kl_runs(clean, ro),
        "logprob_clean": lp,
        "restored": recovered(lp, noised.logprob_clean, clean.logprob_clean),
        "answer": ro.answer.number,
        "flip": ro.answer.same(clean.answer),
        "away": not ro.answer.same(noised.answer),
    }


def knockout_metrics(ro: Readout, unpatched: Readout) -> dict[str, float | bool]:
    """An attention knockout against the run it was applied to (no source run)."""
    m = logprob_diff(ro)
    return {
        "kl": kl_runs(ro, unpatched),
        "logprob_diff": m,
        "delta_logprob_diff": m - logprob_diff(unpatched),
        "answer": ro.answer.number,
        "away": not ro.answer.same(unpatched.answer),
    }


def baseline_columns(experiment: str, receiving: Readout, source: Readout) -> dict[str, float]:
    """The unpatched runs' values every row carries, so that ratios of means (`recovered`,
    `restored`) can be recomputed from results.jsonl alone."""
    if experiment == "trace":
        return {"logprob_clean_receiving": receiving.logprob_clean, "logprob_clean_source": source.logprob_clean}
    if experiment == "knockout":
        return {"logprob_diff_receiving": logprob_diff(receiving)}
    return {"logprob_diff_receiving": logprob_diff(receiving), "logprob_diff_source": logprob_diff(source)}
