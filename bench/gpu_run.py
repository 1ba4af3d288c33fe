"""One prepared GPU run: a LLaMA-3.2-1B-shaped random CODI model in bf16, the unpatched runs,
layer patching, Exp 1 (position) and Exp 2 (iterative) over 57 pairs with the batched engine.

    python bench/gpu_run.py                      # one H100: about 2.5 minutes in all
    python bench/gpu_run.py --tiny --pairs 2     # the tiny shape on CPU (a few seconds; tested)

Prints one JSON line: seconds per phase (each experiment alone, then `all_one_pass`: all three
in one engine call per pair, as `thoughtpatch run` does) and the total of the separate phases, peak GPU memory, achieved TFLOP/s
(per phase and overall), tokens processed, shape, dtype and device name. Progress goes to
stderr. One pair's unpatched runs are done once before timing (warm-up: CUDA context,
cuBLAS handles, allocator) and not counted.

FLOP estimate (a model of the work, not a hardware counter). A hook on the decoder counts,
for every forward, B×T new positions and the S keys they attend to (cache + new); hooks on
the LM head and CODI's projection count the rows they actually process. Then
    FLOPs = 2 × P_blocks × positions                      (matmuls of the decoder blocks)
          + 4 × layers × hidden × Σ B·T·S                 (attention: QKᵀ and AV, no causal halving)
          + 2 × hidden × vocab × LM-head rows             (logits; tied to the embedding)
          + 2 × P_prj × projection rows                   (CODI's thought projection)
where P_blocks are the parameters of the decoder blocks and final norm (non-embedding).
Embedding look-ups, norms' and activations' element-wise work, softmax and the engine's own
tensor copies are not counted, so the achieved TFLOP/s is a slight under-estimate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from thoughtpatch.data.schema import Pair, Problem
from thoughtpatch.model.synthetic import SHAPES, question, random_codi
from thoughtpatch.patching.engine import BatchedEngine
from thoughtpatch.patching.experiments import Spec, all_layers, iterative_patching, layer_patching, pair_runs, patch_pair, position_patching


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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny shape on CPU (a smoke test of this script)")
    ap.add_argument("--pairs", type=int, default=57, help="pairs (default 57, the organism's count)")
    ap.add_argument("--words", type=int, default=60, help="question length in words (GSM8K: ~45 on average)")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="decode budget per run ('The answer is : N' + eos)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default bfloat16 (float32 with --tiny)")
    ap.add_argument("--device", default=None, help="default cuda (cpu with --tiny)")
    ap.add_argument("--batch-size", type=int, default=None, help="variants per batch (default: all of a pair)")
    ap.add_argument("--direction", choices=["denoising", "noising"], default="denoising")
    args = ap.parse_args(argv)

    shape_name = "tiny" if args.tiny else "llama-3.2-1b"
    device = args.device or ("cpu" if args.tiny else "cuda")
    dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    cuda = torch.device(device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("error: no CUDA device (use --tiny for the CPU smoke test)")
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    t0 = time.perf_counter()
    model = random_codi(SHAPES[shape_name], dtype=getattr(torch, dtype), device=device)
    sync()
    build_s = time.perf_counter() - t0
    pairs = [Pair(i, Problem(question(args.words, 10 + i), 15 + i), Problem(question(args.words, 20 + i), 25 + i)) for i in range(args.pairs)]
    layers, thoughts, k = all_layers(model), list(range(model.num_thoughts)), model.num_thoughts
    engine = BatchedEngine(model, args.batch_size)
    say(f"built {shape_name} ({SHAPES[shape_name].describe()}, {dtype}, {device}) in {build_s:.1f} s; {len(pairs)} pairs")

    pair_runs(model, pairs[0], args.max_new_tokens)  # warm-up, not timed
    counter = FlopCounter(model)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    phases = {}
    runs = []

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

    runs = timed("unpatched", lambda: [pair_runs(model, p, args.max_new_tokens) for p in pairs])
    rows = {}
    rows["layer"] = timed("layer", lambda: sum((layer_patching(engine, r, layers, thoughts, args.direction) for r in runs), []))
    rows["position"] = timed("exp1_position", lambda: sum((position_patching(engine, r, layers, thoughts, args.direction) for r in runs), []))
    rows["iterative"] = timed("exp2_iterative", lambda: sum((iterative_patching(engine, r, layers, k, args.direction) for r in runs), []))
    # What `thoughtpatch run` does: every experiment of a pair in one engine call.
    combined = timed("all_one_pass", lambda: [patch_pair(engine, r, ["layer", "position", "iterative"], Spec("resid", tuple(layers), tuple(thoughts), args.direction)) for r in runs])
    rows["all_one_pass"] = [row for d in combined for rs in d.values() for row in rs]

    separate = [n for n in phases if n != "all_one_pass"]
    total_s = sum(phases[n]["s"] for n in separate)
    total_flops = sum(phases[n]["flops"] for n in separate)
    out = {
        "seconds": {name: p["s"] for name, p in phases.items()},
        "total_s": round(total_s, 3),
        "build_s": round(build_s, 3),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "tflops": float(f"{total_flops / total_s / 1e12:.4g}"),
        "tflops_by_phase": {name: p["tflops"] for name, p in phases.items()},
        "tokens_processed": sum(phases[n]["positions"] for n in separate),
        "rows": {e: len(r) for e, r in rows.items()},
        "pairs": len(pairs),
        "prompt_tokens": len(runs[0].clean_ids),
        "max_new_tokens": args.max_new_tokens,
        "shape": f"{shape_name}: {SHAPES[shape_name].describe()}",
        "params_nonembedding": counter.p_blocks,
        "dtype": dtype,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
