"""One tiny real run shared by the report tests (figures, reports, intervals, browser)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tiny import make_tiny_codi

Q = "tom has {} apples and he buys 5 more . how many apples has tom ?"


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    from thoughtpatch.sweep import RunConfig, run_experiments

    root = tmp_path_factory.mktemp("tiny")
    ckpt, base = make_tiny_codi(root, "llama")
    pairs = [{"pair_id": i, "clean": {"question": Q.format(2 + i), "answer": 7 + i}, "corrupted": {"question": Q.format(30 + i), "answer": 35 + i}} for i in range(3)]
    (root / "pairs.json").write_text(json.dumps(pairs))
    out = root / "runs" / "tiny-run"
    cfg = RunConfig(model=str(ckpt), base=str(base), pairs=str(root / "pairs.json"), out=str(out), wandb="disabled", max_new_tokens=6)
    run_experiments(cfg, progress=False, log=lambda s: None)
    return out
