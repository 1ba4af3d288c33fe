"""`thoughtpatch report RUN_DIR`: figures, reports, journal entry and inventory, rebuilt from a
run directory's results alone (no model needed)."""

from __future__ import annotations

from pathlib import Path

import typer

from thoughtpatch.cli import app


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory written by `thoughtpatch run` (or layer/position/iterative)."),
    journal: Path = typer.Option(None, "--journal", help="Append the journal entry here instead of RUN_DIR/research_journal.md."),
) -> None:
    """Rebuild figures/, reports/*.md, the research-journal entry and DATA_INVENTORY.md from results.

    The same results give the same files, byte for byte; a run's journal entry is replaced, not duplicated."""
    from thoughtpatch.errors import ThoughtpatchError
    from thoughtpatch.report.markdown import write_reports
    from thoughtpatch.report.rundir import RunLock

    if not run_dir.is_dir():
        raise ThoughtpatchError(f"run directory '{run_dir}' not found")
    with RunLock(run_dir):  # not while a run or merge is writing there
        written = write_reports(run_dir, journal=journal)
    for p in written:
        typer.echo(str(p))
