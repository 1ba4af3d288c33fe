"""`thoughtpatch toy ...`: the organism (a tiny CODI trained here)."""

from __future__ import annotations

import typer

from thoughtpatch.cli import app

toy_app = typer.Typer(help="The organism: a tiny CODI trained on synthetic arithmetic.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")
