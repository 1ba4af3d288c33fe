"""Statistics on a hand-computed fixture, and the filter."""

from __future__ import annotations

import json
from pathlib import Path

from thoughtpatch.data.formats import read_pairs
from thoughtpatch.data.stats import filter_file, filter_pairs, format_stats, pair_stats

FIXTURES = Path(__file__).parent / "fixtures"


def test_stats_hand_computed() -> None:
    # Differences |corrupted - clean|: 1, 4, 0, 1. Clean question words: 9, 12, 3, 9.
    # Pair 3 repeats pair 0 (both questions). Reasoning steps: 1, 2, 2, 1.
    stats = pair_stats(read_pairs(FIXTURES / "stats_pairs.json"))
    assert stats == {
        "count": 4,
        "answer_difference": {"min": 0, "max": 4, "mean": 1.5},
        "same_answer": 1,
        "duplicate_pairs": 1,
        "duplicate_clean_questions": 1,
        "question_words": {"min": 3, "max": 12, "mean": 8.25},
        "reasoning_steps": {"1": 2, "2": 2},
    }
    lines = format_stats(stats)
    assert "answer difference |corrupted - clean|: min 0, max 4, mean 1.50" in lines
    assert "reasoning steps: 1: 2, 2: 2" in lines


def test_stats_without_steps_and_empty() -> None:
    stats = pair_stats(read_pairs(FIXTURES / "filter_pairs.json"))
    assert "reasoning_steps" not in stats
    empty = pair_stats([])
    assert empty["count"] == 0 and empty["answer_difference"]["mean"] is None
    assert "pairs: 0" in format_stats(empty)


def test_filter_removes_exactly_the_same_answer_pairs(tmp_path: Path) -> None:
    out = tmp_path / "kept.json"
    kept, removed = filter_file(FIXTURES / "filter_pairs.json", out)
    assert [pid for pid, _ in removed] == [11, 14]
    assert all(reason.startswith("same answer") for _, reason in removed)
    assert [p.pair_id for p in kept] == [10, 12, 13, 15]
    assert [p["pair_id"] for p in json.loads(out.read_text())] == [10, 12, 13, 15]
    assert pair_stats(kept)["same_answer"] == 0


def test_filter_other_reasons() -> None:
    pairs = read_pairs(FIXTURES / "stats_pairs.json")
    _, removed = filter_pairs(pairs)
    assert removed == [(2, "same answer (7)"), (3, "duplicate of pair 0")]
    p = pairs[0]
    odd = [
        type(p)(20, p.clean, type(p.corrupted)(p.clean.question, 6), {}),
        type(p)(21, p.clean, type(p.corrupted)("Tom has 4.5 apples.", 6.5), {}),
    ]
    _, removed = filter_pairs(odd)
    assert removed == [(20, "clean and corrupted questions are identical"),
                       (21, "corrupted answer 6.5 is not an integer")]
