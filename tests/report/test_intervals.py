"""Intervals that stay in their metric's range: Wilson for rates, the seeded bootstrap for
skewed means and the ratio of means, the clipped normal interval for bounded means."""

from __future__ import annotations

import math

import pytest

from thoughtpatch.report.intervals import BOOTSTRAP, CLIPPED, NORMAL, WILSON, Z, metric_range, method_for, ratio_of_means, stats, wilson


def _normal(vals):
    n = len(vals)
    m = sum(vals) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1))
    return m - Z * sd / math.sqrt(n), m + Z * sd / math.sqrt(n)


def test_wilson_known_values_and_bounds():
    assert wilson(0, 10) == (0.0, pytest.approx(0.27753, abs=1e-5))
    assert wilson(10, 10) == (pytest.approx(0.72247, abs=1e-5), 1.0)
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.23659, abs=1e-5) and hi == pytest.approx(0.76341, abs=1e-5)
    for n in (1, 2, 3, 57):
        for k in range(n + 1):
            lo, hi = wilson(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_methods_by_metric():
    assert method_for("flip") == method_for("away") == method_for("anything", boolean=True) == WILSON
    assert method_for("kl") == method_for("kl_to_clean") == method_for("recovered") == BOOTSTRAP
    assert method_for("cos_clean") == method_for("norm") == CLIPPED
    assert method_for("logprob_diff") == method_for("answer_logit_diff") == NORMAL
    assert metric_range("cos_corrupted") == (-1.0, 1.0) and metric_range("kl") == (0.0, math.inf)


def test_rate_where_the_normal_interval_leaves_0_1():
    flips = [True] + [False] * 9
    assert _normal([float(f) for f in flips])[0] < 0  # what the old interval did
    s = stats(flips, "flip", boolean=True)
    assert s["ci_method"] == WILSON and s["mean"] == 0.1 and 0.0 <= s["ci_low"] < 0.1 < s["ci_high"] <= 1.0 and s["ci95"] is None
    zero = stats([False] * 5, "flip", boolean=True)
    assert zero["ci_low"] == 0.0 and zero["ci_high"] > 0  # 0 of 5 is not "certainly 0"


def test_skewed_kl_bootstrap_stays_nonnegative_and_is_seeded():
    kl = [0.0] * 9 + [10.0]
    assert _normal(kl)[0] < 0
    a, b = stats(kl, "kl"), stats(list(kl), "kl")
    assert a["ci_method"] == BOOTSTRAP and 0.0 <= a["ci_low"] <= a["mean"] <= a["ci_high"]
    assert a == b  # same resamples every time
    # float rounding in the data (a KL of −1e-9) is clipped, never shown as a negative bound
    assert stats([-1e-9, -1e-9, 0.0], "kl")["ci_low"] == 0.0


def test_cosine_interval_clipped_to_minus_one_one():
    cos = [1.0, 1.0, 0.9, 1.0000000052]  # fp32 cosines can exceed 1 by rounding
    assert _normal(cos)[1] > 1
    s = stats(cos, "cos_clean")
    assert s["ci_method"] == CLIPPED and -1.0 <= s["ci_low"] <= s["ci_high"] == 1.0 and s["ci95"] is None
    inside = stats([0.1, 0.2, 0.3], "cos_clean")
    assert inside["ci95"] is not None and math.isclose(inside["ci_high"] - inside["mean"], inside["ci95"])


def test_unbounded_metric_gets_the_symmetric_normal_interval():
    s = stats([-1.0, 0.0, 2.0, 3.0], "logprob_diff")
    lo, hi = _normal([-1.0, 0.0, 2.0, 3.0])
    assert s["ci_method"] == NORMAL and s["ci_low"] == pytest.approx(lo) and s["ci_high"] == pytest.approx(hi)


def test_edge_counts():
    none = stats([math.nan, None], "kl")
    assert none["n"] == 0 and none["mean"] is None and none["ci_low"] is None and none["ci_method"] == BOOTSTRAP
    one = stats([0.5], "logprob_diff")
    assert one["mean"] == 0.5 and one["ci_low"] is None  # no spread from one pair
    assert stats([True], "flip", boolean=True)["ci_low"] > 0  # Wilson is defined for n = 1


def test_ratio_of_means_bootstrap():
    patched = [1.0, 2.0, 1.5, 0.5, 1.0]
    receiving = [0.0, 0.0, 0.5, 0.0, 0.5]
    source = [2.0, 3.0, 2.5, 2.0, 2.5]
    r = ratio_of_means(patched, receiving, source)
    assert r["mean"] == pytest.approx((1.2 - 0.2) / (2.4 - 0.2)) and r["ci_method"] == BOOTSTRAP
    assert r["ci_low"] <= r["mean"] <= r["ci_high"] and r == ratio_of_means(patched, receiving, source)
    with_nan = ratio_of_means(patched + [math.nan], receiving + [0.0], source + [1.0])
    assert with_nan["n"] == 5 and with_nan["mean"] == r["mean"]  # a pair missing a value is left out whole
    flat = ratio_of_means([1.0, 1.0], [1.0, 1.0], [1.0, 1.0])  # source = receiving: undefined
    assert flat["mean"] is None and flat["ci_low"] is None
