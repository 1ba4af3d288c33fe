"""Figures of a run: matplotlib PNGs (paper quality, byte-reproducible) and one offline
interactive plotly page per experiment.

Every function takes a `RunData` (JSON read back from the run directory) and the figures
directory, and returns the paths it wrote. PNGs are saved without the Software tag and with
fixed settings, so rebuilding from the same results gives the same bytes.
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
    cells = data.cells("position")
    M = np.full((len(data.layers), len(data.thoughts)), np.nan)
    for i, l in enumerate(data.layers):
        for j, k in enumerate(data.thoughts):
            if (l, k) in cells:
                M[i, j] = data.stat("position", (l, k), metric, what)
    return M


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


def _series(data: RunData, exp: str, keys: list[tuple], metric: str) -> tuple[np.ndarray, np.ndarray]:
    m = np.array([data.stat(exp, k, metric, "mean") for k in keys])
    ci = np.array([data.stat(exp, k, metric, "ci95") for k in keys])
    return m, ci


def _layer_colors(layers: list) -> list:
    cmap = mpl.colormaps["viridis"]
    n = max(len(layers) - 1, 1)
    return [cmap(0.88 * i / n) for i in range(len(layers))]


def _band(ax, x, m, ci, color, label=None, marker="o", ls="-", alpha=0.15):
    ax.plot(x, m, marker=marker, ms=3.5, lw=1.4, color=color, label=label, ls=ls, zorder=3)
    if np.isfinite(ci).any():
        ax.fill_between(x, m - ci, m + ci, color=color, alpha=alpha, lw=0)
        ax.plot(x, m - ci, color=color, lw=0.4, alpha=0.5, ls=ls)
        ax.plot(x, m + ci, color=color, lw=0.4, alpha=0.5, ls=ls)


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


def position_per_pair(data: RunData, out: Path) -> list[Path]:
    """Small multiples: one heatmap per pair, one shared colour scale per sheet; dots mark
    cells where the greedy answer flipped to the source run's answer."""
    paths = []
    by_pair = data.pair_rows("position")
    pids = [p for p in data.pair_ids if p in by_pair] or sorted(by_pair)
    n = len(pids)
    ncols = max(1, min(n, math.ceil(math.sqrt(n * 1.3))))
    nrows = math.ceil(n / ncols)
    L, K = len(data.layers), len(data.thoughts)
    li = {l: i for i, l in enumerate(data.layers)}
    ki = {k: j for j, k in enumerate(data.thoughts)}
    with mpl.rc_context(RC):
        for metric, label in PER_PAIR.items():
            get = _pair_value(metric)
            grids, flips = {}, {}
            for pid in pids:
                G = np.full((L, K), np.nan)
                F = np.zeros((L, K), bool)
                for r in by_pair[pid]:
                    if r["layer"] in li and r["thought"] in ki:
                        G[li[r["layer"]], ki[r["thought"]]] = get(r)
                        F[li[r["layer"]], ki[r["thought"]]] = bool(r.get("flip"))
                grids[pid], flips[pid] = G, F
            allv = np.concatenate([g.ravel() for g in grids.values()])
            e = _scale_exp(allv)
            nc = _norm_cmap(metric, allv / 10.0**e)
            w, h = 0.32 * K + 0.55, 0.16 * L + 0.55
            fig = Figure(figsize=(ncols * w + 1.2, nrows * h + 1.0), layout="constrained")
            axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
            im = None
            for idx, ax in enumerate(axes):
                if idx >= n:
                    ax.set_axis_off()
                    continue
                pid = pids[idx]
                im, _ = _draw_heatmap(fig, ax, grids[pid], metric, data.layers, data.thoughts, annotate=False, colorbar=False, norm_cmap=nc, scale=e)
                ys, xs = np.nonzero(flips[pid])
                if len(xs):
                    ax.scatter(xs, ys, s=16, c="black", marker="o", edgecolors="white", linewidths=0.6)
                ax.set_title(f"pair {pid}" + (f" · {int(flips[pid].sum())} flip" if flips[pid].any() else ""), fontsize=7, pad=2)
                ax.tick_params(labelsize=5, length=0, pad=1)
                col, row = idx % ncols, idx // ncols
                if col:
                    ax.set_yticklabels([])
                if row != nrows - 1 and idx + ncols < n:
                    ax.set_xticklabels([])
            if im is not None:
                cb = fig.colorbar(im, ax=list(axes[:n]), fraction=0.03, pad=0.01, shrink=0.6)
                cb.set_label(PER_PAIR_SHORT[metric] + _suffix(e))
            fig.suptitle(
                f"Exp 1 per pair: {label}\nrows: layer (bottom row = input z$_k$), columns: thought k · dot = answer flips to the {data.source_role} answer · {data.model_name} · {data.direction}",
                x=0.0, ha="left", fontsize=9,
            )
            paths.append(_save(fig, out / f"position_per_pair_{metric}.png"))
    return paths


# ---- layer patching ---------------------------------------------------------------------------
CURVE_METRICS = ("kl", "kl_to_clean", "answer_logit_diff", "logprob_diff", "recovered", "flip")


def layer_curve(data: RunData, out: Path) -> list[Path]:
    layers = [l for l in data.layers if (l,) in data.cells("layer")]
    x = np.arange(len(layers))
    with mpl.rc_context(RC):
        fig = Figure(figsize=(max(9.0, 3 * (0.25 * len(layers) + 1.6)), 5.6), layout="constrained")
        axes = fig.subplots(2, 3).ravel()
        for ax, metric in zip(axes, CURVE_METRICS):
            m, ci = _series(data, "layer", [(l,) for l in layers], metric)
            _zero_line(ax, metric)
            _ref_lines(ax, data, "layer", (layers[0],), metric)
            _band(ax, x, m, ci, EXP_COLORS["layer"], label="layer patching (mean ± 95 % CI)")
            ax.set_xticks(x, _ylabels(layers), rotation=0 if len(layers) <= 10 else 90)
            ax.set_xlabel("layer (all thoughts patched)")
            ax.set_title(LABELS[metric] + (", no CI" if metric == "recovered" else ""), fontsize=9)
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
    layers = [l for l in data.layers if any((l, i) in data.cells("iterative") for i in its)]
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
            fig = Figure(figsize=(11.5, 3.0 * nrows + 0.8), layout="constrained")
            axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
            for ax, metric in zip(axes, metrics):
                _zero_line(ax, metric)
                for l, c in zip(layers, colors):
                    m, ci = _series(data, "iterative", [(l, i) for i in its], metric)
                    _band(ax, x, m, ci, c, label=("input" if l == "input" else f"layer {l}"), marker=".", alpha=0.10 if len(layers) <= 5 else 0.04)
                ax.set_xticks(x)
                ax.set_xlabel("iteration i (thought patched with $a_i$)")
                ax.set_title(LABELS[metric] + (", no CI" if metric == "recovered" else ""), fontsize=9)
                if metric in RATE:
                    ax.set_ylim(-0.03, 1.03)
                if metric in ("cos_clean", "cos_corrupted"):
                    ax.set_ylim(top=1.02)
            for ax in axes[len(metrics):]:
                ax.set_axis_off()
            handles, labels = axes[0].get_legend_handles_labels()
            fig.legend(handles, labels, loc="outside right center", frameon=False, title="layer", ncols=1 if len(layers) <= 20 else 2)
            fig.suptitle(f"{title} (mean; band = 95 % CI)\n{_subtitle(data, 'iterative')} · iteration 0 = Exp 1 at thought 0", x=0.0, ha="left")
            paths.append(_save(fig, out / f"{name}.png"))
    return paths


# ---- Exp 1 vs Exp 2 vs layer patching -------------------------------------------------------
COMPARE_METRICS = ("kl", "logprob_diff")


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
            for ax, l in zip(axes, layers):
                _zero_line(ax, metric)
                ref_exp = "layer" if "layer" in have else have[0]
                ref_key = (l,) if ref_exp == "layer" else (l, 0)
                _ref_lines(ax, data, ref_exp, ref_key, metric)
                if "layer" in have and (l,) in data.cells("layer"):
                    m = data.stat("layer", (l,), metric)
                    ci = data.stat("layer", (l,), metric, "ci95")
                    ax.axhline(m, color=EXP_COLORS["layer"], lw=1.4, label="layer patching (all thoughts)")
                    if np.isfinite(ci):
                        ax.axhspan(m - ci, m + ci, color=EXP_COLORS["layer"], alpha=0.08, lw=0)
                if "position" in have:
                    ks = [k for k in data.thoughts if (l, k) in data.cells("position")]
                    m, ci = _series(data, "position", [(l, k) for k in ks], metric)
                    _band(ax, np.array(ks), m, ci, EXP_COLORS["position"], label=f"Exp 1: {data.source_role} activation at thought k only", alpha=0.10)
                if "iterative" in have:
                    ii = [i for i in its if (l, i) in data.cells("iterative")]
                    m, ci = _series(data, "iterative", [(l, i) for i in ii], metric)
                    _band(ax, np.array(ii), m, ci, EXP_COLORS["iterative"], label="Exp 2: chained $a_i$ at thought i only", marker="s", ls="--", alpha=0.10)
                ax.set_title("input (z$_k$)" if l == "input" else f"layer {l}", fontsize=9)
                ax.set_xticks(xs)
            for ax in axes[len(layers):]:
                ax.set_axis_off()
            for ax in axes[(nrows - 1) * ncols:]:
                ax.set_xlabel("thought k / iteration i")
            for ax in axes[::ncols]:
                ax.set_ylabel(SHORT[metric])
            handles, labels = axes[0].get_legend_handles_labels()
            fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), frameon=False)
            fig.suptitle(f"Exp 1 vs Exp 2 vs layer patching: {LABELS[metric]} (mean; band = 95 % CI)\n{data.model_name} · {data.direction} · n = {max(data.n_pairs(e) for e in have)} pairs", x=0.0, ha="left")
            paths.append(_save(fig, out / f"comparison_{metric}.png"))
    return paths


# ---- interactive pages (plotly, library inlined) --------------------------------------------
HTML_CSS = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1em;color:#222}h2{margin-top:2em;border-bottom:1px solid #ddd}p.note{color:#555}"


def _page(path: Path, title: str, intro: str, sections: list[tuple[str, str, object]]) -> Path:
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    body = []
    for i, (heading, note, fig) in enumerate(sections):
        div = pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=f"fig{i}", config={"displaylogo": False, "responsive": True})
        body.append(f"<h2>{html.escape(heading)}</h2>\n<p class='note'>{html.escape(note)}</p>\n{div}")
    text = (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>{html.escape(title)}</title>\n<style>{HTML_CSS}</style>\n"
        f"<script type='text/javascript'>{get_plotlyjs()}</script>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p>{html.escape(intro)}</p>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _plotly_scale(metric: str) -> dict:
    if metric in RATE:
        return {"colorscale": "Purples", "zmin": 0, "zmax": 1}
    if metric in SIGNED or metric.startswith("delta_"):
        return {"colorscale": "RdBu", "reversescale": True, "zmid": 0}
    return {"colorscale": "Viridis"}


def _r(v: float):
    return None if not np.isfinite(v) else float(f"{v:.6g}")


def position_html(data: RunData, out: Path) -> list[Path]:
    import plotly.graph_objects as go

    ylab = _ylabels(data.layers)
    xlab = [str(k) for k in data.thoughts]
    by_pair = data.pair_rows("position")
    pids = [p for p in data.pair_ids if p in by_pair] or sorted(by_pair)
    sections = []
    for metric in MAIN_METRICS + ("kl_to_clean",):
        fig = go.Figure()
        M, CI = _grid(data, metric), _grid(data, metric, "ci95")
        Z = [[_r(v) for v in row] for row in M]
        custom = [[("±" + f"{c:.3g}") if np.isfinite(c) else "" for c in row] for row in CI]
        fig.add_trace(go.Heatmap(z=Z, x=xlab, y=ylab, customdata=custom, texttemplate="%{z:.3g}", name="mean",
                                 hovertemplate="layer %{y}, thought %{x}<br>mean %{z:.4g} %{customdata} (95% CI)<extra>mean</extra>",
                                 colorbar={"title": {"text": SHORT[metric]}}, **_plotly_scale(metric)))
        get = _pair_value(metric) if metric != "recovered" else (lambda r: float(r["recovered"]))
        li = {l: i for i, l in enumerate(data.layers)}
        ki = {k: j for j, k in enumerate(data.thoughts)}
        for pid in pids:
            G = np.full((len(data.layers), len(data.thoughts)), np.nan)
            for r in by_pair[pid]:
                if r["layer"] in li and r["thought"] in ki:
                    G[li[r["layer"]], ki[r["thought"]]] = get(r)
            fig.add_trace(go.Heatmap(z=[[_r(v) for v in row] for row in G], x=xlab, y=ylab, visible=False, texttemplate="%{z:.3g}", name=f"pair {pid}",
                                     hovertemplate=f"pair {pid}: layer %{{y}}, thought %{{x}}<br>%{{z:.4g}}<extra></extra>",
                                     colorbar={"title": {"text": SHORT[metric]}}, **_plotly_scale(metric)))
        steps = []
        for i, label in enumerate(["mean"] + [f"pair {p}" for p in pids]):
            vis = [j == i for j in range(1 + len(pids))]
            steps.append({"method": "update", "label": label, "args": [{"visible": vis}]})
        fig.update_layout(
            sliders=[{"active": 0, "steps": steps, "currentvalue": {"prefix": "showing: "}, "pad": {"t": 40}}],
            xaxis_title="thought k", yaxis_title="layer (input = fed thought vector)",
            height=max(420, 28 * len(ylab) + 260), margin={"t": 30},
        )
        note = LABELS[metric] + (" — ratio of means for the mean view; per-pair ratios in the pair views." if metric == "recovered" else ". Mean over pairs; slide to see one pair.")
        sections.append((f"Exp 1 heatmap — {SHORT[metric]}", note, fig))
    intro = f"Exp 1, position-wise patching: each (layer, thought) site alone gets the {data.source_role} activation. {_subtitle(data, 'position')}. Works offline (plotly inlined)."
    return [_page(out / "position.html", f"Exp 1 — position-wise patching ({data.run_dir.name})", intro, sections)]


def _lines_fig(data: RunData, exp: str, metric: str, xname: str, groups: list, xs: list, key: Callable, group_name: Callable):
    import plotly.graph_objects as go

    fig = go.Figure()
    for g in groups:
        keys = [key(g, x) for x in xs]
        m, ci = _series(data, exp, keys, metric)
        fig.add_trace(go.Scatter(x=xs, y=[_r(v) for v in m], name=group_name(g), mode="lines+markers",
                                 error_y={"type": "data", "array": [_r(v) for v in ci], "visible": bool(np.isfinite(ci).any())}))
    fig.update_layout(xaxis_title=xname, yaxis_title=SHORT[metric], height=420, margin={"t": 30})
    return fig


def layer_html(data: RunData, out: Path) -> list[Path]:
    layers = [l for l in data.layers if (l,) in data.cells("layer")]
    xs = _ylabels(layers)
    sections = []
    for metric in CURVE_METRICS:
        fig = _lines_fig(data, "layer", metric, "layer (all thoughts patched)", [None], list(range(len(layers))), lambda g, x: (layers[x],), lambda g: "layer patching")
        fig.update_xaxes(tickmode="array", tickvals=list(range(len(layers))), ticktext=xs)
        sections.append((SHORT[metric], LABELS[metric] + " — mean over pairs, error bars 95 % CI" + (" (none for recovered: a ratio of means)" if metric == "recovered" else ""), fig))
    intro = f"Layer patching: every thought at one layer gets the {data.source_role} activations. {_subtitle(data, 'layer')}. Works offline (plotly inlined)."
    return [_page(out / "layer.html", f"Layer patching ({data.run_dir.name})", intro, sections)]


def iterative_html(data: RunData, out: Path) -> list[Path]:
    import plotly.graph_objects as go

    its = data.iterations
    layers = [l for l in data.layers if any((l, i) in data.cells("iterative") for i in its)]
    sections = []
    for metric in CURVE_METRICS + ACTIVATION_METRICS:
        fig = _lines_fig(data, "iterative", metric, "iteration i", layers, its, lambda g, x: (g, x), lambda g: "input" if g == "input" else f"layer {g}")
        sections.append((SHORT[metric], LABELS[metric] + " per iteration, one line per layer (click legend entries to hide); error bars 95 % CI.", fig))
    if "position" in data.rows or "layer" in data.rows:
        for metric in COMPARE_METRICS:
            fig = go.Figure()
            vis_of = []
            for l in layers:
                if "position" in data.rows:
                    ks = [k for k in data.thoughts if (l, k) in data.cells("position")]
                    m, ci = _series(data, "position", [(l, k) for k in ks], metric)
                    fig.add_trace(go.Scatter(x=ks, y=[_r(v) for v in m], error_y={"type": "data", "array": [_r(v) for v in ci]}, name="Exp 1 (thought k only)", line={"color": EXP_COLORS["position"]}))
                    vis_of.append(l)
                m, ci = _series(data, "iterative", [(l, i) for i in its], metric)
                fig.add_trace(go.Scatter(x=its, y=[_r(v) for v in m], error_y={"type": "data", "array": [_r(v) for v in ci]}, name="Exp 2 (iteration i)", line={"color": EXP_COLORS["iterative"], "dash": "dash"}))
                vis_of.append(l)
                if "layer" in data.rows and (l,) in data.cells("layer"):
                    v = data.stat("layer", (l,), metric)
                    fig.add_trace(go.Scatter(x=[min(its), max(its)], y=[_r(v), _r(v)], mode="lines", name="layer patching (all thoughts)", line={"color": EXP_COLORS["layer"]}))
                    vis_of.append(l)
            buttons = [{"method": "update", "label": "input" if l == "input" else f"layer {l}", "args": [{"visible": [t == l for t in vis_of]}]} for l in layers]
            for t, owner in zip(fig.data, vis_of):
                t.visible = owner == layers[0]
            fig.update_layout(updatemenus=[{"buttons": buttons, "x": 0, "y": 1.15, "xanchor": "left"}], xaxis_title="thought k / iteration i", yaxis_title=SHORT[metric], height=440, margin={"t": 60})
            sections.append((f"Exp 1 vs Exp 2 vs layer patching — {SHORT[metric]}", "Pick a layer in the menu.", fig))
    intro = f"Exp 2, iterative patching: iteration 0 patches (l, 0) with the {data.source_role} activation; iteration i patches only (l, i) with the activation aᵢ the previous iteration produced. {_subtitle(data, 'iterative')}. Works offline (plotly inlined)."
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


__all__ = ["write_figures", "layer_key"]
