"""The annotation parser (exact, no eval) and question-number handling."""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import pytest

from thoughtpatch.data.arith import ArithError, evaluate, format_decimal, literals, parse_expr
from thoughtpatch.data.numbers import format_like, implied_values, question_numbers, replace_number


@pytest.mark.parametrize(
    ("expr", "value"),
    [
        ("16-3-4", 9), ("2+3*4", 14), ("(2+3)*4", 20), ("12/60", Fraction(1, 5)), ("0.2*50", 10),
        (".5*2", 1), ("-3+5", 2), ("2*-3", -6), ("--4", 4), ("2^3^2", 512), ("2**3", 8), ("-2^2", -4),
        ("50%*80", 40), ("80*25%", 20), ("1,200/4", 300), ("10/3*3", 10), ("6 x 7", 42), ("2^-1", Fraction(1, 2)),
        ("1/2*40*20", 400), ("+12.5+25+16.5", 54),
    ],
)
def test_evaluate(expr: str, value: Fraction) -> None:
    assert evaluate(parse_expr(expr)) == value


@pytest.mark.parametrize("expr", ["", "2+", "(2+3", "2 apples", "3)", "560//10", "2 3", "eval('1')"])
def test_unparseable(expr: str) -> None:
    with pytest.raises(ArithError) as err:
        evaluate(parse_expr(expr))
    assert err.value.kind == "unparseable"


def test_division_by_zero_and_powers() -> None:
    with pytest.raises(ArithError) as err:
        evaluate(parse_expr("5/(3-3)"))
    assert err.value.kind == "division by zero"
    with pytest.raises(ArithError) as err:
        evaluate(parse_expr("2^0.5"))
    assert err.value.kind == "inexact power"


def test_literal_overrides() -> None:
    node = parse_expr("48/2 + 48")
    lits = literals(node)
    assert [(n.value, "48/2 + 48"[n.start : n.end]) for n in lits] == [(48, "48"), (2, "2"), (48, "48")]
    assert evaluate(node, {0: Fraction(49), 2: Fraction(49)}) == Fraction(147, 2)


def test_format_decimal() -> None:
    assert format_decimal(Fraction(49, 2)) == "24.5"
    assert format_decimal(Fraction(1, 3)) is None
    assert format_decimal(Fraction(9), 2) == "9.00"
    assert format_decimal(Fraction(1200001), commas=True) == "1,200,001"
    assert format_decimal(Fraction(-5, 4)) == "-1.25"


def test_no_eval_in_data_room() -> None:
    src = Path(__file__).resolve().parents[2] / "src" / "thoughtpatch" / "data"
    for f in src.glob("*.py"):
        assert not re.search(r"\b(eval|exec)\(", f.read_text()), f


def test_question_numbers() -> None:
    q = ("On the 3rd day, Jo paid $1,200 for 3.5 kg at 50% off, at 3:30, for 1/2 of 4-5 boxes "
         "of mp3 players and .5 liters, 1 cat, 60 cents.")
    nums = question_numbers(q)
    texts = [n.text for n in nums]
    assert texts == ["3", "1,200", "3.5", "50", "3", "30", "1", "2", "4", "5", ".5", "1", "60"]
    part = "part of a fraction, time or range"
    skips = [n.skip for n in nums]
    assert skips == ["ordinal", None, None, None, part, part, part, part, part, part, None, "value 0 or 1", None]
    assert [n.value for n in nums][1:3] == [1200, Fraction(7, 2)]
    assert [n.percent for n in nums][3] and not nums[2].percent
    assert nums[-1].cents


@pytest.mark.parametrize(
    ("old", "value", "new"),
    [("3.50", Fraction(9, 2), "4.50"), ("1,200", Fraction(1201), "1,201"), ("999", Fraction(1000), "1000"),
     (".5", Fraction(3, 2), "1.5"), (".25", Fraction(1, 2), ".50"), ("7", Fraction(15, 2), "7.5"),
     ("2", Fraction(1, 3), None)],
)
def test_format_like(old: str, value: Fraction, new: str | None) -> None:
    assert format_like(old, value) == new


@pytest.mark.parametrize(
    ("question", "new", "expected"),
    [
        ("He works an 8-hour day.", "9", "He works a 9-hour day."),
        ("She has a 7 foot quilt.", "8", "She has an 8 foot quilt."),
        ("It is a 10 year loan.", "11", "It is an 11 year loan."),
        ("A 17 inch pizza.", "18", "An 18 inch pizza."),
        ("He ran a 79 minute race.", "80", "He ran an 80 minute race."),
        ("She bought a 5 kg bag.", "6", "She bought a 6 kg bag."),
        ("Buy an 18,000 pound truck.", "18,001", "Buy an 18,001 pound truck."),
        ("Buy an 11 pound ham.", "12", "Buy a 12 pound ham."),
    ],
)
def test_replace_number_fixes_article(question: str, new: str, expected: str) -> None:
    qn = next(n for n in question_numbers(question) if n.skip is None)
    assert replace_number(question, qn, new) == expected


def test_implied_values() -> None:
    got = implied_values("Twice a week she reads a dozen pages for twenty-five minutes, 10% off, half an hour.")
    assert {2, 7, 52, 12, 20, 5, 25, 60, 24, 100} <= got
    assert 3 not in got
