"""`thoughtpatch compare RUN_A RUN_B --out DIR`: two runs' Exp 1 grids side by side, on one
colour range per metric, from their results alone (no model needed)."""

from __future__ import annotations

from pathlib import Path

import typer

from thoughtpatch.cli import app


@app.command("compare")
def compare_cmd(
    run_a: Path = typer.Argument(..., help="A run directory with Exp 1 (position) results."),
    run_b: Path = typer.Argument(..., help="Another one, with the same sites (e.g. the Coconut organism on the same pairs)."),
    out: Path = typer.Option(..., "--out", help="Directory for compare.md and the PNGs (created if missing)."),
) -> None:
    """Set two runs' Exp 1 grids side by side: per site and main metric, A and B on one colour
    range and their difference where the grids have the same shape; writes PNGs and compare.md."""
    from thoughtpatch.report.compare import write_compare

    for p in write_compare(run_a, run_b, out):
        typer.echo(str(p))
