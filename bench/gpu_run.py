"""One prepared GPU run: a LLaMA-3.2-1B-shaped random CODI model in bf16; the unpatched runs
of every pair, then layer patching, Exp 1 (position) and Exp 2 (iterative) of every pair,
both through the batched engine, many pairs per batch (as a run does).

    python bench/gpu_run.py                      # 57 pairs (the seed's count)
    python bench/gpu_run.py --pairs 1340         # a whole GSM8K test set's pairs (`pairs from-gsm8k`)
    python bench/gpu_run.py --tiny --pairs 2     # the tiny shape on CPU (a few seconds; tested)

Questions have GSM8K's lengths by default (`--lengths gsm8k`: words per question drawn from a
log-normal with median 42, clipped to 12…150 — GSM8K test questions run from about 10 to 160
words, 46 on average), or all `--words` long (`--lengths fixed`, the setting of the first
H100 figures).

Prints one JSON line: seconds per phase (`unpatched`, `experiments`; with --separate also
each experiment alone) and `total_s` = unpatched + experiments; peak GPU memory; achieved
TFLOP/s per phase and overall; MFU = achieved FLOP/s ÷ the device's dense bf16 peak (table
PEAK_BF16_TFLOPS, matched on the device name; `--peak-tflops` for another device; null on
a CPU); tokens processed; shape, dtype, device name. Progress goes to stderr. One pair's
unpatched runs are done once before timing (warm-up: CUDA context, cuBLAS handles,
allocator) and not counted.

FLOP estimate (a model of the work, not a hardware counter). A hook on the decoder counts,
for every forward, B×T new positions and the S keys they attend to (cache + new); hooks on
the LM head and CODI's projection count the rows they actually process. Then
    FLOPs = 2 × P_blocks × positions                      (matmuls of the decoder blocks)
          + 4 × layers × hidden × Σ B·T·S                 (attention: QKᵀ and AV, no causal halving)
          + 2 × hidden × vocab × LM-head rows             (logits; tied to the embedding)
          + 2 × P_prj × projection rows                   (CODI's thought projection)
where P_blocks are the parameters of the decoder blocks and final norm (non-embedding).
Embedding look-ups, norms' and activations' element-wise work, softmax and the engine's own
tensor copies are not counted, so the achieved TFLOP/s is a slight under-estimate. Padding
and masked attention entries are counted: this is the work done, not the least work needed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time

import torch

from thoughtpatch.data.schema import Pair, Problem
from thoughtpatch.model.runtime import INPUT
from thoughtpatch.model.synthetic import SHAPES, question, random_codi
from thoughtpatch.patching.engine import BatchedEngine
from thoughtpatch.patching.experiments import Spec, all_layers, pair_runs, pairs_runs, patch_pairs

EXPERIMENTS = ["layer", "position", "iterative"]
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets; the
# first name contained in torch.cuda.get_device_name() wins.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "RTX 4090": 165.0,
}


def peak_for(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


class FlopCounter:
    """Counts the work of every forward through forward hooks (see the module docstring)."""

    def __init__(self, model):
        hf = model.hf
        self.decoder = hf.model
        self.layers = len(model.blocks)
        self.hidden = model.hidden_size
        self.vocab = hf.get_output_embeddings().weight.shape[0]
        self.p_blocks = sum(p.numel() for p in self.decoder.layers.parameters()) + sum(p.numel() for p in self.decoder.norm.parameters())
        self.p_prj = sum(p.numel() for p in model.prj.parameters())
        self.positions = self.attn_bts = self.head_rows = self.prj_rows = 0
        self._handles = [
            self.decoder.register_forward_pre_hook(self._decoder, with_kwargs=True),
            hf.get_output_embeddings().register_forward_hook(self._head),
            model.prj.register_forward_hook(self._prj),
        ]

    def _decoder(self, _module, args, kwargs):
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        b, t = x.shape[0], x.shape[1]
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        self.positions += b * t
        self.attn_bts += b * t * (past + t)

    def _head(self, _module, _inputs, output):
        self.head_rows += output.numel() // output.shape[-1]

    def _prj(self, _module, inputs, _output):
        self.prj_rows += inputs[0].numel() // inputs[0].shape[-1]

    def snapshot(self) -> dict:
        return {"positions": self.positions, "attn_bts": self.attn_bts, "head_rows": self.head_rows, "prj_rows": self.prj_rows}

    def flops(self, since: dict) -> tuple[float, int]:
        d = {k: v - since[k] for k, v in self.snapshot().items()}
        f = 2.0 * self.p_blocks * d["positions"] + 4.0 * self.layers * self.hidden * d["attn_bts"]
        f += 2.0 * self.hidden * self.vocab * d["head_rows"] + 2.0 * self.p_prj * d["prj_rows"]
        return f, d["positions"]


def gsm8k_words(n: int, seed: int = 0) -> list[int]:
    """Question lengths in words like GSM8K's test set (see the module docstring)."""
    rng = random.Random(seed)
    return [min(150, max(12, round(math.exp(rng.gauss(math.log(42), 0.4))))) for _ in range(n)]


def make_pairs(n: int, lengths: str, words: int) -> list[Pair]:
    sizes = gsm8k_words(n) if lengths == "gsm8k" else [words] * n
    return [
        Pair(i, Problem(question(w, 10 + i % 900), (15 + i) % 1000), Problem(question(w, 20 + i % 900), (25 + i) % 1000))
        for i, w in enumerate(sizes)
    ]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny shape on CPU (a smoke test of this script)")
    ap.add_argument("--pairs", type=int, default=57, help="pairs (57: the seed's count; 1340: a whole GSM8K test set's)")
    ap.add_argument("--lengths", choices=["gsm8k", "fixed"], default="gsm8k", help="question lengths: GSM8K-like, or all --words long")
    ap.add_argument("--words", type=int, default=60, help="question length in words with --lengths fixed")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="decode budget per run ('The answer is : N' + eos)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default bfloat16 (float32 with --tiny)")
    ap.add_argument("--device", default=None, help="default cuda (cpu with --tiny)")
    ap.add_argument("--max-tokens", type=int, default=1 << 17, help="cached positions per batch (the engine's memory budget; 32 KiB each for the 1B shape in bf16)")
    ap.add_argument("--direction", choices=["denoising", "noising"], default="denoising")
    ap.add_argument("--separate", action="store_true", help="also time each experiment alone")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not in the table")
    args = ap.parse_args(argv)

    shape_name = "tiny" if args.tiny else "llama-3.2-1b"
    device = args.device or ("cpu" if args.tiny else "cuda")
    dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    cuda = torch.device(device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("error: no CUDA device (use --tiny for the CPU smoke test)")
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops or (peak_for(device_name) if cuda else None)

    t0 = time.perf_counter()
    model = random_codi(SHAPES[shape_name], dtype=getattr(torch, dtype), device=device)
    sync()
    build_s = time.perf_counter() - t0
    pairs = make_pairs(args.pairs, args.lengths, args.words)
    layers, thoughts = all_layers(model), list(range(model.num_thoughts))
    spec = Spec("resid", tuple(layers), tuple(thoughts), args.direction)
    engine = BatchedEngine(model, max_tokens=args.max_tokens)
    say(f"built {shape_name} ({SHAPES[shape_name].describe()}, {dtype}, {device_name}) in {build_s:.1f} s; {len(pairs)} pairs")

    pair_runs(model, pairs[0], args.max_new_tokens)  # warm-up, not timed
    counter = FlopCounter(model)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    phases = {}

    def timed(name, fn):
        sync()
        mark, t = counter.snapshot(), time.perf_counter()
        out = fn()
        sync()
        s = time.perf_counter() - t
        flops, positions = counter.flops(mark)
        phases[name] = {"s": round(s, 3), "tflops": float(f"{flops / s / 1e12:.4g}"), "flops": flops, "positions": positions}
        say(f"{name}: {s:.1f} s, {flops / s / 1e12:.2f} TFLOP/s")
        return out

    # the activation cache keeps what the resid grid reads (input and resid), as a run does
    runs = timed("unpatched", lambda: pairs_runs(model, pairs, args.max_new_tokens, record=(INPUT, "resid"), max_tokens=args.max_tokens))
    by_pair = timed("experiments", lambda: patch_pairs(engine, runs, EXPERIMENTS, spec))
    rows = {e: sum(len(d[e]) for d in by_pair) for e in EXPERIMENTS}
    if args.separate:
        for e, name in zip(EXPERIMENTS, ("layer", "exp1_position", "exp2_iterative")):
            timed(name, lambda e=e: patch_pairs(engine, runs, [e], spec))

    main_phases = ("unpatched", "experiments")
    total_s = sum(phases[n]["s"] for n in main_phases)
    total_flops = sum(phases[n]["flops"] for n in main_phases)
    tflops = total_flops / total_s / 1e12
    out = {
        "seconds": {name: p["s"] for name, p in phases.items()},
        "total_s": round(total_s, 3),
        "build_s": round(build_s, 3),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "tflops": float(f"{tflops:.4g}"),
        "tflops_by_phase": {name: p["tflops"] for name, p in phases.items()},
        "peak_bf16_tflops": peak,
        "mfu": float(f"{tflops / peak:.4g}") if peak else None,
        "mfu_by_phase": {name: float(f"{p['tflops'] / peak:.4g}") for name, p in phases.items()} if peak else None,
        "tokens_processed": sum(phases[n]["positions"] for n in main_phases),
        "rows": rows,
        "pairs": len(pairs),
        "lengths": args.lengths,
        "prompt_tokens": {"min": min(len(r.clean_ids) for r in runs), "mean": round(sum(len(r.clean_ids) for r in runs) / len(runs), 1), "max": max(len(r.clean_ids) for r in runs)},
        "max_new_tokens": args.max_new_tokens,
        "max_tokens": engine.max_tokens,
        "shape": f"{shape_name}: {SHAPES[shape_name].describe()}",
        "params_nonembedding": counter.p_blocks,
        "dtype": dtype,
        "device": device_name,
        "torch": torch.__version__,
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
