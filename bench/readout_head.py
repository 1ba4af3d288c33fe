"""The batched read-out's three CPU kernels against the plain way, same process, same inputs:
the LM head in slices of the vocabulary (`sliced_linear`, as `ThoughtModel._read_head` runs it)
against one GEMM; the float64 log-sum-exp in blocks of 16 rows (`logsumexp64`) against one
float64 copy of the chunk; and greedy ids through the bf16 screen (`ArgmaxScreen`, as
`ThoughtModel._greedy` runs it where the CPU has AMX) against the fp32 head's argmax.

    python bench/readout_head.py --json

Shapes are the `--quick` engine bench's (hidden 768, vocabulary 32,003) at the row counts of
its read-out: 218 rows (a decode step) and 524 (one chunk of the teacher-forced tree). Prints
one JSON line: per shape, the median seconds of each way, their ratio and the largest
difference of the outputs (0.0 where the BLAS computes each logit the same way; for greedy
ids, how many differ), and whether this CPU has AMX (without it the engine does not screen)."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from thoughtpatch.model.argmax import ArgmaxScreen, fast_bf16
from thoughtpatch.model.runtime import ThoughtModel, logsumexp64, sliced_linear


def median_s(f, repeat: int) -> float:
    f()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=32003)
    ap.add_argument("--rows", type=int, nargs="+", default=[218, 524])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    lm = nn.Linear(args.hidden, args.vocab, bias=False)
    out: dict = {"threads": torch.get_num_threads(), "hidden": args.hidden, "vocab": args.vocab, "amx": fast_bf16()}
    ids = args.vocab - 1  # CODI's argmax leaves out <eot>, the last id
    screen = ArgmaxScreen(lm.weight.detach(), ids)
    with torch.inference_mode():
        for rows in args.rows:
            h = torch.randn(rows, args.hidden)
            plain, sliced = (lambda: lm(h)), (lambda: sliced_linear(lm, h, ThoughtModel.HEAD_SLICE))
            a, b = median_s(plain, args.repeat), median_s(sliced, args.repeat)
            out[f"head_{rows}"] = {"plain_s": round(a, 4), "sliced_s": round(b, 4), "ratio": round(a / b, 2), "max_abs_diff": float((plain() - sliced()).abs().max())}
            f = lm(h).float()
            whole, blocks = (lambda: f.double().logsumexp(-1)), (lambda: logsumexp64(f))
            a, b = median_s(whole, args.repeat), median_s(blocks, args.repeat)
            out[f"lse_{rows}"] = {"whole_s": round(a, 4), "blocks_s": round(b, 4), "ratio": round(a / b, 2), "max_abs_diff": float((whole() - blocks()).abs().max())}
            argmax, screened = (lambda: lm(h)[:, :ids].argmax(-1)), (lambda: screen(h))
            a, b = median_s(argmax, args.repeat), median_s(screened, args.repeat)
            out[f"greedy_{rows}"] = {"plain_s": round(a, 4), "screened_s": round(b, 4), "ratio": round(a / b, 2), "ids_differ": int((argmax() != screened()).sum())}
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
