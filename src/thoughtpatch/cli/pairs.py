"""`thoughtpatch pairs ...`: prepare, filter, stats, from-gsm8k, synth."""

from __future__ import annotations

import typer

from thoughtpatch.cli import app

pairs_app = typer.Typer(help="Make, convert, filter and describe clean/corrupted pairs.", no_args_is_help=True)
app.add_typer(pairs_app, name="pairs")
