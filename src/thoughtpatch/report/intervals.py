"""95 % intervals that never leave the range their metric can take (DESIGN §3).

* a rate (a boolean column: flip, away; an accuracy) — the Wilson score interval, inside
  [0, 1] by construction;
* a mean whose distribution is skewed (KL ≥ 0, mostly near 0 with a long tail) and
  `recovered` (a ratio of means) — the percentile bootstrap over pairs, seeded; a resampled
  mean of values ≥ 0 is ≥ 0, so it cannot leave the range either;
* every other mean — the normal interval mean ± 1.96·sd/√n, clipped to the metric's range
  where it has one (cosines [−1, 1], norms ≥ 0).

The method's name is stored with every interval (`ci_method`) and shown wherever the
interval is. Deterministic: the bootstrap draws the same resamples for the same n.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

LEVEL = 0.95
Z = 1.959963984540054  # two-sided 95 % normal quantile
RESAMPLES = 2000
SEED = 0

WILSON, BOOTSTRAP, NORMAL, CLIPPED = "wilson", "bootstrap", "normal", "normal-clipped"
# The names are part of summary.json; these say what each one is.
METHODS = {
    WILSON: "Wilson score interval",
    BOOTSTRAP: f"percentile bootstrap over pairs ({RESAMPLES} resamples, seed {SEED})",
    NORMAL: "normal, mean ± 1.96·sd/√n",
    CLIPPED: "normal, mean ± 1.96·sd/√n clipped to the metric's range",
}
SHORT_METHODS = {WILSON: "Wilson", BOOTSTRAP: "bootstrap", NORMAL: "normal", CLIPPED: "normal, clipped"}
RATES = {"flip", "away"}
RATIO_METRICS = {"recovered", "restored"}  # ratios of means over pairs (results.RATIOS)


def metric_range(metric: str) -> tuple[float, float]:
    """The values a metric (or its mean) can take."""
    if metric in RATES or "accuracy" in metric or metric.endswith("_rate"):
        return 0.0, 1.0
    if metric.startswith("kl") or metric == "norm":
        return 0.0, math.inf
    if metric.startswith("cos"):
        return -1.0, 1.0
    if metric.startswith("logprob_clean"):  # a log-probability (causal tracing)
        return -math.inf, 0.0
    return -math.inf, math.inf


def method_for(metric: str, boolean: bool = False) -> str:
    if boolean or metric in RATES:
        return WILSON
    if metric.startswith("kl") or metric in RATIO_METRICS:
        return BOOTSTRAP
    lo, hi = metric_range(metric)
    return CLIPPED if math.isfinite(lo) or math.isfinite(hi) else NORMAL


def wilson(k: float, n: int, z: float = Z) -> tuple[float, float]:
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at k = 0 and k = n the ends are exactly 0 and 1 (the formula leaves a rounding error)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


@lru_cache(maxsize=64)
def _resamples(n: int) -> np.ndarray:
    """(RESAMPLES, n) indices; the same for every cell with n pairs, so a rerun gives the same bytes."""
    return np.random.default_rng(SEED).integers(0, n, size=(RESAMPLES, n))


def _percentiles(boot: np.ndarray) -> tuple[float | None, float | None]:
    boot = boot[np.isfinite(boot)]
    if boot.size < RESAMPLES // 2:  # the statistic is undefined on most resamples
        return None, None
    lo, hi = np.percentile(boot, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    return float(lo), float(hi)


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def stats(values, metric: str, boolean: bool = False) -> dict:
    """mean, std, n and the interval of one metric's per-pair values (NaN skipped).
    `ci95` is the half-width where the interval is mean ± ci95, else null."""
    vals = _finite(values)
    n = len(vals)
    method = method_for(metric, boolean)
    out = {"mean": None, "std": None, "n": n, "ci_low": None, "ci_high": None, "ci_method": method, "ci95": None}
    if n == 0:
        return out
    mean = sum(vals) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    out |= {"mean": mean, "std": sd}
    if method == WILSON:
        out["ci_low"], out["ci_high"] = wilson(sum(vals), n)
    elif n < 2:
        pass  # one pair: no spread to build an interval from
    elif method == BOOTSTRAP:
        out["ci_low"], out["ci_high"] = clip(metric, *_percentiles(np.asarray(vals)[_resamples(n)].mean(axis=1)))
    else:
        half = Z * sd / math.sqrt(n)
        low, high = clip(metric, mean - half, mean + half)
        out |= {"ci_low": low, "ci_high": high, "ci95": half if (low, high) == (mean - half, mean + half) else None}
    return out


def clip(metric: str, low: float | None, high: float | None) -> tuple[float | None, float | None]:
    """Both ends into the metric's range. Needed by the normal interval; for the others it only
    catches float rounding in the data (a cosine of 1.0000000052, a KL of −1e-9)."""
    if low is None or high is None:
        return low, high
    a, b = metric_range(metric)
    return min(max(low, a), b), max(min(high, b), a)


def ratio_of_means(patched, receiving, source) -> dict:
    """A ratio of means — `recovered` (of logprob_diff), `restored` (of log P(clean answer)) —
    (mean patched − mean receiving) / (mean source − mean receiving), with a bootstrap
    interval over pairs (a pair's three values are resampled together)."""
    trip = [(float(p), float(r), float(s)) for p, r, s in zip(patched, receiving, source) if not any(math.isnan(float(v)) for v in (p, r, s))]
    n = len(trip)
    out = {"mean": None, "n": n, "ci_low": None, "ci_high": None, "ci_method": BOOTSTRAP, "ci95": None}
    if n == 0:
        return out
    mp, mr, ms = (sum(c) / n for c in zip(*trip))
    out["mean"] = (mp - mr) / (ms - mr) if ms != mr else None
    P, R, S = (np.asarray(c) for c in zip(*trip))
    if n >= 2:
        idx = _resamples(n)
        with np.errstate(divide="ignore", invalid="ignore"):
            boot = (P[idx].mean(1) - R[idx].mean(1)) / (S[idx].mean(1) - R[idx].mean(1))
        out["ci_low"], out["ci_high"] = _percentiles(boot)
    return out

