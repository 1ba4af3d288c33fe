"""results.jsonl: a torn last line or an incomplete pair is dropped on resume."""

from __future__ import annotations

import json
import math

from thoughtpatch.report.results import ResultsWriter, read_rows, summarize


def _row(pid, layer, kl):
    return {"pair_id": pid, "experiment": "layer", "direction": "denoising", "layer": layer, "kl": kl, "flip": layer == 1,
            "logprob_diff": kl, "logprob_diff_receiving": 0.0, "logprob_diff_source": 2.0, "recovered": kl / 2}


def test_torn_and_partial_pairs_are_dropped(tmp_path):
    p = tmp_path / "results.jsonl"
    w = ResultsWriter(p, rows_per_pair=2)
    w.write_pair([_row(0, 0, 1.0), _row(0, 1, 2.0)])
    with open(p, "a") as f:  # pair 1 half written, then a torn line
        f.write(json.dumps(_row(1, 0, 3.0)) + "\n" + '{"pair_id": 1, "lay')
    w2 = ResultsWriter(p, rows_per_pair=2)
    assert w2.done == {0}
    assert [r["pair_id"] for r in read_rows(p)] == [0, 0]


def test_summary_stats_and_nan(tmp_path):
    rows = [_row(0, 0, 1.0), _row(1, 0, 3.0), _row(2, 0, math.nan)]
    (cell,) = summarize(rows, "layer")
    kl = cell["metrics"]["kl"]
    assert kl["n"] == 2 and kl["mean"] == 2.0 and math.isclose(kl["std"], math.sqrt(2))
    assert kl["ci_method"] == "bootstrap" and 1.0 <= kl["ci_low"] <= kl["ci_high"] <= 3.0 and kl["ci95"] is None
    lp = cell["metrics"]["logprob_diff"]  # unbounded: the symmetric normal interval, ci95 its half-width
    assert lp["ci_method"] == "normal" and math.isclose(lp["ci95"], 1.96 * math.sqrt(2) / math.sqrt(2), rel_tol=1e-4)
    assert math.isclose(lp["ci_high"] - lp["mean"], lp["ci95"]) and math.isclose(lp["mean"] - lp["ci_low"], lp["ci95"])
    assert cell["metrics"]["flip"]["mean"] == 0.0 and cell["metrics"]["flip"]["ci_method"] == "wilson"
    assert "answer" not in cell["metrics"] and "layer" not in cell["metrics"]


def test_every_metric_of_every_cell_has_a_named_interval_in_its_range():
    import random

    from thoughtpatch.report.intervals import METHODS, metric_range

    rng = random.Random(0)
    rows = []
    for pid in range(20):
        for layer in (0, 1):
            kl = rng.expovariate(3.0) if pid % 4 else 0.0  # skewed, many zeros
            rows.append(_row(pid, layer, kl) | {"cos_clean": 1 - rng.random() * 1e-3, "away": pid == 3, "answer": 7})
    cells = summarize(rows, "layer")
    for cell in cells:
        for metric, s in cell["metrics"].items():
            assert {"ci_low", "ci_high", "ci_method"} <= s.keys() and s["ci_method"] in METHODS, metric
            lo, hi = metric_range(metric)
            assert lo <= s["ci_low"] <= s["ci_high"] <= hi, (metric, s)
    # the bootstrap resamples pairs, not rows in file order: a shuffled file gives the same summary
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    assert json.dumps(summarize(shuffled, "layer")) == json.dumps(cells)
