"""Exact arithmetic for calculator annotations (`<<48/2=24>>`): a tokenizer, a small
recursive-descent parser and an evaluator over `Fraction`s. Text is never `eval`-ed.

Grammar (usual precedence, `^`/`**` right-associative, postfix `%` divides by 100):

    expr    := term (('+' | '-') term)*
    term    := unary (('*' | '/' | 'x') unary)*
    unary   := ('-' | '+') unary | power
    power   := postfix (('^' | '**') unary)?
    postfix := atom '%'*
    atom    := NUMBER | '(' expr ')'

Every number literal keeps its character span so a changed value can be written back
into the expression text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Union


class ArithError(ValueError):
    """An expression that cannot be parsed or evaluated exactly; `kind` names the cause."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Num:
    index: int  # position among the expression's literals
    value: Fraction
    start: int
    end: int


@dataclass(frozen=True)
class Unary:
    op: str  # '-' or '%'
    arg: Node


@dataclass(frozen=True)
class Binary:
    op: str  # '+', '-', '*', '/', '^'
    left: Node
    right: Node


Node = Union[Num, Unary, Binary]

_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.?\d*|\.\d+)|(?P<op>\*\*|[-+*/^%()x×÷]))"
)
_OP_ALIASES = {"x": "*", "×": "*", "÷": "/", "**": "^"}
_MAX_EXPONENT = 64  # keeps exact powers small; larger ones are not GSM8K arithmetic


def parse_number(text: str) -> Fraction:
    """'1,200' / '3.50' / '.5' → exact Fraction (no float rounding)."""
    return Fraction(text.replace(",", ""))


def _tokenize(src: str) -> list[tuple[str, str, int, int]]:
    tokens: list[tuple[str, str, int, int]] = []
    pos = 0
    while pos < len(src):
        if src[pos:].strip() == "":
            break
        m = _TOKEN.match(src, pos)
        if m is None:
            raise ArithError("unparseable", f"unexpected character {src[pos:].strip()[0]!r} in {src!r}")
        if m.group("num") is not None:
            tokens.append(("num", m.group("num"), m.start("num"), m.end("num")))
        else:
            op = m.group("op")
            tokens.append(("op", _OP_ALIASES.get(op, op), m.start("op"), m.end("op")))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, src: str) -> None:
        self.src = src
        self.tokens = _tokenize(src)
        self.i = 0
        self.n_literals = 0

    def _peek(self) -> str | None:
        if self.i < len(self.tokens) and self.tokens[self.i][0] == "op":
            return self.tokens[self.i][1]
        return None

    def _fail(self, what: str) -> ArithError:
        return ArithError("unparseable", f"{what} in {self.src!r}")

    def parse(self) -> Node:
        if not self.tokens:
            raise self._fail("empty expression")
        node = self._expr()
        if self.i != len(self.tokens):
            raise self._fail(f"unexpected {self.tokens[self.i][1]!r}")
        return node

    def _expr(self) -> Node:
        node = self._term()
        while self._peek() in ("+", "-"):
            op = self.tokens[self.i][1]
            self.i += 1
            node = Binary(op, node, self._term())
        return node

    def _term(self) -> Node:
        node = self._unary()
        while self._peek() in ("*", "/"):
            op = self.tokens[self.i][1]
            self.i += 1
            node = Binary(op, node, self._unary())
        return node

    def _unary(self) -> Node:
        op = self._peek()
        if op in ("-", "+"):
            self.i += 1
            arg = self._unary()
            return Unary("-", arg) if op == "-" else arg
        return self._power()

    def _power(self) -> Node:
        base = self._postfix()
        if self._peek() == "^":
            self.i += 1
            return Binary("^", base, self._unary())
        return base

    def _postfix(self) -> Node:
        node = self._atom()
        while self._peek() == "%":
            self.i += 1
            node = Unary("%", node)
        return node

    def _atom(self) -> Node:
        if self.i >= len(self.tokens):
            raise self._fail("unexpected end")
        kind, text, start, end = self.tokens[self.i]
        if kind == "num":
            self.i += 1
            node = Num(self.n_literals, parse_number(text), start, end)
            self.n_literals += 1
            return node
        if text == "(":
            self.i += 1
            node = self._expr()
            if self._peek() != ")":
                raise self._fail("missing ')'")
            self.i += 1
            return node
        raise self._fail(f"unexpected {text!r}")


def parse_expr(src: str) -> Node:
    return _Parser(src).parse()


def literals(node: Node) -> list[Num]:
    """Number literals in source order."""
    if isinstance(node, Num):
        return [node]
    if isinstance(node, Unary):
        return literals(node.arg)
    return literals(node.left) + literals(node.right)


def evaluate(node: Node, values: dict[int, Fraction] | None = None) -> Fraction:
    """Exact value; `values` overrides literals by index (the propagated change)."""
    if isinstance(node, Num):
        return values.get(node.index, node.value) if values else node.value
    if isinstance(node, Unary):
        v = evaluate(node.arg, values)
        return -v if node.op == "-" else v / 100
    a, b = evaluate(node.left, values), evaluate(node.right, values)
    if node.op == "+":
        return a + b
    if node.op == "-":
        return a - b
    if node.op == "*":
        return a * b
    if node.op == "/":
        if b == 0:
            raise ArithError("division by zero", "division by zero")
        return a / b
    if b.denominator != 1 or abs(b) > _MAX_EXPONENT:
        raise ArithError("inexact power", f"power with exponent {b} is not exact")
    if a == 0 and b < 0:
        raise ArithError("division by zero", "zero to a negative power")
    return a ** int(b)


def is_terminating(x: Fraction) -> bool:
    """True when x has a finite decimal expansion (denominator of the form 2^a 5^b)."""
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def format_decimal(x: Fraction, min_decimals: int = 0, commas: bool = False) -> str | None:
    """Exact decimal text of x (None if it does not terminate)."""
    if not is_terminating(x):
        return None
    sign = "-" if x < 0 else ""
    x = abs(x)
    decimals = 0
    while (x * 10**decimals).denominator != 1:
        decimals += 1
    decimals = max(decimals, min_decimals)
    scaled = int(x * 10**decimals)
    whole, frac = divmod(scaled, 10**decimals)
    head = f"{whole:,}" if commas else str(whole)
    return sign + head + (f".{frac:0{decimals}d}" if decimals else "")
