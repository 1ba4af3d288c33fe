"""Pair file formats: reading (with detection) and writing.

* ``ours``: a JSON list of ``{pair_id, clean{question, answer, ...}, corrupted{...}, meta}``.
* ``seed-prepared``: the same without ``meta`` (the seed's prepared list); other top-level
  keys are kept in ``meta`` and written back at the top level.
* ``seed-source``: the seed's flat list, two rows per pair
  ``{pair_id, variant: clean|corrupted, question, answer, reasoning_steps, baseline_correct,
  ablated_correct, needs_cot}``; per-row extras are kept on each side (``Problem.extra``).

A file is a JSON list, a JSON object ``{"pairs": [...]}``, or JSON lines (one row per line;
errors then name the 1-based line). Everything is validated before anything is returned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from thoughtpatch.data.schema import (
    Pair,
    _type_name,
    _where,
    at,
    atomic_write_text,
    check_unique_ids,
    pair_from_dict,
    pair_id_from,
    problem_from_dict,
    read_text,
    row_label,
)
from thoughtpatch.errors import ThoughtpatchError

IN_FORMATS = ("auto", "ours", "seed-prepared", "seed-source")
OUT_FORMATS = ("ours", "seed-prepared", "seed-source")
VARIANTS = ("clean", "corrupted")


def read_rows(path: str | Path) -> list[tuple[int | str, Any]]:
    """(row label, value) for each row of a JSON list / {"pairs": [...]} / JSON lines file."""
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise ThoughtpatchError(f"{path}: empty file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and "\n" in text.strip():
            return _read_jsonl(path, text)
        raise ThoughtpatchError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if isinstance(data, dict) and "pairs" in data:
        data = data["pairs"]
    elif isinstance(data, dict):
        return [("line 1", data)]  # a one-line JSON lines file
    if not isinstance(data, list):
        raise ThoughtpatchError(f"{path}: expected a list of rows, got {_type_name(data)}")
    if not data:
        raise ThoughtpatchError(f"{path}: contains no rows")
    return list(enumerate(data))


def _read_jsonl(path: Path, text: str) -> list[tuple[int | str, Any]]:
    rows: list[tuple[int | str, Any]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise ThoughtpatchError(f"{path}, line {n}: malformed JSON at column {e.colno}: {e.msg}") from None
    return rows


def detect_format(rows: list[tuple[int | str, Any]], path: str | Path) -> str:
    row, first = rows[0]
    if not isinstance(first, dict):
        raise ThoughtpatchError(f"{at(path, row)}: expected an object, got {_type_name(first)}")
    if "variant" in first:
        return "seed-source"
    if "clean" in first or "corrupted" in first:
        return "ours" if "meta" in first else "seed-prepared"
    if isinstance(first.get("answer"), str) and "####" in first["answer"]:
        raise ThoughtpatchError(
            f"{at(path, row)}: unknown format: this is raw GSM8K; make pairs with `thoughtpatch pairs from-gsm8k`"
        )
    keys = ", ".join(sorted(map(str, first))) or "none"
    raise ThoughtpatchError(
        f"{at(path, row)}: unknown format (keys: {keys}); expected 'clean'/'corrupted' (ours, seed-prepared) "
        "or 'variant' rows (seed-source)"
    )


def _seed_source(rows: list[tuple[int | str, Any]], path: str | Path) -> list[Pair]:
    sides: dict[int, dict[str, tuple[int | str, Any]]] = {}
    for row, d in rows:
        if not isinstance(d, dict):
            raise ThoughtpatchError(f"{at(path, row)}: expected an object, got {_type_name(d)}")
        pid = pair_id_from(d, path, row)
        if "variant" not in d:
            raise ThoughtpatchError(f"{_where(path, row, 'variant')}: missing")
        variant = d["variant"]
        if variant not in VARIANTS:
            raise ThoughtpatchError(
                f"{_where(path, row, 'variant')}: expected 'clean' or 'corrupted', got {variant!r}"
            )
        problem = problem_from_dict({k: v for k, v in d.items() if k not in ("pair_id", "variant")}, path, row)
        got = sides.setdefault(pid, {})
        if variant in got:
            raise ThoughtpatchError(
                f"{_where(path, row, 'pair_id')}: duplicate pair id {pid} "
                f"(a second {variant} row; first at {row_label(got[variant][0])})"
            )
        got[variant] = (row, problem)
    pairs = []
    for pid, got in sides.items():  # first-appearance order
        for need in VARIANTS:
            if need not in got:
                other = got[VARIANTS[1 - VARIANTS.index(need)]][0]
                raise ThoughtpatchError(f"{_where(path, other, 'variant')}: pair {pid} has no {need} row")
        pairs.append(Pair(pid, got["clean"][1], got["corrupted"][1], {}))
    return pairs


def read_pairs(path: str | Path, fmt: str = "auto") -> list[Pair]:
    """Read and validate a pair file; `fmt` is one of IN_FORMATS."""
    if fmt not in IN_FORMATS:
        raise ThoughtpatchError(f"{path}: unknown format {fmt!r} (choose from {', '.join(IN_FORMATS)})")
    rows = read_rows(path)
    if fmt == "auto":
        fmt = detect_format(rows, path)
    if fmt == "seed-source":
        return _seed_source(rows, path)
    pairs = [pair_from_dict(d, path, row) for row, d in rows]
    check_unique_ids(pairs, path, [row for row, _ in rows])
    return pairs


def pairs_to_rows(pairs: list[Pair], fmt: str = "ours") -> list[dict[str, Any]]:
    if fmt == "ours":
        return [p.to_dict() for p in pairs]
    if fmt == "seed-prepared":
        return [{"pair_id": p.pair_id, "clean": p.clean.to_dict(), "corrupted": p.corrupted.to_dict(), **p.meta}
                for p in pairs]
    if fmt == "seed-source":
        return [{"pair_id": p.pair_id, "variant": v, **getattr(p, v).to_dict()} for p in pairs for v in VARIANTS]
    raise ThoughtpatchError(f"unknown output format {fmt!r} (choose from {', '.join(OUT_FORMATS)})")


def write_pairs(pairs: list[Pair], path: str | Path, fmt: str = "ours") -> None:
    """Write atomically: the file appears complete or not at all. (seed-source drops `meta`.)"""
    text = json.dumps(pairs_to_rows(pairs, fmt), indent=1, ensure_ascii=False) + "\n"
    try:
        atomic_write_text(path, text)
    except OSError as e:
        raise ThoughtpatchError(f"{path}: cannot write ({e.strerror or e})") from None


def prepare(src: str | Path, out: str | Path, fmt: str = "auto", out_format: str = "ours") -> list[Pair]:
    """Read `src` in any format and write every pair to `out` (`pairs prepare`)."""
    if out_format not in OUT_FORMATS:
        raise ThoughtpatchError(f"unknown output format {out_format!r} (choose from {', '.join(OUT_FORMATS)})")
    pairs = read_pairs(src, fmt)
    write_pairs(pairs, out, out_format)
    return pairs
