"""`thoughtpatch compare RUN_A RUN_B --out DIR`: two runs' Exp 1 grids on one colour range per
metric, a difference panel where the grids have the same shape, one-line refusals."""

from __future__ import annotations

import re

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import run_cli
from thoughtpatch.report.rundata import MAIN_METRICS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _images(fig):
    return [ax.images[0] for ax in fig.axes if ax.images]


def test_compare_two_codi_runs_shares_the_colour_range(run_dir, noising_run, tmp_path):
    from thoughtpatch.cli import app
    from thoughtpatch.report.compare import compare_figure
    from thoughtpatch.report.figures import _grid, _scale_exp
    from thoughtpatch.report.rundata import load_run

    out = tmp_path / "cmp"
    r = CliRunner().invoke(app, ["compare", str(run_dir), str(noising_run), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == sorted(["compare.md"] + [f"compare_{m}.png" for m in MAIN_METRICS])
    assert all((out / f"compare_{m}.png").read_bytes().startswith(PNG_MAGIC) for m in MAIN_METRICS)
    text = (out / "compare.md").read_text()
    assert f"`{run_dir.name}` (A) vs `{noising_run.name}` (B)" in text and "| direction | denoising | noising |" in text
    assert "Both runs patched the same pairs" in text and text.count("Largest |A − B|") == len(MAIN_METRICS)
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (out / link).is_file()

    a, b = load_run(run_dir).only("position", "resid"), load_run(noising_run).only("position", "resid")
    for metric in MAIN_METRICS:
        fig = compare_figure(a, b, metric)
        ia, ib, diff = _images(fig)  # A, B and the difference (same grid shape)
        assert (ia.norm.vmin, ia.norm.vmax) == (ib.norm.vmin, ib.norm.vmax), metric
        A, B = _grid(a, metric), _grid(b, metric)
        both = np.concatenate([A.ravel(), B.ravel()])
        both = both / 10.0 ** _scale_exp(both)  # the figure's numbers are in its colour bar's unit
        assert ia.norm.vmin <= np.nanmin(both) + 1e-9 and np.nanmax(both) <= ia.norm.vmax + 1e-9, metric  # the range covers both runs
        d = np.asarray(diff.get_array())
        np.testing.assert_allclose(d / np.nanmax(np.abs(d)), (A - B) / np.nanmax(np.abs(A - B)), rtol=1e-9, atol=1e-12)


def test_compare_codi_with_coconut_draws_no_difference_across_shapes(run_dir, coconut_run, tmp_path):
    from thoughtpatch.report.compare import compare_figure, write_compare
    from thoughtpatch.report.rundata import load_run

    written = write_compare(run_dir, coconut_run, tmp_path / "cmp")
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "(coconut, gpt2)" in text and "(codi, llama)" in text
    assert text.count("The grids differ in shape") == len(MAIN_METRICS) and len(written) == len(MAIN_METRICS) + 1
    a, b = load_run(run_dir).only("position", "resid"), load_run(coconut_run).only("position", "resid")
    fig = compare_figure(a, b, "kl")
    ia, ib = _images(fig)
    assert (ia.norm.vmin, ia.norm.vmax) == (ib.norm.vmin, ib.norm.vmax)
    assert ia.get_array().shape[1] != ib.get_array().shape[1]  # K = 4 vs 3 thoughts


@pytest.mark.parametrize("other, says", [("sites_run", "the runs patch different sites"), ("trace_run", "no Exp 1 (position) results")])
def test_compare_refuses_incomparable_runs(run_dir, other, says, request, tmp_path):
    out = tmp_path / "cmp"
    r = run_cli("compare", str(run_dir), str(request.getfixturevalue(other)), "--out", str(out))
    assert r.returncode == 2 and says in r.stderr
    assert not out.exists()  # nothing written before both runs are checked


def test_compare_refusal_is_one_line(run_dir, sites_run, tmp_path):
    err = run_cli("compare", str(run_dir), str(sites_run), "--out", str(tmp_path / "x")).stderr
    assert err.count("\n") == 1 and err.startswith("error: the runs patch different sites") and "attn, head" in err
