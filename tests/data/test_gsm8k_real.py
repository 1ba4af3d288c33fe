"""`from-gsm8k` on real GSM8K train rows (tests/fixtures/gsm8k: every 50th row of the train
split plus the rows checked here): yield, zero same-answer pairs, and a sample of accepted
pairs whose corrupted answers were worked out by hand from the question."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import FIXTURES
from thoughtpatch.data import gsm8k as g
from thoughtpatch.data.gsm8k import GsmResult, pairs_from_gsm8k

SAMPLE = FIXTURES / "gsm8k" / "train_sample.jsonl"
EVERY = 50  # the sample's stride over the train split (make_fixtures.GSM8K_EVERY)

# (index in GSM8K train, changed number old -> new, corrupted answer worked out by hand).
HAND_CHECKED = [
    (318, "60", "61", 221),  # keeps 61, gave Rebecca 40 and Mara 120: 61+160
    (413, "40", "41", 8),  # 41 balls - 11 blue - 22 red
    (466, "8", "9", 90),  # 10 days left x 9 hours ("an 8-hour" -> "a 9-hour")
    (498, "6", "7", 85),  # 7*5*50 = 1750 lb; (6000-1750)/50
    (519, "3.50", "4.50", 520),  # (4.50+5.50) x 52 weeks
    (536, "25", "26", 61),  # witch 7, unicorn 21, dragon 7+26
    (570, "8", "9", 205),  # 50 + (75-25) + 9*5 + 60 cents
    (596, "8.5", "9.5", 3180),  # 12.5 + 25 + (25-9.5) = 53 h = 3180 min
    (619, "5", "6", 252),  # 21+12+9 = 42 dogs x $6
    (644, "1,200,000", "1,200,001", 109200091),  # x 91 days
    (721, "300", "301", 2204),  # 301 + 801 + 1102
    (766, "30", "31", 19),  # 31 - (7+8-3)
    (790, "40", "41", 1230),  # 3 x (1/2 x 41 x 20)
    (923, "7", "8", 2560),  # 8 x 8 ft x $40 ("a 7 foot" -> "an 8 foot")
    (1033, "4", "5", 3000),  # 600 cal/h x 1 h/day x 5
    (1260, "66", "67", 103),  # 67 + 3 x 12
    (1459, "1.25", "2.25", 63),  # 4 people x 2 cups x .5 oz x 7 days x 2.25
    (1489, "1.5", "2.5", 90),  # 17.5 + 52.5 + (17.5+2.5)
    (1787, "3", "4", 44),  # 4 x 5 + 6 x 4
    (1860, "1.5", "2.5", 17),  # 2.5 x 6 + 120 min / 60
    (1995, "300", "301", 121),  # target 301 - (100 + 80)
    (2450, "20", "21", 42),  # 2 rungs per foot x 21
    (2672, "50", "51", 15),  # 51 - 4 x (3/5 x 15)
    (2785, "10,000", "10,001", 50001),  # 80 guests x 500 + 10,001
    (3009, "60", "61", 62640),  # 2000x12 + (2000 + 0.61x2000)x12
    (3237, "12", "13", 3),  # 16 - 13
    (3428, "7", "8", 96),  # 24 x 8 x 0.5
    (3477, "50", "51", 8),  # 51 - (5x6 + 13)
    (3566, "60", "61", 21),  # 61 - (10 + 30)
    (3912, "5", "6", 23000),  # 12x6 months x 250 + 5,000
    (4195, "8", "9", 42),  # 9 + 18 + 15
    (4205, "300", "301", 1305),  # the solution's sum: 602 + 301 + (602-200)
    (4422, "5", "6", 108),  # 6% of 3 x 600
    (4529, "100", "101", 272700),  # 450 days x $101 x 6 builders
    (4631, "4", "5", 96),  # (300 min x 10 x .1 + 3 x 60) / 5 h
    (4633, "3.65", "4.65", 6),  # 15 - (9.3+2+1+4+1.5+.2)/2
    (4655, "7.5", "8.5", 338),  # 8.5 x 60 - 2 x 86
    (4729, "15", "16", 180),  # 5 x 16 + 10 x 10
    (4780, "35", "36", 780),  # 36 x 10 + 40 x 10.5
    (5169, "3", "4", 4000),  # 1000 visitors x $4
    (5194, "1.25", "2.25", 975),  # 1200 - 100 x 2.25
    (5299, "37", "38", 9300),  # 15000 - 380 x 15
    (5392, "3", "4", 33),  # 4 x 6 + 9
    (5465, "15", "16", 672),  # 800 - 16% of 800
    (5910, "5", "6", 24),  # 6 x 8 oz x 0.5
    (6258, "60,000", "60,001", 900015),  # 60001 x (1+2+4+8)
    (6296, "5", "6", 240),  # 16 x 6 + 8 pots x 18
    (6324, "15", "16", 160),  # ($16 - 80 x $0.10) / $0.05
    (6548, "1.50", "2.50", 20),  # 40 - (2 x 5 + 2.50 x 2 x 2)
    (6732, "30", "31", 71340),  # 31% of 234,000 - 1,200
    (6753, "80", "81", 29),  # 81 - (20 + 32)
    (6757, "50,000", "50,001", 5440096),  # 0.8 x 4 x (30 x 50,001 + 200,000)
    (6796, "35", "36", 25),  # 36 - (5 + 6)
    (6867, "9.50", "10.50", 73),  # 2 x 10.50 + 92 - 40
    (6939, "22", "23", 117),  # (9 x 23 + 27) x .5
    (6948, "6", "7", 13),  # 25% of 80 - 7
    (7461, "40", "41", 191),  # brown 101 + black 60 + white 30
]

# Changes that look fine but must be rejected (found while checking by hand).
HAND_REJECTED = [
    (6187, "2", g.OTHER_FORM),  # "fell 2%" is used as 98 = 100-2: changing to 3% needs 97
    (1995, "20", g.UNANNOTATED),  # 20% of 100 = 20 is computed in words, then used as 20
    (1, "12", g.NON_TERMINATING),  # $13 an hour / 60 minutes
    (0, "48", g.BECOMES_FRACTIONAL),  # half of 49 clips
]


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text().splitlines()]


@pytest.fixture(scope="module")
def result(rows: list[dict]) -> GsmResult:
    """Pairs from the sample, their source indexes mapped back to lines of the full train file."""
    out = pairs_from_gsm8k(SAMPLE)
    for p in out.pairs:
        p.meta["source_index"] = rows[p.meta["source_index"]]["index"]
    for r in out.rejections:
        r["source_index"] = rows[r["source_index"]]["index"]
    return out


def test_yield_and_one_pair_per_problem(result: GsmResult, rows: list[dict]) -> None:
    assert result.problems == len(rows)
    assert len(result.pairs) == result.problems_with_pairs  # one pair per problem by default
    # Yield on the rows at every EVERY-th line, an unbiased sample (the hand-checked rows are not).
    strided = {r["index"] for r in rows if r["index"] % EVERY == 0}
    assert len(strided) == 150  # 7473 rows in GSM8K train
    accepted = {p.meta["source_index"] for p in result.pairs} & strided
    assert len(accepted) / len(strided) >= 0.45, len(accepted)


def test_no_same_answer_and_integer_answers(result: GsmResult) -> None:
    for p in result.pairs:
        assert p.clean.answer != p.corrupted.answer
        assert isinstance(p.clean.answer, int) and isinstance(p.corrupted.answer, int)
        assert p.clean.question != p.corrupted.question
    assert [p.pair_id for p in result.pairs] == list(range(len(result.pairs)))
    indexes = [p.meta["source_index"] for p in result.pairs]
    assert indexes == sorted(indexes)


def test_meta_records_the_change(result: GsmResult, rows: list[dict]) -> None:
    by_index = {r["index"]: r for r in rows}
    for p in result.pairs:
        m = p.meta
        row = by_index[m["source_index"]]
        assert row["question"] == p.clean.question
        c = m["changed_number"]
        q, cq = p.clean.question, p.corrupted.question
        end = c["start"] + len(c["old"])
        assert q[c["start"] : end] == c["old"]
        # Only the number changed (and, right before it, 'a' <-> 'an').
        head = cq[: len(cq) - len(q[end:])]
        assert cq.endswith(q[end:]) and head.endswith(c["new"])
        article = re.compile(r"\b(a|an) $", re.IGNORECASE)
        assert article.sub("", head[: -len(c["new"])]) == article.sub("", q[: c["start"]])
        assert m["changed_equations"] and all(e["clean"] != e["corrupted"] for e in m["changed_equations"])


@pytest.mark.parametrize(("index", "old", "new", "answer"), HAND_CHECKED)
def test_hand_checked(result: GsmResult, index: int, old: str, new: str, answer: int) -> None:
    by_index = {p.meta["source_index"]: p for p in result.pairs}
    p = by_index[index]
    assert (p.meta["changed_number"]["old"], p.meta["changed_number"]["new"]) == (old, new)
    assert p.corrupted.answer == answer


@pytest.mark.parametrize(("index", "number", "reason"), HAND_REJECTED)
def test_hand_rejected(result: GsmResult, index: int, number: str, reason: str) -> None:
    got = [r["reason"] for r in result.rejections if r["source_index"] == index and r.get("number") == number]
    assert got == [reason]


def test_hand_checked_sample_is_large_enough() -> None:
    assert len({i for i, *_ in HAND_CHECKED}) == len(HAND_CHECKED) >= 30
