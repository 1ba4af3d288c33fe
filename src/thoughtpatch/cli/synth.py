"""`thoughtpatch pairs synth`: templated word problems for the organism."""

from __future__ import annotations

from thoughtpatch.cli.pairs import pairs_app  # noqa: F401
