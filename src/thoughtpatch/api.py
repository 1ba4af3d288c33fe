"""The Python API (DESIGN §9): what a notebook imports as `thoughtpatch`.

    import thoughtpatch as tp
    model = tp.load("toy")
    pairs = tp.load_pairs("toy")
    tr = model.run(pairs[0].clean.question)                       # a Trace
    res = tp.run(model, pairs[:5], experiments=["position"])      # Results, the CLI's engine
    res.grid("position", "kl"); res.save("runs/x"); tp.open_run("runs/x")
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable

from thoughtpatch.errors import ThoughtpatchError
from thoughtpatch.results import Results, open_run  # noqa: F401  (part of the API)


def load(model: str | Path = "toy", base: str | Path | None = None, lora_alpha: float | None = None, dtype: str = "float32",
         device: str = "cpu", num_thoughts: int | None = None, family: str | None = None):
    """A continuous-thought model: `toy` / `toy-coconut` (the organisms), or a CODI or Coconut
    checkpoint (dir or file) on a base model directory (config + tokenizer)."""
    from thoughtpatch.model import load_model

    return load_model(model, base=base, dtype=dtype, lora_alpha=lora_alpha, num_thoughts=num_thoughts, device=device, family=family)


class PairList(list):
    """A list of `Pair`s that prints short."""

    def __repr__(self) -> str:
        return f"PairList({len(self)} pairs" + (f", ids {self[0].pair_id}…{self[-1].pair_id})" if self else ")")

    def __getitem__(self, i):
        got = super().__getitem__(i)
        return PairList(got) if isinstance(i, slice) else got


def load_pairs(source: str | Path = "toy") -> PairList:
    """Pairs from `toy` / `toy-coconut` (an organism's 57 default pairs) or a file in any
    supported format (ours, the seed's source or prepared format)."""
    from thoughtpatch.data.schema import load_pairs as read
    from thoughtpatch.model.loader import ORGANISMS

    path = ORGANISMS[str(source)] / "pairs.json" if str(source) in ORGANISMS else Path(source)
    return PairList(read(path))


def load_questions(source: str | Path) -> PairList:
    """Causal tracing's questions: a GSM8K jsonl file as it is, {question, answer} rows, or a
    pair file's clean questions."""
    from thoughtpatch.data.questions import load_questions as read

    return PairList(read(source))


def run(model, pairs: Iterable, experiments: Iterable[str] = ("layer", "position", "iterative"), *, out: str | Path | None = None,
        resume: bool = False, progress: bool = False, verbose: bool = False, **options) -> Results:
    """Patch `pairs` (or, for "trace", questions) with the engine the CLI uses; returns
    `Results`. Options are the CLI's, by their RunConfig names: layers="input,0-3",
    thoughts="0-5", site="attn,mlp", direction, mode, alpha, vector, noise_scale, seed, readers,
    knock_on, noise_tokens, keep, engine, batch_size, max_new_tokens, stop. With `out` the run
    is written as the CLI writes it (resumable; W&B per `wandb=`), else kept in memory."""
    import sys

    from thoughtpatch.sweep import RunConfig, sweep

    fields = {f.name for f in dataclasses.fields(RunConfig)}
    model_level = {"model", "base", "family", "pairs", "questions", "n", "out", "resume", "dtype", "lora_alpha", "num_thoughts", "shard", "report"}
    unknown = sorted(set(options) - (fields - model_level))
    if unknown:
        raise ThoughtpatchError(f"tp.run: unknown option(s) {', '.join(unknown)} (see thoughtpatch.sweep.RunConfig)")
    pairs = list(pairs)
    if not pairs:
        raise ThoughtpatchError("tp.run: no pairs")
    exps = [experiments] if isinstance(experiments, str) else list(experiments)
    cfg = RunConfig(
        model=str(model.source.get("checkpoint")), base=str(model.source.get("base")), experiments=exps,
        out=str(out) if out else None, resume=resume, report=False, wandb=options.pop("wandb", "disabled" if out is None else None),
        dtype=str(model.dtype).removeprefix("torch."), num_thoughts=model.num_thoughts, **options,
    )
    cfg.validate()
    limit = options.get("limit")
    pairs = pairs[:limit] if limit else pairs
    if "trace" not in exps:
        same = [p.pair_id for p in pairs if p.clean.answer == p.corrupted.answer]
        if same:
            raise ThoughtpatchError(f"pairs {same} have equal clean and corrupted answers: nothing to patch towards (drop them)")
    ids = [p.pair_id for p in pairs]
    if len(set(ids)) != len(ids):
        raise ThoughtpatchError("tp.run: pair ids repeat")
    say = (lambda s: print(s, file=sys.stderr)) if verbose else (lambda s: None)
    if out is not None:
        from thoughtpatch.model.checkpoint import find_checkpoint_file
        from thoughtpatch.report.rundir import claim_out
        from thoughtpatch.sweep import check_resume, pairs_sha256, result_config, sha256_file

        out = Path(out)
        sha = sha256_file(find_checkpoint_file(model.source["checkpoint"])) if Path(str(model.source.get("checkpoint"))).exists() else None
        check_resume(out, claim_out(out, resume), result_config(cfg, "(in memory)"), sha, pairs_sha256(pairs))
        data = sweep(model, pairs, cfg, out=out, model_sha=sha, progress=progress, say=say)
    else:
        data = sweep(model, pairs, cfg, progress=progress, say=say)
    return Results(data)
