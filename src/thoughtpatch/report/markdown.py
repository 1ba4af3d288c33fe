"""Reports of a run: `reports/{layer,position,iterative}_patching.md`, `knockout.md`,
`causal_tracing.md`, the research journal entry and DATA_INVENTORY.md — all rebuilt from the
run directory's JSON alone. A run with several grids of an experiment (sites; knockout: the
clean and the corrupted run) gets one report per experiment with a part per grid in each
section.

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
from thoughtpatch.report.figures import EXP_SHORT, write_figures
from thoughtpatch.report.intervals import METHODS, SHORT_METHODS, wilson
from thoughtpatch.report.results import CELL_KEYS
from thoughtpatch.report.rundata import (
    ACTIVATION_METRICS, MAIN_METRICS, READERS, SHORT, SITE_SHORT, SITE_WORDS, RunData, label, layer_key, load_run, loc_name, marked, metrics_of,
    mode_tag, short, table_metrics, verdict_counts,
)
from thoughtpatch.report.rundir import LOCK_NAME

REPORT_FILES = {
    "position": "position_patching.md", "iterative": "iterative_patching.md", "layer": "layer_patching.md",
    "knockout": "knockout.md", "trace": "causal_tracing.md",
}
TITLES = {
    "position": "Exp 1 — position-wise patching",
    "iterative": "Exp 2 — iterative patching",
    "layer": "Layer patching (baseline)",
    "knockout": "Attention knockout",
    "trace": "Causal tracing",
}
# A head grid with more locations than this gets its per-cell tables as layer × head tables of
# the thought-summed means (the cells with their intervals stay in summary.json and the page).
MAX_TABLE_ROWS = 64
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
    return loc_name(l)


# ---- grids ---------------------------------------------------------------------------------
def grid_title(view: RunData, exp: str) -> str:
    """The heading of one grid's part of a section: its site (or knockout run) and what it is."""
    if exp == "knockout":
        return f"Knocked out in the {view.run} run"
    return f"Site `{view.site}` ({SITE_SHORT.get(view.site, view.site)})"


def per_grid(data: RunData, exp: str, title: str, part, lead: str = "") -> str:
    """A section with one part per grid of `exp` (a site, or a knockout run): the part alone
    when the run has one grid, else each under its own heading (its inner headings one level
    down). `part(view, h)` writes one grid's part, its inner headings at level `h`."""
    views = data.views(exp)
    head = title + "\n\n" + (lead.rstrip("\n") + "\n\n" if lead else "")
    if len(views) == 1:
        return head + part(views[0], "###")
    return head + "\n".join(f"### {grid_title(v, exp)}\n\n" + part(v, "####").rstrip("\n") + "\n" for v in views)


# ---- shared sections -----------------------------------------------------------------------
def intervals_used(data: RunData) -> str:
    """Which interval each metric of this run got, and what the methods are."""
    by_method: dict[str, list[str]] = {}
    for exp in data.experiments:
        for metric in table_metrics(exp) + ACTIVATION_METRICS:
            m = data.ci_method(exp, metric)
            if m and metric not in by_method.setdefault(m, []):
                by_method[m].append(metric)
    return "; ".join(f"{METHODS[m]} for {', '.join(ms)}" for m, ms in by_method.items())


AGGREGATES = """Aggregates: mean over {unit}s, n {unit}s per cell, and a 95 % interval that stays inside the metric's
range (DESIGN §3), written `mean [low, high]`: {intervals}.
"""


def metric_definitions(data: RunData, exp: str = "position") -> str:
    if exp == "knockout":
        return """Metrics, read at the answer's decision position (as in Exp 1), in fp32, against the unpatched run the
knockout is applied to (there is no source run):

* **kl** — KL(P_knocked-out ‖ P_unpatched) of the next-token distribution: how much blocking the reads moved
  the run (effect size, ≥ 0).
* **logprob_diff** — teacher-forced log P(clean answer) − log P(corrupted answer) of the knocked-out run;
  **delta_logprob_diff** — its change against the unpatched run (< 0: the knockout took the run away from
  the clean answer).
* **away** — the knocked-out run's greedy answer differs from the unpatched run's (away rate = mean of away).

""" + AGGREGATES.format(intervals=intervals_used(data), unit="question" if exp == "trace" else "pair")
    if exp == "trace":
        return """Metrics, read at the answer's decision position (as in Exp 1), in fp32, relative to the clean answer:

* **kl** — KL(P_restored ‖ P_noised) of the next-token distribution: how much restoring the site moved the
  noised run (effect size, ≥ 0). **kl_to_clean** — KL(P_clean ‖ P_restored): how far the restored run still is
  from the clean run.
* **logprob_clean** — teacher-forced log P(clean answer), summed over the answer's tokens (≤ 0).
* **restored** — (m_restored − m_noised) / (m_clean − m_noised) of logprob_clean: the share of log P(clean
  answer) lost to the noise that the restored site brings back (0 = none, 1 = all). Aggregated as the
  **ratio of means** over questions (never the mean of per-question ratios); its interval is a bootstrap.
* **flip** — the restored run's greedy answer is the clean run's again (flip back; rate = mean of flip);
  **away** — it differs from the noised run's answer.

""" + AGGREGATES.format(intervals=intervals_used(data), unit="question" if exp == "trace" else "pair")
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

""" + AGGREGATES.format(intervals=intervals_used(data), unit="question" if exp == "trace" else "pair")


def receives(data: RunData) -> str:
    """What a patched site gets under the run's mode (DESIGN §8), in words."""
    m = data.mode
    n = f" (n = {m['stats_n']} pairs; stored in site_stats.safetensors)" if m.get("stats_n") is not None else ""
    return {
        "replace": "the clean run's activation (restored)" if "trace" in data.rows else "the source run's activation",
        "zero": "zeros",
        "mean": f"the site's mean over the receiving runs of the whole pair set{n}",
        "resample": "the activation of another pair's receiving run at the same site (pair p takes pair (p+1) mod n; recorded per row as `resample_pair`)",
        "add": f"its own value + α·v with α = {m.get('alpha', 1.0):g} and v = "
        + ("mean(source) − mean(receiving) at that site over the pair set" + n if m.get("vector") == "diff" else f"the vector for that site in `{m.get('vector')}`"),
        "noise": f"its own value + σ·ε, σ = {m.get('noise_scale', 1.0):g} × the site's spread over the pair set{n}, ε Gaussian seeded by (seed {m.get('seed', 0)}, pair, site)",
    }.get(m.get("mode", "replace"), m.get("mode", "?"))


def what_it_does(data: RunData, exp: str) -> str:
    """The experiment in the words of DESIGN §3 and §8."""
    if exp == "knockout":
        return (f"Attention knockout: in block l, the readers of thought k's key are blocked (pre-softmax score → −inf); here the readers "
                f"are {READERS.get(data.readers(), data.readers())}. Grid L × K, applied to the unpatched "
                f"{' and '.join(data.groups('knockout'))} run{'s' if len(data.groups('knockout')) > 1 else ''}; the effect is measured against the run "
                "it is applied to (no source run: `kl`, the change of `logprob_diff`, `away`). The cache holds every key, so a blocked entry is exactly "
                "one removed from the attention, for every later position in the block.")
    if exp == "trace":
        cfg = data.manifest.get("config", {})
        noised = "its number tokens" if cfg.get("noise_tokens", "numbers") == "numbers" else "every question token"
        return ("Causal tracing (ROME style, needs no pair): the corrupted run is the same question with Gaussian noise (σ = 3 × the std of "
                f"the embedding matrix, seed {cfg.get('seed', 0)}) added to the embeddings of {noised}; each single site (layer l, thought k) is "
                "restored to the clean run's value. Metrics relative to the clean answer.")
    replaced = "replaced by the source run's activation" if data.mode.get("mode", "replace") == "replace" else f"given {receives(data)}"
    return {
        "layer": f"For each layer l, every thought k = 0…K−1 at layer l is {replaced} (one run per layer).",
        "position": f"For each site (layer l, thought k), only that one site is {replaced}. The `input` row "
        "patches the fed thought vector z_k itself (hidden_states[0] at thought k); the output of thought k is the input of thought k+1.",
        "iterative": "For each layer l: iteration 0 patches (l, 0) with the source activation and records the patched run's own "
        "activation a₁ at (l, 1); iteration i ≥ 1 patches only (l, i) with aᵢ from iteration i−1 and records aᵢ₊₁. "
        "Iteration 0 equals Exp 1 at (l, 0).",
    }[exp]


def sites_row(data: RunData, exp: str) -> str:
    model = data.manifest.get("model", {})
    out = []
    for v in data.views(exp):
        locs = v.locs(exp)
        if v.head_site:
            where = f"{len({l for l, _ in locs})} blocks × {len({h for _, h in locs})} heads ({model.get('num_heads', '?')} heads, {model.get('num_kv_heads', '?')} key/value heads)"
        else:
            where = "rows " + ", ".join(lname(l) for l in locs)
        out.append(f"`{v.site}` — {SITE_WORDS.get(v.site, v.site)}; {where}")
    return "; ".join(out)


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
    rows = [
        ["model checkpoint", f"`{m.get('checkpoint', '?')}` (sha256 {str(m.get('sha256', '?'))[:16]}…)"],
        ["base (config + tokenizer)", f"`{m.get('base', cfg.get('base'))}`"],
        ["family / dtype", f"{m.get('family', '?')} / {m.get('dtype', cfg.get('dtype', '?'))}"],
        ["layers L (+ input row)", f"{L} (+ input); patched: {', '.join(lname(l) for l in data.layers)}"]
        if exp != "knockout" else ["layers L", f"{L}; knocked out in blocks {', '.join(lname(l) for l in data.layers if l != 'input')}"],
        ["thoughts K", f"{data.num_thoughts}; patched: {', '.join(str(k) for k in data.thoughts)}"],
        ["hidden size", str(m.get("hidden_size", "?"))],
        ["answer template", f"`{m.get('answer_template', '?')}`"],
    ]
    if exp == "trace":
        rows.append(["questions", f"{data.n_pairs(exp)}, the clean questions of `{pairs.get('path', cfg.get('pairs'))}` (sha256 {str(pairs.get('sha256', '?'))[:16]}…)"])
        noised = "the number tokens'" if cfg.get("noise_tokens", "numbers") == "numbers" else "every question token's"
        rows.append(["noise", f"on {noised} embeddings, σ = 3 × std(embedding matrix), seed {cfg.get('seed', 0)}"])
    else:
        rows.append(["pairs", f"{data.n_pairs(exp)} from `{pairs.get('path', cfg.get('pairs'))}` (sha256 {str(pairs.get('sha256', '?'))[:16]}…)"])
    if exp == "knockout":
        rows.append(["readers blocked", f"{data.readers()}: {READERS.get(data.readers(), '?')}"])
        rows.append(["applied to", ", ".join(f"the unpatched {r} run" for r in data.groups("knockout"))])
    else:
        rows.append(["sites", sites_row(data, exp)])
        if exp != "trace":
            rows.append(["direction", direction])
        mode = data.mode.get("mode", "replace")
        rows.append(["mode", f"{mode}: a patched site gets {receives(data)}"])
    rows += [
        ["engine / max new tokens / stop", f"{cfg.get('engine', '?')} / {cfg.get('max_new_tokens', '?')} / {cfg.get('stop', '?')}"],
        ["versions", ", ".join(f"{k} {v}" for k, v in mf.get("versions", {}).items())],
    ]
    return f"## Methodology\n\n{what_it_does(data, exp)}\n\n" + table(["", ""], rows) + "\n" + metric_definitions(data, exp)


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
    trace = "trace" in data.manifest.get("experiments", data.experiments)
    labels = (
        ("baseline_accuracy_clean", "Accuracy, clean questions"),
        ("baseline_accuracy_corrupted", "Accuracy, noised questions" if trace else "Accuracy, corrupted questions"),
        ("accuracy_thoughts_zeroed", "Accuracy, every fed thought zeroed"),
        ("unpatched_answers_agree", "Questions whose noised run already gives the clean answer (flip-back floor)" if trace else "Pairs already answering alike (flip-rate floor)"),
    )
    for name, label_ in labels:
        c = _check(data, name)
        if c is not None:
            out.append(f"* {label_}: **{pct(c['value'])}**{rate_interval(c)} — {c.get('detail', '')}")
    return out or ["* Baseline accuracy: not recorded (no checks.json)."]


def _cell_namer(data: RunData, exp: str):
    cols = [c for c in data.shown_columns(exp) if c not in ("site", "run")]
    if cols == ["layer"]:
        return lambda r: f"layer {lname(r['layer'])}"
    return lambda r: "(" + ", ".join(lname(r[k]) if k == "layer" else str(r.get(k)) for k in cols) + ")"


def _pair_effect(data: RunData, exp: str):
    """(column title, per-row effect towards the experiment's aim, absolute?) for the error analysis."""
    if exp == "knockout":
        return "largest Δ logprob_diff (either sign)", lambda r: r["logprob_diff"] - r["logprob_diff_receiving"], True
    if exp == "trace":
        return "best Δ log P(clean)", lambda r: r["logprob_clean"] - r["logprob_clean_receiving"], False
    return "best Δ logprob_diff", lambda r: data.sign * (r["logprob_diff"] - r["logprob_diff_receiving"]), False


def error_part(data: RunData, exp: str) -> str:
    """One grid's error analysis: which pairs move, where, and each pair's answers."""
    by_pair = data.pair_rows(exp)
    pairs = {p["pair_id"]: p for p in data.pairs}
    rec, src = data.roles_of(exp)
    cell_name = _cell_namer(data, exp)
    mark = marked(exp)
    unit = "question" if exp == "trace" else "pair"
    effect_name, effect, absolute = _pair_effect(data, exp)
    lines, flipped, still, table_rows = [], [], [], []
    for pid in [p for p in data.pair_ids if p in by_pair]:
        rows = by_pair[pid]
        p = pairs.get(pid, {})
        gold_c, gold_r = p.get("clean", {}).get("answer"), p.get("corrupted", {}).get("answer")
        rec_ans = next((r["answer"] for r in rows if not r.get("away")), None)
        src_ans = next((r["answer"] for r in rows if r.get("flip")), None)
        nflip = sum(bool(r.get(mark)) for r in rows)
        naway = sum(bool(r.get("away")) for r in rows)
        best = max(rows, key=lambda r: -math.inf if math.isnan(r["kl"]) else r["kl"])
        d = [effect(r) for r in rows if not math.isnan(effect(r))]
        top = (max(d, key=abs) if absolute else max(d)) if d else math.nan
        if nflip:
            flipped.append((pid, nflip, [cell_name(r) for r in sorted(rows, key=lambda r: -r["kl"]) if r.get(mark)][:5]))
        if naway == 0:
            still.append(pid)
        answers = [num(gold_c)] if exp == "trace" else [num(gold_c), num(gold_r)]
        answers.append(num(rec_ans) if rec_ans is not None else "—")
        if src is not None:
            answers.append(num(src_ans) if src_ans is not None else "—")
        moved = [] if exp == "knockout" else [f"{nflip}/{len(rows)}"]
        table_rows.append([pid, *answers, *moved, f"{naway}/{len(rows)}", f"{num(best['kl'])} at {cell_name(best)}", num(top)])
    n = len(table_rows)
    if exp == "knockout":
        lines.append(f"Pairs whose greedy answer **moves away from the unpatched {rec} run's** at one cell or more: **{len(flipped)} of {n}**.")
    else:
        back = "flips back to the clean answer" if exp == "trace" else f"flips to the {src} answer"
        lines.append(f"{unit.capitalize()}s whose greedy answer **{back}** in at least one cell: **{len(flipped)} of {n}**.")
    lines.append("")
    if flipped:
        what = "cells that move it" if exp == "knockout" else "cells that flip"
        lines.append(table([unit, what, f"{'moving' if exp == 'knockout' else 'flipping'} cells (strongest KL first, ≤ 5)"], [[pid, k, ", ".join(c)] for pid, k, c in flipped]))
    lines.append(f"{unit.capitalize()}s that **never move** (no cell changes the {rec} run's greedy answer): **{len(still)} of {n}**" + (f" — {unit}s {', '.join(map(str, still))}." if still else "."))
    lines.append("")
    if exp == "knockout":
        lines.append(f"Per pair (answers: gold from pairs.json; the unpatched {rec} run's answer is read off cells where the answer did not move, "
                     "— when no cell shows it; largest |Δ| = the largest change of logprob_diff against the unpatched run, either sign):\n")
        header = ["pair", "gold clean", "gold corrupted", f"{rec} run", "away cells", "max KL (cell)", effect_name]
    elif exp == "trace":
        lines.append("Per question (answers: gold from the question file; the noised run's answer is read off cells where the answer did not move, "
                     "the clean run's off cells that flipped back, — when no cell shows it; best Δ = largest gain of log P(clean answer)):\n")
        header = ["question", "gold", "noised run", "clean run", "flip-back cells", "away cells", "max KL (cell)", effect_name]
    else:
        lines.append(
            f"Per pair (answers: gold from pairs.json; the {rec} run's answer is read off cells where the answer did not move, "
            f"the {src} run's off cells that flipped, — when no cell shows it; best Δ = largest move of logprob_diff towards the {src} run):\n"
        )
        header = ["pair", "gold clean", "gold corrupted", f"{rec} run", f"{src} run", "flip cells", "away cells", "max KL (cell)", effect_name]
    lines.append(table(header, table_rows))
    return "\n".join(lines) + "\n"


def error_analysis(data: RunData, exp: str) -> str:
    lead = "Baseline (DESIGN check 8):\n\n" + "\n".join(baseline_lines(data)) + "\n"
    return per_grid(data, exp, "## Error analysis", lambda v, h: error_part(v, exp), lead=lead)


# ---- ranking -------------------------------------------------------------------------------
RANK_ABS = {"delta_logprob_diff"}  # a knockout's effect either way: largest |Δ| first


def ranked(data: RunData, exp: str, metric: str, k: int = 5) -> list[tuple[tuple, float, float, float, float]]:
    """Top cells by a metric, (key, mean, ci_low, ci_high, n): largest effect first (signed
    metrics towards the source run; a knockout's Δ by its size)."""
    out = []
    for key in data.cells(exp):
        m, lo, hi = data.interval(exp, key, metric)
        if math.isfinite(m):
            out.append((key, m, lo, hi, data.stat(exp, key, metric, "n")))
    sgn = data.sign if metric in ("answer_logit_diff", "logprob_diff") and exp != "knockout" else 1  # recovered is already source-oriented
    out.sort(key=(lambda t: -abs(t[1])) if metric in RANK_ABS else (lambda t: -sgn * t[1]))  # stable: ties keep the cell order
    return out[:k]


def _order(data: RunData, exp: str) -> str:
    if exp == "knockout":
        return "highest first; Δ log-prob diff by its size, either sign"
    if exp == "trace":
        return "highest first"
    return "highest first" if data.sign > 0 else "highest first; logit diff and log-prob diff lowest first (most towards the corrupted answer)"


def top5_part(data: RunData, exp: str) -> str:
    head = [c for c in data.shown_columns(exp) if c not in ("site", "run")]
    parts = []
    for metric in metrics_of(exp):
        rows = [[i + 1, *[lname(x) for c, x in data.shown(exp, key) if c in head], ci(m, lo, hi), num(n)] for i, (key, m, lo, hi, n) in enumerate(ranked(data, exp, metric))]
        parts.append(f"**{label(metric, exp)}**\n\n" + table(["rank", *head, f"mean [{ci_label(data, exp, metric)}]", "n"], rows))
    return "\n".join(parts)


def top5_section(data: RunData, exp: str) -> str:
    heads = {tuple(c for c in v.shown_columns(exp) if c not in ("site", "run")) for v in data.views(exp)}
    head = list(heads.pop()) if len(heads) == 1 else None
    what = "cells" if head is None else "layers" if head == ["layer"] else "(" + ", ".join(head) + ") cells"
    return per_grid(data, exp, f"## Top-5 {what} by each main metric", lambda v, h: top5_part(v, exp), lead=f"Mean over {'questions' if exp == 'trace' else 'pairs'} ({_order(data, exp)}).\n")


# ---- results tables ------------------------------------------------------------------------
TABLE_METRICS = MAIN_METRICS + ("kl_to_clean", "away")


def ci_label(data: RunData, exp: str, metric: str) -> str:
    m = data.ci_method(exp, metric)
    return f"95 % CI, {SHORT_METHODS.get(m, m)}" if m else "no interval"


def grid_table(data: RunData, exp: str, metric: str, cols: list, col_name: str, step: str) -> str:
    locs = data.locs(exp)
    head = isinstance(locs[0], tuple) if locs else False
    header = (["layer", "head"] if head else ["layer"]) + [f"{col_name} {c}" for c in cols]
    rows = []
    for l in locs:
        keys = [data.key(exp, loc=l, **{step: c}) for c in cols]
        rows.append(([lname(l[0]), l[1]] if head else [lname(l)]) + [ci(*data.interval(exp, k, metric)) for k in keys])
    return table(header, rows)


def summed_table(data: RunData, exp: str, metric: str, step: str) -> str:
    """A head grid's layer × head table of Σ over `step` of the per-cell means."""
    locs = data.locs(exp)
    layers = sorted({l for l, _ in locs}, key=layer_key)
    heads = sorted({h for _, h in locs})
    total: dict = {}
    for key, c in data.cells(exp).items():
        cell = dict(zip(CELL_KEYS[exp], key))
        v = data.stat(exp, key, metric)
        if math.isfinite(v):
            total[(cell["layer"], cell["head"])] = total.get((cell["layer"], cell["head"]), 0.0) + v
    return table(["layer"] + [f"head {h}" for h in heads], [[lname(l)] + [num(total.get((l, h), math.nan)) for h in heads] for l in layers])


def results_part(data: RunData, exp: str, h: str) -> str:
    parts = []
    if exp == "layer" and not data.head_site:
        keys = [data.key("layer", loc=l) for l in data.locs("layer")]
        rows = [[lname(k[CELL_KEYS["layer"].index("layer")])] + [ci(*data.interval("layer", k, m)) for m in TABLE_METRICS] for k in keys]
        parts.append(table(["layer"] + [f"{SHORT[m]} ({SHORT_METHODS.get(data.ci_method('layer', m), '—')})" for m in TABLE_METRICS], rows))
        return "\n".join(parts)
    step = {"iterative": "iteration", "layer": None}.get(exp, "thought")
    cols, cname = (data.thoughts, "thought") if step == "thought" else (data.iterations, "iter") if step else (["all"], "thoughts")
    metrics = table_metrics(exp) + (ACTIVATION_METRICS if exp == "iterative" else ())
    many = len(data.locs(exp)) > MAX_TABLE_ROWS
    for metric in metrics:
        if many:
            body = f"Σ over {step}s of the per-cell means (per-cell means and intervals: summary.json, the interactive page).\n\n" + summed_table(data, exp, metric, step)
        elif step:
            body = f"{ci_label(data, exp, metric)}.\n\n" + grid_table(data, exp, metric, cols, cname, step)
        else:  # layer patching on the head site: one column
            body = f"{ci_label(data, exp, metric)}.\n\n" + table(["layer", "head", "all thoughts"], [[lname(l[0]), l[1], ci(*data.interval(exp, data.key(exp, loc=l), metric))] for l in data.locs(exp)])
        parts.append(f"{h} {label(metric, exp)}\n\n{body}")
    return "\n".join(parts)


def results_section(data: RunData, exp: str) -> str:
    unit = "questions" if exp == "trace" else "pairs"
    ratio = {"trace": "; `restored` is the ratio of means.", "knockout": "."}.get(exp, "; `recovered` is the ratio of means.")
    lead = f"Mean [95 % CI] over {unit} (n = {data.n_pairs(exp)}){ratio} Each table names its interval's method (Methodology lists them).\n"
    return per_grid(data, exp, "## Results", lambda v, h: results_part(v, exp, h), lead=lead)


def iterative_vs_parallel(data: RunData) -> tuple[list[list], str]:
    """Per layer: Exp 1 at thought 0 (= iteration 0), Exp 1 at the last thought, Exp 2 at the
    final iteration, layer patching — for kl, recovered and flip."""
    last = max(data.iterations) if data.iterations else None
    rows = []
    for l in data.locs("iterative"):
        row = [lname(l)]  # a head grid's row: "layer.h<head>"
        for metric in ("kl", "recovered", "flip"):
            e1_0 = data.stat("position", data.key("position", loc=l, thought=0), metric) if "position" in data.rows else math.nan
            e1_last = data.stat("position", data.key("position", loc=l, thought=last), metric) if "position" in data.rows and last is not None else math.nan
            e2 = data.stat("iterative", data.key("iterative", loc=l, iteration=last), metric) if "iterative" in data.rows and last is not None else math.nan
            lp = data.stat("layer", data.key("layer", loc=l), metric) if "layer" in data.rows else math.nan
            row += [num(e1_0), num(e1_last), num(e2), num(lp)]
        rows.append(row)
    return rows, f"Exp 1 at thought 0 (= Exp 2 iteration 0) / Exp 1 at thought {last} / Exp 2 at its final iteration {last} / layer patching (all thoughts)"


def iterative_vs_parallel_section(data: RunData) -> str:
    parts = []
    for v in data.views("iterative"):
        title = "### Iterative vs parallel" + (f" — site `{v.site}`" if len(data.groups("iterative")) > 1 else "")
        if len(v.locs("iterative")) > MAX_TABLE_ROWS:
            parts.append(f"{title}\n\nNot tabulated for {len(v.locs('iterative'))} (layer, head) rows; compare the layer × head figures instead.\n")
            continue
        rows, legend = iterative_vs_parallel(v)
        header = ["layer"] + [f"{SHORT[m]}: {w}" for m in ("kl", "recovered", "flip") for w in ("E1 k=0", "E1 k=last", "E2 last", "layer")]
        parts.append(f"{title}\n\nColumns: " + legend + ".\n\n" + table(header, rows))
    return "\n".join(parts)


# ---- figures section -----------------------------------------------------------------------
FIG_CAPTIONS = {
    "position_heatmaps.png": "All main metrics side by side (mean over pairs).",
    "layer_curve.png": "Layer patching: each metric per layer, mean with its 95 % CI band (method in each panel's title).",
    "iterative_trajectories.png": "Exp 2: each metric per iteration, one line per layer, 95 % CI bands (method in each panel's title; KL on a log axis when it spans more than two decades).",
    "iterative_activations.png": "Exp 2: the chained activation aᵢ — cosine to the clean and corrupted runs and its norm per iteration.",
    "comparison_kl.png": "Exp 1 vs Exp 2 vs layer patching, KL, one panel per layer.",
    "comparison_logprob_diff.png": "Exp 1 vs Exp 2 vs layer patching, log-prob diff, one panel per layer (dotted: unpatched run, dashed: source run).",
}
GROUPS = "input|attn|mlp|head|kv|clean|corrupted"
FIG_NAME = re.compile(rf"(?P<exp>position|trace|knockout|iterative|layer|comparison)(?:_(?P<group>{GROUPS}))?_(?P<kind>.+)\.png")
PER_PAIR_WHAT = {
    "kl": "KL(patched ‖ receiving)", "delta_logprob_diff": "change of logprob_diff against the unpatched run",
    "delta_logprob_clean": "change of log P(clean answer) against the noised run",
}
PER_PAIR_KL = {"knockout": "KL(knocked out ‖ unpatched)", "trace": "KL(restored ‖ noised)"}


def caption(p: Path) -> str:
    m = FIG_NAME.fullmatch(p.name)
    if not m:
        return FIG_CAPTIONS.get(p.name, p.stem)
    exp, group, kind = m.group("exp"), m.group("group"), m.group("kind")
    plain = f"{exp}_{kind}.png"
    tag = f" [{group}]" if group else ""
    if exp == "knockout":
        tag = f" (the {group} run)"
    name = EXP_SHORT.get(exp, "")
    if group == "head":
        step = "iteration" if exp == "iterative" else "thought"
        mh = re.fullmatch(r"heatmap_(\w+)", kind)
        if mh:
            metric = mh.group(1)
            summed = " and, right, the thought-summed grid (Σ over thoughts of the per-cell means, its own colour scale)" if exp in ("position", "trace") else ""
            return f"{name} [head]: {label(metric, exp)} as a layer × head grid per {step} on one colour scale{summed}."
        if kind == "heatmaps":
            if exp == "layer":
                return "Layer patching [head]: every thought patched at one (layer, head); one layer × head grid per metric."
            return f"{name} [head]: the thought-summed layer × head grid of every main metric (Σ over thoughts of the per-cell means; each its own scale)."
    mh = re.fullmatch(r"heatmap_(\w+)", kind)
    if mh:
        return f"{name} heatmap{tag}: {label(mh.group(1), exp)}, mean over {'questions' if exp == 'trace' else 'pairs'}."
    mp = re.fullmatch(r"per_pair_(\w+)_(\d+)", kind)
    if mp:
        what = PER_PAIR_KL.get(exp, PER_PAIR_WHAT["kl"]) if mp.group(1) == "kl" else PER_PAIR_WHAT.get(mp.group(1), mp.group(1))
        dots = {"knockout": "the answer moved away from the unpatched run's", "trace": "the answer flipped back to the clean answer"}.get(exp, "the answer flipped")
        who = "Per question" if exp == "trace" else "Per pair"
        return f"{who}{tag}, sheet {mp.group(2)}: {what}; one colour scale across the sheets; dots = {dots}."
    if kind == "heatmaps" and exp in ("trace", "knockout"):
        return f"{name}{tag}: every main metric side by side (mean over {'questions' if exp == 'trace' else 'pairs'})."
    base = FIG_CAPTIONS.get(plain, p.stem)
    return base if not group else base.rstrip(".") + f"{tag}."


def figures_part(figs: list[Path]) -> str:
    png = [p for p in figs if p.suffix == ".png"]
    pages = [p for p in figs if p.suffix == ".html"]
    parts = [f"{caption(p)}\n\n![{p.stem}](../figures/{p.name})\n" for p in png]
    if pages:
        parts.append("Interactive (offline; hover for mean, interval and n): " + ", ".join(f"[{p.name}](../figures/{p.name})" for p in pages) + "\n")
    return "\n".join(parts)


def figures_section(data: RunData, exp: str, figs: dict[str, list[Path]]) -> str:
    def part(v: RunData, h: str) -> str:
        got = list(figs.get(f"{exp}{v.tag}", []))
        pages = [p for p in got if p.suffix == ".html"]
        got = [p for p in got if p.suffix == ".png"] + [p for p in figs.get(f"comparison{v.tag}", []) if exp in ("position", "iterative", "layer")] + pages
        return figures_part(got)

    return per_grid(data, exp, "## Figures", part)


def how_to_read(data: RunData, exp: str) -> str:
    sites = data.groups(exp)
    if exp == "knockout":
        return ("Rows are blocks l, columns the thought k whose key its readers stop attending to in that block. A cell that moves the answer "
                "marks where thought k is read at layer l; a column that never moves is a thought nobody reads there.")
    if exp == "trace":
        return ("Rows are layers (`input` = the fed thought vector, at the bottom), columns thoughts; a cell is how much of the clean answer comes back "
                "when that one site gets the clean value in the noised run. A faithful loop shows the `input` row as the layer rows shifted one "
                "thought to the right.")
    text = HOW_TO_READ[exp]
    if sites != ["resid"]:
        text += (" Sites other than `resid` have no `input` row (the fed thought is the `input`/`resid` grid's); the head site's rows are "
                 "(layer, head) and its figures are layer × head grids per thought.")
    if data.mode.get("mode", "replace") != "replace":
        text += f" Mode `{data.mode['mode']}`: a patched site gets {receives(data)}, so `flip` and `recovered` still compare with the {data.source_role} run."
    return text


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


def _what_run(data: RunData, exp: str) -> str:
    n = data.n_pairs(exp)
    if exp == "trace":
        return f"{n} questions · causal tracing"
    if exp == "knockout":
        return f"{n} pairs · readers blocked: {data.readers()}"
    return f"{n} pairs · {data.direction}"


def report(data: RunData, exp: str, figs: dict[str, list[Path]]) -> str:
    head = (
        f"# {TITLES[exp]}\n\n"
        + warning_lines(data)
        + f"Run `{data.run_dir.name}` · model `{data.model_name}` · {_what_run(data, exp)} · "
        f"L = {data.manifest.get('model', {}).get('num_layers', '?')}, K = {data.num_thoughts}\n\n"
        f"Pairs covered: {data.pair_set(exp)}.\n\n"
        f"How to read it: {how_to_read(data, exp)}\n\n"
        + "".join("Other reports: " + ", ".join(f"[{TITLES[e]}]({REPORT_FILES[e]})" for e in others) + "\n" for others in [[e for e in data.experiments if e != exp]] if others)
    )
    body = [head, methodology(data, exp), results_section(data, exp)]
    if exp == "iterative":
        body.append(iterative_vs_parallel_section(data))
    body += [figures_section(data, exp, figs), top5_section(data, exp), checklist(data), error_analysis(data, exp)]
    return "\n".join(b.rstrip("\n") + "\n" for b in body)


# ---- journal -------------------------------------------------------------------------------
def cell_words(exp: str, key: tuple, bare: bool = False, data: RunData | None = None) -> str:
    """"layer 2, thought 3" for a cell key (the bare value for a one-column key)."""
    parts = data.shown(exp, key) if data is not None else [(c, v) for c, v in zip(CELL_KEYS[exp], key) if v is not None]
    parts = [(c, v) for c, v in parts if c not in ("site", "run")]
    if bare and len(parts) == 1:
        return lname(parts[0][1])
    return ", ".join(f"{c} {lname(v)}" for c, v in parts)


def journal_lines(data: RunData, exp: str) -> list[str]:
    """One grid's findings (a view of one site or knockout run)."""
    lines, n = [], data.n_pairs(exp)
    where = data.grid_tag(exp)  # none for the resid grid under replace (the journal's lines before sites existed)
    if exp == "position":
        for metric in ("kl", "recovered"):
            top = ranked(data, "position", metric, 3)
            lines.append(f"* Exp 1{where} top cells by {SHORT[metric]}: " + "; ".join(f"({cell_words('position', k, data=data)}) {num(m)}" for k, m, *_ in top) + ".")
        flips = {r["pair_id"] for r in data.rows["position"] if r.get("flip")}
        moved = {r["pair_id"] for r in data.rows["position"] if r.get("away")}
        lines.append(f"* Exp 1{where} answers: {len(flips)} of {n} pairs flip to the {data.source_role} answer at some cell; {n - len(moved)} never move.")
    if exp == "trace":
        for metric in ("restored", "kl"):
            top = ranked(data, "trace", metric, 3)
            lines.append(f"* Causal tracing{where} top cells by {short(metric, exp)}: " + "; ".join(f"({cell_words('trace', k, data=data)}) {num(m)}" for k, m, *_ in top) + ".")
        flips = {r["pair_id"] for r in data.rows["trace"] if r.get("flip")}
        lines.append(f"* Causal tracing{where} answers: {len(flips)} of {n} questions flip back to the clean answer at some cell.")
    if exp == "knockout":
        for metric in ("kl", "delta_logprob_diff"):
            top = ranked(data, "knockout", metric, 3)
            lines.append(f"* Knockout{where} top cells by {short(metric, exp)}: " + "; ".join(f"({cell_words('knockout', k, data=data)}) {num(m)}" for k, m, *_ in top) + ".")
        moved = {r["pair_id"] for r in data.rows["knockout"] if r.get("away")}
        lines.append(f"* Knockout{where} answers: {len(moved)} of {n} pairs' answers move at some cell.")
    if exp == "layer":
        top = ranked(data, "layer", "kl", 1) + ranked(data, "layer", "recovered", 1)
        if top:
            lines.append(f"* Layer patching{where}: strongest layer by KL {cell_words('layer', top[0][0], bare=True, data=data)} ({num(top[0][1])})" + (f", by recovered {cell_words('layer', top[1][0], bare=True, data=data)} ({num(top[1][1])})." if len(top) > 1 else "."))
    if exp == "iterative" and "position" in data.rows and data.iterations and not data.head_site:
        last = max(data.iterations)
        ratios = []
        locs = data.locs("iterative")
        for l in locs:
            e1, e2 = data.stat("position", data.key("position", loc=l, thought=last), "kl"), data.stat("iterative", data.key("iterative", loc=l, iteration=last), "kl")
            if math.isfinite(e1) and math.isfinite(e2) and e1 > 0:
                ratios.append(e2 / e1)
        e2_0 = [data.stat("iterative", data.key("iterative", loc=l, iteration=0), "kl") for l in locs]
        e2_l = [data.stat("iterative", data.key("iterative", loc=l, iteration=last), "kl") for l in locs]
        keep = [b / a for a, b in zip(e2_0, e2_l) if math.isfinite(a) and math.isfinite(b) and a > 0]
        if ratios:
            med = sorted(ratios)[len(ratios) // 2]
            lines.append(
                f"* Iterative vs parallel{where}: at thought {last}, Exp 2's chained activation gives a median {num(med)}× the KL of patching the "
                f"{data.source_role} activation there directly (Exp 1), over {len(ratios)} layers"
                + (f"; along the chain KL goes from iteration 0 to {last} by a median factor {num(sorted(keep)[len(keep) // 2])}." if keep else ".")
            )
    return lines


JOURNAL_ORDER = ("position", "trace", "knockout", "layer", "iterative")


def journal_entry(data: RunData) -> str:
    mf = data.manifest
    date = str(mf.get("finished") or mf.get("started") or "undated")[:10]
    first = data.experiments[0]
    n = data.n_pairs(first)
    what = f"{n} questions · causal tracing" if first == "trace" else f"{n} pairs · {data.direction}"
    lines = [f"## {date} · {data.run_dir.name} · {data.model_name} · {what}", f"<!-- entry: {data.run_id} -->", ""]
    lines += [f"* **Warning — {w}.**" for w in data.warnings]
    lines.append(f"* Pairs covered: {data.pair_set(first)}.")
    if mode_tag(data.mode) and first != "knockout":
        lines.append(f"* Mode: {mode_tag(data.mode)} — a patched site gets {receives(data)}.")
    lines += baseline_lines(data)
    if data.checks:
        lines.append(f"* Checks: {verdict_counts(data.checks)}.")
    for exp in [e for e in JOURNAL_ORDER if e in data.rows]:
        for v in data.views(exp):
            lines += journal_lines(v, exp)
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
EXP_DESC = {
    "layer": "layer patching", "position": "Exp 1 position-wise patching", "iterative": "Exp 2 iterative patching",
    "knockout": "attention knockout", "trace": "causal tracing",
}
PAGE_NAME = re.compile(rf"(?P<exp>position|trace|knockout|iterative|layer)(?:_(?P<group>{GROUPS}))?\.html")
PAGES = {
    "position": "interactive Exp 1 heatmaps (every metric; slider over mean and each pair)",
    "trace": "interactive causal-tracing heatmaps (every metric; slider over mean and each question)",
    "knockout": "interactive knockout heatmaps (every metric; slider over mean and each pair)",
    "iterative": "interactive Exp 2 trajectories and Exp 1 vs Exp 2 vs layer comparison",
    "layer": "interactive layer-patching curves",
}


def describe(rel: str) -> str:
    name = Path(rel).name
    fixed = {
        "manifest.json": "run configuration, model and pairs hashes, layers and thoughts, sites and mode, versions, timings, device",
        "pairs.json": "the clean/corrupted pairs this run used (our format; causal tracing: each question on both sides)",
        "checks.json": "validation checks: name, value, verdict (pass/warn/fail/info), detail",
        "dropped_pairs.json": "pairs left out: equal answers (never run), answered wrong (with the model's answers; not patched under --keep correct, not in summary_correct.json under --keep all)",
        "clean_activations.safetensors": "clean runs' thought activations per pair (cache, with metadata checked before reuse)",
        "corrupted_activations.safetensors": "corrupted runs' thought activations per pair (cache, with metadata checked before reuse; causal tracing: the noised runs)",
        "site_stats.safetensors": "the mode's pair-set statistics per site (mean of the receiving runs, spread, mean difference), their n in the metadata",
        JOURNAL: "research journal: one dated entry per run (findings, top cells, iterative vs parallel)",
        "plotly.min.js": "plotly.js, the one copy the interactive pages beside it load (no network)",
    }
    parts = rel.split("/")
    if parts[0] in EXP_DESC and name == "results.jsonl":
        return f"{EXP_DESC[parts[0]]}: one row per pair × cell with every metric (tidy)"
    if parts[0] in EXP_DESC and name == "summary.json":
        ratio = {"trace": "; restored as ratio of means", "knockout": ""}.get(parts[0], "; recovered as ratio of means")
        return f"{EXP_DESC[parts[0]]}: per cell mean, std, n and 95 % interval (ci_low, ci_high, ci_method) of every metric{ratio}"
    if parts[0] in EXP_DESC and name == "summary_correct.json":
        return f"{EXP_DESC[parts[0]]}: the same summary over the pairs answered right on both sides only"
    if parts[0] == "reports":
        for e, f in REPORT_FILES.items():
            if name == f:
                return f"report: {TITLES[e]} (methodology, results, figures, top-5, checklist, error analysis)"
    if parts[0] == "figures" and name.endswith(".png"):
        return "figure: " + caption(Path(name))
    m = PAGE_NAME.fullmatch(name) if parts[0] == "figures" else None
    if m:
        group = m.group("group")
        head = " (as layer.head × iteration heatmaps)" if group == "head" and m.group("exp") == "iterative" else ""
        where = f" [{group}]" if group else ""
        return f"{PAGES[m.group('exp')]}{where}{head}; offline, loads plotly.min.js"
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
