"""bench/gpu_run.py, the prepared GPU script, runs end to end on CPU with --tiny; so does
bench/engine_speed.py on its tiny shape. Both run their `main` in this process (a script's
own process would spend seconds on imports)."""

from __future__ import annotations

import importlib
import json
import sys

from tests.conftest import REPO


def _bench(name: str):
    """A script of bench/ as a module."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "bench"))


def _printed(capsys) -> dict:
    """The one JSON line a bench script prints last."""
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_gpu_run_tiny_on_cpu(capsys):
    returned = _bench("gpu_run").main(["--tiny", "--pairs", "3", "--separate"])
    out = _printed(capsys)
    assert out == json.loads(json.dumps(returned))
    assert {"seconds", "total_s", "peak_gpu_mem_gib", "tflops", "tflops_by_phase", "mfu", "peak_bf16_tflops", "tokens_processed", "shape", "dtype", "device"} <= out.keys()
    assert set(out["seconds"]) == {"unpatched", "experiments", "layer", "exp1_position", "exp2_iterative"}
    assert out["total_s"] > 0 and out["tflops"] > 0 and out["tokens_processed"] > 0
    assert out["rows"] == {"layer": 3 * 3, "position": 3 * 3 * 6, "iterative": 3 * 3 * 6}  # 3 pairs, input + 2 layers, K = 6
    assert out["shape"].startswith("tiny") and out["device"] == "cpu" and out["mfu"] is None  # no bf16 peak for a CPU
    assert out["lengths"] == "gsm8k" and out["prompt_tokens"]["min"] < out["prompt_tokens"]["max"]  # questions of different lengths


def test_mfu_peaks_by_device_name():
    gpu_run = _bench("gpu_run")
    gsm8k_words, peak_for = gpu_run.gsm8k_words, gpu_run.peak_for
    assert peak_for("NVIDIA H100 80GB HBM3") == 989.0 and peak_for("NVIDIA H100 PCIe") == 756.0
    assert peak_for("NVIDIA H200") == 989.0 and peak_for("NVIDIA A100-SXM4-80GB") == 312.0 and peak_for("NVIDIA L4") == 121.0
    assert peak_for("some other device") is None
    words = gsm8k_words(1340)
    assert 12 <= min(words) < 25 and 100 < max(words) <= 150 and 40 < sum(words) / len(words) < 52


def test_engine_speed_tiny_on_cpu(capsys):
    """bench/engine_speed.py end to end on the tiny shape: the engines agree, the pairs are
    well-conditioned, the timings are reported."""
    returned = _bench("engine_speed").main(["--shape", "tiny", "--pairs", "1", "--repeat", "2", "--json"])
    out = _printed(capsys)
    assert out == json.loads(json.dumps(returned))
    assert out["max_abs_diff"] <= 1e-5 and out["max_abs_diff_by_metric"]["answer"] == 0.0
    assert out["min_gap"] > 0.1  # the bench pair's runs differ: `recovered` is not noise
    assert out["rows"] == 3 + 3 * 6 + 3 * 6 and len(out["batched_passes_s"]) == 2
    assert out["ratio"] > 0 and out["reference_s"] > 0


def test_readout_head_small_on_cpu(capsys):
    """bench/readout_head.py on a small shape: the sliced head, the blocked log-sum-exp and the
    screened greedy ids compute what the plain ways do (a vocabulary of three slices, the last
    partial)."""
    returned = _bench("readout_head").main(["--hidden", "32", "--vocab", "20000", "--rows", "40", "--repeat", "1", "--json"])
    out = _printed(capsys)
    assert out == json.loads(json.dumps(returned))
    assert out["head_40"]["max_abs_diff"] <= 1e-5 and out["lse_40"]["max_abs_diff"] <= 1e-9
    assert out["head_40"]["ratio"] > 0 and out["lse_40"]["ratio"] > 0
    assert out["greedy_40"]["ids_differ"] == 0 and out["greedy_40"]["ratio"] > 0
