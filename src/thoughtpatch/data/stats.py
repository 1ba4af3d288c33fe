"""Statistics of a pair set, and the filter that removes unusable pairs with a reason."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from thoughtpatch.data.schema import Pair


def _summary(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"min": None, "max": None, "mean": None}
    return {"min": min(xs), "max": max(xs), "mean": round(sum(xs) / len(xs), 4)}


def pair_stats(pairs: list[Pair]) -> dict[str, Any]:
    """count; |corrupted − clean| answer difference; duplicates; clean-question length in
    words; histogram of clean reasoning steps (when any pair records them)."""
    diffs = [abs(p.corrupted.answer - p.clean.answer) for p in pairs]
    seen_pairs: set[tuple[str, str]] = set()
    seen_clean: set[str] = set()
    dup_pairs = dup_clean = 0
    for p in pairs:
        key = (p.clean.question, p.corrupted.question)
        dup_pairs += key in seen_pairs
        dup_clean += p.clean.question in seen_clean
        seen_pairs.add(key)
        seen_clean.add(p.clean.question)
    steps = Counter(p.clean.reasoning_steps for p in pairs if p.clean.reasoning_steps is not None)
    out: dict[str, Any] = {
        "count": len(pairs),
        "answer_difference": _summary(diffs),
        "same_answer": sum(d == 0 for d in diffs),
        "duplicate_pairs": dup_pairs,
        "duplicate_clean_questions": dup_clean,
        "question_words": _summary([len(p.clean.question.split()) for p in pairs]),
    }
    if steps:
        out["reasoning_steps"] = {str(k): steps[k] for k in sorted(steps)}
    return out


def format_stats(stats: dict[str, Any]) -> list[str]:
    """Plain lines for the terminal."""

    def num(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else f"{x:.2f}"

    def mmm(d: dict[str, Any]) -> str:
        return "n/a" if d["min"] is None else f"min {num(d['min'])}, max {num(d['max'])}, mean {num(d['mean'])}"

    lines = [
        f"pairs: {stats['count']}",
        f"answer difference |corrupted - clean|: {mmm(stats['answer_difference'])}",
        f"same answer: {stats['same_answer']}",
        f"duplicates: {stats['duplicate_pairs']} pairs, {stats['duplicate_clean_questions']} clean questions",
        f"question length (words): {mmm(stats['question_words'])}",
    ]
    if "reasoning_steps" in stats:
        hist = ", ".join(f"{k}: {v}" for k, v in stats["reasoning_steps"].items())
        lines.append(f"reasoning steps: {hist}")
    return lines


def removal_reason(p: Pair, seen: dict[tuple[str, str], int]) -> str | None:
    if p.clean.answer == p.corrupted.answer:
        return f"same answer ({p.clean.answer})"
    if p.clean.question.strip() == p.corrupted.question.strip():
        return "clean and corrupted questions are identical"
    for side in ("clean", "corrupted"):
        a = getattr(p, side).answer
        if not isinstance(a, int):
            return f"{side} answer {a} is not an integer"
    key = (p.clean.question, p.corrupted.question)
    if key in seen:
        return f"duplicate of pair {seen[key]}"
    return None


def filter_pairs(pairs: list[Pair]) -> tuple[list[Pair], list[tuple[int, str]]]:
    """Keep usable pairs (ids unchanged); return the removed ones as (pair_id, reason)."""
    kept: list[Pair] = []
    removed: list[tuple[int, str]] = []
    seen: dict[tuple[str, str], int] = {}
    for p in pairs:
        reason = removal_reason(p, seen)
        if reason is None:
            kept.append(p)
            seen[(p.clean.question, p.corrupted.question)] = p.pair_id
        else:
            removed.append((p.pair_id, reason))
    return kept, removed


def filter_file(src: str | Path, out: str | Path, fmt: str = "auto") -> tuple[list[Pair], list[tuple[int, str]]]:
    """`pairs filter`: read, drop unusable pairs, write the rest in our format."""
    from thoughtpatch.data.formats import read_pairs, write_pairs

    kept, removed = filter_pairs(read_pairs(src, fmt))
    write_pairs(kept, out)
    return kept, removed
