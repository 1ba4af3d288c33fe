"""Seeded modes and causal tracing scale out like plain patching: `--shard i/n` + `merge`, and
`--resume` of a torn run, give the rows of one whole run (the noise is seeded per pair and
site, a resample partner and the mean come from the whole pair set, never from the shard)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.rows import assert_rows_close
from tests.test_run import _pairs
from tests.tiny import make_tiny_codi
from thoughtpatch.report.merge import merge_runs
from thoughtpatch.report.results import read_rows
from thoughtpatch.sweep import RunConfig, run_experiments

quiet = lambda s: None  # noqa: E731
KINDS = {
    "noise": dict(experiments=["position"], mode="noise", noise_scale=0.5, seed=3, layers="0-1", thoughts="0-2"),
    "resample": dict(experiments=["position"], mode="resample", layers="0-1", thoughts="0-2"),
    "trace": dict(experiments=["trace"], layers="0-1", thoughts="0-2", seed=3),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale_modes")
    ckpt, base = make_tiny_codi(root, "llama")
    return ckpt, base, _pairs(root / "pairs.json", 5)


def _cfg(tiny, out, kind, **kw) -> RunConfig:
    ckpt, base, pairs = tiny
    return RunConfig(model=str(ckpt), base=str(base), pairs=str(pairs), out=str(out), wandb="disabled",
                     max_new_tokens=6, report=False, **KINDS[kind], **kw)


def _rows(run, exp):
    key = lambda r: json.dumps([r["pair_id"], str(r["layer"]), r.get("thought")])  # noqa: E731
    return sorted(read_rows(run / exp / "results.jsonl"), key=key)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_shards_and_resume_equal_one_run(tiny, tmp_path, kind):
    exp = KINDS[kind]["experiments"][0]
    whole = run_experiments(_cfg(tiny, tmp_path / "whole", kind), progress=False, log=quiet)
    shards = [run_experiments(_cfg(tiny, tmp_path / f"s{i}", kind, shard=f"{i}/2"), progress=False, log=quiet) for i in range(2)]
    merged = merge_runs(shards, tmp_path / "merged", report=False, log=quiet)
    want = _rows(whole, exp)
    assert {r["pair_id"] for r in want} == set(range(5))
    assert_rows_close(_rows(merged, exp), want)  # other batch shapes: equal up to fp32 rounding
    if kind == "resample":
        assert {r["pair_id"]: r["resample_pair"] for r in want} == {p: (p + 1) % 5 for p in range(5)}
    # Torn: the last pair's rows lost; --resume reruns it alone and must give the same rows.
    torn = shutil.copytree(whole, tmp_path / "torn")
    res = torn / exp / "results.jsonl"
    res.write_text("".join(line for line in res.read_text().splitlines(keepends=True) if json.loads(line)["pair_id"] != 4))
    run_experiments(_cfg(tiny, torn, kind, resume=True), progress=False, log=quiet)
    assert_rows_close(_rows(torn, exp), want)
