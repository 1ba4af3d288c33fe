"""The pair schema every experiment reads.

A pair is a clean and a corrupted question (one number changed) with integer answers that
differ. `meta` holds provenance (source index, changed number, CoT, ...).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thoughtpatch.errors import ThoughtpatchError


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int | float
    reasoning_steps: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"question": self.question, "answer": self.answer}
        if self.reasoning_steps is not None:
            d["reasoning_steps"] = self.reasoning_steps
        return d


@dataclass(frozen=True)
class Pair:
    pair_id: int
    clean: Problem
    corrupted: Problem
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pair_id": self.pair_id,
            "clean": self.clean.to_dict(),
            "corrupted": self.corrupted.to_dict(),
            "meta": self.meta,
        }


def _where(path: str | Path, row: int | None, fld: str) -> str:
    at = f"{path}"
    if row is not None:
        at += f", row {row}"
    return f"{at}, field '{fld}'"


def _problem(d: Any, path: str | Path, row: int | None, prefix: str) -> Problem:
    if not isinstance(d, dict):
        raise ThoughtpatchError(f"{_where(path, row, prefix)}: expected an object")
    q = d.get("question")
    if q is None:
        raise ThoughtpatchError(f"{_where(path, row, prefix + '.question')}: missing")
    if not isinstance(q, str) or not q.strip():
        raise ThoughtpatchError(f"{_where(path, row, prefix + '.question')}: expected a non-empty string")
    a = d.get("answer")
    if a is None:
        raise ThoughtpatchError(f"{_where(path, row, prefix + '.answer')}: missing")
    a = parse_answer(a, f"{_where(path, row, prefix + '.answer')}")
    rs = d.get("reasoning_steps")
    if rs is not None and (isinstance(rs, bool) or not isinstance(rs, int)):
        raise ThoughtpatchError(f"{_where(path, row, prefix + '.reasoning_steps')}: expected an integer")
    return Problem(q, a, rs)


def parse_answer(a: Any, where: str) -> int | float:
    """Answers are numbers; numeric strings ("1,200") are accepted; integral floats become ints."""
    if isinstance(a, bool):
        raise ThoughtpatchError(f"{where}: expected a number, got a boolean")
    if isinstance(a, str):
        s = a.replace(",", "").strip()
        try:
            a = float(s)
        except ValueError:
            raise ThoughtpatchError(f"{where}: expected a number, got {a!r}") from None
    if not isinstance(a, (int, float)):
        raise ThoughtpatchError(f"{where}: expected a number, got {type(a).__name__}")
    if isinstance(a, float):
        if a != a or a in (float("inf"), float("-inf")):
            raise ThoughtpatchError(f"{where}: expected a finite number")
        if a.is_integer():
            return int(a)
    return a


def pair_from_dict(d: Any, path: str | Path = "<pairs>", row: int | None = None) -> Pair:
    if not isinstance(d, dict):
        raise ThoughtpatchError(f"{path}, row {row}: expected an object")
    pid = d.get("pair_id")
    if pid is None:
        raise ThoughtpatchError(f"{_where(path, row, 'pair_id')}: missing")
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise ThoughtpatchError(f"{_where(path, row, 'pair_id')}: expected an integer")
    for side in ("clean", "corrupted"):
        if side not in d:
            raise ThoughtpatchError(f"{_where(path, row, side)}: missing")
    meta = d.get("meta", {})
    if not isinstance(meta, dict):
        raise ThoughtpatchError(f"{_where(path, row, 'meta')}: expected an object")
    return Pair(pid, _problem(d["clean"], path, row, "clean"), _problem(d["corrupted"], path, row, "corrupted"), meta)


def load_pairs(path: str | Path) -> list[Pair]:
    """Read our own format (a JSON list of pairs); errors name the file, row and field."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ThoughtpatchError(f"{path}: cannot read ({e.strerror})") from None
    if not text.strip():
        raise ThoughtpatchError(f"{path}: empty file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ThoughtpatchError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if isinstance(data, dict) and "pairs" in data:
        data = data["pairs"]
    if not isinstance(data, list):
        raise ThoughtpatchError(f"{path}: expected a list of pairs")
    pairs = [pair_from_dict(d, path, i) for i, d in enumerate(data)]
    seen: set[int] = set()
    for i, p in enumerate(pairs):
        if p.pair_id in seen:
            raise ThoughtpatchError(f"{_where(path, i, 'pair_id')}: duplicate pair id {p.pair_id}")
        seen.add(p.pair_id)
    return pairs


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file and rename it into place: never a half-written output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pairs(pairs: list[Pair], path: str | Path) -> None:
    atomic_write_text(path, json.dumps([p.to_dict() for p in pairs], indent=1) + "\n")
