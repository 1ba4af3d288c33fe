"""`thoughtpatch merge`: shard run directories (`run --shard i/n`) into one run directory."""

from __future__ import annotations

from pathlib import Path

import typer

from thoughtpatch.cli import app


@app.command("merge")
def merge(
    dirs: list[Path] = typer.Argument(..., help="Run directories of the shards (every shard of one run)."),
    out: Path = typer.Option(..., "--out", help="Directory for the merged run."),
    no_report: bool = typer.Option(False, "--no-report", help="Do not write reports after merging."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in --out."),
) -> None:
    """Merge shards of one run: results in pair order, summaries, caches and checks recomputed over the union."""
    from thoughtpatch.report.merge import merge_runs

    merge_runs(dirs, out, overwrite=overwrite, report=not no_report)
