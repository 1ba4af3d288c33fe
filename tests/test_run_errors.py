"""Bad input and faults in a run: refused before the model loads or anything is written (one
line and exit status 2 from the command line), same-answer pairs and too-long prompts, one
owner per run directory, a full disk, damaged results, `report` on a damaged run."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import shutil
import signal

import pytest

from tests.conftest import run_cli
from tests.report.test_rundir import hold_lock
from tests.test_run import Q, _pairs
from tests.tiny import make_tiny_codi
from thoughtpatch.errors import ThoughtpatchError
from thoughtpatch.report.results import read_rows
from thoughtpatch.report.rundir import LOCK_NAME
from thoughtpatch.sweep import RunConfig, run_experiments

quiet = lambda s: None  # noqa: E731


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    ckpt, base = make_tiny_codi(root, "llama")
    return ckpt, base, _pairs(root / "pairs.json", 3)


def _cfg(tiny, out, **kw) -> RunConfig:
    ckpt, base, pairs = tiny
    kw = {"experiments": ["layer"], "max_new_tokens": 6, **kw}
    return RunConfig(model=str(ckpt), base=str(base), pairs=str(pairs), out=str(out), wandb="disabled", report=False, **kw)


def _args(tiny, out) -> list[str]:
    ckpt, base, pairs = tiny
    return ["layer", "--model", str(ckpt), "--base", str(base), "--pairs", str(pairs), "--out", str(out), "--wandb", "disabled", "--max-new-tokens", "6", "--no-report"]


def cli(*args: str) -> tuple[int, str]:
    """`run_cli` as (exit status, stderr)."""
    r = run_cli(*args)
    return r.returncode, r.stderr


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a model is loaded: the input must be refused before."""
    import thoughtpatch.model

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(thoughtpatch.model, "load_model", refuse)


@pytest.fixture(scope="module")
def small_run(tiny, tmp_path_factory):
    return run_experiments(_cfg(tiny, tmp_path_factory.mktemp("small") / "run"), progress=False, log=quiet)


# ---- validation before work --------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, message",
    [
        ({"layers": "3-1"}, "--layers: '3-1' is reversed (write 1-3)"),
        ({"thoughts": "5-0"}, "--thoughts: '5-0' is reversed (write 0-5)"),
        ({"layers": "1,,2"}, "--layers: cannot read ''"),
        ({"num_thoughts": 0}, "--num-thoughts must be at least 1, not 0"),
        ({"max_new_tokens": 0}, "--max-new-tokens must be at least 1, not 0"),
        ({"batch_size": -3}, "--batch-size must be at least 1, not -3"),
        ({"dtype": "float16"}, "--dtype must be float32 or fp32 or bfloat16 or bf16, not 'float16'"),
        ({"lora_alpha": math.nan}, "--lora-alpha must be a positive number, not nan"),
        ({"keep": "some"}, "--keep must be all or correct, not 'some'"),
        ({"experiments": []}, "experiments is empty"),
        ({"test_mode": "no"}, "--test-mode: expected true or false, got a string ('no')"),
    ],
)
def test_bad_settings_are_refused_before_loading(tiny, tmp_path, no_model, kw, message):
    out = tmp_path / "o"
    with pytest.raises(ThoughtpatchError, match=re.escape(message)):
        run_experiments(_cfg(tiny, out, **kw), progress=False, log=quiet)
    assert not out.exists()


@pytest.mark.parametrize(
    "line, message",
    [
        ('test_mode = "no"', "key 'test_mode': expected true or false, got a string ('no')"),
        ('experiments = "layer"', "key 'experiments': expected a list of names"),
        ('max_new_tokens = "6"', "key 'max_new_tokens': expected an integer, got a string ('6')"),
        ("batch_size = 2.5", "key 'batch_size': expected an integer, got a number (2.5)"),
        ("lora_alpha = true", "key 'lora_alpha': expected a number, got a boolean (True)"),
        ("layers = 3", "key 'layers': expected a string, got an integer (3)"),
    ],
)
def test_toml_types_are_checked(tmp_path, line, message):
    toml = tmp_path / "run.toml"
    toml.write_text(line + "\n")
    with pytest.raises(ThoughtpatchError, match=re.escape(f"{toml}: {message}")):
        RunConfig.from_toml(toml)


def test_cli_bad_option_is_one_line(tiny, tmp_path, no_model):
    out = tmp_path / "o"
    code, err = cli(*_args(tiny, out), "--layers", "3-1")
    assert code == 2 and err == "error: --layers: '3-1' is reversed (write 1-3)\n"
    assert not out.exists()


def test_same_answer_pairs_are_dropped_and_named(tiny, tmp_path):
    pairs = json.loads(tiny[2].read_text())
    pairs[1]["corrupted"]["answer"] = pairs[1]["clean"]["answer"]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(pairs))
    logs: list[str] = []
    out = run_experiments(dataclasses.replace(_cfg(tiny, tmp_path / "o"), pairs=str(path)), progress=False, log=logs.append)
    warning = next(s for s in logs if s.startswith("warning"))
    assert "dropped 1 pair(s) whose clean and corrupted answers are equal (pair ids 1)" in warning and "thoughtpatch pairs filter" in warning
    m = json.loads((out / "manifest.json").read_text())
    assert m["pairs"]["ids"] == [0, 2] and m["selection"]["same_answer"] == [1]
    dropped = json.loads((out / "dropped_pairs.json").read_text())
    assert (dropped[0]["pair_id"], dropped[0]["reason"], dropped[0]["patched"]) == (1, "same answer (8)", False)
    assert all(d["reason"] == "answered wrong" for d in dropped[1:])  # a random model answers nothing right
    assert {r["pair_id"] for r in read_rows(out / "layer" / "results.jsonl")} == {0, 2}
    path.write_text(json.dumps([pairs[1]]))  # nothing left: refused before loading
    with pytest.raises(ThoughtpatchError, match="no pairs left once those with equal answers are dropped"):
        run_experiments(dataclasses.replace(_cfg(tiny, tmp_path / "o2"), pairs=str(path)), progress=False, log=quiet)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prompt_longer_than_the_models_positions(tmp_path, family):
    """Refused before anything is written (GPT-2 used to fail with an IndexError mid-run, LLaMA
    to run past its positions); a prompt that fits decodes at most to the last position."""
    from thoughtpatch.model import load_model

    ckpt, base = make_tiny_codi(tmp_path / "m", family)  # 512 positions
    pairs = json.loads(_pairs(tmp_path / "p.json", 2).read_text())
    pairs[1]["clean"]["question"] = " ".join(["tom has 3 apples ."] * 110) + " how many apples has tom ?"
    path = tmp_path / "long.json"
    path.write_text(json.dumps(pairs))
    out = tmp_path / "o"
    cfg = RunConfig(model=str(ckpt), base=str(base), pairs=str(path), out=str(out), wandb="disabled", max_new_tokens=6, report=False, experiments=["layer"])
    with pytest.raises(ThoughtpatchError, match=rf"{path}: pair 1: the clean prompt is \d+ tokens; with 4 thoughts and the \d+-token answer it needs \d+ positions, the model has 512"):
        run_experiments(cfg, progress=False, log=quiet)
    assert not out.exists()
    from thoughtpatch.data.schema import load_pairs
    from thoughtpatch.sweep import plan_pairs

    model = load_model(ckpt, base=base)
    fits = load_pairs(_pairs(tmp_path / "fits.json", 1))
    n = len(model.prompt_ids(fits[0].clean.question))
    plans, cut = plan_pairs(model, fits, path, 1000, None)
    assert cut == 1 and plans[0][2].max_new_tokens == 512 - 4 - n


# ---- the run directory ---------------------------------------------------------------------
def test_a_run_directory_has_one_owner(tiny, tmp_path):
    """A second run or resume on a directory in use is refused with the holder's pid (two
    resumes at once used to both succeed and double the rows); a killed holder does not block."""
    out = tmp_path / "o"
    holder = hold_lock(out)
    try:
        with pytest.raises(ThoughtpatchError, match=rf"{out}: in use by another thoughtpatch process \(pid {holder.pid}\)"):
            run_experiments(_cfg(tiny, out), progress=False, log=quiet)
        assert os.listdir(out) == [LOCK_NAME]  # nothing written
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    run_experiments(_cfg(tiny, out), progress=False, log=quiet)
    assert len(read_rows(out / "layer" / "results.jsonl")) == 3 * 4


def test_out_that_is_not_a_run_is_refused(tiny, tmp_path, no_model):
    f = tmp_path / "file"
    f.write_text("mine")
    code, err = cli(*_args(tiny, f))
    assert code == 2 and err == f"error: --out {f}: is a file, not a directory\n" and f.read_text() == "mine"
    d = tmp_path / "notes"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    code, err = cli(*_args(tiny, d), "--resume")
    assert code == 2 and err == f"error: --out {d}: not empty and not a thoughtpatch run (holds notes.txt); choose a new or empty directory\n"
    assert os.listdir(d) == ["notes.txt"]


def test_full_disk_is_one_line_and_the_run_resumes(tiny, tmp_path, monkeypatch):
    from thoughtpatch.report import results as R

    real = R.ResultsWriter.write_pair
    calls = []

    def disk_full_at_second_pair(self, rows):
        calls.append(rows[0]["pair_id"])
        if len(calls) == 2:  # half a line reaches the disk, then it is full
            with open(self.path, "a") as f:
                f.write(json.dumps(rows[0])[:25])
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        real(self, rows)

    monkeypatch.setattr(R.ResultsWriter, "write_pair", disk_full_at_second_pair)
    out = tmp_path / "o"
    code, err = cli(*_args(tiny, out))
    assert code == 2 and err.splitlines()[-1] == f"error: {out / 'layer' / 'results.jsonl'}: No space left on device"
    assert "Traceback" not in err
    monkeypatch.setattr(R.ResultsWriter, "write_pair", real)
    run_experiments(_cfg(tiny, out, resume=True), progress=False, log=quiet)
    rows = read_rows(out / "layer" / "results.jsonl")
    assert sorted(r["pair_id"] for r in rows) == [0] * 4 + [1] * 4 + [2] * 4


def test_resume_names_a_foreign_line_and_changes_nothing(tiny, small_run, tmp_path):
    out = shutil.copytree(small_run, tmp_path / "copy")
    res = out / "layer" / "results.jsonl"
    lines = res.read_text().splitlines(keepends=True)
    res.write_text("".join(lines[:2]) + '{"pair_id": 0, "lay\n' + "".join(lines[2:]))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ThoughtpatchError, match=re.escape(f"{res}, line 3: malformed JSON")):
        run_experiments(_cfg(tiny, out, resume=True), progress=False, log=quiet)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_report_on_damaged_results_is_one_line(small_run, tmp_path):
    out = shutil.copytree(small_run, tmp_path / "copy")
    res = out / "layer" / "results.jsonl"
    lines = res.read_text().splitlines(keepends=True)
    res.write_text(lines[0] + "[1, 2]\n" + "".join(lines[1:]))
    code, err = cli("report", str(out))
    assert code == 2 and err == f"error: {res}, line 2: expected an object, got list\n"
    res.write_text("")  # a run that patched nothing (reversed ranges once made these)
    code, err = cli("report", str(out))
    assert code == 2 and err == f"error: {res}: no rows (the run patched nothing)\n"
    assert not (out / "reports").exists()


def test_report_waits_for_no_one(small_run, tmp_path):
    """`report` on a directory a run (or merge) is writing is refused with the holder's pid."""
    out = shutil.copytree(small_run, tmp_path / "copy")
    holder = hold_lock(out)
    try:
        code, err = cli("report", str(out))
        assert code == 2 and err == f"error: {out}: in use by another thoughtpatch process (pid {holder.pid}); wait for it to finish\n"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert not (out / "reports").exists()
