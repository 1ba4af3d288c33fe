"""Which pairs to patch: all of them, or only those the model answers right.

Patching practice is to study pairs on which the unpatched model is right on both sides
(the clean answer on the clean run, the corrupted answer on the corrupted run): on a pair
the model gets wrong, "recovering the clean run" means recovering a wrong answer. The
unpatched runs are needed either way, so the split costs nothing: `keep="all"` patches
every pair and the run also summarises the correct ones; `keep="correct"` patches only them.
"""

from __future__ import annotations

import math

from thoughtpatch.model.runtime import ThoughtModel
from thoughtpatch.patching.experiments import PairRuns

KEEP = ("all", "correct")


def _number(x: float) -> int | float | None:
    if isinstance(x, float) and math.isnan(x):
        return None
    return int(x) if float(x).is_integer() else x


def answers(r: PairRuns) -> dict:
    """A pair's expected and greedy answers on both sides (null: no number in the answer)."""
    out: dict = {"pair_id": r.pair.pair_id}
    for side in ("clean", "corrupted"):
        got = getattr(r, side).answer
        out[side] = {"expected": getattr(r.pair, side).answer, "model": _number(got.number), "text": got.text.strip()}
    return out


def is_correct(model: ThoughtModel, r: PairRuns, trace: bool = False) -> bool:
    """Both sides right, by the family's own accuracy rule (causal tracing: the clean run; its
    noised run is meant to go wrong)."""
    clean = model.correct(r.clean.answer, r.pair.clean.answer)
    return clean if trace else clean and model.correct(r.corrupted.answer, r.pair.corrupted.answer)


def split_correct(model: ThoughtModel, runs: list[PairRuns], trace: bool = False) -> tuple[list[PairRuns], list[dict]]:
    """(the pairs answered right on both sides, the others with the model's answers)."""
    right = [r for r in runs if is_correct(model, r, trace)]
    wrong = [answers(r) for r in runs if not is_correct(model, r, trace)]
    return right, wrong


def select(model: ThoughtModel, runs: list[PairRuns], keep: str, trace: bool = False) -> tuple[list[PairRuns], list[PairRuns], list[dict]]:
    """(pairs to patch, pairs answered right, the wrong ones with the model's answers)."""
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, not {keep!r}")
    right, wrong = split_correct(model, runs, trace)
    return (runs if keep == "all" else right), right, wrong
