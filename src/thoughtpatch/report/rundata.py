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


# The tables of a report: the main metrics and the ones worth a second look.
TABLE_EXTRA = {"knockout": ("logprob_diff",), "trace": ("kl_to_clean", "away")}


def table_metrics(exp: str) -> tuple[str, ...]:
    return metrics_of(exp) + TABLE_EXTRA.get(exp, ("kl_to_clean", "away"))


SITE_SHORT = {"input": "fed thought vector", "resid": "block output", "attn": "attention output", "mlp": "MLP output", "head": "attention heads", "kv": "cached key and value"}
# What each site is (DESIGN §8), for titles, methodology and how-to-read lines.
SITE_WORDS = {
    "input": "the fed thought vector z_k",
    "resid": "block l's output (the residual stream after the block)",
    "attn": "block l's attention output, before it is added to the residual stream",
    "mlp": "block l's MLP output, before it is added to the residual stream",
    "head": "head h's output in block l (its slice of the attention output before the output projection)",
    "kv": "the key and value block l caches for thought k (keys after rotary embedding), as every later position reads them; thought k's own residual stream is untouched",
}


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
    "delta_logprob_clean": "Δ log P(clean answer) vs the noised run",
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
    "delta_logprob_clean": "Δ log P(clean)",
    "flip": "flip rate",
    "away": "away rate",
    "cos_clean": "cos to clean",
    "cos_corrupted": "cos to corrupted",
    "norm": "norm",
}


# Where an experiment's metric means something else than in Exp 1 (no source run, or the
# clean answer as the reference).
LABELS_OF = {
    "trace": {
        "kl": "KL(restored ‖ noised)",
        "kl_to_clean": "KL(clean ‖ restored)",
        "flip": "flip-back rate (answer = clean run's again)",
        "away": "away rate (answer ≠ noised run's)",
    },
    "knockout": {
        "kl": "KL(knocked out ‖ unpatched)",
        "logprob_diff": "log P(clean) − log P(corrupted), knocked out",
        "away": "away rate (answer ≠ unpatched run's)",
    },
}
SHORT_OF = {"trace": {"flip": "flip-back rate", "kl_to_clean": "KL to clean"}}


def label(metric: str, exp: str | None = None) -> str:
    return LABELS_OF.get(exp or "", {}).get(metric) or LABELS.get(metric, metric)


def short(metric: str, exp: str | None = None) -> str:
    return SHORT_OF.get(exp or "", {}).get(metric) or SHORT.get(metric, metric)


# The boolean a per-pair view marks: the answer flips to the source (trace: back to the clean
# answer); a knockout has no source, so it marks an answer that moved away.
MARKED = {"knockout": "away"}


def marked(exp: str) -> str:
    return MARKED.get(exp, "flip")


READERS = {
    "answer": "the answer positions (from `<eot>` on)",
    "thoughts": "the later thoughts",
    "both": "the later thoughts and the answer positions",
}


READERS_SHORT = {"answer": "answer", "thoughts": "later thoughts", "both": "later thoughts + answer"}


def mode_tag(mode: dict) -> str:
    """The mode in a few words ("" for replace): "mean (n = 57)", "add α = 1, v = diff"."""
    name = mode.get("mode", "replace")
    if name == "replace":
        return ""
    parts = {"add": [f"α = {mode.get('alpha', 1.0):g}", f"v = {mode.get('vector')}"], "noise": [f"ν = {mode.get('noise_scale', 1.0):g}", f"seed {mode.get('seed', 0)}"]}.get(name, [])
    if mode.get("stats_n") is not None:
        parts.append(f"n = {mode['stats_n']}")
    return f"{name} ({', '.join(parts)})" if parts else name


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


def loc_key(loc) -> tuple[int, int]:
    """Sort key of a grid row: a layer, or (layer, head) on the head site."""
    return (layer_key(loc[0]), loc[1]) if isinstance(loc, tuple) else (layer_key(loc), -1)


def loc_of(row: dict):
    """A row's location: its layer, or (layer, head) on the head site."""
    return row["layer"] if row.get("head") is None else (row["layer"], row["head"])


def layer_name(layer) -> str:
    return "input" if layer == "input" else f"L{layer}"


def loc_name(loc) -> str:
    """"input", "2", or "2.h3" (layer 2, head 3)."""
    if isinstance(loc, tuple):
        return f"{loc[0]}.h{loc[1]}"
    return "input" if loc == "input" else str(loc)


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
    site: str | None = None  # set on a view of one site's grids (`only`)
    run: str | None = None  # set on a view of one knockout run's grid
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

    def locs(self, exp: str) -> list:
        """The rows of `exp`'s grid as its cells have them: layers ("input" first), or
        (layer, head) on the head site (a view of one site holds one grid)."""
        keys = CELL_KEYS[exp]
        seen = {(k[keys.index("layer")], k[keys.index("head")] if "head" in keys else None) for k in self.cells(exp)}
        return sorted({l if h is None else (l, h) for l, h in seen}, key=loc_key)

    @property
    def head_site(self) -> bool:
        return self.site == "head"

    @property
    def mode(self) -> dict:
        """The run's mode and its parameters (manifest.json; `stats_n` = the pair-set statistics' n)."""
        return self.manifest.get("mode") or {"mode": "replace"}

    def groups(self, exp: str) -> list[str]:
        """The grids `exp`'s cells fall into: its sites (in the run's order), or for knockout
        the runs it was applied to (clean first)."""
        col = "run" if exp == "knockout" else "site"
        have = {c.get(col, CELL_DEFAULTS.get(col)) for c in self.summaries[exp]["cells"]}
        order = list(self.manifest.get("sites") or []) if col == "site" else ["clean", "corrupted"]
        return [g for g in order if g in have] + sorted(g for g in have if g not in order)

    def only(self, exp: str, group: str) -> "RunData":
        """The run seen as one grid of `exp`: every experiment's rows and summary cells of one
        site (knockout, which has no site, is left out), or knockout's of one run (the other
        experiments left out). Figures and reports draw one grid at a time."""
        col = "run" if exp == "knockout" else "site"
        rows, summaries = {}, {}
        for e, rs in self.rows.items():
            if col not in CELL_KEYS[e]:
                continue
            rows[e] = [r for r in rs if r.get(col, CELL_DEFAULTS.get(col)) == group]
            doc = self.summaries[e]
            summaries[e] = doc | {"cells": [c for c in doc["cells"] if c.get(col, CELL_DEFAULTS.get(col)) == group]}
            if not rows[e]:
                del rows[e], summaries[e]
        return RunData(self.run_dir, self.manifest, self.pairs, self.checks, rows, summaries, self.dropped, **{col: group})

    def views(self, exp: str) -> list["RunData"]:
        return [self.only(exp, g) for g in self.groups(exp)]

    @property
    def tag(self) -> str:
        """A view's part of its file names: none for the resid grid (the names of a run
        before sites existed), `_<site>` or `_<run>` otherwise."""
        group = self.run or self.site
        return "" if group in (None, "resid") else f"_{group}"

    def readers(self) -> str:
        """Knockout: whose reading of thought k's key is blocked (answer | thoughts | both)."""
        got = {r.get("readers") for r in self.rows.get("knockout", [])} - {None}
        return got.pop() if len(got) == 1 else str(self.manifest.get("config", {}).get("readers", "answer"))

    def grid_tag(self, exp: str) -> str:
        """What a figure of this grid names beside the experiment: the site (resid only beside
        other sites), the mode when it is not replace, a knockout's run and readers."""
        if exp == "knockout":
            return f" [{self.run or 'unpatched'} run · blocked readers: {READERS_SHORT.get(self.readers(), self.readers())}]"
        several = len(self.manifest.get("sites") or []) > 1  # then the resid grid is named too
        parts = [self.site] if self.site not in (None, "resid") or (self.site and several) else []
        if mode_tag(self.mode):
            parts.append(mode_tag(self.mode))
        return f" [{' · '.join(parts)}]" if parts else ""

    def roles_of(self, exp: str) -> tuple[str, str | None]:
        """(receiving, source) run of `exp`: trace restores the clean run into the noised one;
        a knockout has no source, its receiving run is the one knocked out."""
        if exp == "trace":
            return "noised", "clean"
        if exp == "knockout":
            return self.run or "unpatched", None
        return self.receiving_role, self.source_role

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
        """Which pairs (causal tracing: questions) the numbers of `exp` cover, in words."""
        sel, n = self.selection, self.n_pairs(exp)
        same = len(sel.get("same_answer", []))
        dropped_same = f"; {same} dropped for equal answers" if same else ""
        units, right = ("questions", "answered right on the clean run") if exp == "trace" else ("pairs", "answered right on both sides")
        if sel.get("keep") == "correct":
            return (f"the {n} {units} the model {right.replace('answered', 'answers')} ({sel.get('wrong', '?')} answered wrong were dropped{dropped_same}; "
                    f"listed with the model's answers in dropped_pairs.json)")
        if "correct" not in sel:
            return f"all {n} {units}"
        return (f"all {n} {units}, right or wrong ({sel['correct']} {right}{dropped_same}; "
                f"the correct-only summaries are in summary_correct.json beside each summary.json, the wrong {units} in dropped_pairs.json)")

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
        """A cell key of `exp` from named parts (`key("position", layer=l, thought=k)`, or
        `loc=` a grid row: a layer or (layer, head)), in the order of CELL_KEYS; a key column
        not named takes the one value the cells have for it."""
        if "loc" in parts:
            loc = parts.pop("loc")
            parts["layer"], head = loc if isinstance(loc, tuple) else (loc, None)
            if "head" in CELL_KEYS[exp]:
                parts["head"] = head
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
