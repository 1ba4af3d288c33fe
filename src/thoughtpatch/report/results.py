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
from thoughtpatch.errors import ThoughtpatchError

# Which columns name the cell of each experiment. `site` is the site kind of the grid (a run
# may hold several); `head` is set for the head site only (absent = None).
CELL_KEYS = {
    "layer": ("site", "layer", "head"),
    "position": ("site", "layer", "head", "thought"),
    "iterative": ("site", "layer", "head", "iteration"),
    "knockout": ("run", "layer", "thought"),
    "trace": ("site", "layer", "head", "thought"),
}
CELL_DEFAULTS = {"site": "resid", "head": None}  # rows written before sites existed
# (a mode's parameters — alpha, noise_scale, seed — are settings, not effects)
NOT_METRICS = {
    "pair_id", "direction", "experiment", "layer", "thought", "iteration", "site", "mode", "head", "run", "readers", "vector", "resample_pair",
    "alpha", "noise_scale", "seed",
}
# Ratios of means (never means of per-pair ratios): metric → (patched, receiving, source) columns.
RATIOS = {
    "recovered": ("logprob_diff", "logprob_diff_receiving", "logprob_diff_source"),
    "restored": ("logprob_clean", "logprob_clean_receiving", "logprob_clean_source"),
}
# Numeric columns that are not effects: the greedy answer's mean over pairs means nothing.
NOT_AGGREGATED = {"answer"}


def _clean(v):
    """JSON has no NaN: write null."""
    return None if isinstance(v, float) and math.isnan(v) else v


class ResultsWriter:
    """Append-only results.jsonl: one pair's rows at a time, flushed and fsynced."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write_pair(self, rows: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps({k: _clean(v) for k, v in r.items()}) + "\n" for r in rows)
        with open(self.path, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def open_results(paths: dict[str, Path], cells: dict[str, list[tuple]], pair_ids: list[int], direction: str) -> tuple[dict[str, ResultsWriter], set[int]]:
    """Writers for a run's experiments, and the pairs already done.

    A pair is the unit of completion: it is done only when every experiment holds all of its
    cells. What a killed run left behind — a torn last line, a pair written for some
    experiments or cells but not all — is dropped, so that pair reruns whole, in the same
    batch as an uninterrupted run. Any other line that is not this run's (malformed JSON in
    the middle, another pair set, cell, experiment or direction, a duplicate) is an error."""
    known = set(pair_ids)
    kept: dict[str, list[tuple[int, dict]]] = {}
    complete: set[int] = set(known)
    for exp, path in paths.items():
        want = set(cells[exp])
        seen: dict[tuple, int] = {}
        by_pair: dict[int, set] = defaultdict(set)
        lines = read_lines(path, tolerate_torn_tail=True) if path.exists() else []
        for n, row in lines:
            check_row(row, path, n, exp)
            where = f"{path}, line {n}"
            pid, cell = row["pair_id"], cell_of(row, exp)
            if pid not in known:
                raise ThoughtpatchError(f"{where}: pair {pid} is not in this run's pairs; not this run's results")
            if row.get("direction") != direction:
                raise ThoughtpatchError(f"{where}: direction {row.get('direction')!r}, this run is {direction}")
            if cell not in want:
                raise ThoughtpatchError(f"{where}: cell {cell} is not among this run's layers/thoughts")
            if (pid, cell) in seen:
                raise ThoughtpatchError(f"{where}: pair {pid}, cell {cell} written twice (first at line {seen[(pid, cell)]})")
            seen[(pid, cell)] = n
            by_pair[pid].add(cell)
        complete &= {pid for pid, got in by_pair.items() if got == want}
        kept[exp] = lines
    writers = {}
    for exp, path in paths.items():
        rows = [r for _, r in kept[exp] if r["pair_id"] in complete]
        if path.exists():  # rewritten without what is dropped (a torn tail included)
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        writers[exp] = ResultsWriter(path)
    return writers, complete


def read_lines(path: Path, tolerate_torn_tail: bool = False) -> list[tuple[int, dict]]:
    """(1-based line number, object) of each non-empty line; a torn last line is dropped when
    tolerated (a killed run's), every other unreadable line is an error naming it."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ThoughtpatchError(f"{path}: not UTF-8 text") from None
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if tolerate_torn_tail and i == len(lines) - 1:
                continue
            raise ThoughtpatchError(f"{path}, line {i + 1}: malformed JSON") from None
        if not isinstance(row, dict):
            raise ThoughtpatchError(f"{path}, line {i + 1}: expected an object, got {type(row).__name__}")
        out.append((i + 1, row))
    return out


def check_row(row: dict, path: Path, n: int, experiment: str) -> None:
    """The keys every row of `experiment` has (foreign lines are named, not crashed on)."""
    pid = row.get("pair_id")
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise ThoughtpatchError(f"{path}, line {n}: field 'pair_id': expected an integer, got {pid!r}")
    if row.get("experiment", experiment) != experiment:
        raise ThoughtpatchError(f"{path}, line {n}: a row of experiment {row.get('experiment')!r} in {experiment} results")
    for key in CELL_KEYS[experiment]:
        if key not in row and key not in CELL_DEFAULTS:
            raise ThoughtpatchError(f"{path}, line {n}: field '{key}' missing")


def read_rows(path: Path, experiment: str | None = None) -> list[dict]:
    """Every row of a results.jsonl (null metrics as NaN); with `experiment`, each row is
    checked to be one of its rows. Unreadable lines are errors naming file and line."""
    rows = []
    for n, r in read_lines(Path(path)):
        if experiment is not None:
            check_row(r, path, n, experiment)
        rows.append(r)
    return [{k: (math.nan if v is None and k not in NOT_METRICS else v) for k, v in r.items()} for r in rows]


def cell_of(row: dict, experiment: str) -> tuple:
    return tuple(row.get(k, CELL_DEFAULTS.get(k)) for k in CELL_KEYS[experiment])


def summarize(rows: Iterable[dict], experiment: str) -> list[dict]:
    """Per cell: mean, std, n and a 95 % interval (`ci_low`, `ci_high`, `ci_method`; see
    intervals.py) of every metric over pairs. `recovered` (and causal tracing's `restored`) is
    the ratio of means, (mean patched − mean receiving) / (mean source − mean receiving), never
    the mean of per-pair ratios (which explodes on pairs whose runs barely differ); those are
    kept under `per_pair`. A cell's rows are taken in pair order, so the bootstrap does not
    depend on the order of results.jsonl."""
    keys = CELL_KEYS[experiment]
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        cells[cell_of(r, experiment)].append(r)
    out = []
    for cell, rs in cells.items():
        rs = sorted(rs, key=lambda r: r["pair_id"])
        entry = {k: v for k, v in zip(keys, cell) if v is not None} | {"n": len(rs), "metrics": {}}
        for key in rs[0]:
            v = rs[0][key]
            if key in NOT_METRICS or key in keys or key in NOT_AGGREGATED or key in RATIOS or not isinstance(v, (int, float, bool)):
                continue
            entry["metrics"][key] = stats([r[key] for r in rs], key, boolean=any(isinstance(r[key], bool) for r in rs))
        for name, cols in RATIOS.items():
            if name in rs[0] and all(c in rs[0] for c in cols):
                ratio = ratio_of_means(*([r[c] for r in rs] for c in cols))
                entry["metrics"][name] = ratio | {"per_pair": stats([r[name] for r in rs], f"{name}_per_pair")}
        out.append(entry)
    order = lambda e: tuple((-1, "") if v == "input" else (v, "") if isinstance(v, (int, float)) else (math.inf, str(v)) for v in (e.get(k, -2) for k in keys))  # noqa: E731
    return sorted(out, key=order)


def summary_doc(rows: list[dict], experiment: str, extra: dict | None = None) -> dict:
    """What summary.json holds: the experiment, n, `extra`, the interval methods, the cells."""
    intervals = {"level": LEVEL, "methods": METHODS, "bootstrap": {"resamples": RESAMPLES, "seed": SEED}}
    return {"experiment": experiment, "n_pairs": len({r["pair_id"] for r in rows}), **(extra or {}), "intervals": intervals, "cells": summarize(rows, experiment)}


def write_summary(path: Path, rows: list[dict], experiment: str, extra: dict | None = None) -> dict:
    doc = summary_doc(rows, experiment, extra)
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    return doc
