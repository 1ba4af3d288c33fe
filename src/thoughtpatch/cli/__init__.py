"""`thoughtpatch` command line. Each room registers its commands from its own module;
heavy imports (torch, transformers) happen inside the commands so `--help` stays fast."""

from __future__ import annotations

import sys

import typer

from thoughtpatch.errors import ThoughtpatchError

app = typer.Typer(
    name="thoughtpatch",
    help="Faithful activation patching for continuous-thought language models (CODI).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Registration order = order in --help.
from thoughtpatch.cli import experiments as _experiments  # noqa: E402,F401
from thoughtpatch.cli import report as _report  # noqa: E402,F401
from thoughtpatch.cli import compare as _compare  # noqa: E402,F401
from thoughtpatch.cli import scale as _scale  # noqa: E402,F401
from thoughtpatch.cli import model as _model  # noqa: E402,F401
from thoughtpatch.cli import evaluate as _evaluate  # noqa: E402,F401
from thoughtpatch.cli import pairs as _pairs  # noqa: E402,F401
from thoughtpatch.cli import synth as _synth  # noqa: E402,F401
from thoughtpatch.cli import toy as _toy  # noqa: E402,F401


def main() -> None:
    """Entry point: expected faults — bad input (ThoughtpatchError) and the file system's
    (OSError: read-only, full disk, a directory where a file goes, ...) — become one line on
    stderr and exit status 2. Anything else is a bug and keeps its traceback."""
    try:
        app()
    except ThoughtpatchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {os_error(e)}", file=sys.stderr)
        sys.exit(2)


def os_error(e: OSError) -> str:
    """'PATH: cause' for an OSError (both paths of a failed rename)."""
    where = ", ".join(str(f) for f in (e.filename, e.filename2) if f)
    cause = e.strerror or str(e) or type(e).__name__
    return f"{where}: {cause}" if where else cause
