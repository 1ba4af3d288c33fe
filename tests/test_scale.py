"""Scale-out: `--shard i/n` + `merge` equal one unsharded run; `accelerate launch` with two CPU
processes splits the pairs and merges them into the same results."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.test_run import _pairs
from tests.tiny import make_tiny_codi
from thoughtpatch.errors import ThoughtpatchError
from thoughtpatch.report.merge import merge_runs
from thoughtpatch.sweep import RunConfig, parse_shard, run_experiments

N_PAIRS = 5
quiet = lambda s: None  # noqa: E731


# The launched workers (test_accelerate_two_cpu_processes) and the run they are compared with
# must run under the same thread settings: torch's CPU kernels split their sums by thread, so
# one thread and torch's default (one per core) add in another order and differ in the last
# bits. Each worker has one thread, and so has every run this module makes in its own process.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    ckpt, base = make_tiny_codi(root, "llama")
    return ckpt, base, _pairs(root / "pairs.json", N_PAIRS)


def _cfg(tiny, out, **kw) -> RunConfig:
    ckpt, base, pairs = tiny
    return RunConfig(model=str(ckpt), base=str(base), pairs=str(pairs), out=str(out), wandb="disabled", max_new_tokens=6, **kw)


@pytest.fixture(scope="module")
def whole(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    return run_experiments(_cfg(tiny, out, report=False), progress=False, log=quiet)


@pytest.fixture(scope="module")
def shards(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return [run_experiments(_cfg(tiny, root / f"s{i}", shard=f"{i}/2", report=False), progress=False, log=quiet) for i in range(2)]


def _tensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    f = safe_open(str(path), "pt")
    return json.loads(f.metadata()["thoughtpatch"]), {k: f.get_tensor(k) for k in f.keys()}


def assert_same_run(a: Path, b: Path) -> None:
    """Results, summaries, pairs, checks and caches of two run directories are identical."""
    for exp in ("layer", "position", "iterative"):
        assert (a / exp / "results.jsonl").read_text() == (b / exp / "results.jsonl").read_text(), exp
        assert (a / exp / "summary.json").read_text() == (b / exp / "summary.json").read_text(), exp
    assert (a / "pairs.json").read_text() == (b / "pairs.json").read_text()
    assert json.loads((a / "checks.json").read_text()) == json.loads((b / "checks.json").read_text())
    for role in ("clean", "corrupted"):
        meta_a, ta = _tensors(a / f"{role}_activations.safetensors")
        meta_b, tb = _tensors(b / f"{role}_activations.safetensors")
        assert meta_a == meta_b
        assert ta.keys() == tb.keys()
        assert all(ta[k].equal(tb[k]) for k in ta), role
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma["pairs"] == mb["pairs"] and ma["full_pairs"] == mb["full_pairs"]
    assert ma["result_config"] == mb["result_config"] and ma["model"] == mb["model"]


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "1", "a/2", "1/0", "-1/2"):
        with pytest.raises(ThoughtpatchError, match="--shard"):
            parse_shard(bad)


def test_shard_split_is_recorded(shards):
    m0, m1 = (json.loads((d / "manifest.json").read_text()) for d in shards)
    assert m0["shard"] == {"index": 0, "count": 2} and m0["config"]["shard"] == "0/2"
    assert m0["pairs"]["ids"] == [0, 2, 4] and m1["pairs"]["ids"] == [1, 3]
    assert m0["full_pairs"] == m1["full_pairs"] and m0["full_pairs"]["ids"] == list(range(N_PAIRS))
    assert m0["pairs"]["sha256"] != m0["full_pairs"]["sha256"]


def test_two_shards_merged_equal_unsharded(tiny, whole, shards, tmp_path):
    out = merge_runs([shards[1], shards[0]], tmp_path / "merged", report=False, log=quiet)  # any order
    assert_same_run(out, whole)
    m = json.loads((out / "manifest.json").read_text())
    assert m["shard"] is None and m["config"]["shard"] is None
    assert [s["shard"]["index"] for s in m["merged_from"]] == [0, 1]
    # A merged directory is a whole run: resuming it has nothing left to do and accepts its cache.
    run_experiments(_cfg(tiny, out, resume=True, report=False), progress=False, log=quiet)
    assert_same_run(out, whole)


def _edit_manifest(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_merge_refuses(shards, tmp_path):
    s0, s1 = shards
    with pytest.raises(ThoughtpatchError, match="leave out 2 of 5 pairs: 1, 3"):
        merge_runs([s0], tmp_path / "a", log=quiet)
    with pytest.raises(ThoughtpatchError, match="pair 0 is in both"):
        merge_runs([s0, s1, shutil.copytree(s0, tmp_path / "dup")], tmp_path / "b", log=quiet)
    other = _edit_manifest(s1, tmp_path / "noising", lambda m: m["result_config"].update(direction="noising"))
    with pytest.raises(ThoughtpatchError, match=r"not a shard of the same run .*\(direction differ\)"):
        merge_runs([s0, other], tmp_path / "c", log=quiet)
    other = _edit_manifest(s1, tmp_path / "weights", lambda m: m["model"].update(sha256="0" * 64))
    with pytest.raises(ThoughtpatchError, match="model weights differ"):
        merge_runs([s0, other], tmp_path / "d", log=quiet)
    other = _edit_manifest(s1, tmp_path / "unfinished", lambda m: m.pop("finished"))
    with pytest.raises(ThoughtpatchError, match="has not finished"):
        merge_runs([s0, other], tmp_path / "e", log=quiet)
    merge_runs([s0, s1], tmp_path / "f", report=False, log=quiet)
    with pytest.raises(ThoughtpatchError, match="already holds a run"):
        merge_runs([s0, s1], tmp_path / "f", log=quiet)
    # The command line: one line, exit status 2.
    r = run_cli("merge", str(s0), "--out", str(tmp_path / "g"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "leave out" in r.stderr


def test_merge_checks_every_shard_before_writing(shards, tmp_path):
    """A damaged or foreign shard is named and nothing is written (merge once left a
    half-merged directory behind)."""
    s0, s1 = shards
    bad = shutil.copytree(s1, tmp_path / "torn")
    res = bad / "iterative" / "results.jsonl"
    lines = res.read_text().splitlines(keepends=True)
    res.write_text("".join(lines[:3]) + lines[3][:30] + "\n" + "".join(lines[4:]))
    out = tmp_path / "m"
    with pytest.raises(ThoughtpatchError, match=f"{res}, line 4: malformed JSON"):
        merge_runs([s0, bad], out, log=quiet)
    assert not out.exists()
    res.write_text("".join(lines) + lines[0].replace('"pair_id": 1,', '"pair_id": 0,'))  # a row of shard 0's pair
    with pytest.raises(ThoughtpatchError, match=f"{res}, line {len(lines) + 1}: pair 0 is not among this shard's patched pairs"):
        merge_runs([s0, bad], out, log=quiet)
    assert not out.exists()
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ThoughtpatchError, match="not empty and not a thoughtpatch run"):
        merge_runs([s0, s1], foreign, log=quiet)
    assert os.listdir(foreign) == ["notes.txt"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_args(tiny, out: Path) -> list[str]:
    ckpt, base, pairs = tiny
    return ["-m", "thoughtpatch", "run", "--model", str(ckpt), "--base", str(base), "--pairs", str(pairs), "--out", str(out), "--wandb", "disabled", "--max-new-tokens", "6"]


def test_accelerate_two_cpu_processes(tiny, whole, tmp_path):
    """`accelerate launch` with two CPU processes: each runs a shard, rank 0 merges.
    (accelerate's `--cpu` flag starts one process unless mpirun is used; `--multi_gpu` with
    ACCELERATE_USE_CPU=1 starts two torch.distributed workers that talk over gloo.)"""
    out = tmp_path / "acc"
    env = os.environ | ONE_THREAD | {"ACCELERATE_USE_CPU": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        *_run_args(tiny, out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "shard-0-of-2" / "manifest.json").is_file() and (out / "shard-1-of-2" / "manifest.json").is_file()
    assert_same_run(out, whole)
    m = json.loads((out / "manifest.json").read_text())
    assert [s["n"] for s in m["merged_from"]] == [3, 2]
    assert (out / "reports").is_dir() and (out / "DATA_INVENTORY.md").is_file()  # rank 0 reports the merged run
