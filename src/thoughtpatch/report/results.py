"""Tidy results: `results.jsonl` (one row per pair × cell, written pair by pair with
flush + fsync so a killed run loses at most the pair in flight) and `summary.json`."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from thoughtpatch.data.schema import atomic_write_text

# Which columns name the cell of each experiment.
CELL_KEYS = {"layer": ("layer",), "position": ("layer", "thought"), "iterative": ("layer", "iteration")}
NOT_METRICS = {"pair_id", "direction", "experiment", "layer", "thought", "iteration"}


def _clean(v):
    """JSON has no NaN: write null."""
    return None if isinstance(v, float) and math.isnan(v) else v


class ResultsWriter:
    """Append-only results.jsonl. On open, a torn last line or an incomplete pair (the run was
    killed mid-write) is dropped, and the pairs already complete are reported."""

    def __init__(self, path: Path, rows_per_pair: int):
        self.path = Path(path)
        self.rows_per_pair = rows_per_pair
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[int] = set()
        if self.path.exists():
            rows = read_rows(self.path, strict=False)
            counts: dict[int, int] = defaultdict(int)
            for r in rows:
                counts[r["pair_id"]] += 1
            self.done = {p for p, c in counts.items() if c == rows_per_pair}
            keep = [r for r in rows if r["pair_id"] in self.done]
            atomic_write_text(self.path, "".join(json.dumps({k: _clean(v) for k, v in r.items()}) + "\n" for r in keep))

    def write_pair(self, rows: list[dict]) -> None:
        text = "".join(json.dumps({k: _clean(v) for k, v in r.items()}) + "\n" for r in rows)
        with open(self.path, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        self.done.update(r["pair_id"] for r in rows)


def read_rows(path: Path, strict: bool = True) -> list[dict]:
    rows = []
    lines = Path(path).read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if strict or i != len(lines) - 1:
                raise ValueError(f"{path}, line {i + 1}: malformed JSON") from None
    return [{k: (math.nan if v is None and k not in NOT_METRICS else v) for k, v in r.items()} for r in rows]


def cell_of(row: dict, experiment: str) -> tuple:
    return tuple(row[k] for k in CELL_KEYS[experiment])


def _stats(values: list[float]) -> dict:
    vals = [float(v) for v in values if not (isinstance(v, float) and math.isnan(v))]
    n = len(vals)
    if n == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    mean = sum(vals) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": sd, "ci95": 1.96 * sd / math.sqrt(n), "n": n}


def summarize(rows: Iterable[dict], experiment: str) -> list[dict]:
    """Per cell: mean, std, 95 % CI and n of every metric over pairs. `recovered` is the ratio
    of means, (mean patched − mean receiving) / (mean source − mean receiving), never the mean
    of per-pair ratios (which explodes on pairs whose runs barely differ)."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        cells[cell_of(r, experiment)].append(r)
    out = []
    for cell, rs in cells.items():
        entry = dict(zip(CELL_KEYS[experiment], cell)) | {"n": len(rs), "metrics": {}}
        for key in rs[0]:
            if key in NOT_METRICS or not isinstance(rs[0][key], (int, float, bool)) or key == "recovered":
                continue
            entry["metrics"][key] = _stats([float(r[key]) for r in rs])
        mp = _stats([r["logprob_diff"] for r in rs])["mean"]
        mr = _stats([r["logprob_diff_receiving"] for r in rs])["mean"]
        ms = _stats([r["logprob_diff_source"] for r in rs])["mean"]
        rec = None if None in (mp, mr, ms) or ms == mr else (mp - mr) / (ms - mr)
        entry["metrics"]["recovered"] = {"mean": rec, "per_pair": _stats([r["recovered"] for r in rs]), "n": len(rs)}
        out.append(entry)
    order = lambda e: tuple((-1 if v == "input" else v) for v in (e[k] for k in CELL_KEYS[experiment]))  # noqa: E731
    return sorted(out, key=order)


def write_summary(path: Path, rows: list[dict], experiment: str, extra: dict | None = None) -> dict:
    doc = {"experiment": experiment, "n_pairs": len({r["pair_id"] for r in rows}), **(extra or {}), "cells": summarize(rows, experiment)}
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    return doc
