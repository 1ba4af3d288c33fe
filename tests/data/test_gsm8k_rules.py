"""GSM8K pair maker on small hand-made problems: one per acceptance and rejection rule."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from thoughtpatch.data import gsm8k as g
from thoughtpatch.data.gsm8k import gsm8k_to_file, pairs_from_gsm8k, pairs_from_problem
from thoughtpatch.errors import ThoughtpatchError


def _outcome(question: str, solution: str, number: str, delta: int = 1) -> str | int:
    """The corrupted answer when `number` is changed, else the rejection reason."""
    accepted, rejected = pairs_from_problem(question, solution, Fraction(delta), max_per_problem=99)
    for qn, r in rejected:
        if qn is None:
            return r.reason
        if qn.text == number:
            return r.reason
    for a in accepted:
        if a.number.text == number:
            return a.change.new_answer
    raise AssertionError(f"{number} not examined")


CASES = {
    "accepted, propagated through results": (
        "Sam has 12 marbles and buys 5 more. He gives 4 away. How many marbles does he have?",
        "12+5=<<12+5=17>>17\n17-4=<<17-4=13>>13\n#### 13", "12", 1, 14),
    "accepted, negative delta": (
        "Sam has 12 marbles and buys 5 more. He gives 4 away. How many marbles does he have?",
        "12+5=<<12+5=17>>17\n17-4=<<17-4=13>>13\n#### 13", "5", -2, 11),
    "accepted, percent written as a decimal": (
        "A $200 coat is 30% off. How much does it cost now?",
        "200*.3=<<200*.3=60>>60 off\n200-60=<<200-60=140>>140\n#### 140", "30", 1, 138),
    "number occurs twice": (
        "Ann has 5 red and 5 blue pens and 3 green pens. How many pens?",
        "5+5+3=<<5+5+3=13>>13\n#### 13", "5", 1, g.OCCURS_TWICE),
    "question number equals an earlier result": (
        "A shop has 6 pens and 2 boxes of 3 pencils. How many items?",
        "2*3=<<2*3=6>>6 pencils\n6+6=<<6+6=12>>12\n#### 12", "6", 1, g.EQUALS_INTERMEDIATE),
    "changed result never used later": (
        "Ann has 8 cats and 3 dogs. She buys 4 more dogs. How many dogs does she have?",
        "8+3=<<8+3=11>>11 pets\n3+4=<<3+4=7>>7\n#### 7", "8", 1, g.RESULT_NOT_USED),
    "answer is a bare copy": (
        "Ann has 9 cats and 4 dogs. She gets 2 more dogs. How many cats does she have?",
        "4+2=<<4+2=6>>6 dogs\n#### 9", "4", 1, g.BARE_COPY),
    "answer equals a question number": (
        "Ann has 9 cats and 4 dogs and 5 birds. How many cats and dogs?",
        "9+4=<<9+4=13>>13\n13-4=<<13-4=9>>9\n#### 9", "4", 1, g.ANSWER_IS_QUESTION_NUMBER),
    "stated result does not re-evaluate": (
        "Tim has 3 apples and buys 4. How many?", "3+4=<<3+4=8>>8\n#### 8", "3", 1, g.CLEAN_MISMATCH),
    "answer not computed": (
        "Tim has 3 apples and buys 4. How many?", "He has 7.\n#### 7", "3", 1, g.NO_ANNOTATIONS),
    "answer not an annotation result": (
        "Tim has 3 apples and buys 4. How many pairs?", "3+4=<<3+4=7>>7\n#### 8", "3", 1, g.ANSWER_NOT_COMPUTED),
    "no final answer": ("Tim has 3 apples and buys 4.", "3+4=<<3+4=7>>7", "3", 1, g.NO_FINAL_ANSWER),
    "non-integer clean answer": ("Tim has 3 apples and buys 4.", "<<3+4.5=7.5>>\n#### 7.5", "3", 1, g.NON_INTEGER_ANSWER),
    "unparseable annotation": ("Tim has 3 apples and buys 4.", "<<3 apples+4=7>>\n#### 7", "3", 1, g.UNPARSEABLE),
    "whole-number result becomes fractional": (
        "Natalia sold 48 clips in April and half as many in May. How many clips in all?",
        "48/2=<<48/2=24>>24\n48+24=<<48+24=72>>72\n#### 72", "48", 1, g.BECOMES_FRACTIONAL),
    "corrupted answer not an integer": (
        "There are 12 cookies for 4 kids. How many cookies does each kid get?",
        "12/4=<<12/4=3>>3\n#### 3", "12", 1, g.NON_INTEGER),
    "intermediate becomes fractional": (
        "There are 12 cookies for 4 kids. Each kid eats all of theirs and 8 more. How many does each kid eat?",
        "12/4=<<12/4=3>>3\n3+8=<<3+8=11>>11\n#### 11", "12", 1, g.BECOMES_FRACTIONAL),
    "non-terminating decimal": (
        "Weng earns $12 an hour for babysitting. She did 50 minutes. How much did she earn?",
        "12/60=<<12/60=0.2>>0.2\n0.2*50=<<0.2*50=10>>10\n#### 10", "12", 1, g.NON_TERMINATING),
    "division by zero": (
        "There are 24 cookies and 5 kids, but 3 kids leave. How many cookies does each remaining kid get?",
        "5-3=<<5-3=2>>2\n24/2=<<24/2=12>>12\n#### 12", "5", -2, g.DIV_ZERO),
    "negative result": (
        "Tom has 20 dollars and spends 18 dollars. How many are left?",
        "20-18=<<20-18=2>>2\n#### 2", "20", -3, g.NEGATIVE),
    "changed number not positive": (
        "Tom has 20 dollars and spends 3 dollars. How many are left?",
        "20-3=<<20-3=17>>17\n#### 17", "3", -3, g.NEW_VALUE_BAD),
    "value implied by a word": (
        "Mia reads 2 books a day and twice as many on Sunday. How many on Sunday and Monday?",
        "2*2=<<2*2=4>>4\n4+2=<<4+2=6>>6\n#### 6", "2", 1, g.IMPLIED),
    "value implied by a unit": (
        "Bo works 60 minutes a day at $3 an hour. How much does he earn in 4 days?",
        "60/60=<<60/60=1>>1 hour\n1*3*4=<<1*3*4=12>>12\n#### 12", "60", 1, g.IMPLIED),
    "number not used": (
        "Bob is 40 years old. He has 3 boxes of 6 eggs. How many eggs?", "3*6=<<3*6=18>>18\n#### 18", "40", 1,
        g.UNUSED),
    "percentage over 100": (
        "A fund grew by 100% from $30. How much is it now?", "30*2=<<30*2=60>>60\n#### 60", "100", 1,
        g.PERCENT_OVER),
    "derived form ('fell 2%' written as 98)": (
        "The Dow fell 2% today and ended at 8,722. What was it in the morning?",
        "8722 / 98*2 = <<8722/98*2=178>>178.\n8722 + 178 = <<8722+178=8900>>8900.\n#### 8900", "2", 1,
        g.OTHER_FORM),
    "feeds an unannotated computation": (
        "Sam has 5 apples and 7 pears. He buys 4 bags that each hold as many fruits as he has, "
        "then gives away as many fruits as he had apples. How many fruits does he keep?",
        "He has 5 + 7 = 12 fruits.\nThe bags hold 4*12=<<4*12=48>>48 fruits.\n"
        "He keeps 12+48-5=<<12+48-5=55>>55 fruits.\n#### 55", "5", 1, g.UNANNOTATED),
    "two equal results": (
        "Ann buys 3 packs of 4 pens and 2 packs of 6 pencils. How many items?",
        "3*4=<<3*4=12>>12\n2*6=<<2*6=12>>12\n12+12=<<12+12=24>>24\n#### 24", "3", 1, g.EQUAL_RESULTS),
    "same answer": (
        "Lia has 8 bags with 0 apples in each, 3 pears and 2 plums. How many fruits?",
        "8*0=<<8*0=0>>0\n0+3+2=<<0+3+2=5>>5\n#### 5", "8", 1, g.SAME_ANSWER),
    "ordinal": ("On the 3rd day Al ran 4 miles and 6 more. How far?", "4+6=<<4+6=10>>10\n#### 10", "3", 1, g.ORDINAL),
    "fraction part": ("Al ate 1/2 of 8 pies and 3 cakes. How many?", "8/2=<<8/2=4>>4\n4+3=<<4+3=7>>7\n#### 7", "2", 1,
                      g.NOT_QUANTITY),
    "value 1": ("Al has 1 dog and 6 cats. How many pets?", "1+6=<<1+6=7>>7\n#### 7", "1", 1, g.ZERO_ONE),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rule(case: str) -> None:
    question, solution, number, delta, expected = CASES[case]
    assert _outcome(question, solution, number, delta) == expected


def test_the_natalia_problem_gives_a_pair_by_its_only_safe_number() -> None:
    # 48 is fine by itself but "half" implies 2, so 48 -> 49 gives 24.5 clips: no pair at all.
    accepted, rejected = pairs_from_problem(
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72",
    )
    assert not accepted and [r.reason for _, r in rejected] == [g.BECOMES_FRACTIONAL]
    accepted, _ = pairs_from_problem(
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72",
        Fraction(2),
    )
    a = accepted[0]
    assert (a.number.text, a.new_text, a.change.new_answer) == ("48", "50", 75)
    assert a.change.changed_steps == [
        {"step": 0, "clean": "48/2=24", "corrupted": "50/2=25"},
        {"step": 1, "clean": "48+24=72", "corrupted": "50+25=75"},
    ]
    assert "to 50 of her friends" in a.question


def test_file_level(tmp_path: Path) -> None:
    src = tmp_path / "g.jsonl"
    rows = [
        {"question": "Sam has 12 marbles and buys 5 more. He gives 4 away. How many marbles?",
         "answer": "12+5=<<12+5=17>>17\n17-4=<<17-4=13>>13\n#### 13"},
        {"question": "Tim has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=8>>8\n#### 8"},
    ]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out, rej = tmp_path / "p.json", tmp_path / "rej.jsonl"
    result = gsm8k_to_file(src, out, max_per_problem=3, rejections=rej)
    assert result.problems == 2 and result.problems_with_pairs == 1
    assert [(p.pair_id, p.corrupted.answer) for p in result.pairs] == [(0, 14), (1, 14), (2, 12)]  # 13+1, 18-4, 17-5
    assert [p.meta["changed_number"]["old"] for p in result.pairs] == ["12", "5", "4"]
    assert {p.meta["source_index"] for p in result.pairs} == {0}
    assert result.problem_rejections == {g.CLEAN_MISMATCH: 1}
    saved = json.loads(out.read_text())
    assert saved[2]["meta"]["changed_equations"] == [{"step": 1, "clean": "17-4=13", "corrupted": "17-5=12"}]
    assert saved[2]["clean"]["reasoning_steps"] == 2
    logged = [json.loads(line) for line in rej.read_text().splitlines()]
    assert logged == [{"source_index": 1, "reason": g.CLEAN_MISMATCH, "detail": "3+4 = 7, stated 8"}]
    # deterministic
    assert pairs_from_gsm8k(src, max_per_problem=3).pairs == result.pairs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "empty file"),
        ('{"question": "q"}\n', "line 1, field 'answer': missing"),
        ('{"question": "q", "answer": "#### 1"}\n{"question": 3, "answer": "#### 1"}\n',
         "line 2, field 'question': expected a string, got int"),
        ('{"question": "q", "answer": "#### 1"}\n{oops}\n', "line 2: malformed JSON"),
        ('[1, 2]\n', "line 1: expected an object"),
    ],
)
def test_bad_gsm8k_file(tmp_path: Path, text: str, expected: str) -> None:
    src, out = tmp_path / "g.jsonl", tmp_path / "p.json"
    src.write_text(text)
    with pytest.raises(ThoughtpatchError) as err:
        gsm8k_to_file(src, out)
    assert str(err.value).startswith(str(src)) and expected in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()


def test_bad_options(tmp_path: Path) -> None:
    src = tmp_path / "g.jsonl"
    src.write_text('{"question": "Tim has 3 apples and buys 4.", "answer": "<<3+4=7>>\\n#### 7"}\n')
    for kwargs, msg in [({"delta": 0}, "must not be 0"), ({"delta": "x"}, "expected a number"),
                        ({"max_per_problem": 0}, "at least 1")]:
        with pytest.raises(ThoughtpatchError, match=msg):
            gsm8k_to_file(src, tmp_path / "p.json", **kwargs)
    with pytest.raises(ThoughtpatchError, match="no pair could be made"):
        gsm8k_to_file(src, tmp_path / "p.json", delta=-3)
    assert not (tmp_path / "p.json").exists()
