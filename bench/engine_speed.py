"""Reference engine vs batched engine, same machine, same run, on a LLaMA-shaped random
CODI model: all three experiments (layer, Exp 1, Exp 2) for N pairs.

    python bench/engine_speed.py --quick --json     # mid-size shape, a few minutes on 2 CPU cores
    python bench/engine_speed.py --json             # LLaMA-3.2-1B shape, 1 pair

Both engines run all three experiments of every pair through `patch_pairs`, as a run does:
the batched engine batches the pairs' variants together (one batch for the default pairs),
the reference engine runs each variant alone. Prints one JSON line: ratio (reference seconds
/ median batched seconds), max_abs_diff (largest difference of any metric between the engines,
and per metric), max_rel_diff (differences relative to max(1, |value|)), shape, both
timings, min_gap, and the 1-minute load average before and after (the machine may be shared:
a ratio is only as good as the quiet it was measured in).

Pairs. A random-weight model barely notices one changed number: its clean and corrupted
runs would differ by a few thousandths of a nat, and `recovered` — a ratio over that gap —
would be fp32 noise in any implementation. So a bench pair is two questions of the same
length in different words, and its answers are the two numbers whose log-probs the change
of question moves furthest apart (the clean run prefers the clean answer, as with a trained
model). Token counts, and so timings, are those of a one-number pair; `min_gap` reports the
smallest clean–corrupted log-prob gap, the denominator of `recovered`."""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

from thoughtpatch.data.schema import Pair, Problem
from thoughtpatch.model.synthetic import SHAPES, question, random_codi
from thoughtpatch.patching.engine import BatchedEngine, ReferenceEngine
from thoughtpatch.patching import metrics as M
from thoughtpatch.patching.experiments import PairRuns, Spec, all_layers, pair_runs, patch_pairs


def bench_pair(model, i: int, n_words: int, max_new_tokens: int) -> PairRuns:
    """Pair i (see the module doc): different words, answers the model separates most."""
    clean_q, corrupted_q = question(n_words, 10, seed=2 * i), question(n_words, 10, seed=2 * i + 1)
    probe = pair_runs(model, Pair(i, Problem(clean_q, 0), Problem(corrupted_q, 1)), max_new_tokens=1)
    numbers = [n for n in range(1000) if len(model.answer_ids(n)) == len(model.answer_ids(0))]
    ids = [model.answer_ids(n)[probe.target.decision] for n in numbers]
    lp = lambda ro: ro.decision_logits.double().log_softmax(-1)[ids]  # noqa: E731
    moved = lp(probe.clean) - lp(probe.corrupted)
    clean_answer, corrupted_answer = numbers[int(moved.argmax())], numbers[int(moved.argmin())]
    return pair_runs(model, Pair(i, Problem(clean_q, clean_answer), Problem(corrupted_q, corrupted_answer)), max_new_tokens=max_new_tokens)


def all_experiments(engine, model, runs):
    """All three experiments of every pair (as `thoughtpatch run`)."""
    layers, thoughts = all_layers(model), list(range(model.num_thoughts))
    rows = []
    for by_exp in patch_pairs(engine, runs, ["layer", "position", "iterative"], Spec("resid", tuple(layers), tuple(thoughts))):
        for exp_rows in by_exp.values():
            rows += exp_rows
    return rows


def max_diffs(a: list[dict], b: list[dict], relative: bool = False) -> dict[str, float]:
    """Largest |difference| per metric (relative: divided by max(1, |reference value|)); inf
    where a non-float field (the answer, flip) differs."""
    worst: dict[str, float] = {}
    for ra, rb in zip(a, b, strict=True):
        for k, x in ra.items():
            if isinstance(x, float) and not (math.isnan(x) and math.isnan(rb[k])):
                d = abs(x - rb[k]) / (max(1.0, abs(rb[k])) if relative else 1.0)
                worst[k] = max(worst.get(k, 0.0), d)
            elif x != rb[k] and not isinstance(x, str):
                worst[k] = math.inf
    return worst


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="mid-size shape instead of LLaMA-3.2-1B")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="explicit shape (overrides --quick)")
    ap.add_argument("--pairs", type=int, default=None, help="pairs (default 2 quick, 1 full)")
    ap.add_argument("--words", type=int, default=60, help="question length in words (GSM8K: ~45 on average)")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="decode budget per run ('The answer is : N' + eos)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeat", type=int, default=3, help="timed batched passes, their median taken (after an untimed warm-up pass of the same size)")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)

    shape = SHAPES[args.shape or ("mid" if args.quick else "llama-3.2-1b")]
    n_pairs = args.pairs or (2 if args.quick else 1)
    load_before = os.getloadavg()[0]
    model = random_codi(shape, dtype=getattr(torch, args.dtype), device=args.device)
    runs = [bench_pair(model, i, args.words, args.max_new_tokens) for i in range(n_pairs)]

    def timed(engine, pair_runs):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        rows = all_experiments(engine, model, pair_runs)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return rows, time.perf_counter() - t

    # Both engines are warm when timed: building the pairs above ran the batch-1 path the
    # reference uses; the batched engine gets one untimed pass of the same size as the timed
    # ones (its first pass at a new batch shape pays one-off allocation and kernel set-up). A
    # batched pass is short, so it is timed `--repeat` times and the median taken (one pass
    # disturbed by the machine moves it least); the reference, one run of hundreds of
    # variants, once.
    batched = BatchedEngine(model)
    timed(batched, runs)
    passes = [timed(batched, runs) for _ in range(args.repeat)]
    bat_rows, bat_s = passes[0][0], statistics.median(t for _, t in passes)
    ref_rows, ref_s = timed(ReferenceEngine(model), runs)
    diffs = max_diffs(bat_rows, ref_rows)
    out = {
        "ratio": round(ref_s / bat_s, 2),
        "max_abs_diff": max(diffs.values()),
        "max_abs_diff_by_metric": {k: float(f"{v:.3g}") for k, v in diffs.items()},
        # `recovered` divides by the clean–corrupted log-prob gap, tiny for random weights: its
        # absolute error is the log-prob error over that gap. Relative to max(1, |value|):
        "max_rel_diff": max(max_diffs(bat_rows, ref_rows, relative=True).values()),
        "min_gap": round(min(abs(M.logprob_diff(r.clean) - M.logprob_diff(r.corrupted)) for r in runs), 4),
        "shape": shape.describe(),
        "reference_s": round(ref_s, 2),
        "batched_s": round(bat_s, 2),
        "batched_passes_s": [round(t, 2) for _, t in passes],
        "pairs": n_pairs,
        "rows": len(bat_rows),
        "prompt_tokens": len(runs[0].clean_ids),
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
