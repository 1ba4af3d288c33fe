"""Comparing result rows of two engines (or two batch shapes): fp32 rounding differs between
GEMM shapes, so floats agree within a tolerance, never bit for bit."""

from __future__ import annotations

import math


def _gap(row: dict) -> float:
    """`recovered` is a ratio over the source–receiving gap: its rounding is its numerator's
    divided by that gap, so it is compared on the numerator's scale."""
    return abs(row["logprob_diff_source"] - row["logprob_diff_receiving"]) if "logprob_diff_source" in row else 1.0


def assert_rows_close(a: list[dict], b: list[dict], tol: float = 1e-5) -> None:
    """Same keys, equal non-floats, every float within tol (relative above 1)."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            x, y = ra[k], rb[k]
            if isinstance(x, float):
                scale = _gap(rb) if k == "recovered" else 1.0
                assert (math.isnan(x) and math.isnan(y)) or abs(x - y) * scale <= tol * max(1.0, abs(y)), (k, x, y, ra)
            else:
                assert x == y, (k, x, y)
