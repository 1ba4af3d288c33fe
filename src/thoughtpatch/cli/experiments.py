"""`thoughtpatch run | layer | position | iterative | knockout | trace`: the experiments, a thin
layer over `thoughtpatch.sweep` (every flag is a RunConfig field and a TOML key)."""

from __future__ import annotations

from pathlib import Path

import typer

from thoughtpatch.cli import app


def _register(name: str, experiments: list[str] | None, doc: str) -> None:
    def command(
        model: str = typer.Option(None, "--model", help="Checkpoint dir or file (CODI or Coconut); `toy` (default) / `toy-coconut` = the organisms."),
        base: str = typer.Option(None, "--base", help="Base model dir (config + tokenizer) or hub id."),
        family: str = typer.Option(None, "--family", help="codi | coconut: confirms what the checkpoint's keys say (read from them by default)."),
        pairs: str = typer.Option(None, "--pairs", help="Pairs file (default: the organism's 57 pairs); for trace, its clean questions."),
        out: str = typer.Option(None, "--out", help="Run directory (default runs/<model>-<time>); with trace -q, the .safetensors file."),
        layers: str = typer.Option(None, "--layers", help="Layers, e.g. 'input,0-3' (default: all and the input row)."),
        thoughts: str = typer.Option(None, "--thoughts", help="Thoughts to patch, e.g. '0-5' (default: all)."),
        site: str = typer.Option(None, "--site", help="input | resid (default) | attn | mlp | head | kv, or several: 'attn,mlp'."),
        direction: str = typer.Option(None, "--direction", help="denoising (clean → corrupted, default) or noising."),
        mode: str = typer.Option(None, "--mode", help="What a site receives: replace (the other run's value, default) | zero | mean | resample | add | noise."),
        alpha: float = typer.Option(None, "--alpha", help="--mode add: value + alpha·v (default 1)."),
        vector: str = typer.Option(None, "--vector", help="--mode add: FILE.safetensors (one vector per site key, e.g. resid.2.3) or 'diff' (mean source − mean receiving)."),
        noise_scale: float = typer.Option(None, "--noise-scale", help="--mode noise: sigma = this × the site's spread over the pair set (default 1)."),
        seed: int = typer.Option(None, "--seed", help="Seed of --mode noise and of trace's noise (default 0)."),
        readers: str = typer.Option(None, "--readers", help="knockout: who stops reading thought k's key: answer (default) | thoughts | both."),
        knock_on: str = typer.Option(None, "--on", help="knockout: the unpatched run it is applied to: clean (default) | corrupted | both."),
        questions: str = typer.Option(None, "--questions", help="trace: a question file (GSM8K jsonl as is, or {question, answer} rows)."),
        n: int = typer.Option(None, "--n", help="trace: N questions evenly from an organism's held-out set."),
        noise_tokens: str = typer.Option(None, "--noise-tokens", help="trace: noise the number tokens (default) or all question tokens."),
        limit: int = typer.Option(None, "--limit", help="Only the first N pairs (or questions)."),
        test_mode: bool = typer.Option(None, "--test-mode", help="Only the first 5 pairs."),
        resume: bool = typer.Option(None, "--resume", help="Continue the run in --out (refuses a changed config)."),
        config: Path = typer.Option(None, "--config", help="TOML file with any of these settings (flags win)."),
        wandb: str = typer.Option(None, "--wandb", help="online | offline | disabled (default offline unless a key is set)."),
        dtype: str = typer.Option(None, "--dtype", help="float32 (default) or bfloat16."),
        batch_size: int = typer.Option(None, "--batch-size", help="Variants per batch (default: all of a pair; halves on CUDA OOM)."),
        keep: str = typer.Option(None, "--keep", help="all (default): patch every pair and also summarise the correct ones; correct: patch only pairs the model answers right on both sides."),
        max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Greedy decode limit (default: the family's own, CODI 256, Coconut 64)."),
        stop: str = typer.Option(None, "--stop", help="codi: stop at the tokenizer's eos as the family's eval; all: at any eos id of the model."),
        engine: str = typer.Option(None, "--engine", help="batched (default) or reference (one variant at a time)."),
        lora_alpha: float = typer.Option(None, "--lora-alpha", help="LoRA alpha (default from thoughtpatch.json, else 32)."),
        num_thoughts: int = typer.Option(None, "--num-thoughts", help="K latent thoughts (default: the model's own; Coconut 6)."),
        report: bool = typer.Option(None, "--report/--no-report", help="Write figures and reports (default: yes)."),
        shard: str = typer.Option(None, "--shard", help="i/n: only the pairs at positions p with p % n == i, for `thoughtpatch merge` (automatic under accelerate launch)."),
        experiment: str = typer.Option(None, "--experiments", help="run: which experiments, e.g. 'position,knockout' (default layer,position,iterative)."),
        question: str = typer.Option(None, "--question", "-q", help="trace: one question's tensors to --out FILE.safetensors instead of causal tracing."),
    ) -> None:
        given = {k: v for k, v in locals().items() if k not in ("config", "name", "experiments", "experiment", "question") and v is not None}
        from thoughtpatch.errors import ThoughtpatchError
        from thoughtpatch.sweep import RunConfig, run_experiments

        if question is not None:
            if name != "trace":
                raise ThoughtpatchError("-q/--question belongs to `thoughtpatch trace` (one question's tensors)")
            if out is None:
                raise ThoughtpatchError("trace -q: --out FILE.safetensors is required")
            stray = sorted(k for k in given if k not in ("model", "base", "dtype", "num_thoughts", "lora_alpha", "max_new_tokens", "family", "out"))
            if stray:
                hint = " (K is --num-thoughts)" if "thoughts" in stray else ""
                raise ThoughtpatchError(f"trace -q takes no --{stray[0].replace('_', '-')}{hint}: it writes one question's tensors")
            from thoughtpatch.cli.model import dump_trace

            return dump_trace(question, Path(out), model or "toy", base, dtype or "float32", num_thoughts, lora_alpha, max_new_tokens, family)
        cfg = RunConfig.from_toml(config, **given) if config else RunConfig(**given)
        if experiments is not None:
            cfg.experiments = experiments
        elif experiment is not None:
            cfg.experiments = [e.strip() for e in experiment.split(",") if e.strip()]
        run_experiments(cfg)

    command.__doc__ = doc
    app.command(name)(command)


_register("run", None, "Run layer patching, Exp 1 (position-wise) and Exp 2 (iterative) — or --experiments — with every validation check.")
_register("layer", ["layer"], "Layer patching: all thoughts at one layer, for each layer.")
_register("position", ["position"], "Exp 1: every single (layer, thought) site.")
_register("iterative", ["iterative"], "Exp 2: patch thought i with the activation the previous iteration produced, chain on.")
_register("knockout", ["knockout"], "Attention knockout: in block l, the readers of thought k's key do not attend to it (grid L × K).")
_register(
    "trace", ["trace"],
    "Causal tracing (no pairs): noise the question's number embeddings, restore each site from the clean run. "
    "With -q QUESTION --out FILE: save every tensor of one run instead.",
)
