"""A whole run on a tiny model: outputs, resume after SIGKILL, cache refusal, W&B keys, config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.tiny import make_tiny_codi
from thoughtpatch.errors import ThoughtpatchError
from thoughtpatch.report.results import read_rows
from thoughtpatch.sweep import RunConfig, parse_range, run_experiments

Q = "tom has {} apples and he buys 5 more . how many apples has tom ?"


def _pairs(path: Path, n: int) -> Path:
    pairs = [
        {"pair_id": i, "clean": {"question": Q.format(2 + i), "answer": 7 + i}, "corrupted": {"question": Q.format(30 + i), "answer": 35 + i}}
        for i in range(n)
    ]
    path.write_text(json.dumps(pairs))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    ckpt, base = make_tiny_codi(root, "llama")
    return ckpt, base, _pairs(root / "pairs.json", 8)


def _cfg(tiny, out, **kw) -> RunConfig:
    ckpt, base, pairs = tiny
    return RunConfig(model=str(ckpt), base=str(base), pairs=str(pairs), out=str(out), wandb="disabled", max_new_tokens=6, report=False, **kw)


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    run_experiments(_cfg(tiny, out), progress=False, log=lambda s: None)
    return out


def test_outputs(full_run, tiny):
    for f in ("manifest.json", "pairs.json", "checks.json", "clean_activations.safetensors", "corrupted_activations.safetensors"):
        assert (full_run / f).is_file(), f
    layers, k = 4, 4  # input + 3 blocks; K from thoughtpatch.json
    expect = {"layer": 8 * layers, "position": 8 * layers * k, "iterative": 8 * layers * k}
    for exp, n in expect.items():
        rows = read_rows(full_run / exp / "results.jsonl")
        assert len(rows) == n
        assert all(r["direction"] == "denoising" for r in rows)
        summary = json.loads((full_run / exp / "summary.json").read_text())
        assert summary["n_pairs"] == 8
        cell = summary["cells"][0]
        assert {"mean", "std", "ci95", "n"} <= cell["metrics"]["kl"].keys()
    row = read_rows(full_run / "iterative" / "results.jsonl")[0]
    for key in ("kl", "kl_to_clean", "answer_logit_diff", "clean_score", "corrupted_score", "logprob_diff", "recovered", "answer", "flip", "away", "cos_clean", "cos_corrupted", "norm"):
        assert key in row, key
    checks = json.loads((full_run / "checks.json").read_text())["checks"]
    names = {c["name"]: c for c in checks}
    assert any("self" in n for n in names)
    assert names["self_patch_exact"]["verdict"] == "pass" and names["self_patch_exact"]["value"] == 0
    assert names["iteration0_equals_exp1"]["verdict"] == "pass"
    assert names["all_sites_reproduce_source"]["verdict"] == "pass"
    assert all(c["verdict"] in ("pass", "warn", "fail", "info") for c in checks)
    clean = names["baseline_accuracy_clean"]
    assert clean["verdict"] == ("pass" if clean["value"] >= 0.5 else "warn")
    # the flip floor: pairs whose unpatched runs already give the same answer (CODI's rule:
    # the extracted number), recomputed from the cached answer ids
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from thoughtpatch.model import extract_number

    tok = AutoTokenizer.from_pretrained(str(tiny[1]))

    def answers(role):
        with safe_open(str(full_run / f"{role}_activations.safetensors"), "pt") as f:
            return {k.split(".")[0]: extract_number(tok.decode(f.get_tensor(k).tolist(), skip_special_tokens=True)) for k in f.keys() if k.endswith(".answer_ids")}

    clean, corrupted = answers("clean"), answers("corrupted")
    alike = sum(clean[p] == corrupted[p] for p in clean)
    assert names["unpatched_answers_agree"]["value"] == alike / 8 and names["unpatched_answers_agree"]["verdict"] == "info"


def test_recovered_summary_is_ratio_of_means(full_run):
    rows = read_rows(full_run / "position" / "results.jsonl")
    cell = [r for r in rows if r["layer"] == 0 and r["thought"] == 0]
    mean = lambda k: sum(r[k] for r in cell) / len(cell)  # noqa: E731
    want = (mean("logprob_diff") - mean("logprob_diff_receiving")) / (mean("logprob_diff_source") - mean("logprob_diff_receiving"))
    summary = json.loads((full_run / "position" / "summary.json").read_text())
    got = next(c for c in summary["cells"] if c["layer"] == 0 and c["thought"] == 0)["metrics"]["recovered"]["mean"]
    assert got == pytest.approx(want, rel=1e-12)


def test_resume_after_sigkill_is_identical(tiny, full_run, tmp_path):
    ckpt, base, pairs = tiny
    out = tmp_path / "killed"
    args = ["run", "--model", str(ckpt), "--base", str(base), "--pairs", str(pairs), "--out", str(out), "--wandb", "disabled", "--max-new-tokens", "6", "--no-report"]
    # Compared bit for bit with `full_run`, made in this process: the killed run uses its thread
    # count, since another count makes torch's CPU kernels add in another order.
    env = os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "thoughtpatch", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    target = out / "position" / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if target.exists() and target.stat().st_size > 0:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(target.read_text().splitlines())
    assert 0 < n_before < 8 * 16
    r = run_cli(*args, "--resume")  # in this process; the killed run left its lock file behind
    assert r.returncode == 0, r.stderr[-2000:]
    for exp in ("layer", "position", "iterative"):
        a = sorted(read_rows(out / exp / "results.jsonl"), key=lambda r: json.dumps([r["pair_id"], str(r["layer"]), r.get("thought"), r.get("iteration")]))
        b = sorted(read_rows(full_run / exp / "results.jsonl"), key=lambda r: json.dumps([r["pair_id"], str(r["layer"]), r.get("thought"), r.get("iteration")]))
        assert json.dumps(a) == json.dumps(b), exp


def test_resume_after_a_torn_pair_reruns_it_whole(tiny, full_run, tmp_path, monkeypatch):
    """Killed between two experiments of the last pair: the pair counts as not done and reruns
    whole, in one engine call as in the uninterrupted run, so every number is the same."""
    import shutil

    import thoughtpatch.patching.experiments as E

    out = tmp_path / "torn"
    shutil.copytree(full_run, out)
    it = out / "iterative" / "results.jsonl"
    lines = it.read_text().splitlines(keepends=True)
    it.write_text("".join(line for line in lines if json.loads(line)["pair_id"] != 7))  # layer and position of pair 7 written, iterative not
    calls = []
    real = E.patch_pair

    def spy(engine, runs, experiments, *a, **k):
        calls.append((runs.pair.pair_id, list(experiments)))
        return real(engine, runs, experiments, *a, **k)

    monkeypatch.setattr(E, "patch_pair", spy)
    run_experiments(_cfg(tiny, out, resume=True), progress=False, log=lambda s: None)
    assert calls == [(7, ["layer", "position", "iterative"])]
    for exp in ("layer", "position", "iterative"):  # same process, same batches: identical
        assert (out / exp / "results.jsonl").read_text() == (full_run / exp / "results.jsonl").read_text(), exp
    checks = {c["name"]: c for c in json.loads((out / "checks.json").read_text())["checks"]}
    assert checks["iteration0_equals_exp1"]["value"] == 0


def test_resume_refuses_changed_config(tiny, full_run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(full_run, out)
    with pytest.raises(ThoughtpatchError, match="already holds a run"):
        run_experiments(_cfg(tiny, out), progress=False, log=lambda s: None)
    with pytest.raises(ThoughtpatchError, match="config changed.*direction"):
        run_experiments(_cfg(tiny, out, resume=True, direction="noising"), progress=False, log=lambda s: None)


def _resumable_with(full_run: Path, out: Path, cfg: RunConfig) -> Path:
    """A copy of `full_run` whose manifest says it was made with `cfg` (so --resume gets as
    far as the activation cache, which still is full_run's)."""
    import shutil

    from thoughtpatch.data.schema import load_pairs
    from thoughtpatch.model.checkpoint import find_checkpoint_file
    from thoughtpatch.sweep import pairs_sha256, sha256_file

    shutil.copytree(full_run, out)
    m = json.loads((out / "manifest.json").read_text())
    m["result_config"] = {k: getattr(cfg, k) for k in RunConfig.RESULT_KEYS}
    m["model"]["sha256"] = sha256_file(find_checkpoint_file(cfg.model))
    m["pairs"]["sha256"] = pairs_sha256(load_pairs(cfg.pairs))
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def test_cache_from_another_pair_set_is_refused(tiny, full_run, tmp_path):
    ckpt, base, _ = tiny
    other = _pairs(tmp_path / "other_pairs.json", 3)
    cfg = RunConfig(model=str(ckpt), base=str(base), pairs=str(other), out=str(tmp_path / "other"), wandb="disabled", max_new_tokens=6, report=False, resume=True)
    _resumable_with(full_run, tmp_path / "other", cfg)
    with pytest.raises(ThoughtpatchError, match="made with pairs_sha256"):
        run_experiments(cfg, progress=False, log=lambda s: None)


def test_cache_from_another_model_is_refused(tiny, full_run, tmp_path):
    _, _, pairs = tiny
    ckpt2, base2 = make_tiny_codi(tmp_path / "m2", "llama", seed=1)
    cfg = RunConfig(model=str(ckpt2), base=str(base2), pairs=str(pairs), out=str(tmp_path / "other_model"), wandb="disabled", max_new_tokens=6, report=False, resume=True)
    _resumable_with(full_run, tmp_path / "other_model", cfg)
    with pytest.raises(ThoughtpatchError, match="made with model"):
        run_experiments(cfg, progress=False, log=lambda s: None)


def test_wandb_offline_has_seed_keys(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "wb"
    cfg = _cfg(tiny, out, test_mode=True)
    cfg.wandb = "offline"
    run_experiments(cfg, progress=False, log=lambda s: None)
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    blob = files[0].read_bytes()
    assert b"cot-exploration" in blob
    rows = read_rows(out / "position" / "results.jsonl")
    kl00 = next(r["kl"] for r in rows if r["pair_id"] == 0 and r["layer"] == 0 and r["thought"] == 0)
    for key in (b"pair_0/layer_0/pos_0/kl_div", b"aggregate/layer_0/pos_0/mean_kl", b"pair_0/layer_0/iter_1/activation_sim_clean", b"pair_0/layer_input/all_pos/kl_div"):
        assert key in blob, key
    assert json.dumps(kl00).encode() in blob  # the same number as results.jsonl


def test_config_file_and_ranges(tiny, tmp_path):
    ckpt, base, pairs = tiny
    toml = tmp_path / "run.toml"
    toml.write_text(f'model = "{ckpt}"\nbase = "{base}"\npairs = "{pairs}"\nlayers = "input,1-2"\nthoughts = "0-1"\ntest_mode = true\n')
    cfg = RunConfig.from_toml(toml, out=str(tmp_path / "o"), thoughts="1")
    assert cfg.layers == "input,1-2" and cfg.thoughts == "1" and cfg.test_mode
    assert parse_range("input,1-2", ["input", 0, 1, 2], "layers") == ["input", 1, 2]
    with pytest.raises(ThoughtpatchError, match="--layers: \\['7'\\] not in this model"):
        parse_range("7", ["input", 0, 1, 2], "layers")
    toml.write_text("colour = 'red'\n")
    with pytest.raises(ThoughtpatchError, match="unknown key"):
        RunConfig.from_toml(toml)
