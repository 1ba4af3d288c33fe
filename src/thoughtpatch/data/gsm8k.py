"""Pairs made from raw GSM8K: change one number of the question and re-execute the
solution's calculator annotations (`<<16-3-4=9>>`) with the change propagated.

Tracing. Every number literal in an annotation is matched, by exact value, to its possible
*sources*: numbers written in the question, results of earlier annotations, values the
wording implies ("twice", "an hour", "%") and results of arithmetic written in words
without an annotation ("5 + 3 = 8 apples"). A literal whose sources agree on the corrupted
value takes that value; one whose sources disagree cannot be traced, and the change is
rejected with the reason. Annotations are re-evaluated in order with exact fractions; a
result that changes becomes the source of its value for later annotations.

Which changes make sense (a rejection reason each, counted in `GsmResult`):
* only digit numbers change; ordinals ("3rd"), parts of "1/2", "3:30", "3-4", and the
  values 0 and 1 ("1 hour" -> "2 hour") never do; a change to a value <= 0 or to 1 neither;
* a percentage may not be pushed past 100; "40%" written as .4 in a solution, and
  "10 cents" written as 0.10, are followed (the same quantity per hundred);
* a result that is a whole number on the clean problem must stay whole (49 clips / 2 is
  not a story), and every result must stay a finite decimal and keep its sign;
* a constant that one operation turns into a changed value ("fell 2%" used as 98) means
  the solution did that step in its head: rejected, since the change would not reach it.
Numbers keep their written form: "$1,200" -> "$1,201", "3.50" -> "4.50"; "a"/"an" before
a changed number is fixed ("an 8-hour" -> "a 9-hour").

A problem yields at most `max_per_problem` pairs, taking its numbers in question order.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from thoughtpatch.data.arith import (
    ArithError,
    Node,
    evaluate,
    format_decimal,
    is_terminating,
    literals,
    parse_expr,
    parse_number,
)
from thoughtpatch.data.numbers import QuestionNumber, format_like, implied_values, question_numbers, replace_number
from thoughtpatch.data.schema import Pair, Problem, atomic_write_text, read_text
from thoughtpatch.errors import ThoughtpatchError

_ANNOTATION = re.compile(r"<<([^<>]*)>>")
_FINAL = re.compile(r"####\s*(.*?)\s*$", re.DOTALL)

# Problem level: the solution itself cannot be re-executed.
NO_FINAL_ANSWER = "no '####' final answer"
NON_INTEGER_ANSWER = "clean answer is not an integer"
NO_ANNOTATIONS = "no calculator annotations"
UNPARSEABLE = "annotation does not parse"
CLEAN_MISMATCH = "stated result does not re-evaluate on the clean problem"
BARE_COPY = "answer is a bare copy of a question number"
ANSWER_NOT_COMPUTED = "answer is not the result of any annotation"
ANSWER_IS_QUESTION_NUMBER = "answer also equals a question number"
NO_CANDIDATES = "no changeable number in the question"
ALL_REJECTED = "every number rejected"
# Number level: this change cannot be made or traced.
ORDINAL = "ordinal"
NOT_QUANTITY = "part of a fraction, time or range"
ZERO_ONE = "value 0 or 1"
NEW_VALUE_BAD = "changed value is not positive or is 1"
OCCURS_TWICE = "number occurs twice in the question"
IMPLIED = "value is also implied by a word or unit"
PERCENT_OVER = "percentage would exceed 100"
UNUSED = "number is not used in any annotation"
UNANNOTATED = "the change feeds a computation without an annotation"
OTHER_FORM = "a changed value is also used in a derived form"
EQUALS_INTERMEDIATE = "a question number equals an earlier intermediate result"
EQUAL_RESULTS = "two intermediate results are equal"
RESULT_NOT_USED = "a changed result is never used later"
DIV_ZERO = "division by zero"
INEXACT = "inexact power"
BECOMES_FRACTIONAL = "a whole-number result becomes fractional"
NON_TERMINATING = "a result is not a finite decimal"
NEGATIVE = "a result becomes negative"
NON_INTEGER = "corrupted answer is not an integer"
SAME_ANSWER = "same answer"

PROBLEM_REASONS = (NO_FINAL_ANSWER, NON_INTEGER_ANSWER, NO_ANNOTATIONS, UNPARSEABLE, CLEAN_MISMATCH,
                   BARE_COPY, ANSWER_NOT_COMPUTED, ANSWER_IS_QUESTION_NUMBER, NO_CANDIDATES, ALL_REJECTED)
NUMBER_REASONS = (ORDINAL, NOT_QUANTITY, ZERO_ONE, NEW_VALUE_BAD, OCCURS_TWICE, IMPLIED, PERCENT_OVER, UNUSED,
                  UNANNOTATED, OTHER_FORM, EQUALS_INTERMEDIATE, EQUAL_RESULTS, RESULT_NOT_USED, DIV_ZERO, INEXACT,
                  BECOMES_FRACTIONAL, NON_TERMINATING, NEGATIVE, NON_INTEGER, SAME_ANSWER)
REASONS = PROBLEM_REASONS + NUMBER_REASONS


class Rejected(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason if not detail else f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Step:
    """One calculator annotation `<<expr=result>>`."""

    expr: str
    node: Node
    result: Fraction


@dataclass(frozen=True)
class Solution:
    steps: list[Step]
    answer: int
    answer_step: int  # index of the step whose result is the final answer
    text: str  # the worked solution before '####'


def parse_solution(question: str, solution: str) -> Solution:
    """Parse and re-check a GSM8K solution; raise Rejected (problem level) if unusable."""
    m = _FINAL.search(solution)
    if m is None:
        raise Rejected(NO_FINAL_ANSWER)
    try:
        answer = parse_number(m.group(1))
    except (ValueError, ZeroDivisionError):
        raise Rejected(NO_FINAL_ANSWER, m.group(1)) from None
    if answer.denominator != 1:
        raise Rejected(NON_INTEGER_ANSWER, m.group(1))
    steps = []
    for text in _ANNOTATION.findall(solution[: m.start()]):
        expr, eq, stated = text.rpartition("=")
        if not eq:
            raise Rejected(UNPARSEABLE, text)
        try:
            node = parse_expr(expr)
            result = parse_number(stated.strip())
            value = evaluate(node)
        except (ArithError, ValueError, ZeroDivisionError) as e:
            raise Rejected(UNPARSEABLE, f"{text} ({e})") from None
        if value != result:
            raise Rejected(CLEAN_MISMATCH, f"{expr} = {format_decimal(value) or value}, stated {stated}")
        steps.append(Step(expr, node, result))
    if not steps:
        raise Rejected(NO_ANNOTATIONS)
    producing = [i for i, s in enumerate(steps) if s.result == answer]
    in_question = any(n.value == answer for n in question_numbers(question))
    if not producing:
        raise Rejected(BARE_COPY if in_question else ANSWER_NOT_COMPUTED, str(answer))
    if in_question:
        # '#### 5' with a 5 in the question: a copy or the computation? Cannot tell.
        raise Rejected(ANSWER_IS_QUESTION_NUMBER, str(answer))
    return Solution(steps, int(answer), producing[-1], solution[: m.start()])


_MASK = "\x00"
_TEXT_NUMBER = re.compile(r"(?<![\w.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.\d])\.\d+")
_UNANNOTATED_RESULT = re.compile(r"=\s*[$€£]?\s*((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")


def unannotated_results(text: str, tainted: set[Fraction]) -> tuple[set[Fraction], set[Fraction]]:
    """Results of arithmetic written without an annotation ('5 + 3 = 8 apples'): all of them,
    and those whose line uses a tainted value (transitively, in reading order)."""
    found: set[Fraction] = set()
    hit: set[Fraction] = set()
    tainted = set(tainted)
    for line in text.splitlines():
        masked = _ANNOTATION.sub(_MASK, line)  # an annotated result reads '= <mask>24'
        for m in _UNANNOTATED_RESULT.finditer(masked):
            value = parse_number(m.group(1))
            found.add(value)
            if any(parse_number(t) in tainted for t in _TEXT_NUMBER.findall(masked[: m.start()])):
                hit.add(value)
                tainted.add(value)
    return found, hit


def _one_step(x: Fraction, v: Fraction, known: set[Fraction]) -> bool:
    """Is x = v op c for a known c (either order, + - * /)?"""
    for c in known:
        if c == v or c == 0:
            continue
        if x in (v + c, v - c, c - v, v * c, v / c) or (v != 0 and x == c / v):
            return True
    return False


@dataclass
class Change:
    """A traced change: corrupted answer and the annotations whose results changed."""

    new_answer: int
    changed_steps: list[dict[str, Any]] = field(default_factory=list)


def _written(step: Step, values: dict[int, Fraction], result: Fraction) -> str:
    """The annotation text with new literal values, 'expr=result'."""
    out, last = [], 0
    for lit in literals(step.node):
        if lit.index in values and values[lit.index] != lit.value:
            out.append(step.expr[last : lit.start])
            out.append(format_like(step.expr[lit.start : lit.end], values[lit.index]) or str(values[lit.index]))
            last = lit.end
    out.append(step.expr[last:])
    return f"{''.join(out)}={format_decimal(result) or f'{float(result):.6g}...'}"


def trace_change(
    numbers: list[QuestionNumber], implied: set[Fraction], sol: Solution, changed: int, new_value: Fraction
) -> Change:
    """Re-execute `sol` with question number `changed` set to `new_value`; raise Rejected."""
    old_value = numbers[changed].value
    q_values = Counter(n.value for n in numbers)
    if q_values[old_value] > 1:
        raise Rejected(OCCURS_TWICE)
    if old_value in implied:
        raise Rejected(IMPLIED)
    steps = sol.steps
    unannotated = unannotated_results(sol.text, set())[0]
    new_results: list[Fraction] = []
    step_values: list[dict[int, Fraction]] = []
    used_number = False
    used_step = [False] * len(steps)
    for i, step in enumerate(steps):
        values: dict[int, Fraction] = {}
        for lit in literals(step.node):
            x = lit.value
            # (kind, new value, step index) for every place this literal may come from.
            sources: list[tuple[str, Fraction, int]] = []
            if q_values[x]:
                sources.append(("question", new_value if x == old_value else x, -1))
            sources += [("result", new_results[j], j) for j in range(i) if steps[j].result == x]
            if x in implied:
                sources.append(("implied", x, -1))
            if x in unannotated:
                sources.append(("unannotated", x, -1))
            if len({s[1] for s in sources}) > 1:
                kinds = {s[0] for s in sources}
                if "unannotated" in kinds:
                    raise Rejected(UNANNOTATED, f"step {i}: {step.expr}")
                if "implied" in kinds:
                    raise Rejected(IMPLIED, f"step {i}: {step.expr}")
                if kinds == {"result"}:
                    raise Rejected(EQUAL_RESULTS, f"step {i}: {step.expr}")
                raise Rejected(EQUALS_INTERMEDIATE, f"step {i}: {step.expr}")
            if not sources and x == old_value / 100 and (numbers[changed].percent or numbers[changed].cents):
                # '40%' written as .4, '10 cents' as 0.10 dollars: the same quantity.
                sources.append(("question", new_value / 100, -1))
            if not sources:
                # An unexplained constant was worked out in the head. If one operation turns
                # a changed value into it (50% written as .5, 'fell 2%' as 98), the change
                # would leak past the annotations.
                changed_now = [old_value] + [steps[j].result for j in range(i) if new_results[j] != steps[j].result]
                known = set(q_values) | implied | {Fraction(100)} | {steps[j].result for j in range(i)}
                if any(_one_step(x, c, known) for c in changed_now):
                    raise Rejected(OTHER_FORM, f"step {i}: {step.expr}")
                continue
            new = sources[0][1]
            if new != x:
                values[lit.index] = new
                for kind, _, j in sources:
                    if kind == "question":
                        used_number = True
                    elif kind == "result":
                        used_step[j] = True
        try:
            result = evaluate(step.node, values)
        except ArithError as e:
            raise Rejected(e.kind, f"step {i}: {step.expr}") from None
        if result != step.result:
            if i == sol.answer_step and result.denominator != 1:
                raise Rejected(NON_INTEGER, _written(step, values, result))
            if step.result.denominator == 1 and result.denominator != 1:
                # 48 clips / 2 = 24.5 clips: the corrupted story no longer makes sense.
                raise Rejected(BECOMES_FRACTIONAL, _written(step, values, result))
            if not is_terminating(result):
                raise Rejected(NON_TERMINATING, _written(step, values, result))
            if result < 0 <= step.result:
                raise Rejected(NEGATIVE, _written(step, values, result))
        new_results.append(result)
        step_values.append(values)
    if not used_number:
        raise Rejected(UNUSED)
    # Literals that kept their value must not be results of unannotated arithmetic that
    # depends on the change ('5 + 3 = 8' written in words, then <<8*2=16>>).
    changed_values = {old_value} | {s.result for s, r in zip(steps, new_results) if r != s.result}
    tainted = unannotated_results(sol.text, changed_values)[1]
    for i, step in enumerate(steps):
        for lit in literals(step.node):
            if lit.value in tainted:
                raise Rejected(UNANNOTATED, f"step {i}: {step.expr}")
    changed_steps = []
    for i, step in enumerate(steps):
        if new_results[i] == step.result:
            continue
        if i != sol.answer_step and not used_step[i]:
            raise Rejected(RESULT_NOT_USED, f"step {i}: {step.expr}")
        changed_steps.append(
            {"step": i, "clean": f"{step.expr}={format_decimal(step.result)}",
             "corrupted": _written(step, step_values[i], new_results[i])}
        )
    answer = new_results[sol.answer_step]
    if answer.denominator != 1:
        raise Rejected(NON_INTEGER, str(answer))
    if answer == sol.answer:
        raise Rejected(SAME_ANSWER, str(answer))
    return Change(int(answer), changed_steps)


@dataclass
class GsmResult:
    pairs: list[Pair]
    problems: int = 0
    problems_with_pairs: int = 0
    problem_rejections: Counter[str] = field(default_factory=Counter)
    number_rejections: Counter[str] = field(default_factory=Counter)
    rejections: list[dict[str, Any]] = field(default_factory=list)  # one per rejected problem/number

    @property
    def yield_fraction(self) -> float:
        return self.problems_with_pairs / self.problems if self.problems else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "problems": self.problems,
            "problems_with_pairs": self.problems_with_pairs,
            "yield": round(self.yield_fraction, 4),
            "pairs": len(self.pairs),
            "problem_rejections": dict(self.problem_rejections.most_common()),
            "number_rejections": dict(self.number_rejections.most_common()),
        }


@dataclass(frozen=True)
class Accepted:
    number: QuestionNumber
    new_text: str
    question: str  # the corrupted question
    change: Change
    solution: Solution


def pairs_from_problem(
    question: str, solution: str, delta: Fraction = Fraction(1), max_per_problem: int = 1
) -> tuple[list[Accepted], list[tuple[QuestionNumber | None, Rejected]]]:
    """Accepted changes and rejections (number None: the whole problem) of one problem."""
    rejected: list[tuple[QuestionNumber | None, Rejected]] = []
    try:
        sol = parse_solution(question, solution)
    except Rejected as r:
        return [], [(None, r)]
    numbers = question_numbers(question)
    implied = implied_values(question)
    accepted: list[Accepted] = []
    for k, qn in enumerate(numbers):
        if len(accepted) >= max_per_problem:
            break
        try:
            if qn.skip is not None:
                raise Rejected(qn.skip)
            new_value = qn.value + delta
            if new_value <= 0 or new_value == 1:
                raise Rejected(NEW_VALUE_BAD, str(new_value))
            if qn.percent and new_value > 100 >= qn.value:
                raise Rejected(PERCENT_OVER)
            new_text = format_like(qn.text, new_value)
            if new_text is None:
                raise Rejected(NON_TERMINATING, str(new_value))
            change = trace_change(numbers, implied, sol, k, new_value)
        except Rejected as r:
            rejected.append((qn, r))
            continue
        accepted.append(Accepted(qn, new_text, replace_number(question, qn, new_text), change, sol))
    if not accepted and not rejected:
        rejected.append((None, Rejected(NO_CANDIDATES)))
    return accepted, rejected


def read_gsm8k(path: str | Path) -> list[tuple[int, str, str]]:
    """(0-based line, question, solution) per non-blank line; errors name file, line, field."""
    path = Path(path)
    text = read_text(path)
    rows = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        where = f"{path}, line {i + 1}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ThoughtpatchError(f"{where}: malformed JSON at column {e.colno}: {e.msg}") from None
        if not isinstance(d, dict):
            raise ThoughtpatchError(f"{where}: expected an object with 'question' and 'answer'")
        for key in ("question", "answer"):
            if key not in d:
                raise ThoughtpatchError(f"{where}, field '{key}': missing")
            if not isinstance(d[key], str):
                raise ThoughtpatchError(f"{where}, field '{key}': expected a string, got {type(d[key]).__name__}")
        rows.append((i, d["question"], d["answer"]))
    if not rows:
        raise ThoughtpatchError(f"{path}: empty file")
    return rows


def pairs_from_gsm8k(
    path: str | Path, delta: Fraction | int | str = 1, max_per_problem: int = 1, limit: int | None = None
) -> GsmResult:
    """Make pairs from a GSM8K jsonl file, in file order; pair ids count from 0."""
    try:
        delta = Fraction(str(delta)) if not isinstance(delta, Fraction) else delta
    except (ValueError, ZeroDivisionError):
        raise ThoughtpatchError(f"--delta: expected a number, got {delta!r}") from None
    if delta == 0:
        raise ThoughtpatchError("--delta: must not be 0")
    if max_per_problem < 1:
        raise ThoughtpatchError("--max-per-problem: must be at least 1")
    rows = read_gsm8k(path)
    if limit is not None:
        rows = rows[:limit]
    out = GsmResult([])
    for index, question, solution in rows:
        out.problems += 1
        accepted, rejected = pairs_from_problem(question, solution, delta, max_per_problem)
        for qn, r in rejected:
            (out.number_rejections if qn is not None else out.problem_rejections)[r.reason] += 1
            rec: dict[str, Any] = {"source_index": index, "reason": r.reason, "detail": r.detail}
            if qn is not None:
                rec["number"] = qn.text
                rec["start"] = qn.start
            out.rejections.append(rec)
        if accepted:
            out.problems_with_pairs += 1
        elif rejected and rejected[0][0] is not None:
            out.problem_rejections[ALL_REJECTED] += 1
        for a in accepted:
            n_steps = len(a.solution.steps)
            meta = {
                "source": "gsm8k",
                "source_index": index,
                "changed_number": {"old": a.number.text, "new": a.new_text, "start": a.number.start},
                "changed_equations": a.change.changed_steps,
            }
            out.pairs.append(
                Pair(
                    len(out.pairs),
                    Problem(question, a.solution.answer, n_steps),
                    Problem(a.question, a.change.new_answer, n_steps),
                    meta,
                )
            )
    return out


def gsm8k_to_file(
    src: str | Path,
    out: str | Path,
    delta: Fraction | int | str = 1,
    max_per_problem: int = 1,
    limit: int | None = None,
    rejections: str | Path | None = None,
) -> GsmResult:
    """`pairs from-gsm8k`: make pairs and write them (and optionally the rejection log)."""
    from thoughtpatch.data.formats import write_pairs

    result = pairs_from_gsm8k(src, delta, max_per_problem, limit)
    if not result.pairs:
        raise ThoughtpatchError(f"{src}: no pair could be made (see the rejection counts with --rejections)")
    write_pairs(result.pairs, out)
    if rejections is not None:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.rejections)
        try:
            atomic_write_text(rejections, lines)
        except OSError as e:
            raise ThoughtpatchError(f"{rejections}: cannot write ({e.strerror or e})") from None
    return result
