"""Reports of a run: `reports/{layer,position,iterative}_patching.md`, the research journal
entry and DATA_INVENTORY.md — all rebuilt from the run directory's JSON alone.

    write_reports(run_dir) → figures/ + reports/*.md + research_journal.md + DATA_INVENTORY.md

Reproducible: the same results give the same bytes. Reports hold no wall-clock time; the
journal entry is dated by the run's own manifest (when it finished) and keyed by the run id
(`<directory name>@<start time>`, which a resumed run keeps): regenerating replaces that
run's entry in place instead of appending a second one, so the journal gets exactly one
entry per run. DATA_INVENTORY.md is rewritten from what is on disk each time.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

from thoughtpatch.data.schema import atomic_write_text
from thoughtpatch.report.figures import write_figures
from thoughtpatch.report.intervals import METHODS, SHORT_METHODS, wilson
from thoughtpatch.report.results import CELL_KEYS
from thoughtpatch.report.rundata import ACTIVATION_METRICS, LABELS, MAIN_METRICS, SHORT, RunData, layer_key, load_run, verdict_counts
from thoughtpatch.report.rundir import LOCK_NAME

REPORT_FILES = {"position": "position_patching.md", "iterative": "iterative_patching.md", "layer": "layer_patching.md"}
TITLES = {
    "position": "Exp 1 — position-wise patching",
    "iterative": "Exp 2 — iterative patching",
    "layer": "Layer patching (baseline)",
}
JOURNAL = "research_journal.md"
INVENTORY = "DATA_INVENTORY.md"
SECTIONS = ("## Methodology", "## Results", "## Figures", "## Top-5", "## Validation checklist", "## Error analysis")


# ---- formatting ----------------------------------------------------------------------------
def num(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    s = f"{v:.{digits}g}"
    return "0" if s in ("-0", "0") else s


def ci(m: float, lo: float, hi: float) -> str:
    """"mean [low, high]" (the mean alone where the cell has no interval)."""
    if not all(isinstance(v, float) and math.isfinite(v) for v in (lo, hi)):
        return num(m)
    return f"{num(m)} [{num(lo)}, {num(hi)}]"


def pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * float(v):.1f} %"


def md(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(md(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def lname(l) -> str:
    return "input" if l == "input" else str(l)


# ---- shared sections -----------------------------------------------------------------------
def intervals_used(data: RunData) -> str:
    """Which interval each metric of this run got, and what the methods are."""
    by_method: dict[str, list[str]] = {}
    for exp in data.experiments:
        for metric in TABLE_METRICS + ACTIVATION_METRICS:
            m = data.ci_method(exp, metric)
            if m and metric not in by_method.setdefault(m, []):
                by_method[m].append(metric)
    return "; ".join(f"{METHODS[m]} for {', '.join(ms)}" for m, ms in by_method.items())


def metric_definitions(data: RunData) -> str:
    src, rec = data.source_role, data.receiving_role
    return f"""Metrics, read at the answer's decision position (the position that predicts the first token where the clean
and corrupted answer continuations differ, the shared part teacher-forced), in fp32:

* **kl** — KL(P_patched ‖ P_receiving) of the next-token distribution: how much the patch moved the
  {rec} run (effect size, ≥ 0). **kl_to_clean** — KL(P_source ‖ P_patched): how far the patched run still
  is from the {src} run.
* **answer_logit_diff** — at the decision position, the logit of the clean answer's token there minus
  the logit of the corrupted answer's token (> 0 favours the clean answer); `clean_score` and
  `corrupted_score` are the two logits.
* **logprob_diff** — teacher-forced log P(clean answer) − log P(corrupted answer), summed over each
  answer's tokens (> 0 favours the clean answer).
* **recovered** — (m_patched − m_receiving) / (m_source − m_receiving) of logprob_diff: 0 = no change,
  1 = the {src} run's value. Aggregated as the **ratio of means** over pairs (never the mean of
  per-pair ratios); its interval is a bootstrap over pairs.
* **flip** — the patched run's greedy answer equals the {src} run's answer (flip rate = mean of flip;
  pairs whose unpatched runs already answer alike flip without any patch: see the baseline);
  **away** — it differs from the {rec} run's answer.
* Exp 2 also records the patched activation aᵢ: **norm** ‖aᵢ‖, **cos_clean** / **cos_corrupted** =
  cosine to the clean / corrupted run's activation at the same site.

Aggregates: mean over pairs, n pairs per cell, and a 95 % interval that stays inside the metric's
range (DESIGN §3), written `mean [low, high]`: {intervals_used(data)}.
"""


def methodology(data: RunData, exp: str) -> str:
    m, mf = data.manifest.get("model", {}), data.manifest
    cfg = mf.get("config", {})
    pairs = mf.get("pairs", {})
    L = m.get("num_layers", "?")
    direction = (
        "**denoising**: activations of the clean run are written into the corrupted run (receiving = corrupted, source = clean)"
        if data.direction == "denoising"
        else "**noising**: activations of the corrupted run are written into the clean run (receiving = clean, source = corrupted)"
    )
    what = {
        "layer": "For each layer l, every thought k = 0…K−1 at layer l is replaced by the source run's activation (one run per layer).",
        "position": "For each site (layer l, thought k), only that one site is replaced by the source run's activation. The `input` row "
        "patches the fed thought vector z_k itself (hidden_states[0] at thought k); the output of thought k is the input of thought k+1.",
        "iterative": "For each layer l: iteration 0 patches (l, 0) with the source activation and records the patched run's own "
        "activation a₁ at (l, 1); iteration i ≥ 1 patches only (l, i) with aᵢ from iteration i−1 and records aᵢ₊₁. "
        "Iteration 0 equals Exp 1 at (l, 0).",
    }[exp]
    rows = [
        ["model checkpoint", f"`{m.get('checkpoint', '?')}` (sha256 {str(m.get('sha256', '?'))[:16]}…)"],
        ["base (config + tokenizer)", f"`{m.get('base', cfg.get('base'))}`"],
        ["family / dtype", f"{m.get('family', '?')} / {m.get('dtype', cfg.get('dtype', '?'))}"],
        ["layers L (+ input row)", f"{L} (+ input); patched: {', '.join(lname(l) for l in data.layers)}"],
        ["thoughts K", f"{data.num_thoughts}; patched: {', '.join(str(k) for k in data.thoughts)}"],
        ["hidden size", str(m.get("hidden_size", "?"))],
        ["answer template", f"`{m.get('answer_template', '?')}`"],
        ["pairs", f"{data.n_pairs(exp)} from `{pairs.get('path', cfg.get('pairs'))}` (sha256 {str(pairs.get('sha256', '?'))[:16]}…)"],
        ["direction", direction],
        ["engine / max new tokens / stop", f"{cfg.get('engine', '?')} / {cfg.get('max_new_tokens', '?')} / {cfg.get('stop', '?')}"],
        ["versions", ", ".join(f"{k} {v}" for k, v in mf.get("versions", {}).items())],
    ]
    return f"## Methodology\n\n{what}\n\n" + table(["", ""], rows) + "\n" + metric_definitions(data)


def checklist(data: RunData) -> str:
    if not data.checks:
        return "## Validation checklist\n\nNo checks.json in this run.\n"
    shown = {"fail": "**FAIL**", "warn": "**WARN**"}
    rows = [[i + 1, f"`{c['name']}`", num(c["value"], 4), shown.get(c["verdict"], c["verdict"]), c.get("detail", "")] for i, c in enumerate(data.checks)]
    return (
        "## Validation checklist\n\n"
        f"{verdict_counts(data.checks)} (a check is a finding: `info` reports a value without a threshold; `warn` means the results "
        "describe something other than they seem; a fail is shown, not hidden).\n\n"
        + table(["#", "check", "value", "verdict", "detail"], rows)
    )


def _check(data: RunData, name: str) -> dict | None:
    return next((c for c in data.checks if c["name"] == name), None)


def rate_interval(check: dict) -> str:
    """The Wilson interval of a rate check whose detail starts with its count, "k/d …"."""
    m = re.match(r"(\d+)/(\d+)\b", str(check.get("detail", "")))
    if not m or int(m.group(2)) == 0:
        return ""
    lo, hi = wilson(int(m.group(1)), int(m.group(2)))
    return f" [{pct(lo)}, {pct(hi)}; 95 % CI, Wilson]"


def baseline_lines(data: RunData) -> list[str]:
    out = []
    labels = (
        ("baseline_accuracy_clean", "Accuracy, clean questions"),
        ("baseline_accuracy_corrupted", "Accuracy, corrupted questions"),
        ("accuracy_thoughts_zeroed", "Accuracy, every fed thought zeroed"),
        ("unpatched_answers_agree", "Pairs already answering alike (flip-rate floor)"),
    )
    for name, label in labels:
        c = _check(data, name)
        if c is not None:
            out.append(f"* {label}: **{pct(c['value'])}**{rate_interval(c)} — {c.get('detail', '')}")
    return out or ["* Baseline accuracy: not recorded (no checks.json)."]


def error_analysis(data: RunData, exp: str) -> str:
    by_pair = data.pair_rows(exp)
    pairs = {p["pair_id"]: p for p in data.pairs}
    src, rec = data.source_role, data.receiving_role
    cols = data.shown_columns(exp)
    if cols == ["layer"]:
        cell_name = lambda r: f"layer {lname(r['layer'])}"  # noqa: E731
    else:
        cell_name = lambda r: "(" + ", ".join(lname(r[k]) if k == "layer" else str(r.get(k)) for k in cols) + ")"  # noqa: E731
    lines = ["## Error analysis", "", "Baseline (DESIGN check 8):", ""] + baseline_lines(data) + [""]
    flipped, still, table_rows = [], [], []
    for pid in [p for p in data.pair_ids if p in by_pair]:
        rows = by_pair[pid]
        p = pairs.get(pid, {})
        gold_c, gold_r = p.get("clean", {}).get("answer"), p.get("corrupted", {}).get("answer")
        rec_ans = next((r["answer"] for r in rows if not r.get("away")), None)
        src_ans = next((r["answer"] for r in rows if r.get("flip")), None)
        nflip = sum(bool(r.get("flip")) for r in rows)
        naway = sum(bool(r.get("away")) for r in rows)
        best = max(rows, key=lambda r: -math.inf if math.isnan(r["kl"]) else r["kl"])
        dlp = [data.sign * (r["logprob_diff"] - r["logprob_diff_receiving"]) for r in rows if not math.isnan(r["logprob_diff"])]
        if nflip:
            flipped.append((pid, nflip, [cell_name(r) for r in sorted(rows, key=lambda r: -r["kl"]) if r.get("flip")][:5]))
        if naway == 0:
            still.append(pid)
        table_rows.append([
            pid, num(gold_c), num(gold_r), num(rec_ans) if rec_ans is not None else "—",
            num(src_ans) if src_ans is not None else "—", f"{nflip}/{len(rows)}", f"{naway}/{len(rows)}",
            f"{num(best['kl'])} at {cell_name(best)}", num(max(dlp)) if dlp else "n/a",
        ])
    n = len(table_rows)
    lines.append(f"Pairs whose greedy answer **flips to the {src} answer** in at least one cell: **{len(flipped)} of {n}**.")
    lines.append("")
    if flipped:
        lines.append(table(["pair", "cells that flip", "flipping cells (strongest KL first, ≤ 5)"], [[pid, k, ", ".join(c)] for pid, k, c in flipped]))
    lines.append(f"Pairs that **never move** (no cell changes the {rec} run's greedy answer): **{len(still)} of {n}**" + (f" — pairs {', '.join(map(str, still))}." if still else "."))
    lines.append("")
    lines.append(
        f"Per pair (answers: gold from pairs.json; the {rec} run's answer is read off cells where the answer did not move, "
        f"the {src} run's off cells that flipped, — when no cell shows it; best Δ = largest move of logprob_diff towards the {src} run):\n"
    )
    lines.append(table(["pair", "gold clean", "gold corrupted", f"{rec} run", f"{src} run", "flip cells", "away cells", "max KL (cell)", "best Δ logprob_diff"], table_rows))
    return "\n".join(lines) + "\n"


# ---- ranking -------------------------------------------------------------------------------
def ranked(data: RunData, exp: str, metric: str, k: int = 5) -> list[tuple[tuple, float, float, float, float]]:
    """Top cells by a metric, (key, mean, ci_low, ci_high, n): largest effect first (signed
    metrics towards the source run)."""
    out = []
    for key in data.cells(exp):
        m, lo, hi = data.interval(exp, key, metric)
        if math.isfinite(m):
            out.append((key, m, lo, hi, data.stat(exp, key, metric, "n")))
    sgn = data.sign if metric in ("answer_logit_diff", "logprob_diff") else 1  # recovered is already source-oriented
    out.sort(key=lambda t: -sgn * t[1])  # stable: ties keep the cell order
    return out[:k]


def top5_section(data: RunData, exp: str) -> str:
    head = data.shown_columns(exp)
    what = "layers" if head == ["layer"] else "(" + ", ".join(head) + ") cells"
    order = "highest first" if data.sign > 0 else "highest first; logit diff and log-prob diff lowest first (most towards the corrupted answer)"
    parts = [f"## Top-5 {what} by each main metric\n\nMean over pairs ({order}).\n"]
    for metric in MAIN_METRICS:
        rows = [[i + 1, *[lname(x) for _, x in data.shown(exp, key)], ci(m, lo, hi), num(n)] for i, (key, m, lo, hi, n) in enumerate(ranked(data, exp, metric))]
        parts.append(f"**{LABELS[metric]}**\n\n" + table(["rank", *head, f"mean [{ci_label(data, exp, metric)}]", "n"], rows))
    return "\n".join(parts)


# ---- results tables ------------------------------------------------------------------------
TABLE_METRICS = MAIN_METRICS + ("kl_to_clean", "away")


def ci_label(data: RunData, exp: str, metric: str) -> str:
    m = data.ci_method(exp, metric)
    return f"95 % CI, {SHORT_METHODS.get(m, m)}" if m else "no interval"


def grid_table(data: RunData, exp: str, metric: str, cols: list, col_name: str, step: str) -> str:
    header = ["layer"] + [f"{col_name} {c}" for c in cols]
    rows = []
    for l in data.layers:
        keys = [data.key(exp, layer=l, **{step: c}) for c in cols]
        if not any(k in data.cells(exp) for k in keys):
            continue
        rows.append([lname(l)] + [ci(*data.interval(exp, k, metric)) for k in keys])
    return table(header, rows)


def results_section(data: RunData, exp: str) -> str:
    parts = [
        "## Results\n",
        f"Mean [95 % CI] over pairs (n = {data.n_pairs(exp)}); `recovered` is the ratio of means. Each table names its interval's method (Methodology lists them).\n",
    ]
    if exp == "layer":
        keys = [data.key("layer", layer=l) for l in data.layers]
        keys = [k for k in keys if k in data.cells("layer")]
        rows = [[lname(k[CELL_KEYS["layer"].index("layer")])] + [ci(*data.interval("layer", k, m)) for m in TABLE_METRICS] for k in keys]
        parts.append(table(["layer"] + [f"{SHORT[m]} ({SHORT_METHODS.get(data.ci_method('layer', m), '—')})" for m in TABLE_METRICS], rows))
        return "\n".join(parts)
    cols, cname, step = (data.thoughts, "thought", "thought") if exp == "position" else (data.iterations, "iter", "iteration")
    metrics = TABLE_METRICS + (ACTIVATION_METRICS if exp == "iterative" else ())
    for metric in metrics:
        parts.append(f"### {LABELS[metric]}\n\n{ci_label(data, exp, metric)}.\n\n" + grid_table(data, exp, metric, cols, cname, step))
    return "\n".join(parts)


def iterative_vs_parallel(data: RunData) -> tuple[list[list], str]:
    """Per layer: Exp 1 at thought 0 (= iteration 0), Exp 1 at the last thought, Exp 2 at the
    final iteration, layer patching — for kl, recovered and flip."""
    last = max(data.iterations) if data.iterations else None
    rows = []
    for l in data.layers:
        row = [lname(l)]
        for metric in ("kl", "recovered", "flip"):
            e1_0 = data.stat("position", data.key("position", layer=l, thought=0), metric) if "position" in data.rows else math.nan
            e1_last = data.stat("position", data.key("position", layer=l, thought=last), metric) if "position" in data.rows and last is not None else math.nan
            e2 = data.stat("iterative", data.key("iterative", layer=l, iteration=last), metric) if "iterative" in data.rows and last is not None else math.nan
            lp = data.stat("layer", data.key("layer", layer=l), metric) if "layer" in data.rows else math.nan
            row += [num(e1_0), num(e1_last), num(e2), num(lp)]
        rows.append(row)
    return rows, f"Exp 1 at thought 0 (= Exp 2 iteration 0) / Exp 1 at thought {last} / Exp 2 at its final iteration {last} / layer patching (all thoughts)"


def iterative_vs_parallel_section(data: RunData) -> str:
    rows, legend = iterative_vs_parallel(data)
    header = ["layer"] + [f"{SHORT[m]}: {w}" for m in ("kl", "recovered", "flip") for w in ("E1 k=0", "E1 k=last", "E2 last", "layer")]
    return "### Iterative vs parallel\n\nColumns: " + legend + ".\n\n" + table(header, rows)


# ---- figures section -----------------------------------------------------------------------
FIG_CAPTIONS = {
    "position_heatmaps.png": "All main metrics side by side (mean over pairs).",
    "layer_curve.png": "Layer patching: each metric per layer, mean with its 95 % CI band (method in each panel's title).",
    "iterative_trajectories.png": "Exp 2: each metric per iteration, one line per layer, 95 % CI bands (method in each panel's title; KL on a log axis when it spans more than two decades).",
    "iterative_activations.png": "Exp 2: the chained activation aᵢ — cosine to the clean and corrupted runs and its norm per iteration.",
    "comparison_kl.png": "Exp 1 vs Exp 2 vs layer patching, KL, one panel per layer.",
    "comparison_logprob_diff.png": "Exp 1 vs Exp 2 vs layer patching, log-prob diff, one panel per layer (dotted: unpatched run, dashed: source run).",
}


def caption(p: Path) -> str:
    m = re.match(r"position_heatmap_(\w+)\.png", p.name)
    if m:
        return f"Exp 1 heatmap: {LABELS.get(m.group(1), m.group(1))}, mean over pairs."
    m = re.match(r"position_per_pair_(\w+)_(\d+)\.png", p.name)
    if m:
        what = {"kl": "KL(patched ‖ receiving)", "delta_logprob_diff": "change of logprob_diff against the unpatched run"}.get(m.group(1), m.group(1))
        return f"Per pair, sheet {m.group(2)}: {what}; one colour scale across the sheets; dots = the answer flipped."
    return FIG_CAPTIONS.get(p.name, p.stem)


def figures_section(figs: list[Path], html_pages: list[Path]) -> str:
    parts = ["## Figures\n"]
    for p in figs:
        parts.append(f"{caption(p)}\n\n![{p.stem}](../figures/{p.name})\n")
    if html_pages:
        parts.append("Interactive (offline; hover for mean, interval and n): " + ", ".join(f"[{p.name}](../figures/{p.name})" for p in html_pages) + "\n")
    return "\n".join(parts)


HOW_TO_READ = {
    "position": "Rows are layers with the fed thought vector (`input`) at the bottom, columns the patched thought. "
    "A faithful loop shows the `input` row as the layer rows shifted one thought to the right (thought k's output is thought k+1's input). "
    "Red = towards the clean answer for the signed metrics.",
    "iterative": "If the chained activation carries the clean information forward, the Exp 2 lines stay close to Exp 1 at the same thought; "
    "if it fades, they decay to 0 (KL) while cos to clean drops.",
    "layer": "Layer patching replaces every thought at a layer at once: an upper bound for any single site at that layer.",
}


def warning_lines(data: RunData) -> str:
    """The `warn` checks as a block quote: a report on a model that cannot solve its
    questions says so before anything else."""
    return "".join(f"> **Warning — {w}.**\n\n" for w in data.warnings)


def report(data: RunData, exp: str, figs: dict[str, list[Path]]) -> str:
    png = [p for p in figs.get(exp, []) if p.suffix == ".png"]
    html_pages = [p for p in figs.get(exp, []) if p.suffix == ".html"]
    png += figs.get("comparison", [])
    head = (
        f"# {TITLES[exp]}\n\n"
        + warning_lines(data)
        + f"Run `{data.run_dir.name}` · model `{data.model_name}` · {data.n_pairs(exp)} pairs · "
        f"{data.direction} · L = {data.manifest.get('model', {}).get('num_layers', '?')}, K = {data.num_thoughts}\n\n"
        f"Pairs covered: {data.pair_set(exp)}.\n\n"
        f"How to read it: {HOW_TO_READ[exp]}\n\n"
        + "".join("Other reports: " + ", ".join(f"[{TITLES[e]}]({REPORT_FILES[e]})" for e in others) + "\n" for others in [[e for e in data.experiments if e != exp]] if others)
    )
    body = [head, methodology(data, exp), results_section(data, exp)]
    if exp == "iterative":
        body.append(iterative_vs_parallel_section(data))
    body += [figures_section(png, html_pages), top5_section(data, exp), checklist(data), error_analysis(data, exp)]
    return "\n".join(b.rstrip("\n") + "\n" for b in body)


# ---- journal -------------------------------------------------------------------------------
def cell_words(exp: str, key: tuple, bare: bool = False, data: RunData | None = None) -> str:
    """"layer 2, thought 3" for a cell key (the bare value for a one-column key)."""
    parts = data.shown(exp, key) if data is not None else [(c, v) for c, v in zip(CELL_KEYS[exp], key) if v is not None]
    if bare and len(parts) == 1:
        return lname(parts[0][1])
    return ", ".join(f"{c} {lname(v)}" for c, v in parts)


def journal_entry(data: RunData) -> str:
    mf = data.manifest
    date = str(mf.get("finished") or mf.get("started") or "undated")[:10]
    n = data.n_pairs(data.experiments[0])
    lines = [f"## {date} · {data.run_dir.name} · {data.model_name} · {n} pairs · {data.direction}", f"<!-- entry: {data.run_id} -->", ""]
    lines += [f"* **Warning — {w}.**" for w in data.warnings]
    lines.append(f"* Pairs covered: {data.pair_set(data.experiments[0])}.")
    lines += baseline_lines(data)
    if data.checks:
        lines.append(f"* Checks: {verdict_counts(data.checks)}.")
    if "position" in data.rows:
        for metric in ("kl", "recovered"):
            top = ranked(data, "position", metric, 3)
            lines.append(f"* Exp 1 top cells by {SHORT[metric]}: " + "; ".join(f"({cell_words('position', k, data=data)}) {num(m)}" for k, m, *_ in top) + ".")
        flips = {r["pair_id"] for r in data.rows["position"] if r.get("flip")}
        moved = {r["pair_id"] for r in data.rows["position"] if r.get("away")}
        lines.append(f"* Exp 1 answers: {len(flips)} of {n} pairs flip to the {data.source_role} answer at some cell; {n - len(moved)} never move.")
    if "layer" in data.rows:
        top = ranked(data, "layer", "kl", 1) + ranked(data, "layer", "recovered", 1)
        if top:
            lines.append(f"* Layer patching: strongest layer by KL {cell_words('layer', top[0][0], bare=True, data=data)} ({num(top[0][1])})" + (f", by recovered {cell_words('layer', top[1][0], bare=True, data=data)} ({num(top[1][1])})." if len(top) > 1 else "."))
    if "iterative" in data.rows and "position" in data.rows and data.iterations:
        last = max(data.iterations)
        ratios = []
        for l in data.layers:
            e1, e2 = data.stat("position", data.key("position", layer=l, thought=last), "kl"), data.stat("iterative", data.key("iterative", layer=l, iteration=last), "kl")
            if math.isfinite(e1) and math.isfinite(e2) and e1 > 0:
                ratios.append(e2 / e1)
        e2_0 = [data.stat("iterative", data.key("iterative", layer=l, iteration=0), "kl") for l in data.layers]
        e2_l = [data.stat("iterative", data.key("iterative", layer=l, iteration=last), "kl") for l in data.layers]
        keep = [b / a for a, b in zip(e2_0, e2_l) if math.isfinite(a) and math.isfinite(b) and a > 0]
        if ratios:
            med = sorted(ratios)[len(ratios) // 2]
            lines.append(
                f"* Iterative vs parallel: at thought {last}, Exp 2's chained activation gives a median {num(med)}× the KL of patching the "
                f"{data.source_role} activation there directly (Exp 1), over {len(ratios)} layers"
                + (f"; along the chain KL goes from iteration 0 to {last} by a median factor {num(sorted(keep)[len(keep) // 2])}." if keep else ".")
            )
    lines.append("* Reports: " + ", ".join(f"reports/{REPORT_FILES[e]}" for e in data.experiments) + ".")
    lines += ["", f"<!-- /entry: {data.run_id} -->"]
    return "\n".join(lines) + "\n"


def update_journal(path: Path, entry: str, run_id: str) -> None:
    """One entry per run id: replace this run's entry in place if present, else append."""
    head = "# Research journal\n\nOne dated entry per run (dated by when the run finished); `thoughtpatch report` rewrites a run's entry in place.\n"
    text = path.read_text() if path.exists() else head
    start, end = f"<!-- entry: {run_id} -->", f"<!-- /entry: {run_id} -->\n"
    i = text.find(start)
    if i >= 0:
        h = text.rfind("\n## ", 0, i)
        i = h + 1 if h >= 0 else i
        j = text.find(end, i)
        j = len(text) if j < 0 else j + len(end)
        text = text[:i] + entry + text[j:]
    else:
        text = text.rstrip("\n") + "\n\n" + entry
    atomic_write_text(path, text)


# ---- inventory -----------------------------------------------------------------------------
def describe(rel: str) -> str:
    name = Path(rel).name
    exp_desc = {"layer": "layer patching", "position": "Exp 1 position-wise patching", "iterative": "Exp 2 iterative patching"}
    fixed = {
        "manifest.json": "run configuration, model and pairs hashes, layers and thoughts, versions, timings, device",
        "pairs.json": "the clean/corrupted pairs this run used (our format)",
        "checks.json": "validation checks: name, value, verdict (pass/warn/fail/info), detail",
        "dropped_pairs.json": "pairs left out: equal answers (never run), answered wrong (with the model's answers; not patched under --keep correct, not in summary_correct.json under --keep all)",
        "clean_activations.safetensors": "clean runs' thought activations per pair (cache, with metadata checked before reuse)",
        "corrupted_activations.safetensors": "corrupted runs' thought activations per pair (cache, with metadata checked before reuse)",
        JOURNAL: "research journal: one dated entry per run (findings, top cells, iterative vs parallel)",
        "position.html": "interactive Exp 1 heatmaps (every metric; slider over mean and each pair); offline, loads plotly.min.js",
        "iterative.html": "interactive Exp 2 trajectories and Exp 1 vs Exp 2 vs layer comparison; offline, loads plotly.min.js",
        "layer.html": "interactive layer-patching curves; offline, loads plotly.min.js",
        "plotly.min.js": "plotly.js, the one copy the interactive pages beside it load (no network)",
    }
    parts = rel.split("/")
    if parts[0] in exp_desc and name == "results.jsonl":
        return f"{exp_desc[parts[0]]}: one row per pair × cell with every metric (tidy)"
    if parts[0] in exp_desc and name == "summary.json":
        return f"{exp_desc[parts[0]]}: per cell mean, std, n and 95 % interval (ci_low, ci_high, ci_method) of every metric; recovered as ratio of means"
    if parts[0] in exp_desc and name == "summary_correct.json":
        return f"{exp_desc[parts[0]]}: the same summary over the pairs answered right on both sides only"
    if parts[0] == "reports":
        for e, f in REPORT_FILES.items():
            if name == f:
                return f"report: {TITLES[e]} (methodology, results, figures, top-5, checklist, error analysis)"
    if parts[0] == "figures" and name.endswith(".png"):
        return "figure: " + caption(Path(name))
    if parts[0] == "wandb" or "wandb" in parts:
        return "Weights & Biases run files (offline runs: upload with `wandb sync`)"
    return fixed.get(name, "")


def write_inventory(run_dir: Path) -> Path:
    files = sorted(
        p for p in run_dir.rglob("*")
        if p.is_file() and p.name not in (INVENTORY, LOCK_NAME) and not (p.name.startswith(".") and p.name.endswith(".tmp"))
    )
    rows = []
    for p in files:
        rel = p.relative_to(run_dir).as_posix()
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        rows.append([f"`{rel}`", f"{p.stat().st_size:,}", f"`{h.hexdigest()}`", describe(rel)])
    text = (
        "# Data inventory\n\n"
        f"Every file in this run directory (`{run_dir.name}`) except this one: path, size in bytes, sha256, what it holds. "
        "Rewritten by `thoughtpatch run` and `thoughtpatch report`.\n\n"
        + table(["path", "bytes", "sha256", "what it holds"], rows)
    )
    path = run_dir / INVENTORY
    atomic_write_text(path, text)
    return path


# ---- entry point ---------------------------------------------------------------------------
def write_reports(run_dir: Path, journal: Path | None = None) -> list[Path]:
    """Figures, reports, the journal entry and the inventory of one run, from its JSON alone.
    Returns the files written (the journal and the inventory last)."""
    run_dir = Path(run_dir)
    data = load_run(run_dir)
    figs = write_figures(data, run_dir / "figures")
    written = [p for ps in figs.values() for p in ps]
    for exp in data.experiments:
        path = run_dir / "reports" / REPORT_FILES[exp]
        atomic_write_text(path, report(data, exp, figs))
        written.append(path)
    jpath = Path(journal) if journal else run_dir / JOURNAL
    update_journal(jpath, journal_entry(data), data.run_id)
    written.append(jpath)
    written.append(write_inventory(run_dir))
    return written


__all__ = ["write_reports", "SECTIONS", "REPORT_FILES", "layer_key"]
