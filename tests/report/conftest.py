"""Tiny real runs shared by the report tests (figures, reports, intervals, compare, browser):
the classic resid run, a multi-site run with a mode and knockout, causal tracing, a noising
run and a tiny Coconut run to compare with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tiny import make_tiny_codi, make_tiny_coconut

Q = "tom has {} apples and he buys 5 more . how many apples has tom ?"


@pytest.fixture(scope="session")
def tiny_codi(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(checkpoint, base, pairs file) of a tiny LLaMA CODI model (3 layers, 4 heads, 2 KV heads)."""
    root = tmp_path_factory.mktemp("tiny")
    ckpt, base = make_tiny_codi(root, "llama")
    pairs = [{"pair_id": i, "clean": {"question": Q.format(2 + i), "answer": 7 + i}, "corrupted": {"question": Q.format(30 + i), "answer": 35 + i}} for i in range(3)]
    (root / "pairs.json").write_text(json.dumps(pairs))
    return ckpt, base, root / "pairs.json"


def _run(model: tuple[Path, Path, Path], out: Path, **settings) -> Path:
    from thoughtpatch.sweep import RunConfig, run_experiments

    ckpt, base, pairs = model
    cfg = RunConfig(model=str(ckpt), base=str(base), pairs=str(pairs), out=str(out), wandb="disabled", max_new_tokens=6, **settings)
    run_experiments(cfg, progress=False, log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def run_dir(tiny_codi) -> Path:
    """The classic run: layer, position, iterative on the resid grid."""
    return _run(tiny_codi, tiny_codi[2].parent / "runs" / "tiny-run")


# The runs below use K = 2 thoughts where the figures they are read for need only a grid of
# two or more cells per axis: a report's cost grows with its panels (a head sheet per thought).
@pytest.fixture(scope="session")
def sites_run(tiny_codi) -> Path:
    """Two sites (attn and the head grid) under the noise mode, and knockout on both runs."""
    return _run(
        tiny_codi, tiny_codi[2].parent / "runs" / "tiny-sites", site="attn,head", mode="noise", noise_scale=0.5,
        experiments=["layer", "position", "iterative", "knockout"], knock_on="both", readers="both", num_thoughts=2,
    )


@pytest.fixture(scope="session")
def trace_run(tiny_codi) -> Path:
    """Causal tracing on the resid and the head grid."""
    return _run(tiny_codi, tiny_codi[2].parent / "runs" / "tiny-trace", site="resid,head", experiments=["trace"], num_thoughts=2)


# The two runs only `compare` reads (their results and summaries): no reports of their own.
@pytest.fixture(scope="session")
def noising_run(tiny_codi) -> Path:
    """Exp 1 alone, noising: comparable with run_dir (same sites, same grid shape)."""
    return _run(tiny_codi, tiny_codi[2].parent / "runs" / "tiny-noising", direction="noising", experiments=["position"], report=False)


@pytest.fixture(scope="session")
def coconut_run(tiny_codi, tmp_path_factory) -> Path:
    """Exp 1 on a tiny Coconut model (GPT-2, 3 thoughts): the same sites, another grid shape."""
    root = tmp_path_factory.mktemp("tiny-coconut")
    ckpt, base = make_tiny_coconut(root, "gpt2")
    return _run((ckpt, base, tiny_codi[2]), root / "runs" / "tiny-coconut", experiments=["position"], num_thoughts=3, report=False)
