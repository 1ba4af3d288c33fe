"""`thoughtpatch run | layer | position | iterative`: the patching experiments."""

from __future__ import annotations

from pathlib import Path

import typer

from thoughtpatch.cli import app


def _register(name: str, experiments: list[str], doc: str) -> None:
    def command(
        model: str = typer.Option(None, "--model", help="CODI checkpoint dir or file; `toy` (default) = the shipped organism."),
        base: str = typer.Option(None, "--base", help="Base model dir (config + tokenizer) or hub id."),
        pairs: str = typer.Option(None, "--pairs", help="Pairs file (default: the organism's 57 pairs)."),
        out: str = typer.Option(None, "--out", help="Run directory (default runs/<model>-<time>)."),
        layers: str = typer.Option(None, "--layers", help="Layers, e.g. 'input,0-3' (default: all and the input row)."),
        thoughts: str = typer.Option(None, "--thoughts", help="Thoughts to patch, e.g. '0-5' (default: all)."),
        direction: str = typer.Option(None, "--direction", help="denoising (clean → corrupted, default) or noising."),
        test_mode: bool = typer.Option(None, "--test-mode", help="Only the first 5 pairs."),
        resume: bool = typer.Option(None, "--resume", help="Continue the run in --out (refuses a changed config)."),
        config: Path = typer.Option(None, "--config", help="TOML file with any of these settings (flags win)."),
        wandb: str = typer.Option(None, "--wandb", help="online | offline | disabled (default offline unless a key is set)."),
        dtype: str = typer.Option(None, "--dtype", help="float32 (default) or bfloat16."),
        batch_size: int = typer.Option(None, "--batch-size", help="Variants per batch (default: all of a pair; halves on CUDA OOM)."),
        keep: str = typer.Option(None, "--keep", help="all (default): patch every pair and also summarise the correct ones; correct: patch only pairs the model answers right on both sides."),
        max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Greedy decode limit (CODI: 256)."),
        stop: str = typer.Option(None, "--stop", help="codi: stop at the tokenizer's eos as CODI's eval; all: at any eos id of the model."),
        engine: str = typer.Option(None, "--engine", help="batched (default) or reference (one variant at a time)."),
        lora_alpha: float = typer.Option(None, "--lora-alpha", help="LoRA alpha (default from thoughtpatch.json, else 32)."),
        num_thoughts: int = typer.Option(None, "--num-thoughts", help="K latent thoughts (default: the model's own)."),
        report: bool = typer.Option(None, "--report/--no-report", help="Write figures and reports (default: yes)."),
        shard: str = typer.Option(None, "--shard", help="i/n: only the pairs at positions p with p % n == i, for `thoughtpatch merge` (automatic under accelerate launch)."),
    ) -> None:
        given = {k: v for k, v in locals().items() if k not in ("config", "name", "experiments") and v is not None}
        from thoughtpatch.run import RunConfig, run_experiments

        cfg = RunConfig.from_toml(config, **given) if config else RunConfig(**given)
        if name != "run":
            cfg.experiments = experiments
        run_experiments(cfg)

    command.__doc__ = doc
    app.command(name)(command)


_register("run", ["layer", "position", "iterative"], "Run layer patching, Exp 1 (position-wise) and Exp 2 (iterative) with every validation check.")
_register("layer", ["layer"], "Layer patching: all thoughts at one layer, for each layer.")
_register("position", ["position"], "Exp 1: every single (layer, thought) site.")
_register("iterative", ["iterative"], "Exp 2: patch thought i with the activation the previous iteration produced, chain on.")
