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
from thoughtpatch.report.intervals import LEVEL, METHODS, RESAMPLES, SEED, ratio_of_means, stats

# Which columns name the cell of each experiment.
CELL_KEYS = {"layer": ("layer",), "position": ("layer", "thought"), "iterative": ("layer", "iteration")}
NOT_METRICS = {"pair_id", "direction", "experiment", "layer", "thought", "iteration", "site", "mode", "head"}
# Numeric columns that are not effects: the greedy answer's mean over pairs means nothing.
NOT_AGGREGATED = {"answer"}


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


def summarize(rows: Iterable[dict], experiment: str) -> list[dict]:
    """Per cell: mean, std, n and a 95 % interval (`ci_low`, `ci_high`, `ci_method`; see
    intervals.py) of every metric over pairs. `recovered` is the ratio of means,
    (mean patched − mean receiving) / (mean source − mean receiving), never the mean of
    per-pair ratios (which explodes on pairs whose runs barely differ); those are kept
    under `per_pair`. A cell's rows are taken in pair order, so the bootstrap does not
    depend on the order of results.jsonl."""
    keys = CELL_KEYS[experiment]
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        cells[cell_of(r, experiment)].append(r)
    out = []
    for cell, rs in cells.items():
        rs = sorted(rs, key=lambda r: r["pair_id"])
        entry = dict(zip(keys, cell)) | {"n": len(rs), "metrics": {}}
        for key in rs[0]:
            v = rs[0][key]
            if key in NOT_METRICS or key in keys or key in NOT_AGGREGATED or key == "recovered" or not isinstance(v, (int, float, bool)):
                continue
            entry["metrics"][key] = stats([r[key] for r in rs], key, boolean=any(isinstance(r[key], bool) for r in rs))
        rec = ratio_of_means(*([r[k] for r in rs] for k in ("logprob_diff", "logprob_diff_receiving", "logprob_diff_source")))
        entry["metrics"]["recovered"] = rec | {"per_pair": stats([r["recovered"] for r in rs], "recovered_per_pair")}
        out.append(entry)
    order = lambda e: tuple((-1, "") if v == "input" else (v, "") if isinstance(v, (int, float)) else (math.inf, str(v)) for v in (e[k] for k in keys))  # noqa: E731
    return sorted(out, key=order)


def write_summary(path: Path, rows: list[dict], experiment: str, extra: dict | None = None) -> dict:
    intervals = {"level": LEVEL, "methods": METHODS, "bootstrap": {"resamples": RESAMPLES, "seed": SEED}}
    doc = {"experiment": experiment, "n_pairs": len({r["pair_id"] for r in rows}), **(extra or {}), "intervals": intervals, "cells": summarize(rows, experiment)}
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    return doc
