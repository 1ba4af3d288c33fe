"""Shared test helpers: where ../shared is, and tiny CODI models built in the tests."""

from __future__ import annotations

import os

# CODI's bf16 reference was recorded with oneDNN's AVX-512 bf16 GEMMs; AMX kernels round a
# few elements differently. The cap is read when torch is imported, so it is set here, first.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def require_shared(rel: str) -> Path:
    """A fixture file under ../shared: missing fails in CI, skips elsewhere with the reason."""
    p = SHARED / rel
    if not p.exists():
        msg = f"fixture {p} is missing"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " (required in CI)")
        pytest.skip(msg)
    return p
