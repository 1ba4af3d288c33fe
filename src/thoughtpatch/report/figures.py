"""Figures of a run: matplotlib PNGs (paper quality, byte-reproducible) and one offline
interactive plotly page per experiment, the pages sharing one `plotly.min.js` beside them.

Every function takes a `RunData` (JSON read back from the run directory) and the figures
directory, and returns the paths it wrote. PNGs are saved without the Software tag and with
fixed settings, so rebuilding from the same results gives the same bytes. Every interval
drawn is the one in summary.json (inside its metric's range; intervals.py) and names its
method.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Callable

import matplotlib as mpl
import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from thoughtpatch.data.schema import atomic_path, atomic_write_text
from thoughtpatch.report.intervals import RATIO_METRICS, SHORT_METHODS, metric_range
from thoughtpatch.report.results import CELL_KEYS
from thoughtpatch.report.rundata import (
    ACTIVATION_METRICS, LABELS, MAIN_METRICS, READERS, SHORT, SIGNED, RunData, label, layer_key, loc_key, loc_name, loc_of, marked, metrics_of, short, table_metrics,
)

DPI = 200
RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "figure.titlesize": 11,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "savefig.facecolor": "white",
    "path.simplify": False,
}
RATE = {"flip", "away"}
SEQ_CMAP, SIGNED_CMAP, RATE_CMAP = "viridis", "RdBu_r", "Purples"
EXP_COLORS = {"position": "#1f77b4", "iterative": "#d62728", "layer": "#2ca02c"}
EXP_TITLE = {
    "position": "Exp 1 position-wise patching", "trace": "Causal tracing", "knockout": "Attention knockout",
    "iterative": "Exp 2 iterative patching", "layer": "Layer patching",
}
EXP_SHORT = {"position": "Exp 1", "trace": "Causal tracing", "knockout": "Knockout", "iterative": "Exp 2", "layer": "Layer patching"}
STEP = {"position": "thought", "trace": "thought", "knockout": "thought", "iterative": "iteration"}  # a grid's columns
GRID_EXPS = ("position", "trace", "knockout")  # location × thought heatmaps


# ---- helpers -----------------------------------------------------------------------------
def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    return path


def _ylabels(layers: list) -> list[str]:
    return [loc_name(l) for l in layers]


def _steps(data: RunData, exp: str) -> list:
    """A grid's columns: thoughts (Exp 1, trace, knockout), iterations (Exp 2), or one."""
    if exp == "iterative":
        return data.iterations
    return data.thoughts if exp in STEP else ["all"]


def _scale_exp(values: np.ndarray) -> int:
    """Power of ten to factor out of tiny or huge values (0 = none)."""
    finite = np.abs(values[np.isfinite(values)])
    if finite.size == 0 or finite.max() == 0:
        return 0
    e = int(math.floor(math.log10(finite.max())))
    return e if e <= -3 or e >= 4 else 0


def _fmt_for(values: np.ndarray) -> str:
    finite = np.abs(values[np.isfinite(values)])
    m = finite.max() if finite.size else 0.0
    return "{:.0f}" if m >= 100 else "{:.1f}" if m >= 10 else "{:.2f}" if m >= 0.1 else "{:.3f}"


def _suffix(e: int) -> str:
    return f" (×10$^{{{e}}}$)" if e else ""


def _norm_cmap(metric: str, values: np.ndarray, rate_max: float = 1.0) -> tuple[Normalize, str]:
    """Rates on [0, rate_max] (a sum of K rates: K), signed metrics symmetric about 0, metrics
    ≥ 0 from 0, others (log P ≤ 0) over their values."""
    finite = values[np.isfinite(values)]
    if metric in RATE:
        return Normalize(0.0, rate_max), RATE_CMAP
    if metric in SIGNED or metric.startswith("delta_"):
        vmax = float(np.abs(finite).max()) if finite.size else 1.0
        vmax = vmax or 1.0
        return Normalize(-vmax, vmax), SIGNED_CMAP
    if metric_range(metric)[0] != 0 and finite.size and finite.min() < 0:
        lo, hi = float(finite.min()), float(finite.max())
        return Normalize(lo, hi if hi > lo else lo + 1.0), SEQ_CMAP
    vmax = float(finite.max()) if finite.size else 1.0
    return Normalize(0.0, vmax if vmax > 0 else 1.0), SEQ_CMAP


def _text_color(rgba) -> str:
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"


def _key(data: RunData, exp: str, loc, step):
    return data.key(exp, loc=loc, **({STEP[exp]: step} if exp in STEP else {}))


def _grid(data: RunData, metric: str, what: str = "mean", exp: str = "position") -> np.ndarray:
    """One grid's location × thought (Exp 2: × iteration) array of one summary number (NaN
    where a cell is missing); `data` is a view of one grid."""
    locs, steps = data.locs(exp), _steps(data, exp)
    M = np.full((len(locs), len(steps)), np.nan)
    for i, l in enumerate(locs):
        for j, k in enumerate(steps):
            M[i, j] = data.stat(exp, _key(data, exp, l, k), metric, what)
    return M


def _head_grids(data: RunData, exp: str, metric: str) -> tuple[list, list, list, np.ndarray]:
    """The head site's grids: (layers, heads, steps, [steps, layers, heads] means)."""
    locs, steps = data.locs(exp), _steps(data, exp)
    layers = sorted({l for l, _ in locs}, key=layer_key)
    heads = sorted({h for _, h in locs})
    G = np.full((len(steps), len(layers), len(heads)), np.nan)
    for (l, h) in locs:
        for s, k in enumerate(steps):
            G[s, layers.index(l), heads.index(h)] = data.stat(exp, _key(data, exp, (l, h), k), metric)
    return layers, heads, steps, G


def ci_name(data: RunData, exp: str, metric: str) -> str:
    """"95 % CI: Wilson" — the interval and its method, for legends, titles and hovers."""
    m = data.ci_method(exp, metric)
    return f"95 % CI: {SHORT_METHODS.get(m, m)}" if m else "no interval"


def log_wanted(metric: str, values) -> bool:
    """KL-type metrics go on a log axis when their positive means span more than two decades
    (Exp 2's chain decays from ~1 to ~1e-8: on a linear axis every later iteration sits on 0)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v) & (v > 0)]
    return metric.startswith("kl") and v.size > 1 and v.max() / v.min() > 100


def _log_axis(ax, values) -> None:
    v = np.asarray(values, float)
    ax.set_yscale("log", nonpositive="clip")
    ax.set_ylim(bottom=v[np.isfinite(v) & (v > 0)].min() / 3)  # interval ends at 0 run off the bottom


def _draw_heatmap(fig: Figure, ax, M: np.ndarray, metric: str, layers: list, thoughts: list, annotate: bool, fontsize: float = 7.5, colorbar: bool = True, norm_cmap=None, scale: int | None = None, exp: str | None = None, fmt: str | None = None, cbar_label: str | None = None):
    e = _scale_exp(M) if scale is None else scale
    S = M / 10.0**e
    norm, cmap_name = norm_cmap or _norm_cmap(metric, S)
    cmap = mpl.colormaps[cmap_name].with_extremes(bad="#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(S), origin="lower", aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_xticks(range(len(thoughts)), [str(k) for k in thoughts])
    ax.set_yticks(range(len(layers)), _ylabels(layers))
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    if annotate:
        fmt = fmt or _fmt_for(S)
        for i in range(S.shape[0]):
            for j in range(S.shape[1]):
                v = S[i, j]
                txt = "n/a" if not np.isfinite(v) else fmt.format(v)
                if txt.lstrip("-").strip("0.") == "" and txt.startswith("-"):
                    txt = txt[1:]
                color = "black" if not np.isfinite(v) else _text_color(cmap(norm(v)))
                ax.text(j, i, txt, ha="center", va="center", fontsize=fontsize, color=color)
    cb = None
    if colorbar:
        cb = fig.colorbar(im, ax=ax, fraction=0.06, pad=0.03)
        cb.set_label((cbar_label or short(metric, exp)) + _suffix(e) + (" (+ = clean)" if metric in ("answer_logit_diff", "logprob_diff") else ""))
        cb.ax.tick_params(labelsize=7)
    return im, e


def _subtitle(data: RunData, exp: str) -> str:
    n = data.n_pairs(exp)
    if exp == "trace":
        cfg = data.manifest.get("config", {})
        noised = "number tokens" if cfg.get("noise_tokens", "numbers") == "numbers" else "question tokens"
        return (f"{data.model_name} · {noised} noised (seed {cfg.get('seed', 0)}) · "
                f"mean over n = {n} question{'s' if n != 1 else ''}")
    how = "" if exp == "knockout" else f" · {data.direction}"
    return f"{data.model_name}{how} · mean over n = {n} pair{'s' if n != 1 else ''}"


def _series(data: RunData, exp: str, keys: list[tuple], metric: str, what=("mean", "ci_low", "ci_high")) -> tuple[np.ndarray, ...]:
    """Means and interval ends (or other summary numbers) of a metric along cells."""
    return tuple(np.array([data.stat(exp, k, metric, w) for k in keys]) for w in what)


def _layer_colors(layers: list) -> list:
    cmap = mpl.colormaps["viridis"]
    n = max(len(layers) - 1, 1)
    return [cmap(0.88 * i / n) for i in range(len(layers))]


def _band(ax, x, m, lo, hi, color, label=None, marker="o", ls="-", alpha=0.15):
    ax.plot(x, m, marker=marker, ms=3.5, lw=1.4, color=color, label=label, ls=ls, zorder=3)
    if np.isfinite(lo).any():
        ax.fill_between(x, lo, hi, color=color, alpha=alpha, lw=0)
        ax.plot(x, lo, color=color, lw=0.4, alpha=0.5, ls=ls)
        ax.plot(x, hi, color=color, lw=0.4, alpha=0.5, ls=ls)


def _ref_lines(ax, data: RunData, exp: str, key: tuple, metric: str) -> None:
    """For log-prob diff: where the unpatched receiving and source runs sit."""
    if metric != "logprob_diff":
        return
    rec = data.stat(exp, key, "logprob_diff_receiving")
    src = data.stat(exp, key, "logprob_diff_source")
    if np.isfinite(rec):
        ax.axhline(rec, color="0.45", ls=":", lw=1, label=f"unpatched {data.receiving_role} run")
    if np.isfinite(src):
        ax.axhline(src, color="0.15", ls="--", lw=1, label=f"{data.source_role} run (source)")


def _refs(data: RunData, metric: str, exp: str = "position") -> str:
    """Where the unpatched runs sit on log-prob diff (trace: log P(clean)), mean over pairs,
    for the heatmap title."""
    if metric not in ("logprob_diff", "logprob_clean") or exp not in data.rows:
        return ""
    rows = data.rows[exp]
    rec_role, src_role = data.roles_of(exp)
    got = [(role, np.nanmean([r[col] for r in rows])) for role, col in ((rec_role, f"{metric}_receiving"), (src_role, f"{metric}_source")) if role and col in rows[0]]
    if not got:
        return ""
    return f"\nunpatched run{'s' if len(got) > 1 else ''}: " + ", ".join(f"{role} {v:.3g}" for role, v in got)


def _zero_line(ax, metric: str) -> None:
    if metric in SIGNED:
        ax.axhline(0, color="0.75", lw=0.8, zorder=0)


# ---- Exp 1, causal tracing, knockout: location × thought heatmaps ---------------------------
XLABEL = {"position": "thought k (the one patched position)", "trace": "thought k (the one restored position)", "knockout": "thought k (whose key is blocked)"}
# The overview sheet of each grid experiment: its main metrics and one more.
OVERVIEW = {"position": MAIN_METRICS + ("kl_to_clean",), "trace": table_metrics("trace"), "knockout": table_metrics("knockout")}


def _row_label(locs: list, short_form: bool = False) -> str:
    if "input" in locs:
        return "layer (input = fed z$_k$)" if short_form else "layer (input = fed thought z$_k$)"
    return "layer"


def grid_heatmaps(data: RunData, exp: str, out: Path) -> list[Path]:
    """One heatmap per main metric and an overview sheet of one grid (a view of one site, or
    of one knockout run): rows are locations, columns thoughts."""
    paths = []
    locs = data.locs(exp)
    L, K = len(locs), len(data.thoughts)
    name, tag = f"{exp}{data.tag}", data.grid_tag(exp)
    with mpl.rc_context(RC):
        for metric in metrics_of(exp):
            M = _grid(data, metric, exp=exp)
            fig = Figure(figsize=(max(6.2, 1.6 + 0.8 * K + 1.0), 1.5 + 0.36 * L), layout="constrained")
            ax = fig.add_subplot()
            _draw_heatmap(fig, ax, M, metric, locs, data.thoughts, annotate=True, fontsize=7.5 if K <= 8 else 6, exp=exp)
            ax.set_xlabel(XLABEL[exp])
            ax.set_ylabel(_row_label(locs))
            ax.set_title(f"{EXP_TITLE[exp]}{tag}: {label(metric, exp)}\n{_subtitle(data, exp)}{_refs(data, metric, exp)}", loc="left")
            paths.append(_save(fig, out / f"{name}_heatmap_{metric}.png"))
        # One overview sheet of every main metric and one more (Exp 1's is the README figure).
        ov = OVERVIEW[exp]
        ncols = math.ceil(len(ov) / 2)
        fig = Figure(figsize=(ncols * (0.6 * K + 1.9), 2 * (0.3 * L + 1.1) + 0.5), layout="constrained")
        axes = fig.subplots(2, ncols, sharey=True).ravel()
        for ax, metric in zip(axes, ov):
            _draw_heatmap(fig, ax, _grid(data, metric, exp=exp), metric, locs, data.thoughts, annotate=L * K <= 130, fontsize=6.5, exp=exp)
            ax.set_title(label(metric, exp), fontsize=9)
        for ax in axes[ncols:]:
            ax.set_xlabel("thought k")
        for ax in axes[::ncols]:
            ax.set_ylabel(_row_label(locs, short_form=True))
        for ax in axes[len(ov):]:
            ax.set_axis_off()
        ref = "logprob_clean" if exp == "trace" else "logprob_diff"
        fig.suptitle(f"{EXP_TITLE[exp]}{tag} — {_subtitle(data, exp)}{_refs(data, ref, exp)}", x=0.0, ha="left")
        paths.append(_save(fig, out / f"{name}_heatmaps.png"))
    return paths


def position_heatmaps(data: RunData, out: Path) -> list[Path]:
    return grid_heatmaps(data, "position", out)


# ---- the head site: layer × head grids ------------------------------------------------------
def _head_panels(fig: Figure, panels: list[tuple[str, np.ndarray, str, float]], layers: list, heads: list, ncols: int, shared: int, exp: str) -> None:
    """Layer × head panels (title, [layers, heads] grid, metric, top of a rate's scale): the
    first `shared` on one colour scale and one colour bar, each other with its own."""
    nrows = math.ceil(len(panels) / ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    annotate = len(layers) * len(heads) <= 64
    panels = [p for p in panels if p is not None]  # None: an empty cell
    allv = np.concatenate([M.ravel() for _, M, _, _ in panels[:shared]] or [np.array([np.nan])])
    e = _scale_exp(allv)
    nc = _norm_cmap(panels[0][2], allv / 10.0**e)
    fmt = _fmt_for(allv / 10.0**e)
    im = None
    for idx, ax in enumerate(axes):
        if idx >= len(panels):
            ax.set_axis_off()
            continue
        title, M, metric, rate_max = panels[idx]
        if idx < shared:
            im, _ = _draw_heatmap(fig, ax, M, metric, layers, heads, annotate=annotate, fontsize=6.5, colorbar=False, norm_cmap=nc, scale=e, exp=exp, fmt=fmt)
        else:
            own = _scale_exp(M)
            _draw_heatmap(fig, ax, M, metric, layers, heads, annotate=annotate, fontsize=6.5, norm_cmap=_norm_cmap(metric, M / 10.0**own, rate_max=rate_max), scale=own, exp=exp)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("layer" if idx % ncols == 0 else "")
        if idx + ncols >= len(panels) or ncols == 1:
            ax.set_xlabel("head")
    if shared and im is not None:
        cb = fig.colorbar(im, ax=list(axes[:shared]), fraction=0.04, pad=0.01, shrink=0.8)
        cb.set_label(short(panels[0][2], exp) + _suffix(e) + (" (same scale in these panels)" if shared > 1 else ""))


# Exp 2 on the head site: a sheet of layer × head grids per iteration for these (every metric
# is on the interactive page).
ITERATIVE_HEAD = ("kl", "recovered", "flip", "cos_clean")


def _head_size(layers: list, heads: list) -> tuple[float, float]:
    return 0.32 * len(heads) + 1.2, 0.26 * len(layers) + 0.9  # one panel, inches


def _thought_sum(G: np.ndarray) -> np.ndarray:
    """Σ over thoughts of the per-cell means ([steps, layers, heads] → [layers, heads])."""
    return np.where(np.isfinite(G).any(axis=0), np.nansum(G, axis=0), np.nan)


def head_sheet(data: RunData, exp: str, metric: str) -> Figure:
    """The head site, one metric: a layer × head grid per thought (Exp 2: per iteration) on one
    colour scale, and beside them (Exp 1, causal tracing) the thought-summed grid on its own."""
    layers, heads, steps, G = _head_grids(data, exp, metric)
    summed = exp in ("position", "trace")
    pw, ph = _head_size(layers, heads)
    word = STEP[exp]
    panels = [(f"{word} {k}", G[s], metric, 1.0) for s, k in enumerate(steps)]
    ncols = math.ceil(len(panels) / math.ceil(len(panels) / 4))
    nrows = math.ceil(len(panels) / ncols)
    with mpl.rc_context(RC):
        fig = Figure(figsize=((ncols + summed) * pw + 1.8 + 0.6 * summed, nrows * ph + 1.4), layout="constrained")
        # the thought-summed grid stands apart, on its own scale
        left, right = fig.subfigures(1, 2, width_ratios=[ncols * pw + 1.2, pw + 0.6]) if summed else (fig, None)
        _head_panels(left, panels, layers, heads, ncols, shared=len(panels), exp=exp)
        if right is not None:
            total = (f"Σ over thoughts: {short(metric, exp)}", _thought_sum(G), metric, float(len(steps)))
            _head_panels(right, [total] + [None] * (nrows - 1), layers, heads, 1, shared=0, exp=exp)
        last = "\nright: Σ over thoughts of the per-cell means (its own colour scale)" if summed else ""
        fig.suptitle(f"{EXP_TITLE[exp]}{data.grid_tag(exp)}: {label(metric, exp)}\nlayer × head, one panel per {word} (one colour scale){last} · {_subtitle(data, exp)}", x=0.0, ha="left")
    return fig


def head_heatmaps(data: RunData, exp: str, out: Path) -> list[Path]:
    """The head site: a `head_sheet` per main metric (Exp 2: per ITERATIVE_HEAD metric), and an
    overview of every metric's thought-summed grid (layer patching: its one grid per metric)."""
    paths = []
    sheets = ITERATIVE_HEAD if exp == "iterative" else () if exp == "layer" else metrics_of(exp)
    for metric in sheets:
        paths.append(_save(head_sheet(data, exp, metric), out / f"{exp}{data.tag}_heatmap_{metric}.png"))
    if exp in ("position", "trace", "layer"):
        overview = []
        for metric in CURVE_METRICS if exp == "layer" else OVERVIEW[exp]:
            layers, heads, _, G = _head_grids(data, exp, metric)
            overview.append((label(metric, exp), G[0], metric, 1.0) if exp == "layer" else (f"Σ over thoughts: {short(metric, exp)}", _thought_sum(G), metric, float(G.shape[0])))
        pw, ph = _head_size(layers, heads)
        with mpl.rc_context(RC):
            ncols = 3
            fig = Figure(figsize=(ncols * pw + 1.5, math.ceil(len(overview) / ncols) * (ph + 0.3) + 1.0), layout="constrained")
            _head_panels(fig, overview, layers, heads, ncols, shared=0, exp=exp)
            what = "every thought patched at once, per (layer, head)" if exp == "layer" else "Σ over thoughts of the per-cell means (layer × head)"
            fig.suptitle(f"{EXP_TITLE[exp]}{data.grid_tag(exp)}: {what}\n{_subtitle(data, exp)}", x=0.0, ha="left")
            paths.append(_save(fig, out / f"{exp}{data.tag}_heatmaps.png"))
    return paths


def _pair_value(metric: str) -> Callable[[dict], float]:
    """A row's value of `metric`; delta_X = X − X of the unpatched (receiving) run."""
    if metric.startswith("delta_"):
        base = metric[len("delta_"):]
        return lambda r: float(r[base]) - float(r[f"{base}_receiving"])
    return lambda r: float(r[metric])


PER_PAIR = {
    "kl": "KL(patched ‖ receiving)",
    "delta_logprob_diff": "Δ log-prob diff vs the unpatched run (> 0: towards clean)",
}
PER_PAIR_OF = {
    "position": PER_PAIR,
    "knockout": {"kl": "KL(knocked out ‖ unpatched)", "delta_logprob_diff": "Δ log-prob diff vs the unpatched run (> 0: towards clean)"},
    "trace": {"kl": "KL(restored ‖ noised)", "delta_logprob_clean": "Δ log P(clean answer) vs the noised run (> 0: restored)"},
}
PER_PAIR_SHORT = {"kl": "KL", "delta_logprob_diff": "Δ log-prob diff", "delta_logprob_clean": "Δ log P(clean)"}
# What the dot of a per-pair cell says, and what a unit is.
MARK_WORDS = {"position": "answer flips to the {src} answer", "trace": "answer flips back to the clean answer", "knockout": "answer moves away from the unpatched run's"}


def unit(exp: str) -> str:
    return "question" if exp == "trace" else "pair"


PAIRS_PER_PAGE, PAGE_COLS = 12, 4
# Per-pair sheets are 9 in wide (1,800 px): shown at 900 px in a report, a 9 pt title is
# 9 · 200/72 · 900/1800 ≈ 12.5 px high.
PAGE_WIDTH_IN, PAIR_TITLE_PT = 9.0, 9


def pair_grids(data: RunData, metric: str, exp: str = "position") -> tuple[list[int], dict[int, np.ndarray], dict[int, np.ndarray], dict[int, list]]:
    """One grid per pair: value grid, mark grid (the answer flipped; knockout: moved away) and
    patched answers (location × thought, Exp 2: × iteration) of each pair."""
    by_pair = data.pair_rows(exp)
    pids = [p for p in data.pair_ids if p in by_pair] or sorted(by_pair)
    li = {l: i for i, l in enumerate(data.locs(exp))}
    step = STEP[exp]
    ki = {k: j for j, k in enumerate(_steps(data, exp))}
    get, mark = _pair_value(metric), marked(exp)
    grids, flips, answers = {}, {}, {}
    for pid in pids:
        G = np.full((len(li), len(ki)), np.nan)
        F = np.zeros((len(li), len(ki)), bool)
        A = [["" for _ in ki] for _ in li]
        for r in by_pair[pid]:
            loc = loc_of(r)
            if loc in li and r[step] in ki:
                i, j = li[loc], ki[r[step]]
                G[i, j], F[i, j], A[i][j] = get(r), bool(r.get(mark)), r.get("answer")
        grids[pid], flips[pid], answers[pid] = G, F, A
    return pids, grids, flips, answers


def position_per_pair(data: RunData, out: Path, exp: str = "position") -> list[Path]:
    """Small multiples, at most PAIRS_PER_PAGE pairs a sheet so they stay readable at report
    width; one colour scale for every sheet of a metric; dots mark cells where the greedy
    answer flipped to the source run's answer (knockout: moved away from the unpatched one)."""
    paths = []
    locs = data.locs(exp)
    L, K = len(locs), len(data.thoughts)
    ncols = PAGE_COLS
    what = MARK_WORDS[exp].format(src=data.source_role)
    rows_are = "layer (bottom = input z$_k$)" if "input" in locs else "layer"
    with mpl.rc_context(RC):
        for metric, label in PER_PAIR_OF[exp].items():
            pids, grids, flips, _ = pair_grids(data, metric, exp)
            allv = np.concatenate([g.ravel() for g in grids.values()])
            e = _scale_exp(allv)
            nc = _norm_cmap(metric, allv / 10.0**e)
            pages = [pids[i:i + PAIRS_PER_PAGE] for i in range(0, len(pids), PAIRS_PER_PAGE)]
            nrows = math.ceil(min(len(pids), PAIRS_PER_PAGE) / ncols)
            for page, chunk in enumerate(pages, 1):
                fig = Figure(figsize=(PAGE_WIDTH_IN, nrows * (0.28 * L + 0.75) + 1.3), layout="constrained")
                axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
                im = None
                for idx, ax in enumerate(axes):
                    if idx >= len(chunk):
                        ax.set_axis_off()
                        continue
                    pid = chunk[idx]
                    im, _ = _draw_heatmap(fig, ax, grids[pid], metric, locs, data.thoughts, annotate=False, colorbar=False, norm_cmap=nc, scale=e)
                    ys, xs = np.nonzero(flips[pid])
                    if len(xs):
                        ax.scatter(xs, ys, s=22, c="black", marker="o", edgecolors="white", linewidths=0.7)
                    nflip, moved = int(flips[pid].sum()), "moved" if exp == "knockout" else "flip"
                    ax.set_title(f"{unit(exp)} {pid}" + (f" · {nflip} {moved}{'s' if nflip != 1 and moved == 'flip' else ''}" if nflip else ""), fontsize=PAIR_TITLE_PT, pad=2)
                    ax.tick_params(labelsize=7, length=0, pad=1)
                    if idx % ncols:
                        ax.set_yticklabels([])
                    if idx + ncols < len(chunk):
                        ax.set_xticklabels([])
                if im is not None:
                    cb = fig.colorbar(im, ax=list(axes), fraction=0.04, pad=0.01, shrink=0.8)
                    cb.set_label(PER_PAIR_SHORT[metric] + _suffix(e) + " (same scale on every sheet)")
                fig.suptitle(
                    f"{EXP_SHORT[exp]}{data.grid_tag(exp)} per {unit(exp)} ({page}/{len(pages)}: {unit(exp)}s {chunk[0]}–{chunk[-1]}): {label}\n"
                    f"rows: {rows_are}, columns: thought k · dot = {what}",
                    x=0.0, ha="left", fontsize=10,
                )
                paths.append(_save(fig, out / f"{exp}{data.tag}_per_pair_{metric}_{page}.png"))
    return paths


# ---- layer patching ---------------------------------------------------------------------------
CURVE_METRICS = ("kl", "kl_to_clean", "answer_logit_diff", "logprob_diff", "recovered", "flip")


def layer_curve(data: RunData, out: Path) -> list[Path]:
    layers = data.locs("layer")
    x = np.arange(len(layers))
    with mpl.rc_context(RC):
        fig = Figure(figsize=(max(9.0, 3 * (0.25 * len(layers) + 1.6)), 6.0), layout="constrained")
        axes = fig.subplots(2, 3).ravel()
        keys = [data.key("layer", loc=l) for l in layers]
        for ax, metric in zip(axes, CURVE_METRICS):
            m, lo, hi = _series(data, "layer", keys, metric)
            _zero_line(ax, metric)
            _ref_lines(ax, data, "layer", keys[0], metric)
            _band(ax, x, m, lo, hi, EXP_COLORS["layer"], label="layer patching (mean; band = 95 % CI)")
            if log_wanted(metric, m):
                _log_axis(ax, m)
            ax.set_xticks(x, _ylabels(layers), rotation=0 if len(layers) <= 10 else 90)
            ax.set_xlabel("layer (all thoughts patched)")
            ax.set_title(f"{LABELS[metric]}\n{ci_name(data, 'layer', metric)}", fontsize=9)
            if metric in RATE:
                ax.set_ylim(-0.03, 1.03)
            if metric == "logprob_diff":
                handles, labels = ax.get_legend_handles_labels()
        # Below the panels: inside one, the legend sat on the reference lines it explains.
        fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
        fig.suptitle(f"Layer patching{data.grid_tag('layer')}: every thought at one layer — {_subtitle(data, 'layer')}", x=0.0, ha="left")
        return [_save(fig, out / f"layer{data.tag}_curve.png")]


# ---- Exp 2: trajectories ---------------------------------------------------------------------
def iterative_trajectories(data: RunData, out: Path) -> list[Path]:
    its = data.iterations
    key = lambda l, i: data.key("iterative", loc=l, iteration=i)  # noqa: E731
    layers = data.locs("iterative")
    colors = _layer_colors(layers)
    x = np.array(its)
    paths = []
    with mpl.rc_context(RC):
        for name, metrics, title in (
            ("iterative_trajectories", CURVE_METRICS, "Exp 2 iterative patching: metric per iteration, one line per layer"),
            ("iterative_activations", ACTIVATION_METRICS, "Exp 2 iterative patching: the patched activation $a_i$ per iteration"),
        ):
            ncols = 3
            nrows = math.ceil(len(metrics) / ncols)
            fig = Figure(figsize=(11.5, 3.2 * nrows + 0.8), layout="constrained")
            axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
            for ax, metric in zip(axes, metrics):
                _zero_line(ax, metric)
                means = []
                for l, c in zip(layers, colors):
                    m, lo, hi = _series(data, "iterative", [key(l, i) for i in its], metric)
                    _band(ax, x, m, lo, hi, c, label=("input" if l == "input" else f"layer {l}"), marker=".", alpha=0.10 if len(layers) <= 5 else 0.04)
                    means.append(m)
                if log_wanted(metric, np.concatenate(means)):
                    _log_axis(ax, np.concatenate(means))
                    ax.set_ylabel(f"{SHORT[metric]} (log scale)")
                ax.set_xticks(x)
                ax.set_xlabel("iteration i (thought patched with $a_i$)")
                ax.set_title(f"{LABELS[metric]}\n{ci_name(data, 'iterative', metric)}", fontsize=9)
                if metric in RATE:
                    ax.set_ylim(-0.03, 1.03)
                if metric in ("cos_clean", "cos_corrupted"):
                    ax.set_ylim(top=1.02)
            for ax in axes[len(metrics):]:
                ax.set_axis_off()
            handles, labels = axes[0].get_legend_handles_labels()
            fig.legend(handles, labels, loc="outside right center", frameon=False, title="layer", ncols=1 if len(layers) <= 20 else 2)
            fig.suptitle(f"{title}{data.grid_tag('iterative')} (mean; band = 95 % CI, method per panel)\n{_subtitle(data, 'iterative')} · iteration 0 = Exp 1 at thought 0", x=0.0, ha="left")
            paths.append(_save(fig, out / f"{name.replace('iterative', 'iterative' + data.tag)}.png"))
    return paths


# ---- Exp 1 vs Exp 2 vs layer patching -------------------------------------------------------
COMPARE_METRICS = ("kl", "logprob_diff")


def comparison(data: RunData, out: Path) -> list[Path]:
    have = [e for e in ("position", "iterative", "layer") if e in data.rows]
    if len(have) < 2:
        return []
    its = data.iterations
    xs = sorted(set(data.thoughts) | set(its)) if "iterative" in have else data.thoughts
    layers = sorted({l for e in have for l in data.locs(e)}, key=loc_key)
    ncols = min(6, len(layers))
    nrows = math.ceil(len(layers) / ncols)
    paths = []
    with mpl.rc_context(RC):
        for metric in COMPARE_METRICS:
            fig = Figure(figsize=(2.3 * ncols + 0.4, 2.0 * nrows + 1.3), layout="constrained")
            axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True).ravel()
            means = []
            for ax, l in zip(axes, layers):
                _zero_line(ax, metric)
                ref_exp = "layer" if "layer" in have else have[0]
                ref_key = data.key(ref_exp, loc=l, **({} if ref_exp == "layer" else {STEP[ref_exp]: 0}))
                _ref_lines(ax, data, ref_exp, ref_key, metric)
                if "layer" in have and data.key("layer", loc=l) in data.cells("layer"):
                    m, lo, hi = data.interval("layer", data.key("layer", loc=l), metric)
                    ax.axhline(m, color=EXP_COLORS["layer"], lw=1.4, label="layer patching (all thoughts)")
                    if np.isfinite(lo):
                        ax.axhspan(lo, hi, color=EXP_COLORS["layer"], alpha=0.08, lw=0)
                    means.append([m])
                if "position" in have:
                    keys = {k: data.key("position", loc=l, thought=k) for k in data.thoughts}
                    ks = [k for k in data.thoughts if keys[k] in data.cells("position")]
                    m, lo, hi = _series(data, "position", [keys[k] for k in ks], metric)
                    _band(ax, np.array(ks), m, lo, hi, EXP_COLORS["position"], label=f"Exp 1: {data.source_role} activation at thought k only", alpha=0.10)
                    means.append(m)
                if "iterative" in have:
                    keys = {i: data.key("iterative", loc=l, iteration=i) for i in its}
                    ii = [i for i in its if keys[i] in data.cells("iterative")]
                    m, lo, hi = _series(data, "iterative", [keys[i] for i in ii], metric)
                    _band(ax, np.array(ii), m, lo, hi, EXP_COLORS["iterative"], label="Exp 2: chained $a_i$ at thought i only", marker="s", ls="--", alpha=0.10)
                    means.append(m)
                ax.set_title("input (z$_k$)" if l == "input" else f"layer {l}", fontsize=9)
                ax.set_xticks(xs)
            allm = np.concatenate([np.asarray(m, float) for m in means]) if means else np.array([])
            scale = log_wanted(metric, allm)
            if scale:
                _log_axis(axes[0], allm)  # the panels share y
            for ax in axes[len(layers):]:
                ax.set_axis_off()
            for ax in axes[(nrows - 1) * ncols:]:
                ax.set_xlabel("thought k / iteration i")
            for ax in axes[::ncols]:
                ax.set_ylabel(SHORT[metric] + (" (log scale)" if scale else ""))
            handles, labels = axes[0].get_legend_handles_labels()
            fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), frameon=False)
            fig.suptitle(
                f"Exp 1 vs Exp 2 vs layer patching{data.grid_tag(have[0])}: {LABELS[metric]} (mean; band = {ci_name(data, have[0], metric)})\n"
                f"{data.model_name} · {data.direction} · n = {max(data.n_pairs(e) for e in have)} pairs", x=0.0, ha="left")
            paths.append(_save(fig, out / f"comparison{data.tag}_{metric}.png"))
    return paths


# ---- interactive pages (plotly; one plotly.min.js per figures directory) --------------------
HTML_CSS = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1em;color:#222}h2{margin-top:2em;border-bottom:1px solid #ddd}p.note{color:#555}"
PLOTLY_JS = "plotly.min.js"
OFFLINE = f"Works offline: plotly is loaded from {PLOTLY_JS} beside this page."


def _plotly_js(folder: Path) -> Path:
    """The pages' one copy of plotly.js (rewritten only when the installed plotly differs)."""
    from plotly.offline import get_plotlyjs

    path = folder / PLOTLY_JS
    text = get_plotlyjs()
    if not path.is_file() or path.stat().st_size != len(text.encode()) or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    return path


def _page(path: Path, title: str, intro: str, sections: list[tuple[str, str, object]]) -> Path:
    import plotly.io as pio

    _plotly_js(path.parent)
    body = []
    for i, (heading, note, fig) in enumerate(sections):
        div = pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=f"fig{i}", config={"displaylogo": False, "responsive": True})
        body.append(f"<h2>{html.escape(heading)}</h2>\n<p class='note'>{html.escape(note)}</p>\n{div}")
    text = (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>{html.escape(title)}</title>\n<style>{HTML_CSS}</style>\n"
        f"<script src='{PLOTLY_JS}'></script>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p>{html.escape(intro)}</p>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )
    atomic_write_text(path, text)
    return path


def _plotly_colours(metric: str) -> dict:
    if metric in RATE:
        return {"colorscale": "Purples"}
    if metric in SIGNED or metric.startswith("delta_"):
        return {"colorscale": "RdBu", "reversescale": True}
    return {"colorscale": "Viridis"}


def colour_range(metric: str, mean: np.ndarray, pairs: list[np.ndarray]) -> tuple[float, float, str]:
    """One colour range for the mean view and every pair of a metric (so pairs compare), and a
    note when values beyond it saturate."""
    allv = np.concatenate([mean.ravel()] + [g.ravel() for g in pairs])
    allv = allv[np.isfinite(allv)]
    if metric in RATE:
        return 0.0, 1.0, ""
    top = float(np.abs(allv).max()) if allv.size else 1.0
    if metric in RATIO_METRICS:
        # per-pair ratios explode where a pair's two runs barely differ; keep 0…1 readable
        r = max(1.0, float(np.nanmax(np.abs(mean))) if np.isfinite(mean).any() else 1.0)
        return -r, r, f" Per-pair ratios beyond ±{r:.3g} saturate the colour."
    if metric in SIGNED:
        return -(top or 1.0), top or 1.0, ""
    return 0.0, (float(allv.max()) if allv.size and allv.max() > 0 else 1.0), ""


def _r(v: float):
    return None if not np.isfinite(v) else float(f"{v:.6g}")


def _num(v: float) -> str:
    return "n/a" if not np.isfinite(v) else f"{v:.4g}"


def cell_text(v: float) -> str:
    """Compact cell text: 3 significant digits, exponent for tiny or huge values."""
    if not np.isfinite(v):
        return ""
    if v != 0 and not 1e-3 <= abs(v) < 1e4:
        return f"{v:.1e}".replace("e-0", "e-").replace("e+0", "e+")
    return f"{v:.3g}"


def _answer(a) -> str:
    if isinstance(a, float) and a.is_integer():
        return str(int(a))
    return "none" if a is None or (isinstance(a, float) and math.isnan(a)) else html.escape(str(a))


def _hover_text(s: str, width: int = 80) -> str:
    """Free text in a hover: escaped, wrapped, no plotly template syntax."""
    import textwrap

    return "<br>".join(html.escape(line).replace("%{", "% {") for line in textwrap.wrap(str(s), width)) or "?"


def _pair_lines(pair: dict, exp: str = "position") -> str:
    c, r = pair.get("clean", {}), pair.get("corrupted", {})
    if exp == "trace":  # one question, noised on the other side
        return f"question: {_hover_text(c.get('question', '?'))} (answer {_answer(c.get('answer'))})"
    return f"clean: {_hover_text(c.get('question', '?'))} (answer {_answer(c.get('answer'))})<br>corrupted: {_hover_text(r.get('question', '?'))} (answer {_answer(r.get('answer'))})"


def _pair_title(pid: int, pair: dict, exp: str = "position") -> str:
    c, r = pair.get("clean", {}), pair.get("corrupted", {})
    if exp == "trace":
        return f"question {pid}: {_hover_text(c.get('question', '?'), 120)} → {_answer(c.get('answer'))}"
    return f"pair {pid} · clean: {_hover_text(c.get('question', '?'), 120)} → {_answer(c.get('answer'))}<br>corrupted: {_hover_text(r.get('question', '?'), 120)} → {_answer(r.get('answer'))}"


PAGE_METRICS = {"position": MAIN_METRICS + ("kl_to_clean",), "iterative": None}
PAGE_TITLE = {
    "position": "Exp 1 — position-wise patching", "trace": "Causal tracing", "knockout": "Attention knockout", "iterative": "Exp 2 — iterative patching",
}


def _intro(data: RunData, exp: str) -> str:
    src = data.source_role
    return {
        "position": f"Exp 1, position-wise patching: each (layer, thought) site alone gets the {src} activation.",
        "trace": "Causal tracing: the question's number tokens are noised; each (layer, thought) site alone is restored from the clean run.",
        "knockout": f"Attention knockout: in block l, {READERS.get(data.readers(), data.readers())} do not attend to thought k's key (pre-softmax score −inf).",
        "iterative": f"Exp 2, iterative patching: iteration i patches (layer, head, i) with the activation the previous iteration produced (iteration 0: the {src} activation).",
    }[exp]


def position_html(data: RunData, out: Path, exp: str = "position") -> list[Path]:
    """One grid's heatmaps (Exp 1, causal tracing, knockout; Exp 2 on the head site): the mean
    view (hover: mean, interval and its method, n) and, on a slider, every pair (hover: the
    pair's questions and answers, the patched answer), all on one colour scale per metric;
    ● marks cells whose answer flips to the source answer (knockout: moves away)."""
    import plotly.graph_objects as go

    locs = data.locs(exp)
    ylab = _ylabels(locs)
    step = STEP[exp]
    xlab = [str(k) for k in _steps(data, exp)]
    where = "layer.head" if data.head_site else "layer"
    pairs = {p["pair_id"]: p for p in data.pairs}
    n_pairs = data.n_pairs(exp)
    u = unit(exp)
    mean_title = f"mean over n = {n_pairs} {u}s"
    mark = MARK_WORDS.get(exp, "answer flips to the {src} answer").format(src=data.source_role)
    metrics = PAGE_METRICS.get(exp, table_metrics(exp)) or CURVE_METRICS + ACTIVATION_METRICS
    sections = []
    for metric in metrics:
        method = ci_name(data, exp, metric)
        M, LO, HI, N = (_grid(data, metric, w, exp=exp) for w in ("mean", "ci_low", "ci_high", "n"))
        pids, grids, flips, answers = pair_grids(data, metric, exp)
        zmin, zmax, saturate = colour_range(metric, M, list(grids.values()))
        what = "ratio of means" if metric in RATIO_METRICS else "mean"
        custom = [[[f"[{_num(lo)}, {_num(hi)}]", "n/a" if not np.isfinite(n) else str(int(n)), _num(m)] for m, lo, hi, n in zip(*rows)] for rows in zip(M, LO, HI, N)]
        fig = go.Figure()
        fig.add_trace(go.Heatmap(
            z=[[_r(v) for v in row] for row in M], x=xlab, y=ylab, text=[[cell_text(v) for v in row] for row in M], texttemplate="%{text}",
            customdata=custom, coloraxis="coloraxis", name="mean",
            hovertemplate=f"{where} %{{y}}, {step} %{{x}}<br>{what} %{{customdata[2]}}<br>{method} %{{customdata[0]}}<br>n = %{{customdata[1]}}<extra></extra>",
        ))
        owner: list = [None]  # the slider step (None = mean view, else a pair id) showing each trace
        per_pair = f"this {u}'s ratio" if metric in RATIO_METRICS else short(metric, exp)
        for pid in pids:
            G, F = grids[pid], flips[pid]
            ans = [[[_answer(a) + (f" ({mark.replace('answer ', '', 1)})" if f else ""), _num(v)] for a, f, v in zip(*rows)] for rows in zip(answers[pid], F, G)]
            # a flip is marked in the cell's text: a marker trace on a category axis could only sit on the number
            text = [[cell_text(v) + (" ●" if f else "") for v, f in zip(*rows)] for rows in zip(G, F)]
            fig.add_trace(go.Heatmap(
                z=[[_r(v) for v in row] for row in G], x=xlab, y=ylab, text=text, texttemplate="%{text}",
                customdata=ans, coloraxis="coloraxis", visible=False, name=f"{u} {pid}",
                hovertemplate=f"{u} {pid} · {where} %{{y}}, {step} %{{x}}<br>{per_pair} %{{customdata[1]}}<br>patched answer %{{customdata[0]}}<br>{_pair_lines(pairs.get(pid, {}), exp)}<extra></extra>",
            ))
            owner.append(pid)
        steps = [
            {"method": "update", "label": "mean" if pid is None else f"{u} {pid}",
             "args": [{"visible": [o == pid for o in owner]}, {"title.text": mean_title if pid is None else _pair_title(pid, pairs.get(pid, {}), exp)}]}
            for pid in [None] + pids
        ]
        fig.update_layout(
            coloraxis={"cmin": _r(zmin), "cmax": _r(zmax), "colorbar": {"title": {"text": short(metric, exp)}}, **_plotly_colours(metric)},
            title={"text": mean_title, "x": 0, "xanchor": "left", "font": {"size": 12}},
            sliders=[{"active": 0, "steps": steps, "currentvalue": {"prefix": "showing: "}, "pad": {"t": 40}}],
            xaxis={"title": {"text": f"{step} {'k' if step == 'thought' else 'i'}"}, "type": "category"},
            yaxis={"title": {"text": "layer (input = fed thought vector)" if "input" in locs else f"{where} (head site: layer.h<head>)" if data.head_site else "layer"}, "type": "category"},
            height=max(500, 28 * len(ylab) + 340), margin={"t": 120}, meta={"metric": metric, "experiment": exp},
        )
        note = (
            f"{label(metric, exp)}. The {what} over {u}s; hover for the 95 % interval ({method.split(': ')[-1]}) and n. "
            f"Slide to see one {u} (hover: its questions, answers and the patched answer; ● = the {mark}). "
            f"One colour scale for the mean and every {u} ({zmin:.3g} to {zmax:.3g}).{saturate}"
        )
        sections.append((f"{EXP_SHORT[exp]} heatmap — {short(metric, exp)}", note, fig))
    intro = f"{_intro(data, exp)} {_subtitle(data, exp)}. {OFFLINE}"
    return [_page(out / f"{exp}{data.tag}.html", f"{PAGE_TITLE[exp]}{data.grid_tag(exp)} ({data.run_dir.name})", intro, sections)]


def _trace(data: RunData, exp: str, keys: list[tuple], metric: str, x: list, name: str, xname: str, **kw):
    """One line with asymmetric error bars = the summary's interval; hover: mean, interval, n."""
    import plotly.graph_objects as go

    m, lo, hi, n = _series(data, exp, keys, metric, ("mean", "ci_low", "ci_high", "n"))
    y = [_r(v) for v in m]
    up = [None if yy is None or not np.isfinite(h) else max(0.0, _r(h) - yy) for yy, h in zip(y, hi)]
    down = [None if yy is None or not np.isfinite(lw) else max(0.0, yy - _r(lw)) for yy, lw in zip(y, lo)]
    custom = [[_num(a), _num(b), "n/a" if not np.isfinite(c) else str(int(c))] for a, b, c in zip(lo, hi, n)]
    what = "ratio of means" if metric == "recovered" else "mean"
    return go.Scatter(
        x=x, y=y, name=name, customdata=custom,
        error_y={"type": "data", "symmetric": False, "array": up, "arrayminus": down, "visible": bool(np.isfinite(lo).any())},
        hovertemplate=f"{name} · {xname} %{{x}}<br>{what} %{{y:.4g}}<br>{ci_name(data, exp, metric)} [%{{customdata[0]}}, %{{customdata[1]}}]<br>n = %{{customdata[2]}}<extra></extra>",
        **({"mode": "lines+markers"} | kw),
    )


def _scale_menu(fig, metric: str, means, x: float = 1.0) -> list[dict]:
    """KL-type metrics get a linear/log switch, log first when the means span > 2 decades."""
    if not metric.startswith("kl"):
        return []
    log = log_wanted(metric, means)
    fig.update_yaxes(type="log" if log else "linear", exponentformat="power")
    buttons = [{"label": t, "method": "relayout", "args": [{"yaxis.type": t}]} for t in ("linear", "log")]
    return [{"type": "buttons", "direction": "right", "buttons": buttons, "active": int(log), "showactive": True, "x": x, "xanchor": "right", "y": 1.02, "yanchor": "bottom"}]


def _lines_fig(data: RunData, exp: str, metric: str, xname: str, groups: list, xs: list, key: Callable, group_name: Callable):
    import plotly.graph_objects as go

    fig = go.Figure()
    for g in groups:
        fig.add_trace(_trace(data, exp, [key(g, x) for x in xs], metric, xs, group_name(g), xname))
    means = [v for t in fig.data for v in t.y if v is not None]
    title = _bars_title(data, exp, metric)
    zeros = sum(v == 0 for v in means)
    if zeros and log_wanted(metric, means):  # a log axis cannot draw 0: say so rather than leave a silent gap
        title["text"] += f"; {zeros} mean{'s' if zeros > 1 else ''} exactly 0, not drawn on the log axis (switch to linear)"
    fig.update_layout(xaxis_title=xname, yaxis_title=SHORT[metric], height=440, margin={"t": 50}, meta={"metric": metric, "experiment": exp},
                      updatemenus=_scale_menu(fig, metric, means), title=title)
    _y_range(fig, metric)
    return fig


def _bars_title(data: RunData, exp: str, metric: str) -> dict:
    what = "ratio of means" if metric == "recovered" else "mean"
    return {"text": f"{what} over pairs; error bars = {ci_name(data, exp, metric)}", "x": 0, "xanchor": "left", "font": {"size": 12}}


def _y_range(fig, metric: str) -> None:
    """Axes of metrics ≥ 0 do not pad below 0 (a rate axis showed a −0.02 tick)."""
    if metric_range(metric)[0] == 0:
        fig.update_yaxes(rangemode="nonnegative")


def _curve_note(data: RunData, exp: str, metric: str, what: str) -> str:
    scale = " Linear/log switch at the top right." if metric.startswith("kl") else ""
    return f"{LABELS[metric]} {what}; error bars = {ci_name(data, exp, metric)} (hover: mean, interval, n).{scale}"


def layer_html(data: RunData, out: Path) -> list[Path]:
    layers = data.locs("layer")
    xs = _ylabels(layers)
    where = "layer.head" if data.head_site else "layer"
    sections = []
    for metric in CURVE_METRICS:
        fig = _lines_fig(data, "layer", metric, where, [None], list(range(len(layers))), lambda g, x: data.key("layer", loc=layers[x]), lambda g: "layer patching")
        fig.update_xaxes(tickmode="array", tickvals=list(range(len(layers))), ticktext=xs, title_text=f"{where} (all thoughts patched)")
        sections.append((SHORT[metric], _curve_note(data, "layer", metric, f"— mean over pairs per {where}"), fig))
    intro = f"Layer patching: every thought at one {where} gets the {data.source_role} activations. {_subtitle(data, 'layer')}. {OFFLINE}"
    return [_page(out / f"layer{data.tag}.html", f"Layer patching{data.grid_tag('layer')} ({data.run_dir.name})", intro, sections)]


def iterative_html(data: RunData, out: Path) -> list[Path]:
    import plotly.graph_objects as go

    if data.head_site:  # one line per (layer, head) would be unreadable: heatmaps instead
        return position_html(data, out, "iterative")
    its = data.iterations
    key = lambda l, i: data.key("iterative", loc=l, iteration=i)  # noqa: E731
    layers = data.locs("iterative")
    lname = lambda l: "input" if l == "input" else f"layer {l}"  # noqa: E731
    sections = []
    for metric in CURVE_METRICS + ACTIVATION_METRICS:
        fig = _lines_fig(data, "iterative", metric, "iteration", layers, its, key, lname)
        sections.append((SHORT[metric], _curve_note(data, "iterative", metric, "per iteration, one line per layer (click legend entries to hide)"), fig))
    if "position" in data.rows or "layer" in data.rows:
        for metric in COMPARE_METRICS:
            fig = go.Figure()
            vis_of, means = [], []
            for l in layers:
                if "position" in data.rows:
                    ks = [k for k in data.thoughts if data.key("position", loc=l, thought=k) in data.cells("position")]
                    fig.add_trace(_trace(data, "position", [data.key("position", loc=l, thought=k) for k in ks], metric, ks, f"Exp 1 (thought k only), {lname(l)}", "thought", line={"color": EXP_COLORS["position"]}))
                    vis_of.append(l)
                fig.add_trace(_trace(data, "iterative", [key(l, i) for i in its], metric, its, f"Exp 2 (iteration i), {lname(l)}", "iteration", line={"color": EXP_COLORS["iterative"], "dash": "dash"}))
                vis_of.append(l)
                if "layer" in data.rows and data.key("layer", loc=l) in data.cells("layer"):
                    lk = data.key("layer", loc=l)
                    fig.add_trace(_trace(data, "layer", [lk, lk], metric, [min(its), max(its)], f"layer patching (all thoughts), {lname(l)}", "all thoughts", mode="lines", line={"color": EXP_COLORS["layer"]}))
                    vis_of.append(l)
            buttons = [{"method": "update", "label": lname(l), "args": [{"visible": [t == l for t in vis_of]}]} for l in layers]
            for t, owner in zip(fig.data, vis_of):
                t.visible = owner == layers[0]
                means += [v for v in t.y if v is not None]
            menus = [{"buttons": buttons, "x": 0, "y": 1.15, "xanchor": "left"}] + _scale_menu(fig, metric, means)
            fig.update_layout(updatemenus=menus, xaxis_title="thought k / iteration i", yaxis_title=SHORT[metric], height=460, margin={"t": 90}, meta={"metric": metric, "experiment": "iterative"},
                              title=_bars_title(data, "iterative", metric) | {"y": 0.98, "yanchor": "top"})
            _y_range(fig, metric)
            sections.append((f"Exp 1 vs Exp 2 vs layer patching — {SHORT[metric]}", "Pick a layer in the menu. " + _curve_note(data, "iterative", metric, "per thought / iteration"), fig))
    intro = f"Exp 2, iterative patching: iteration 0 patches (l, 0) with the {data.source_role} activation; iteration i patches only (l, i) with the activation aᵢ the previous iteration produced. {_subtitle(data, 'iterative')}. {OFFLINE}"
    return [_page(out / f"iterative{data.tag}.html", f"Exp 2 — iterative patching{data.grid_tag('iterative')} ({data.run_dir.name})", intro, sections)]


# ---- all --------------------------------------------------------------------------------------
def figures_of(data: RunData, exp: str, out: Path) -> list[Path]:
    """Every figure of one grid (`data` a view of one site, or of one knockout run)."""
    head = data.head_site
    if exp in GRID_EXPS:
        if head:
            return head_heatmaps(data, exp, out) + position_html(data, out, exp)
        return grid_heatmaps(data, exp, out) + position_per_pair(data, out, exp) + position_html(data, out, exp)
    if exp == "layer":
        return (head_heatmaps(data, exp, out) if head else layer_curve(data, out)) + layer_html(data, out)
    return (head_heatmaps(data, exp, out) if head else iterative_trajectories(data, out)) + iterative_html(data, out)


def write_figures(data: RunData, out: Path) -> dict[str, list[Path]]:
    """Every figure of the run, grouped by the report part that embeds it: "<exp><tag>" for
    one grid (tag: "" for the resid grid, "_<site>" or "_<run>" otherwise) and
    "comparison<tag>" for Exp 1 vs Exp 2 vs layer patching at one site."""
    figs: dict[str, list[Path]] = {}
    for exp in data.experiments:
        for view in data.views(exp):
            figs[f"{exp}{view.tag}"] = figures_of(view, exp, out)
    for site in dict.fromkeys(s for e in ("position", "iterative", "layer") if e in data.rows for s in data.groups(e)):
        view = data.only("position", site)
        figs[f"comparison{view.tag}"] = [] if view.head_site else comparison(view, out)
    return figs


def cell_grid(data: RunData, exp: str, metric: str, what: str = "mean", site: str | None = None, run: str | None = None) -> tuple[list, list, np.ndarray]:
    """(row labels, column labels, [rows, cols] array) of one summary number of any grid
    experiment: rows are locations (layer, "input", or (layer, head)), columns thoughts
    (Exp 2: iterations; layer patching: one column). `site` / `run` pick one grid of several."""
    keys = CELL_KEYS[exp]
    step = {"position": "thought", "trace": "thought", "knockout": "thought", "iterative": "iteration"}.get(exp)
    cells = [dict(zip(keys, k)) for k in data.cells(exp)]
    for name, want in (("site", site), ("run", run)):
        have = sorted({c[name] for c in cells if name in c and c[name] is not None})
        if len(have) > 1 and want is None:
            want = have[0]
        if want is not None:
            cells = [c for c in cells if c.get(name) == want]
    loc = lambda c: c["layer"] if c.get("head") is None else (c["layer"], c["head"])  # noqa: E731
    rows = sorted({loc(c) for c in cells}, key=lambda r: (layer_key(r[0]), r[1]) if isinstance(r, tuple) else (layer_key(r), -1))
    cols = sorted({c[step] for c in cells}) if step else ["all"]
    M = np.full((len(rows), len(cols)), np.nan)
    for c in cells:
        key = tuple(c.get(k) for k in keys)
        M[rows.index(loc(c)), cols.index(c[step] if step else "all")] = data.stat(exp, key, metric, what)
    return rows, cols, M


def figure(data: RunData, exp: str, metric: str, site: str | None = None) -> Figure:
    """One experiment's figure for one metric, returned (not saved): a heatmap of locations ×
    thoughts for Exp 1, causal tracing and knockout, one line per location over iterations for
    Exp 2, and the curve over locations for layer patching."""
    rows, cols, M = cell_grid(data, exp, metric, site=site)
    labels = [f"L{r[0]}.h{r[1]}" if isinstance(r, tuple) else r for r in rows]
    with mpl.rc_context(RC):
        if exp in ("position", "trace", "knockout"):
            fig = Figure(figsize=(max(6.2, 2.6 + 0.8 * len(cols)), 1.5 + 0.3 * len(rows)), layout="constrained")
            ax = fig.add_subplot()
            _draw_heatmap(fig, ax, M, metric, labels, cols, annotate=M.size <= 200)
            ax.set_xlabel("thought k")
            ax.set_ylabel("layer" + (", head" if isinstance(rows[0], tuple) else ""))
        else:
            fig = Figure(figsize=(6.5, 3.8), layout="constrained")
            ax = fig.add_subplot()
            if exp == "iterative":
                lo, hi = (cell_grid(data, exp, metric, w, site=site)[2] for w in ("ci_low", "ci_high"))
                for i, (lab, color) in enumerate(zip(labels, _layer_colors(rows))):
                    _band(ax, cols, M[i], lo[i], hi[i], color, label=str(lab))
                ax.set_xlabel("iteration i")
                if log_wanted(metric, M):
                    _log_axis(ax, M)
                ax.legend(fontsize=7, ncol=2)
            else:
                lo, hi = (cell_grid(data, exp, metric, w, site=site)[2][:, 0] for w in ("ci_low", "ci_high"))
                x = list(range(len(rows)))
                _band(ax, x, M[:, 0], lo, hi, EXP_COLORS["layer"])
                ax.set_xticks(x, [str(lab) for lab in labels], rotation=90 if len(x) > 20 else 0)
                ax.set_xlabel("layer (every thought patched)")
            ax.set_ylabel(SHORT.get(metric, metric))
            _zero_line(ax, metric)
        grid_site = site or next((c.get("site") for c in data.summaries[exp]["cells"] if c.get("site")), None)
        where = f" [{grid_site}]" if grid_site else ""
        ax.set_title(f"{exp}{where}: {LABELS.get(metric, metric)} ({ci_name(data, exp, metric)})\n{_subtitle(data, exp)}", loc="left")
    return fig


__all__ = ["write_figures", "figure", "cell_grid", "layer_key"]
