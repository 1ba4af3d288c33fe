"""Synthetic 1-3 step arithmetic word problems: the organism's data.

A problem is a start value and a chain of operations, e.g. start 12, [(+, 5), (-, 3)]:
"Tom has 12 apples. He buys 5 more. He gives 3 to a friend. How many apples does he have
now?" with CODI-style CoT "<<12+5=17>> <<17-3=14>>" and answer 14. Operands are small and
every intermediate result stays in 0..100 (larger ranges learn far slower). A pair changes
one number (the start value or one operand) and keeps the question length, so clean and
corrupted questions tokenise to the same length.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from thoughtpatch.data.schema import Pair, Problem

# (name, subject pronoun, object pronoun)
NAMES = [("Tom", "he", "him"), ("Anna", "she", "her"), ("Ben", "he", "him"), ("Lily", "she", "her"),
         ("Sam", "he", "him"), ("Mia", "she", "her"), ("Jack", "he", "him"), ("Emma", "she", "her")]
ITEMS = ["apples", "books", "coins", "cards", "stickers", "marbles", "pens", "shells"]

# Two or three phrasings per operation; {P} = pronoun (capitalised), {b} = operand, {x} = items.
PHRASES = {
    "+": ["{P} buys {b} more.", "{P} finds {b} more {x}.", "A friend gives {p2} {b} more."],
    "-": ["{P} gives {b} to a friend.", "{P} loses {b} {x}.", "{P} sells {b} of them."],
    "*": ["{P} gets {b} times as many.", "Now {P} has {b} times as many {x}."],
    "/": ["{P} splits them into {b} equal groups and keeps one.", "{P} keeps one of {b} equal shares."],
}
QUESTIONS = ["How many {x} does {p} have now?", "How many {x} are left?"]
OPS = ["+", "-", "*", "/"]
# Value ranges (inclusive).
START = (2, 20)
ADD_SUB = (1, 10)
MUL_DIV = (2, 5)
MAX_VALUE = 100


@dataclass(frozen=True)
class Chain:
    """start, [(op, operand), ...] and, for the text, the template choices."""

    start: int
    steps: tuple[tuple[str, int], ...]
    name: int
    item: int
    phrasing: tuple[int, ...]
    question: int

    def results(self) -> list[int] | None:
        """Intermediate results y_1..y_n, or None when a step leaves 0..MAX_VALUE or is inexact."""
        v, out = self.start, []
        for op, b in self.steps:
            if op == "+":
                v = v + b
            elif op == "-":
                v = v - b
            elif op == "*":
                v = v * b
            else:
                if v % b:
                    return None
                v = v // b
            if not 0 <= v <= MAX_VALUE:
                return None
            out.append(v)
        return out

    def text(self) -> str:
        name, p, p2 = NAMES[self.name]
        x = ITEMS[self.item]
        parts = [f"{name} has {self.start} {x}."]
        for (op, b), k in zip(self.steps, self.phrasing):
            parts.append(PHRASES[op][k].format(P=p.capitalize(), p2=p2, b=b, x=x))
        parts.append(QUESTIONS[self.question].format(x=x, p=p))
        return " ".join(parts)

    def cot(self) -> str:
        """CODI's CoT format: `<<expr=result>>` per step, space-separated."""
        res = self.results()
        assert res is not None
        prev = [self.start] + res[:-1]
        return " ".join(f"<<{a}{op}{b}={y}>>" for a, (op, b), y in zip(prev, self.steps, res))

    def answer(self) -> int:
        res = self.results()
        assert res is not None
        return res[-1]

    def program(self) -> dict[str, Any]:
        return {"start": self.start, "steps": [[op, b] for op, b in self.steps], "results": self.results()}

    def problem(self) -> Problem:
        return Problem(self.text(), self.answer(), len(self.steps))

    def numbers(self) -> list[int]:
        """The numbers of the question in order: start value, then each operand."""
        return [self.start] + [b for _, b in self.steps]

    def with_number(self, i: int, value: int) -> Chain:
        if i == 0:
            return Chain(value, self.steps, self.name, self.item, self.phrasing, self.question)
        steps = list(self.steps)
        steps[i - 1] = (steps[i - 1][0], value)
        return Chain(self.start, tuple(steps), self.name, self.item, self.phrasing, self.question)


def _operand(rng: random.Random, op: str) -> int:
    lo, hi = ADD_SUB if op in "+-" else MUL_DIV
    return rng.randint(lo, hi)


def sample_chain(rng: random.Random, n_steps: int) -> Chain:
    """A random valid chain with n_steps operations (rejection sampling: cheap, unbiased per op)."""
    while True:
        ops = [rng.choice(OPS) for _ in range(n_steps)]
        c = Chain(
            start=rng.randint(*START),
            steps=tuple((op, _operand(rng, op)) for op in ops),
            name=rng.randrange(len(NAMES)),
            item=rng.randrange(len(ITEMS)),
            phrasing=tuple(rng.randrange(len(PHRASES[op])) for op in ops),
            question=rng.randrange(len(QUESTIONS)),
        )
        if c.results() is not None:
            return c


def problem_meta(c: Chain) -> dict[str, Any]:
    return {"cot": c.cot(), "program": c.program(), "n_steps": len(c.steps)}


def corrupt(rng: random.Random, c: Chain, tries: int = 50) -> tuple[Chain, int] | None:
    """Change one number (start or an operand) within its range so the chain stays valid and
    the answer changes. Returns (corrupted chain, index of the changed number) or None."""
    for _ in range(tries):
        i = rng.randrange(len(c.steps) + 1)
        lo, hi = START if i == 0 else (ADD_SUB if c.steps[i - 1][0] in "+-" else MUL_DIV)
        v = rng.randint(lo, hi)
        if v == c.numbers()[i]:
            continue
        d = c.with_number(i, v)
        if d.results() is not None and d.answer() != c.answer():
            return d, i
    return None


def make_pair(pair_id: int, c: Chain, d: Chain, i: int, **meta: Any) -> Pair:
    return Pair(
        pair_id,
        c.problem(),
        d.problem(),
        {
            "source": "synth",
            "cot": c.cot(),
            "corrupted_cot": d.cot(),
            "program": c.program(),
            "corrupted_program": d.program(),
            "n_steps": len(c.steps),
            "changed": {"index": i, "what": "start" if i == 0 else f"operand of step {i}",
                        "clean": c.numbers()[i], "corrupted": d.numbers()[i]},
            **meta,
        },
    )


def synth_pairs(n: int, seed: int, steps: tuple[int, ...] = (1, 2, 3), exclude: set[str] | None = None) -> list[Pair]:
    """n pairs, number of steps cycling through `steps`; questions in `exclude` are skipped,
    and no question repeats."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    pairs: list[Pair] = []
    while len(pairs) < n:
        k = steps[len(pairs) % len(steps)]
        c = sample_chain(rng, k)
        cd = corrupt(rng, c)
        if cd is None:
            continue
        d, i = cd
        qc, qd = c.text(), d.text()
        if qc in seen or qd in seen:
            continue
        seen.update((qc, qd))
        pairs.append(make_pair(len(pairs), c, d, i, seed=seed))
    return pairs


def synth_problems(n_per_step: int, seed: int, steps: tuple[int, ...] = (1, 2, 3),
                   exclude: set[str] | None = None) -> list[dict[str, Any]]:
    """Distinct problems, n_per_step for each number of steps, as dicts with meta (cot, program)."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[dict[str, Any]] = []
    for k in steps:
        got = 0
        while got < n_per_step:
            c = sample_chain(rng, k)
            q = c.text()
            if q in seen:
                continue
            seen.add(q)
            out.append({**c.problem().to_dict(), "meta": problem_meta(c)})
            got += 1
    return out
