"""Two runs' Exp 1 grids side by side: `thoughtpatch compare RUN_A RUN_B --out DIR`.

    RUN_A, RUN_B (JSON only) → checked comparable → per site and main metric one PNG:
    A | B on one colour range (vmin/vmax over both runs) | A − B (same grid shape only)
    → compare.md

Meant for the same pairs through two models (the CODI and the Coconut organism) or two
settings (direction, mode). Runs are comparable when both hold Exp 1 results for the same
sites; the difference panel needs the same rows (layers / heads) and thoughts. Every file is
written atomically, and nothing is written before both runs are read and checked.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure

from thoughtpatch.data.schema import atomic_write_text
from thoughtpatch.errors import ThoughtpatchError
from thoughtpatch.report.figures import RC, _draw_heatmap, _fmt_for, _grid, _norm_cmap, _row_label, _save, _scale_exp
from thoughtpatch.report.rundata import LABELS, MAIN_METRICS, SHORT, SITE_WORDS, RunData, load_run, loc_name, mode_tag, verdict_counts

EXP = "position"


def _sites(data: RunData) -> list[str]:
    if EXP not in data.rows:
        raise ThoughtpatchError(f"{data.run_dir}: no Exp 1 (position) results; compare sets two runs' Exp 1 grids side by side")
    return data.groups(EXP)


def check_comparable(a: RunData, b: RunData) -> list[str]:
    """The sites both runs patched (in A's order), or a one-line refusal."""
    sa, sb = _sites(a), _sites(b)
    if set(sa) != set(sb):
        raise ThoughtpatchError(
            f"the runs patch different sites ({a.run_dir}: {', '.join(sa)}; {b.run_dir}: {', '.join(sb)}): compare needs the same sites"
        )
    return sa


def _name(data: RunData, side: str) -> str:
    fam = data.manifest.get("model", {}).get("family")
    mode = mode_tag(data.mode)
    return f"{side}: {data.run_dir.name} — {data.model_name}{f' ({fam})' if fam else ''} · {data.direction}{f' · {mode}' if mode else ''}"


def same_shape(a: RunData, b: RunData) -> bool:
    """The two grids have the same rows and columns (a cell-by-cell difference means something)."""
    return a.locs(EXP) == b.locs(EXP) and a.thoughts == b.thoughts


def compare_figure(a: RunData, b: RunData, metric: str) -> Figure:
    """A | B on one colour range, and A − B where the grids have the same shape. `a` and `b`
    are views of one site."""
    A, B = _grid(a, metric, exp=EXP), _grid(b, metric, exp=EXP)
    both = np.concatenate([A.ravel(), B.ravel()])
    e = _scale_exp(both)
    nc = _norm_cmap(metric, both / 10.0**e)  # the shared range: vmin/vmax over both runs
    diff = same_shape(a, b)
    locs_a, locs_b = a.locs(EXP), b.locs(EXP)
    rows = max(len(locs_a), len(locs_b))
    K = max(len(a.thoughts), len(b.thoughts))
    n = 3 if diff else 2
    with mpl.rc_context(RC):
        fig = Figure(figsize=(n * (0.62 * K + 1.5) + 0.6, 0.4 * rows + 2.0), layout="constrained")
        axes = fig.subplots(1, n)
        annotate = rows * K <= 130
        fmt = _fmt_for(both / 10.0**e)
        for ax, d, M, side in ((axes[0], a, A, "A"), (axes[1], b, B, "B")):
            _draw_heatmap(fig, ax, M, metric, d.locs(EXP), d.thoughts, annotate=annotate, fontsize=6.5, colorbar=side == "B", norm_cmap=nc, scale=e, fmt=fmt)
            ax.set_title(_name(d, side).replace(" — ", "\n", 1), fontsize=8, loc="left")
            ax.set_xlabel("thought k")
        axes[0].set_ylabel(_row_label(locs_a))
        if diff:
            D = A - B
            de = _scale_exp(D)
            _draw_heatmap(fig, axes[2], D, "delta_" + metric, locs_a, a.thoughts, annotate=annotate, fontsize=6.5, scale=de, cbar_label=f"A − B, {SHORT.get(metric, metric)}")
            axes[2].set_title("A − B (its own scale, 0 = white)", fontsize=8, loc="left")
            axes[2].set_xlabel("thought k")
        site = a.site or "resid"
        fig.suptitle(
            f"Exp 1 [{site}]: {LABELS.get(metric, metric)}\nA and B on one colour range"
            + ("; A − B on its own" if diff else "; grids of different shape: no difference panel"),
            x=0.0, ha="left",
        )
    return fig


def _facts(a: RunData, b: RunData) -> str:
    def row(name, f):
        return f"| {name} | {f(a)} | {f(b)} |"

    def pairs(d):
        p = d.manifest.get("pairs", {})
        return f"{d.n_pairs(EXP)} (sha256 {str(p.get('sha256', '?'))[:12]}…)"

    def check(d, name):
        c = next((c for c in d.checks if c["name"] == name), None)
        return "n/a" if c is None or c.get("value") is None else f"{100 * float(c['value']):.1f} %"

    m = lambda d, k: d.manifest.get("model", {}).get(k, "?")  # noqa: E731
    lines = [
        "|  | A | B |", "|---|---|---|",
        row("run", lambda d: f"`{d.run_dir.name}`"),
        row("model", lambda d: f"`{d.model_name}` ({m(d, 'family')}, {m(d, 'arch')})"),
        row("layers L / thoughts K", lambda d: f"{m(d, 'num_layers')} / {d.num_thoughts}"),
        row("direction", lambda d: d.direction),
        row("mode", lambda d: mode_tag(d.mode) or "replace"),
        row("sites", lambda d: ", ".join(d.groups(EXP))),
        row("pairs", pairs),
        row("pairs covered", lambda d: d.pair_set(EXP).split(" (")[0]),
        row("accuracy, clean questions", lambda d: check(d, "baseline_accuracy_clean")),
        row("accuracy, thoughts zeroed", lambda d: check(d, "accuracy_thoughts_zeroed")),
        row("checks", lambda d: verdict_counts(d.checks)),
    ]
    return "\n".join(lines) + "\n"


def _largest(a: RunData, b: RunData, metric: str) -> str:
    if not same_shape(a, b):
        return "The grids differ in shape (layers, heads or thoughts): no cell-by-cell difference."
    A, B = _grid(a, metric, exp=EXP), _grid(b, metric, exp=EXP)
    D = np.abs(A - B)
    if not np.isfinite(D).any():
        return "No cell has a value in both runs."
    i, j = np.unravel_index(np.nanargmax(D), D.shape)
    loc, k = a.locs(EXP)[i], a.thoughts[j]
    return (f"Largest |A − B|: layer {loc_name(loc)}, thought {k} — A {A[i, j]:.3g}, B {B[i, j]:.3g} "
            f"(mean over the grid: A {np.nanmean(A):.3g}, B {np.nanmean(B):.3g}).")


def write_compare(run_a: str | Path, run_b: str | Path, out: str | Path) -> list[Path]:
    """Figures and compare.md for two runs; returns the files written."""
    a, b = load_run(run_a), load_run(run_b)
    sites = check_comparable(a, b)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ThoughtpatchError(f"--out {out}: exists and is not a directory")
    same_pairs = a.manifest.get("pairs", {}).get("sha256") == b.manifest.get("pairs", {}).get("sha256")
    written = []
    parts = [
        f"# Comparison — Exp 1: `{a.run_dir.name}` (A) vs `{b.run_dir.name}` (B)\n",
        _facts(a, b),
        ("Both runs patched the same pairs: a cell's difference compares the two settings on the same questions."
         if same_pairs else
         "**The runs patched different pair sets**: a cell's difference mixes the settings with the questions."),
        "\nEach figure puts A and B on one colour range per metric (vmin/vmax over both runs' cells, so equal colours are "
        "equal values); the difference panel A − B, drawn only when the grids have the same rows and thoughts, has its "
        "own scale, symmetric around 0. Intervals: the runs' own reports (figures/position*.html hover, reports/position_patching.md).\n",
    ]
    for site in sites:
        va, vb = a.only(EXP, site), b.only(EXP, site)
        tag = "" if site == "resid" else f"_{site}"
        parts.append(f"## Site `{site}` — {SITE_WORDS.get(site, site)}\n")
        for metric in MAIN_METRICS:
            path = _save(compare_figure(va, vb, metric), out / f"compare{tag}_{metric}.png")
            written.append(path)
            parts.append(f"### {LABELS.get(metric, metric)}\n\n![{path.stem}]({path.name})\n\n{_largest(va, vb, metric)}\n")
    md = out / "compare.md"
    atomic_write_text(md, "\n".join(parts))
    written.append(md)
    return written


__all__ = ["write_compare", "compare_figure", "check_comparable"]
