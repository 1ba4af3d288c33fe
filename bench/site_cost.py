"""What a full Exp 1 grid costs at each site, against today's `resid` grid, same run, same
engine (the batched one, as `thoughtpatch run`), same pairs; and the knockout grid.

    python bench/site_cost.py --json                          # the organism, its first 8 pairs
    python bench/site_cost.py --shape llama-3.2-1b --json     # LLaMA-3.2-1B shape, random weights, 1 pair

Prints one JSON line: per site the seconds of one grid (mean of --repeat passes after a warm
one), its rows (cells × pairs) and `vs_resid` (seconds ÷ the resid grid's seconds). A cell of
the head site is one head, so its grid has H × more cells than the attn grid; `per_cell_vs_resid`
compares the cost of one cell."""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from thoughtpatch.patching.engine import BatchedEngine
from thoughtpatch.patching.experiments import Spec, all_layers, pair_runs, patch_pairs

SITES = ("resid", "attn", "mlp", "head", "kv")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy", help="a model thoughtpatch loads (default: the organism)")
    ap.add_argument("--shape", default=None, help="instead: a random CODI model of this shape (bench/engine_speed.py's shapes)")
    ap.add_argument("--pairs", type=int, default=None, help="pairs (default: 8 for a model, 1 for a shape)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    load_before = os.getloadavg()[0]
    if args.shape:
        from engine_speed import bench_pair  # beside this file
        from thoughtpatch.model.synthetic import SHAPES, random_codi

        model = random_codi(SHAPES[args.shape])
        runs = [bench_pair(model, i, 60, 8) for i in range(args.pairs or 1)]
        what = SHAPES[args.shape].describe()
    else:
        import thoughtpatch as tp

        model = tp.load(args.model)
        runs = [pair_runs(model, p) for p in tp.load_pairs(args.model)[: args.pairs or 8]]
        what = args.model
    engine = BatchedEngine(model)
    layers, thoughts = tuple(all_layers(model)), tuple(range(model.num_thoughts))

    def grid(site: str, exp: str = "position") -> tuple[float, int]:
        spec = Spec(site, layers, thoughts)
        patch_pairs(engine, runs[:1], [exp], spec)  # warm
        times, n = [], 0
        for _ in range(args.repeat):
            t = time.perf_counter()
            out = patch_pairs(engine, runs, [exp], spec)
            times.append(time.perf_counter() - t)
            n = sum(len(r[exp]) for r in out)
        return sum(times) / len(times), n

    res = {}
    for site in SITES:
        s, n = grid(site)
        res[site] = {"s": round(s, 3), "rows": n}
    s, n = grid("resid", "knockout")
    res["knockout"] = {"s": round(s, 3), "rows": n}
    base = res["resid"]
    for r in res.values():
        r["vs_resid"] = round(r["s"] / base["s"], 2)
        r["per_cell_vs_resid"] = round((r["s"] / r["rows"]) / (base["s"] / base["rows"]), 2)
    out = {"model": what, "pairs": len(runs), "threads": torch.get_num_threads(), "sites": res,
           "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
