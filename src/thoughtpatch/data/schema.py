"""The pair schema every experiment reads.

A pair is a clean and a corrupted question (one number changed) with integer answers that
differ. `meta` holds provenance (source index, changed number, CoT, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from thoughtpatch.errors import ThoughtpatchError


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int | float
    reasoning_steps: int | None = None
    # Other per-question fields a source carried (the seed's baseline_correct, ...), kept
    # so that converting back loses nothing.
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"question": self.question, "answer": self.answer}
        if self.reasoning_steps is not None:
            d["reasoning_steps"] = self.reasoning_steps
        d.update(self.extra)
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


def row_label(row: int | str) -> str:
    """A JSON list index reads 'row 3' (0-based); JSONL passes its own 'line 7' (1-based)."""
    return row if isinstance(row, str) else f"row {row}"


def at(path: str | Path, row: int | str | None) -> str:
    return f"{path}" if row is None else f"{path}, {row_label(row)}"


def _where(path: str | Path, row: int | str | None, fld: str) -> str:
    return f"{at(path, row)}, field '{fld}'"


def _type_name(x: Any) -> str:
    return "null" if x is None else {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
                                     "list": "list", "dict": "object"}.get(type(x).__name__, type(x).__name__)


_PROBLEM_KEYS = ("question", "answer", "reasoning_steps")


def problem_from_dict(d: Any, path: str | Path, row: int | str | None, prefix: str = "") -> Problem:
    """One question; `prefix` ('clean.' / 'corrupted.' / '') names the fields in errors."""
    if not isinstance(d, dict):
        raise ThoughtpatchError(f"{_where(path, row, prefix.rstrip('.'))}: expected an object, got {_type_name(d)}")
    q = d.get("question")
    if "question" not in d:
        raise ThoughtpatchError(f"{_where(path, row, prefix + 'question')}: missing")
    if not isinstance(q, str):
        raise ThoughtpatchError(f"{_where(path, row, prefix + 'question')}: expected a string, got {_type_name(q)}")
    if not q.strip():
        raise ThoughtpatchError(f"{_where(path, row, prefix + 'question')}: empty")
    if "answer" not in d:
        raise ThoughtpatchError(f"{_where(path, row, prefix + 'answer')}: missing")
    a = parse_answer(d["answer"], _where(path, row, prefix + "answer"))
    rs = d.get("reasoning_steps")
    if rs is not None and (isinstance(rs, bool) or not isinstance(rs, int) or rs < 0):
        raise ThoughtpatchError(
            f"{_where(path, row, prefix + 'reasoning_steps')}: expected a non-negative integer, got {rs!r}"
        )
    extra = {k: v for k, v in d.items() if k not in _PROBLEM_KEYS}
    return Problem(q, a, rs, extra)


def parse_answer(a: Any, where: str) -> int | float:
    """Answers are numbers; numeric strings ("1,200") are accepted; integral floats become ints."""
    if isinstance(a, bool) or a is None:
        raise ThoughtpatchError(f"{where}: expected a number, got {_type_name(a)}")
    if isinstance(a, str):
        s = a.replace(",", "").strip()
        try:
            a = float(s) if s.lower() not in ("nan", "inf", "-inf", "infinity", "-infinity") else None
        except ValueError:
            a = None
        if a is None:
            raise ThoughtpatchError(f"{where}: expected a number, got {s!r}") from None
    if not isinstance(a, (int, float)):
        raise ThoughtpatchError(f"{where}: expected a number, got {_type_name(a)}")
    if isinstance(a, float):
        if a != a or a in (float("inf"), float("-inf")):
            raise ThoughtpatchError(f"{where}: expected a finite number")
        if a.is_integer():
            return int(a)
    return a


def pair_id_from(d: dict[str, Any], path: str | Path, row: int | str | None) -> int:
    if "pair_id" not in d:
        raise ThoughtpatchError(f"{_where(path, row, 'pair_id')}: missing")
    pid = d["pair_id"]
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise ThoughtpatchError(f"{_where(path, row, 'pair_id')}: expected an integer, got {_type_name(pid)}")
    return pid


def pair_from_dict(d: Any, path: str | Path = "<pairs>", row: int | str | None = None) -> Pair:
    """Our format (and the seed's prepared format): other top-level keys go to `meta`."""
    if not isinstance(d, dict):
        raise ThoughtpatchError(f"{at(path, row)}: expected an object, got {_type_name(d)}")
    pid = pair_id_from(d, path, row)
    for side in ("clean", "corrupted"):
        if side not in d:
            raise ThoughtpatchError(f"{_where(path, row, side)}: missing")
    meta = d.get("meta", {})
    if not isinstance(meta, dict):
        raise ThoughtpatchError(f"{_where(path, row, 'meta')}: expected an object, got {_type_name(meta)}")
    rest = {k: v for k, v in d.items() if k not in ("pair_id", "clean", "corrupted", "meta")}
    clean = problem_from_dict(d["clean"], path, row, "clean.")
    corrupted = problem_from_dict(d["corrupted"], path, row, "corrupted.")
    return Pair(pid, clean, corrupted, {**meta, **rest})


def check_unique_ids(pairs: list[Pair], path: str | Path, rows: list[int | str] | None = None) -> None:
    seen: dict[int, int | str] = {}
    for i, p in enumerate(pairs):
        row = rows[i] if rows else i
        if p.pair_id in seen:
            raise ThoughtpatchError(
                f"{_where(path, row, 'pair_id')}: duplicate pair id {p.pair_id} "
                f"(first at {row_label(seen[p.pair_id])})"
            )
        seen[p.pair_id] = row


def load_pairs(path: str | Path, fmt: str = "auto") -> list[Pair]:
    """Read pairs in any supported format (see `formats.FORMATS`); errors name file, row, field."""
    from thoughtpatch.data.formats import read_pairs  # formats builds on this module

    return read_pairs(path, fmt)


def read_text(path: str | Path) -> str:
    """A UTF-8 text file, or a one-line error naming it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ThoughtpatchError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ThoughtpatchError(f"{path}: not UTF-8 text") from None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to; renamed onto `path` when the block ends
    without an error, removed when it fails: never a half-written output under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        try:
            os.replace(tmp, path)
        except OSError as e:  # name the output, not the temporary file
            raise OSError(e.errno, e.strerror, str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file and rename it into place: never a half-written output."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def save_pairs(pairs: list[Pair], path: str | Path) -> None:
    """Our format: a JSON list of pairs, written atomically."""
    atomic_write_text(path, json.dumps([p.to_dict() for p in pairs], indent=1, ensure_ascii=False) + "\n")
