"""--keep correct patches only the pairs the model answers right on both sides; --keep all
(the default) patches every pair and summarises the correct ones from the same rows; the
baseline gate warns when the model answers fewer than half the clean questions right.
On the organism: it solves its own pairs, so a pair file that expects other answers is one
it gets wrong."""

from __future__ import annotations

import json
import math

import pytest

from tests.test_run_errors import cli
from thoughtpatch.model.loader import TOY_DIR
from thoughtpatch.report.results import read_rows
from thoughtpatch.sweep import RunConfig, run_experiments

quiet = lambda s: None  # noqa: E731
OFF = 1000  # added to an expected answer: the organism gives the true one, so it is "wrong"


def organism_pairs(n: int) -> list[dict]:
    return json.loads((TOY_DIR / "pairs.json").read_text())[:n]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    pairs = organism_pairs(4)
    pairs[1]["clean"]["answer"] += OFF
    pairs[3]["corrupted"]["answer"] += OFF
    path = tmp_path_factory.mktemp("keep") / "pairs.json"
    path.write_text(json.dumps(pairs))
    return path, [p["pair_id"] for p in pairs]


@pytest.fixture(scope="module")
def runs(pairs_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("keep_runs")
    path, _ = pairs_file
    return {
        keep: run_experiments(
            RunConfig(pairs=str(path), out=str(root / keep), keep=keep, experiments=["layer"], wandb="disabled", report=False),
            progress=False, log=quiet,
        )
        for keep in ("correct", "all")
    }


def test_keep_correct_drops_exactly_the_pairs_answered_wrong(runs, pairs_file):
    from thoughtpatch.report.markdown import write_reports

    out, (_, ids) = runs["correct"], pairs_file
    truth = {p["pair_id"]: p for p in organism_pairs(4)}
    dropped = json.loads((out / "dropped_pairs.json").read_text())
    assert [d["pair_id"] for d in dropped] == [ids[1], ids[3]]
    assert all(d["reason"] == "answered wrong" and d["patched"] is False for d in dropped)
    # the model's answers are listed: the true answers, not the file's
    assert dropped[0]["clean"] == {"expected": truth[ids[1]]["clean"]["answer"] + OFF, "model": truth[ids[1]]["clean"]["answer"], "text": dropped[0]["clean"]["text"]}
    assert dropped[1]["corrupted"]["model"] == truth[ids[3]]["corrupted"]["answer"]
    rows = read_rows(out / "layer" / "results.jsonl")
    assert {r["pair_id"] for r in rows} == {ids[0], ids[2]}
    summary = json.loads((out / "layer" / "summary.json").read_text())
    assert summary["n_pairs"] == 2 and summary["pair_set"] == "correct"
    cell = summary["cells"][0]
    kl = [r["kl"] for r in rows if r["layer"] == cell["layer"]]
    assert cell["metrics"]["kl"]["n"] == 2 and math.isclose(cell["metrics"]["kl"]["mean"], sum(kl) / 2, rel_tol=1e-12)
    m = json.loads((out / "manifest.json").read_text())
    assert m["selection"] == {"keep": "correct", "same_answer": [], "unpatched": 4, "correct": 2, "wrong": 2, "patched": 2, "dropped": 2}
    assert not (out / "layer" / "summary_correct.json").exists()
    write_reports(out)
    report = (out / "reports" / "layer_patching.md").read_text()
    assert "Pairs covered: the 2 pairs the model answers right on both sides (2 answered wrong were dropped" in report


def test_keep_all_gives_both_analyses_from_one_pass(runs, pairs_file):
    out, (_, ids) = runs["all"], pairs_file
    summary = json.loads((out / "layer" / "summary.json").read_text())
    correct = json.loads((out / "layer" / "summary_correct.json").read_text())
    assert (summary["n_pairs"], summary["pair_set"]) == (4, "all") and (correct["n_pairs"], correct["pair_set"]) == (2, "correct")
    only = json.loads((runs["correct"] / "layer" / "summary.json").read_text())
    for a, b in zip(correct["cells"], only["cells"], strict=True):  # the same pairs, patched alike
        assert a["layer"] == b["layer"]
        assert a["metrics"]["kl"]["mean"] == pytest.approx(b["metrics"]["kl"]["mean"], rel=1e-6)
    assert {r["pair_id"] for r in read_rows(out / "layer" / "results.jsonl")} == set(ids)
    dropped = json.loads((out / "dropped_pairs.json").read_text())
    assert [(d["pair_id"], d["patched"]) for d in dropped] == [(ids[1], True), (ids[3], True)]
    m = json.loads((out / "manifest.json").read_text())
    assert m["selection"] == {"keep": "all", "same_answer": [], "unpatched": 4, "correct": 2, "wrong": 2, "patched": 4, "dropped": 0}


def test_baseline_gate_warns_on_pairs_the_model_cannot_solve(tmp_path):
    pairs = organism_pairs(5)
    for p in pairs:
        p["clean"]["answer"] += OFF
        p["corrupted"]["answer"] += OFF
    path = tmp_path / "unsolvable.json"
    path.write_text(json.dumps(pairs))
    out = tmp_path / "o"
    code, err = cli("layer", "--test-mode", "--pairs", str(path), "--out", str(out), "--wandb", "disabled")
    assert code == 0, err
    warning = "baseline_accuracy_clean = 0.0 %: 0/5 clean questions answered right (greedy), fewer than half: the results describe a model that does not solve these questions"
    assert err.count("WARNING") == 1 and f"WARNING {warning}" in err
    report = (out / "reports" / "layer_patching.md").read_text().splitlines()
    assert report[0] == "# Layer patching (baseline)" and report[2] == f"> **Warning — {warning}.**"
    checks = {c["name"]: c for c in json.loads((out / "checks.json").read_text())["checks"]}
    assert checks["baseline_accuracy_clean"]["verdict"] == "warn"

# No warning on the organism's own pairs: tests/test_api.py, on the `run --test-mode` it
# compares with the API.
