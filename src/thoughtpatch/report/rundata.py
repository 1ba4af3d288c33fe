"""A finished run directory, read back for figures and reports (JSON only, no torch).

Reads manifest.json, pairs.json, checks.json and, for each experiment present,
<exp>/results.jsonl and <exp>/summary.json. Nothing else: a report can be rebuilt from a
copied run directory without the model or the activation cache.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from thoughtpatch.errors import ThoughtpatchError
from thoughtpatch.report.results import CELL_DEFAULTS, CELL_KEYS, read_rows, summarize

EXPERIMENTS = ("layer", "position", "iterative", "knockout", "trace")
# The metrics every report and figure covers, in this order.
MAIN_METRICS = ("kl", "answer_logit_diff", "logprob_diff", "recovered", "flip")
# Experiments with other metrics: knockout has no source run, causal tracing no second answer.
METRICS_OF = {"knockout": ("kl", "delta_logprob_diff", "away"), "trace": ("kl", "logprob_clean", "restored", "flip")}


def metrics_of(exp: str) -> tuple[str, ...]:
    return METRICS_OF.get(exp, MAIN_METRICS)


SIGNED = {"answer_logit_diff", "logprob_diff", "recovered", "restored", "delta_logprob_diff"}
ACTIVATION_METRICS = ("cos_clean", "cos_corrupted", "norm")

LABELS = {
    "kl": "KL(patched ‖ receiving)",
    "kl_to_clean": "KL(source ‖ patched)",
    "answer_logit_diff": "answer logit diff (clean − corrupted)",
    "logprob_diff": "log P(clean) − log P(corrupted)",
    "recovered": "recovered (ratio of means)",
    "restored": "restored share of log P(clean answer) (ratio of means)",
    "logprob_clean": "log P(clean answer)",
    "delta_logprob_diff": "Δ (log P(clean) − log P(corrupted)) vs the unpatched run",
    "flip": "flip rate (answer = source run's)",
    "away": "away rate (answer ≠ receiving run's)",
    "cos_clean": "cos(activation, clean)",
    "cos_corrupted": "cos(activation, corrupted)",
    "norm": "‖activation‖",
}
SHORT = {
    "kl": "KL",
    "kl_to_clean": "KL to source",
    "answer_logit_diff": "logit diff",
    "logprob_diff": "log-prob diff",
    "recovered": "recovered",
    "restored": "restored",
    "logprob_clean": "log P(clean)",
    "delta_logprob_diff": "Δ log-prob diff",
    "flip": "flip rate",
    "away": "away rate",
    "cos_clean": "cos to clean",
    "cos_corrupted": "cos to corrupted",
    "norm": "norm",
}


VERDICTS = ("pass", "warn", "fail", "info")


def verdict_counts(checks: list[dict]) -> str:
    """"7 pass, 1 warn, 0 fail (name), 5 info": the one-line tally the CLI and reports print."""
    n = {v: sum(c["verdict"] == v for c in checks) for v in VERDICTS}
    failed = [c["name"] for c in checks if c["verdict"] == "fail"]
    return f"{n['pass']} pass, {n['warn']} warn, {n['fail']} fail{' (' + ', '.join(failed) + ')' if failed else ''}, {n['info']} info"


def warnings_of(checks: list[dict]) -> list[str]:
    """One line per `warn` check (e.g. the baseline gate): what the CLI prints before patching
    and every report opens with."""
    out = []
    for c in checks:
        if c["verdict"] == "warn":
            v = c["value"]
            out.append(f"{c['name']} = {f'{100 * v:.1f} %' if isinstance(v, float) else v}: {c.get('detail', '')}")
    return out


def layer_key(layer) -> int:
    """Sort key: the input row (fed thought vector) first, then blocks 0…L−1."""
    return -1 if layer == "input" else int(layer)


def layer_name(layer) -> str:
    return "input" if layer == "input" else f"L{layer}"


def _as_layer(v):
    return "input" if str(v) == "input" else int(v)


def nan_if_none(v) -> float:
    return math.nan if v is None else float(v)


@dataclass
class RunData:
    run_dir: Path
    manifest: dict
    pairs: list[dict]
    checks: list[dict]
    rows: dict[str, list[dict]] = field(default_factory=dict)
    summaries: dict[str, dict] = field(default_factory=dict)
    dropped: list[dict] = field(default_factory=list)  # dropped_pairs.json: pairs not patched or answered wrong
    _cells: dict[str, dict] = field(default_factory=dict, repr=False)

    # ---- what the run covered -------------------------------------------------------
    @property
    def experiments(self) -> list[str]:
        return [e for e in EXPERIMENTS if e in self.rows]

    @property
    def direction(self) -> str:
        return self.manifest.get("config", {}).get("direction", "denoising")

    @property
    def sign(self) -> int:
        """+1 when moving towards the clean answer is the effect (denoising), −1 when noising."""
        return 1 if self.direction == "denoising" else -1

    @property
    def source_role(self) -> str:
        return "clean" if self.direction == "denoising" else "corrupted"

    @property
    def receiving_role(self) -> str:
        return "corrupted" if self.direction == "denoising" else "clean"

    @property
    def layers(self) -> list:
        if self.manifest.get("layers"):
            return sorted((_as_layer(v) for v in self.manifest["layers"]), key=layer_key)
        seen = {r["layer"] for rows in self.rows.values() for r in rows}
        return sorted(seen, key=layer_key)

    @property
    def thoughts(self) -> list[int]:
        if self.manifest.get("thoughts") is not None:
            return [int(k) for k in self.manifest["thoughts"]]
        return sorted({r["thought"] for r in self.rows.get("position", [])})

    @property
    def num_thoughts(self) -> int:
        return int(self.manifest.get("model", {}).get("num_thoughts") or len(self.thoughts))

    @property
    def iterations(self) -> list[int]:
        return sorted({r["iteration"] for r in self.rows.get("iterative", [])})

    @property
    def selection(self) -> dict:
        """keep (all | correct) and the counts of the pair selection (manifest.json)."""
        return self.manifest.get("selection") or {"keep": "all"}

    def pair_set(self, exp: str) -> str:
        """Which pairs the numbers of `exp` cover, in words."""
        sel, n = self.selection, self.n_pairs(exp)
        same = len(sel.get("same_answer", []))
        dropped_same = f"; {same} dropped for equal answers" if same else ""
        if sel.get("keep") == "correct":
            return (f"the {n} pairs the model answers right on both sides ({sel.get('wrong', '?')} answered wrong were dropped{dropped_same}; "
                    f"listed with the model's answers in dropped_pairs.json)")
        if "correct" not in sel:
            return f"all {n} pairs"
        return (f"all {n} pairs, right or wrong ({sel['correct']} answered right on both sides{dropped_same}; "
                "the correct-only summaries are in summary_correct.json beside each summary.json, the wrong pairs in dropped_pairs.json)")

    @property
    def warnings(self) -> list[str]:
        return warnings_of(self.checks)

    @property
    def pair_ids(self) -> list[int]:
        return [p["pair_id"] for p in self.pairs]

    def n_pairs(self, exp: str) -> int:
        return int(self.summaries[exp].get("n_pairs", len({r["pair_id"] for r in self.rows[exp]})))

    @property
    def model_name(self) -> str:
        m = self.manifest.get("model", {})
        ck = str(m.get("checkpoint", "?"))
        return Path(ck).name or ck

    @property
    def run_id(self) -> str:
        """A run is its directory name and start time (a resumed run keeps both)."""
        return f"{self.run_dir.name}@{self.manifest.get('started', 'unknown')}"

    # ---- aggregated cells -----------------------------------------------------------
    def cells(self, exp: str) -> dict[tuple, dict]:
        """(cell key tuple) → summary cell, keys as in CELL_KEYS."""
        if exp not in self._cells:
            self._cells[exp] = {
                tuple(_as_layer(c[k]) if k == "layer" else c.get(k, CELL_DEFAULTS.get(k)) for k in CELL_KEYS[exp]): c for c in self.summaries[exp]["cells"]
            }
        return self._cells[exp]

    def shown_columns(self, exp: str) -> list[str]:
        """The cell-key columns worth naming: not a column every cell leaves empty (head, off the
        head site), nor `site` / `run` when the run has only one."""
        keys = CELL_KEYS[exp]
        out = []
        for i, c in enumerate(keys):
            vals = {k[i] for k in self.cells(exp)}
            if vals == {None} or (c in ("site", "run") and len(vals) == 1):
                continue
            out.append(c)
        return out

    def shown(self, exp: str, key: tuple) -> list[tuple[str, object]]:
        """(column, value) of a cell key, the columns of `shown_columns`."""
        cols = self.shown_columns(exp)
        return [(c, v) for c, v in zip(CELL_KEYS[exp], key) if c in cols]

    def key(self, exp: str, **parts) -> tuple:
        """A cell key of `exp` from named parts (`key("position", layer=l, thought=k)`), in the
        order of CELL_KEYS; a key column not named takes the one value the cells have for it."""
        cols = CELL_KEYS[exp]
        out = []
        for c in cols:
            if c in parts:
                out.append(parts[c])
                continue
            seen = {k[cols.index(c)] for k in self.cells(exp)}
            if len(seen) != 1:
                raise ThoughtpatchError(f"{exp}: cells differ in '{c}'; name it")
            out.append(seen.pop())
        return tuple(out)

    def stat(self, exp: str, key: tuple, metric: str, what: str = "mean") -> float:
        """A number of a cell's metric: mean, std, n, ci_low, ci_high or ci95 (NaN when absent)."""
        c = self.cells(exp).get(key)
        if c is None or metric not in c["metrics"]:
            return math.nan
        return nan_if_none(c["metrics"][metric].get(what))

    def interval(self, exp: str, key: tuple, metric: str) -> tuple[float, float, float]:
        """(mean, ci_low, ci_high) of a cell's metric; NaN where absent."""
        return tuple(self.stat(exp, key, metric, w) for w in ("mean", "ci_low", "ci_high"))  # type: ignore[return-value]

    def ci_method(self, exp: str, metric: str) -> str | None:
        """The interval method of a metric in `exp` (one per metric: the same in every cell)."""
        for c in self.summaries[exp]["cells"]:
            m = c["metrics"].get(metric)
            if m and m.get("ci_method"):
                return m["ci_method"]
        return None

    def pair_rows(self, exp: str) -> dict[int, list[dict]]:
        out: dict[int, list[dict]] = {}
        for r in self.rows.get(exp, []):
            out.setdefault(r["pair_id"], []).append(r)
        return out


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ThoughtpatchError(f"{path}: {what} not found — is this a thoughtpatch run directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ThoughtpatchError(f"{path}: malformed JSON ({e})") from None


def _has_intervals(doc: dict) -> bool:
    return all("ci_method" in m for c in doc.get("cells", []) for m in c.get("metrics", {}).values())


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ThoughtpatchError(f"run directory '{run_dir}' not found")
    manifest = _read_json(run_dir / "manifest.json", "manifest")
    pairs = _read_json(run_dir / "pairs.json", "pairs file")
    checks_path = run_dir / "checks.json"
    doc = _read_json(checks_path, "checks") if checks_path.exists() else {"checks": []}
    checks = doc.get("checks") if isinstance(doc, dict) else None
    if not isinstance(manifest, dict) or not isinstance(pairs, list) or not isinstance(checks, list):
        raise ThoughtpatchError(f"{run_dir}: manifest.json, pairs.json or checks.json is not what a thoughtpatch run writes")
    dropped_path = run_dir / "dropped_pairs.json"
    dropped = _read_json(dropped_path, "dropped pairs") if dropped_path.exists() else []
    data = RunData(run_dir, manifest, pairs, checks, dropped=dropped if isinstance(dropped, list) else [])
    for exp in EXPERIMENTS:
        res, summ = run_dir / exp / "results.jsonl", run_dir / exp / "summary.json"
        if res.exists() and summ.exists():
            rows = read_rows(res, exp)
            if not rows:
                raise ThoughtpatchError(f"{res}: no rows (the run patched nothing)")
            for r in rows:
                r["layer"] = _as_layer(r["layer"])
            data.rows[exp] = rows
            doc = _read_json(summ, "summary")
            if not _has_intervals(doc):  # written before summaries carried ci_low/ci_high/ci_method
                doc = {**doc, "cells": summarize(rows, exp)}
            data.summaries[exp] = doc
    if not data.rows:
        raise ThoughtpatchError(f"{run_dir}: no experiment results (expected layer/, position/ or iterative/ with results.jsonl and summary.json)")
    return data
