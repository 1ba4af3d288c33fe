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

from thoughtpatch.data.schema import atomic_write_text
from thoughtpatch.report.intervals import SHORT_METHODS, metric_range
from thoughtpatch.report.results import CELL_KEYS
from thoughtpatch.report.rundata import ACTIVATION_METRICS, LABELS, MAIN_METRICS, SHORT, SIGNED, RunData, layer_key

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


# ---- helpers -----------------------------------------------------------------------------
def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    return path


def _ylabels(layers: list) -> list[str]:
    return ["input" if l == "input" else str(l) for l in layers]


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


def _norm_cmap(metric: str, values: np.ndarray) -> tuple[Normalize, str]:
    finite = values[np.isfinite(values)]
    if metric in RATE:
        return Normalize(0.0, 1.0), RATE_CMAP
    if metric in SIGNED or metric.startswith("delta_"):
        vmax = float(np.abs(finite).max()) if finite.size else 1.0
        vmax = vmax or 1.0
        return Normalize(-vmax, vmax), SIGNED_CMAP
    vmax = float(finite.max()) if finite.size else 1.0
    return Normalize(0.0, vmax if vmax > 0 else 1.0), SEQ_CMAP


def _text_color(rgba) -> str:
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"


def _grid(data: RunData, metric: str, what: str = "mean") -> np.ndarray:
    """Exp 1 layer × thought grid of one summary number (NaN where a cell is missing)."""
    M = np.full((len(data.layers), len(data.thoughts)), np.nan)
    for i, l in enumerate(data.layers):
        for j, k in enumerate(data.thoughts):
            M[i, j] = data.stat("position", data.key("position", layer=l, thought=k), metric, what)
    return M


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


def _draw_heatmap(fig: Figure, ax, M: np.ndarray, metric: str, layers: list, thoughts: list, annotate: bool, fontsize: float = 7.5, colorbar: bool = True, norm_cmap=None, scale: int | None = None):
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
        fmt = _fmt_for(S)
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
        cb.set_label(SHORT.get(metric, metric) + _suffix(e) + (" (+ = clean)" if metric in ("answer_logit_diff", "logprob_diff") else ""))
        cb.ax.tick_params(labelsize=7)
    return im, e


def _subtitle(data: RunData, exp: str) -> str:
    n = data.n_pairs(exp)
    return f"{data.model_name} · {data.direction} · mean over n = {n} pair{'s' if n != 1 else ''}"


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


def _refs(data: RunData, metric: str) -> str:
    """Where the unpatched runs sit on log-prob diff (mean over pairs), for the heatmap title."""
    if metric != "logprob_diff" or "position" not in data.rows:
        return ""
    rows = data.rows["position"]
    rec = np.nanmean([r["logprob_diff_receiving"] for r in rows])
    src = np.nanmean([r["logprob_diff_source"] for r in rows])
    return f"\nunpatched runs: {data.receiving_role} {rec:.3g}, {data.source_role} {src:.3g}"


def _zero_line(ax, metric: str) -> None:
    if metric in SIGNED:
        ax.axhline(0, color="0.75", lw=0.8, zorder=0)


# ---- Exp 1: heatmaps ------------------------------------------------------------------------
def position_heatmaps(data: RunData, out: Path) -> list[Path]:
    paths = []
    L, K = len(data.layers), len(data.thoughts)
    with mpl.rc_context(RC):
        for metric in MAIN_METRICS:
            M = _grid(data, metric)
            fig = Figure(figsize=(max(6.2, 1.6 + 0.8 * K + 1.0), 1.5 + 0.36 * L), layout="constrained")
            ax = fig.add_subplot()
            _draw_heatmap(fig, ax, M, metric, data.layers, data.thoughts, annotate=True, fontsize=7.5 if K <= 8 else 6)
            ax.set_xlabel("thought k (the one patched position)")
            ax.set_ylabel("layer (input = fed thought z$_k$)")
            ax.set_title(f"Exp 1 position-wise patching: {LABELS[metric]}\n{_subtitle(data, 'position')}{_refs(data, metric)}", loc="left")
            paths.append(_save(fig, out / f"position_heatmap_{metric}.png"))
        # One overview sheet of every main metric and KL to source (the README figure).
        ov = MAIN_METRICS + ("kl_to_clean",)
        fig = Figure(figsize=(3 * (0.6 * K + 1.9), 2 * (0.3 * L + 1.1) + 0.5), layout="constrained")
        axes = fig.subplots(2, 3, sharey=True).ravel()
        for ax, metric in zip(axes, ov):
            _draw_heatmap(fig, ax, _grid(data, metric), metric, data.layers, data.thoughts, annotate=L * K <= 130, fontsize=6.5)
            ax.set_title(LABELS[metric], fontsize=9)
        for ax in axes[3:]:
            ax.set_xlabel("thought k")
        for ax in axes[::3]:
            ax.set_ylabel("layer (input = fed z$_k$)")
        fig.suptitle(f"Exp 1 position-wise patching — {_subtitle(data, 'position')}{_refs(data, 'logprob_diff')}", x=0.0, ha="left")
        paths.append(_save(fig, out / "position_heatmaps.png"))
    return paths


def _pair_value(metric: str) -> Callable[[dict], float]:
    if metric == "delta_logprob_diff":
        return lambda r: float(r["logprob_diff"]) - float(r["logprob_diff_receiving"])
    return lambda r: float(r[metric])


PER_PAIR = {
    "kl": "KL(patched ‖ receiving)",
    "delta_logprob_diff": "Δ log-prob diff vs the unpatched run (> 0: towards clean)",
}
PER_PAIR_SHORT = {"kl": "KL", "delta_logprob_diff": "Δ log-prob diff"}


PAIRS_PER_PAGE, PAGE_COLS = 12, 4
# Per-pair sheets are 9 in wide (1,800 px): shown at 900 px in a report, a 9 pt title is
# 9 · 200/72 · 900/1800 ≈ 12.5 px high.
PAGE_WIDTH_IN, PAIR_TITLE_PT = 9.0, 9


def pair_grids(data: RunData, metric: str) -> tuple[list[int], dict[int, np.ndarray], dict[int, np.ndarray], dict[int, list]]:
    """Exp 1 per pair: value grid, flip grid and patched answers (layer × thought) of each pair."""
    by_pair = data.pair_rows("position")
    pids = [p for p in data.pair_ids if p in by_pair] or sorted(by_pair)
    li = {l: i for i, l in enumerate(data.layers)}
    ki = {k: j for j, k in enumerate(data.thoughts)}
    get = _pair_value(metric)
    grids, flips, answers = {}, {}, {}
    for pid in pids:
        G = np.full((len(li), len(ki)), np.nan)
        F = np.zeros((len(li), len(ki)), bool)
        A = [["" for _ in ki] for _ in li]
        for r in by_pair[pid]:
            if r["layer"] in li and r["thought"] in ki:
                i, j = li[r["layer"]], ki[r["thought"]]
                G[i, j], F[i, j], A[i][j] = get(r), bool(r.get("flip")), r.get("answer")
        grids[pid], flips[pid], answers[pid] = G, F, A
    return pids, grids, flips, answers


def position_per_pair(data: RunData, out: Path) -> list[Path]:
    """Small multiples, at most PAIRS_PER_PAGE pairs a sheet so they stay readable at report
    width; one colour scale for every sheet of a metric; dots mark cells where the greedy
    answer flipped to the source run's answer."""
    paths = []
    L, K = len(data.layers), len(data.thoughts)
    ncols = PAGE_COLS
    with mpl.rc_context(RC):
        for metric, label in PER_PAIR.items():
            pids, grids, flips, _ = pair_grids(data, metric)
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
                    im, _ = _draw_heatmap(fig, ax, grids[pid], metric, data.layers, data.thoughts, annotate=False, colorbar=False, norm_cmap=nc, scale=e)
                    ys, xs = np.nonzero(flips[pid])
                    if len(xs):
                        ax.scatter(xs, ys, s=22, c="black", marker="o", edgecolors="white", linewidths=0.7)
                    nflip = int(flips[pid].sum())
                    ax.set_title(f"pair {pid}" + (f" · {nflip} flip{'s' if nflip != 1 else ''}" if nflip else ""), fontsize=PAIR_TITLE_PT, pad=2)
                    ax.tick_params(labelsize=7, length=0, pad=1)
                    if idx % ncols:
                        ax.set_yticklabels([])
                    if idx + ncols < len(chunk):
                        ax.set_xticklabels([])
                if im is not None:
                    cb = fig.colorbar(im, ax=list(axes), fraction=0.04, pad=0.01, shrink=0.8)
                    cb.set_label(PER_PAIR_SHORT[metric] + _suffix(e) + " (same scale on every sheet)")
                fig.suptitle(
                    f"Exp 1 per pair ({page}/{len(pages)}: pairs {chunk[0]}–{chunk[-1]}): {label}\n"
                    f"rows: layer (bottom = input z$_k$), columns: thought k · dot = answer flips to the {data.source_role} answer",
                    x=0.0, ha="left", fontsize=10,
                )
                paths.append(_save(fig, out / f"position_per_pair_{metric}_{page}.png"))
    return paths


# ---- layer patching ---------------------------------------------------------------------------
CURVE_METRICS = ("kl", "kl_to_clean", "answer_logit_diff", "logprob_diff", "recovered", "flip")


def layer_curve(data: RunData, out: Path) -> list[Path]:
    layers = [l for l in data.layers if data.key("layer", layer=l) in data.cells("layer")]
    x = np.arange(len(layers))
    with mpl.rc_context(RC):
        fig = Figure(figsize=(max(9.0, 3 * (0.25 * len(layers) + 1.6)), 6.0), layout="constrained")
        axes = fig.subplots(2, 3).ravel()
        keys = [data.key("layer", layer=l) for l in layers]
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
        fig.suptitle(f"Layer patching: every thought at one layer — {_subtitle(data, 'layer')}", x=0.0, ha="left")
        return [_save(fig, out / "layer_curve.png")]


# ---- Exp 2: trajectories ---------------------------------------------------------------------
def iterative_trajectories(data: RunData, out: Path) -> list[Path]:
    its = data.iterations
    key = lambda l, i: data.key("iterative", layer=l, iteration=i)  # noqa: E731
    layers = [l for l in data.layers if any(key(l, i) in data.cells("iterative") for i in its)]
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
            fig.suptitle(f"{title} (mean; band = 95 % CI, method per panel)\n{_subtitle(data, 'iterative')} · iteration 0 = Exp 1 at thought 0", x=0.0, ha="left")
            paths.append(_save(fig, out / f"{name}.png"))
    return paths


# ---- Exp 1 vs Exp 2 vs layer patching -------------------------------------------------------
COMPARE_METRICS = ("kl", "logprob_diff")
STEP = {"position": "thought", "iterative": "iteration"}  # the cell key the x axis runs over


def comparison(data: RunData, out: Path) -> list[Path]:
    have = [e for e in ("position", "iterative", "layer") if e in data.rows]
    if len(have) < 2:
        return []
    its = data.iterations
    xs = sorted(set(data.thoughts) | set(its)) if "iterative" in have else data.thoughts
    layers = data.layers
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
                ref_key = data.key(ref_exp, layer=l, **({} if ref_exp == "layer" else {STEP[ref_exp]: 0}))
                _ref_lines(ax, data, ref_exp, ref_key, metric)
                if "layer" in have and data.key("layer", layer=l) in data.cells("layer"):
                    m, lo, hi = data.interval("layer", data.key("layer", layer=l), metric)
                    ax.axhline(m, color=EXP_COLORS["layer"], lw=1.4, label="layer patching (all thoughts)")
                    if np.isfinite(lo):
                        ax.axhspan(lo, hi, color=EXP_COLORS["layer"], alpha=0.08, lw=0)
                    means.append([m])
                if "position" in have:
                    keys = {k: data.key("position", layer=l, thought=k) for k in data.thoughts}
                    ks = [k for k in data.thoughts if keys[k] in data.cells("position")]
                    m, lo, hi = _series(data, "position", [keys[k] for k in ks], metric)
                    _band(ax, np.array(ks), m, lo, hi, EXP_COLORS["position"], label=f"Exp 1: {data.source_role} activation at thought k only", alpha=0.10)
                    means.append(m)
                if "iterative" in have:
                    keys = {i: data.key("iterative", layer=l, iteration=i) for i in its}
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
                f"Exp 1 vs Exp 2 vs layer patching: {LABELS[metric]} (mean; band = {ci_name(data, have[0], metric)})\n"
                f"{data.model_name} · {data.direction} · n = {max(data.n_pairs(e) for e in have)} pairs", x=0.0, ha="left")
            paths.append(_save(fig, out / f"comparison_{metric}.png"))
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
    if metric == "recovered":
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


def _pair_lines(pair: dict) -> str:
    c, r = pair.get("clean", {}), pair.get("corrupted", {})
    return f"clean: {_hover_text(c.get('question', '?'))} (answer {_answer(c.get('answer'))})<br>corrupted: {_hover_text(r.get('question', '?'))} (answer {_answer(r.get('answer'))})"


def _pair_title(pid: int, pair: dict) -> str:
    c, r = pair.get("clean", {}), pair.get("corrupted", {})
    return f"pair {pid} · clean: {_hover_text(c.get('question', '?'), 120)} → {_answer(c.get('answer'))}<br>corrupted: {_hover_text(r.get('question', '?'), 120)} → {_answer(r.get('answer'))}"


def position_html(data: RunData, out: Path) -> list[Path]:
    """Exp 1 heatmaps: the mean view (hover: mean, interval and its method, n) and, on a
    slider, every pair (hover: the pair's questions and answers, the patched answer), all on
    one colour scale per metric; ● marks cells whose answer flips to the source answer."""
    import plotly.graph_objects as go

    exp = "position"
    ylab = _ylabels(data.layers)
    xlab = [str(k) for k in data.thoughts]
    pairs = {p["pair_id"]: p for p in data.pairs}
    n_pairs = data.n_pairs(exp)
    mean_title = f"mean over n = {n_pairs} pairs"
    sections = []
    for metric in MAIN_METRICS + ("kl_to_clean",):
        method = ci_name(data, exp, metric)
        M, LO, HI, N = (_grid(data, metric, w) for w in ("mean", "ci_low", "ci_high", "n"))
        pids, grids, flips, answers = pair_grids(data, metric)
        zmin, zmax, saturate = colour_range(metric, M, list(grids.values()))
        what = "ratio of means" if metric == "recovered" else "mean"
        custom = [[[f"[{_num(lo)}, {_num(hi)}]", "n/a" if not np.isfinite(n) else str(int(n)), _num(m)] for m, lo, hi, n in zip(*rows)] for rows in zip(M, LO, HI, N)]
        fig = go.Figure()
        fig.add_trace(go.Heatmap(
            z=[[_r(v) for v in row] for row in M], x=xlab, y=ylab, text=[[cell_text(v) for v in row] for row in M], texttemplate="%{text}",
            customdata=custom, coloraxis="coloraxis", name="mean",
            hovertemplate=f"layer %{{y}}, thought %{{x}}<br>{what} %{{customdata[2]}}<br>{method} %{{customdata[0]}}<br>n = %{{customdata[1]}}<extra></extra>",
        ))
        owner: list = [None]  # the slider step (None = mean view, else a pair id) showing each trace
        per_pair = "this pair's ratio" if metric == "recovered" else SHORT[metric]
        for pid in pids:
            G, F = grids[pid], flips[pid]
            ans = [[[_answer(a) + (f" (flips to the {data.source_role} answer)" if f else ""), _num(v)] for a, f, v in zip(*rows)] for rows in zip(answers[pid], F, G)]
            # a flip is marked in the cell's text: a marker trace on a category axis could only sit on the number
            text = [[cell_text(v) + (" ●" if f else "") for v, f in zip(*rows)] for rows in zip(G, F)]
            fig.add_trace(go.Heatmap(
                z=[[_r(v) for v in row] for row in G], x=xlab, y=ylab, text=text, texttemplate="%{text}",
                customdata=ans, coloraxis="coloraxis", visible=False, name=f"pair {pid}",
                hovertemplate=f"pair {pid} · layer %{{y}}, thought %{{x}}<br>{per_pair} %{{customdata[1]}}<br>patched answer %{{customdata[0]}}<br>{_pair_lines(pairs.get(pid, {}))}<extra></extra>",
            ))
            owner.append(pid)
        steps = [
            {"method": "update", "label": "mean" if pid is None else f"pair {pid}",
             "args": [{"visible": [o == pid for o in owner]}, {"title.text": mean_title if pid is None else _pair_title(pid, pairs.get(pid, {}))}]}
            for pid in [None] + pids
        ]
        fig.update_layout(
            coloraxis={"cmin": _r(zmin), "cmax": _r(zmax), "colorbar": {"title": {"text": SHORT[metric]}}, **_plotly_colours(metric)},
            title={"text": mean_title, "x": 0, "xanchor": "left", "font": {"size": 12}},
            sliders=[{"active": 0, "steps": steps, "currentvalue": {"prefix": "showing: "}, "pad": {"t": 40}}],
            xaxis={"title": {"text": "thought k"}, "type": "category"}, yaxis={"title": {"text": "layer (input = fed thought vector)"}, "type": "category"},
            height=max(500, 28 * len(ylab) + 340), margin={"t": 120}, meta={"metric": metric, "experiment": exp},
        )
        note = (
            f"{LABELS[metric]}. The {what} over pairs; hover for the 95 % interval ({method.split(': ')[-1]}) and n. "
            f"Slide to see one pair (hover: its questions, answers and the patched answer; ● = the answer flips to the {data.source_role} answer). "
            f"One colour scale for the mean and every pair ({zmin:.3g} to {zmax:.3g}).{saturate}"
        )
        sections.append((f"Exp 1 heatmap — {SHORT[metric]}", note, fig))
    intro = f"Exp 1, position-wise patching: each (layer, thought) site alone gets the {data.source_role} activation. {_subtitle(data, exp)}. {OFFLINE}"
    return [_page(out / "position.html", f"Exp 1 — position-wise patching ({data.run_dir.name})", intro, sections)]


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
    fig.update_layout(xaxis_title=xname, yaxis_title=SHORT[metric], height=440, margin={"t": 50}, meta={"metric": metric, "experiment": exp},
                      updatemenus=_scale_menu(fig, metric, means), title=_bars_title(data, exp, metric))
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
    layers = [l for l in data.layers if data.key("layer", layer=l) in data.cells("layer")]
    xs = _ylabels(layers)
    sections = []
    for metric in CURVE_METRICS:
        fig = _lines_fig(data, "layer", metric, "layer", [None], list(range(len(layers))), lambda g, x: data.key("layer", layer=layers[x]), lambda g: "layer patching")
        fig.update_xaxes(tickmode="array", tickvals=list(range(len(layers))), ticktext=xs, title_text="layer (all thoughts patched)")
        sections.append((SHORT[metric], _curve_note(data, "layer", metric, "— mean over pairs per layer"), fig))
    intro = f"Layer patching: every thought at one layer gets the {data.source_role} activations. {_subtitle(data, 'layer')}. {OFFLINE}"
    return [_page(out / "layer.html", f"Layer patching ({data.run_dir.name})", intro, sections)]


def iterative_html(data: RunData, out: Path) -> list[Path]:
    import plotly.graph_objects as go

    its = data.iterations
    key = lambda l, i: data.key("iterative", layer=l, iteration=i)  # noqa: E731
    layers = [l for l in data.layers if any(key(l, i) in data.cells("iterative") for i in its)]
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
                    ks = [k for k in data.thoughts if data.key("position", layer=l, thought=k) in data.cells("position")]
                    fig.add_trace(_trace(data, "position", [data.key("position", layer=l, thought=k) for k in ks], metric, ks, f"Exp 1 (thought k only), {lname(l)}", "thought", line={"color": EXP_COLORS["position"]}))
                    vis_of.append(l)
                fig.add_trace(_trace(data, "iterative", [key(l, i) for i in its], metric, its, f"Exp 2 (iteration i), {lname(l)}", "iteration", line={"color": EXP_COLORS["iterative"], "dash": "dash"}))
                vis_of.append(l)
                if "layer" in data.rows and data.key("layer", layer=l) in data.cells("layer"):
                    lk = data.key("layer", layer=l)
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
    return [_page(out / "iterative.html", f"Exp 2 — iterative patching ({data.run_dir.name})", intro, sections)]


# ---- all --------------------------------------------------------------------------------------
def write_figures(data: RunData, out: Path) -> dict[str, list[Path]]:
    """Every figure of the run, grouped by the report that embeds it."""
    figs: dict[str, list[Path]] = {"layer": [], "position": [], "iterative": [], "comparison": []}
    if "position" in data.rows:
        figs["position"] += position_heatmaps(data, out) + position_per_pair(data, out) + position_html(data, out)
    if "layer" in data.rows:
        figs["layer"] += layer_curve(data, out) + layer_html(data, out)
    if "iterative" in data.rows:
        figs["iterative"] += iterative_trajectories(data, out) + iterative_html(data, out)
    figs["comparison"] += comparison(data, out)
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
