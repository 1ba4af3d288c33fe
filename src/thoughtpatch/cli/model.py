"""`thoughtpatch trace | inspect | eval`: run the model itself."""

from __future__ import annotations

from thoughtpatch.cli import app  # noqa: F401
