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
    assert kl["n"] == 2 and kl["mean"] == 2.0
    assert math.isclose(kl["std"], math.sqrt(2)) and math.isclose(kl["ci95"], 1.96 * math.sqrt(2) / math.sqrt(2))
    assert cell["metrics"]["flip"]["mean"] == 0.0
