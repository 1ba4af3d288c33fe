"""Numbers written in a GSM8K question: where they are, which may be changed, and which
values the wording implies without writing them as digits ("twice", "a week", "50%")."""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from thoughtpatch.data.arith import format_decimal, parse_number

# A digit number not glued to a word or another number: '1,200', '3.50', '.5', '$5', '50%'.
_NUMBER = re.compile(r"(?<![\w.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.\d])\.\d+")
_ORDINAL = re.compile(r"(?:st|nd|rd|th)\b", re.IGNORECASE)
_PERCENT = re.compile(r"\s*(?:%|percent\b|per cent\b)", re.IGNORECASE)
_CENTS = re.compile(r"\s*(?:cents?\b|¢)", re.IGNORECASE)


@dataclass(frozen=True)
class QuestionNumber:
    start: int
    end: int
    text: str
    value: Fraction
    percent: bool
    cents: bool  # '10 cents': solutions may write it as 0.10 (dollars)
    skip: str | None  # why this number is not a candidate for a change (None: it is)


def _skip_reason(q: str, start: int, end: int, value: Fraction) -> str | None:
    before, after = q[max(0, start - 2) : start], q[end : end + 3]
    if _ORDINAL.match(q, end):
        return "ordinal"
    # '1/2', '3:30', '3-4': a part of a fraction, a time or a range is not a quantity.
    if re.match(r"[/:]\d", after) or re.search(r"\d[/:]$", before) or before.endswith("/"):
        return "part of a fraction, time or range"
    if re.match(r"-\d", after) or re.search(r"\d-$", before):
        return "part of a fraction, time or range"
    if value in (0, 1):
        # '1 hour' -> '2 hour' breaks the grammar, and 0/1 are everywhere as constants.
        return "value 0 or 1"
    return None


def question_numbers(question: str) -> list[QuestionNumber]:
    out = []
    for m in _NUMBER.finditer(question):
        value = parse_number(m.group())
        out.append(
            QuestionNumber(
                m.start(),
                m.end(),
                m.group(),
                value,
                bool(_PERCENT.match(question, m.end())),
                bool(_CENTS.match(question, m.end())),
                _skip_reason(question, m.start(), m.end(), value),
            )
        )
    return out


def format_like(old_text: str, value: Fraction) -> str | None:
    """Write `value` the way `old_text` was written (decimals kept, thousands commas kept)."""
    decimals = len(old_text.split(".", 1)[1]) if "." in old_text else 0
    text = format_decimal(value, decimals, commas="," in old_text)
    if text is not None and old_text.startswith(".") and text.startswith("0."):
        text = text[1:]
    return text


def _needs_an(number_text: str) -> bool:
    """'an 8-hour', 'an 11-year-old', 'an 18,000 pound': the spoken number starts with a vowel."""
    digits = number_text.split(".")[0].replace(",", "")
    if not digits:  # '.5' is read 'point five'
        return False
    lead = digits[: len(digits) % 3 or 3]  # the group before 'thousand' / 'million'
    return digits[0] == "8" or lead in ("11", "18")


def replace_number(question: str, qn: QuestionNumber, new_text: str) -> str:
    """The question with one number replaced, fixing 'a'/'an' right before it."""
    head, tail = question[: qn.start], question[qn.end :]
    m = re.search(r"\b([Aa])(n?) $", head)
    if m and (m.group(2) == "n") == _needs_an(qn.text) and _needs_an(new_text) != _needs_an(qn.text):
        article = m.group(1) + ("n" if _needs_an(new_text) else "")
        head = head[: m.start()] + article + " "
    return head + new_text + tail


_WORD_VALUES: dict[str, tuple[int, ...]] = {
    **{w: (i,) for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
        " fifteen sixteen seventeen eighteen nineteen twenty".split())},
    **{w: (10 * (i + 3),) for i, w in enumerate("thirty forty fifty sixty seventy eighty ninety".split())},
    "hundred": (100,), "hundreds": (100,), "thousand": (1000,), "thousands": (1000,), "million": (10**6,),
    "dozen": (12,), "dozens": (12,), "half": (2,), "halves": (2,), "halved": (2,), "twice": (2,),
    "double": (2,), "doubled": (2,), "doubles": (2,), "triple": (3,), "tripled": (3,), "triples": (3,),
    "thrice": (3,), "quadruple": (4,), "quadrupled": (4,), "pair": (2,), "pairs": (2,), "couple": (2,),
    "twins": (2,), "triplets": (3,), "quarter": (4, 25), "quarters": (4, 25), "third": (3,), "thirds": (3,),
    "fourth": (4,), "fourths": (4,), "fifth": (5,), "fifths": (5,), "sixth": (6,), "seventh": (7,),
    "eighth": (8,), "ninth": (9,), "tenth": (10,), "tenths": (10,), "hundredth": (100,),
    "percent": (100,), "cent": (100,), "cents": (100,), "dime": (10,), "dimes": (10,),
    "nickel": (5,), "nickels": (5,), "decade": (10,), "decades": (10,), "century": (100,),
}
# Unit words whose conversions appear in solutions as bare constants (60 minutes an hour...).
_UNIT_VALUES: dict[str, tuple[int, ...]] = {
    "second": (60,), "minute": (60,), "hour": (60, 24), "day": (24, 7, 30, 365), "week": (7, 52),
    "month": (12, 30, 4), "year": (12, 52, 365), "foot": (12, 3), "feet": (12, 3), "inch": (12,),
    "yard": (3, 36), "pound": (16,), "ounce": (16,), "gallon": (4, 128), "quart": (4, 2), "pint": (2,),
    "kilo": (1000,), "kilometer": (1000,), "km": (1000,), "kg": (1000,), "meter": (100, 1000),
    "centimeter": (100,), "cm": (100,), "liter": (1000,), "litre": (1000,), "milliliter": (1000,),
    "ml": (1000,), "gram": (1000,),
}
_WORD = re.compile(r"[a-z]+")


def implied_values(question: str) -> set[Fraction]:
    """Values the wording implies: number words, multipliers, percent, unit conversions."""
    text = question.lower()
    found: set[Fraction] = set()
    if "%" in text:
        found.add(Fraction(100))
    for word in _WORD.findall(text):
        for v in _WORD_VALUES.get(word, ()):
            found.add(Fraction(v))
        stem = word[:-1] if word.endswith("s") else word
        for v in _UNIT_VALUES.get(stem, ()):
            found.add(Fraction(v))
    # 'twenty-five' also implies 25.
    for tens, ones in re.findall(r"\b(twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety)-([a-z]+)", text):
        if ones in _WORD_VALUES and _WORD_VALUES[ones][0] < 10:
            found.add(Fraction(_WORD_VALUES[tens][0] + _WORD_VALUES[ones][0]))
    return found
