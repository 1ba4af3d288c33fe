"""results.jsonl: a torn last line or an incomplete pair is dropped on resume; a foreign line is named."""

from __future__ import annotations

import json
import math

import pytest

from thoughtpatch.errors import ThoughtpatchError
from thoughtpatch.report.results import open_results, read_rows, summarize


def _row(pid, layer, kl):
    return {"pair_id": pid, "experiment": "layer", "direction": "denoising", "layer": layer, "kl": kl, "flip": layer == 1,
            "logprob_diff": kl, "logprob_diff_receiving": 0.0, "logprob_diff_source": 2.0, "recovered": kl / 2}


def test_torn_and_partial_pairs_are_dropped(tmp_path):
    paths = {"layer": tmp_path / "layer.jsonl"}
    cells = {"layer": [("resid", 0, None), ("resid", 1, None)]}  # (site, layer, head)
    writers, done = open_results(paths, cells, [0, 1], "denoising")
    assert done == set()
    writers["layer"].write_pair([_row(0, 0, 1.0), _row(0, 1, 2.0)])
    with open(paths["layer"], "a") as f:  # pair 1 half written, then a torn line
        f.write(json.dumps(_row(1, 0, 3.0)) + "\n" + '{"pair_id": 1, "lay')
    _, done = open_results(paths, cells, [0, 1], "denoising")
    assert done == {0}
    assert [r["pair_id"] for r in read_rows(paths["layer"])] == [0, 0]


def test_a_pair_is_done_only_in_every_experiment(tmp_path):
    """Pair 0 complete in `layer` but missing from `position`: it is dropped from both, so it
    reruns whole (in the same batch as an uninterrupted run)."""
    paths = {"layer": tmp_path / "layer.jsonl", "position": tmp_path / "position.jsonl"}
    cells = {"layer": [("resid", 0, None)], "position": [("resid", 0, None, 0)]}
    writers, _ = open_results(paths, cells, [0, 1], "denoising")
    pos = lambda pid: {**_row(pid, 0, 1.0), "experiment": "position", "thought": 0}  # noqa: E731
    writers["layer"].write_pair([_row(0, 0, 1.0)])
    writers["position"].write_pair([pos(0)])
    writers["layer"].write_pair([_row(1, 0, 1.0)])  # killed before pair 1's position rows
    _, done = open_results(paths, cells, [0, 1], "denoising")
    assert done == {0}
    assert [r["pair_id"] for r in read_rows(paths["layer"])] == [0]


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "line 2: malformed JSON"),
        ("[1, 2]", "line 2: expected an object"),
        (json.dumps({"layer": 0}), "line 2: field 'pair_id'"),
        (json.dumps(_row(7, 0, 1.0)), "line 2: pair 7 is not in this run's pairs"),
        (json.dumps(_row(0, 5, 1.0)), r"line 2: cell \('resid', 5, None\) is not among"),
        (json.dumps(_row(0, 0, 1.0)), "line 2: pair 0, cell \\('resid', 0, None\\) written twice"),
        (json.dumps({**_row(0, 1, 1.0), "direction": "noising"}), "line 2: direction 'noising'"),
    ],
)
def test_foreign_lines_are_named(tmp_path, line, message):
    """A line that is not this run's (anywhere but a torn tail) is an error naming file and
    line, for --resume as for `report` and `merge` (which read with read_rows)."""
    p = tmp_path / "layer.jsonl"
    p.write_text(json.dumps(_row(0, 0, 1.0)) + "\n" + line + "\n" + json.dumps(_row(0, 1, 1.0)) + "\n")
    with pytest.raises(ThoughtpatchError, match=f"{p}, {message}"):
        open_results({"layer": p}, {"layer": [("resid", 0, None), ("resid", 1, None)]}, [0], "denoising")
    if "JSON" in message or "object" in message or "pair_id" in message:
        with pytest.raises(ThoughtpatchError, match=f"{p}, {message}"):
            read_rows(p, "layer")


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
