"""bench/gpu_run.py, the prepared GPU script, runs end to end on CPU with --tiny."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_gpu_run_tiny_on_cpu():
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_run.py"), "--tiny", "--pairs", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"seconds", "total_s", "peak_gpu_mem_gib", "tflops", "tflops_by_phase", "tokens_processed", "shape", "dtype", "device"} <= out.keys()
    assert set(out["seconds"]) == {"unpatched", "layer", "exp1_position", "exp2_iterative", "all_one_pass"}
    assert out["total_s"] > 0 and out["tflops"] > 0 and out["tokens_processed"] > 0
    assert out["rows"] == {"layer": 2 * 3, "position": 2 * 3 * 6, "iterative": 2 * 3 * 6, "all_one_pass": 2 * 3 * 13}  # 2 pairs, input + 2 layers, K = 6
    assert out["shape"].startswith("tiny") and out["device"] == "cpu"


def test_engine_speed_tiny_on_cpu():
    """bench/engine_speed.py end to end on the tiny shape: the engines agree, the pairs are
    well-conditioned, the timings are reported."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "bench" / "engine_speed.py"), "--shape", "tiny", "--pairs", "1", "--repeat", "2", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["max_abs_diff"] <= 1e-5 and out["max_abs_diff_by_metric"]["answer"] == 0.0
    assert out["min_gap"] > 0.1  # the bench pair's runs differ: `recovered` is not noise
    assert out["rows"] == 3 + 3 * 6 + 3 * 6 and len(out["batched_passes_s"]) == 2
    assert out["ratio"] > 0 and out["reference_s"] > 0
