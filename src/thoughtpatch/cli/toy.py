"""`thoughtpatch toy ...`: the organisms (a tiny CODI and a tiny Coconut trained here)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from thoughtpatch.cli import app

toy_app = typer.Typer(help="The organisms: a tiny CODI and a tiny Coconut trained on synthetic arithmetic.", no_args_is_help=True)
FAMILIES = ("codi", "coconut")
app.add_typer(toy_app, name="toy")


@toy_app.command("train")
def train_cmd(
    out: Path = typer.Option(..., "--out", help="Output directory (a checkpoint dir that is also its own base)."),
    family: str = typer.Option("codi", "--family", help="codi (CODI's recipe, the `toy` organism) or coconut (Coconut's recipe, `toy-coconut`)."),
    minutes: float = typer.Option(None, "--minutes", help="Scale the step budget linearly: M / 30 of the default steps (codi: 4000, ~30 min on 2 idle CPU threads; coconut: 3000)."),
    steps: int = typer.Option(None, "--steps", help="Exact number of optimiser steps (overrides --minutes)."),
    seed: int = typer.Option(0, "--seed", help="Seed: same seed, same steps, same threads -> identical weights."),
    aux: float = typer.Option(None, "--aux", help="coconut: weight of an auxiliary loss (not Coconut's) that makes thoughts decode the intermediate results (default 0: Coconut's plain recipe)."),
    threads: int = typer.Option(None, "--threads", help="CPU threads (default: the shipped organism's, codi 2, coconut 1; weights are bit-identical only for the same count)."),
    eval_n: int = typer.Option(None, "--eval-n", help="Held-out problems for the model card's accuracy table (default: all 600)."),
) -> None:
    """Train an organism with its family's recipe (deterministic for a seed on CPU) and write it to --out."""
    # Two threads on two shared cores: spinning OpenMP workers stall badly when another
    # process holds a core; passive waiting keeps the speed steady. Must precede torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from rich.console import Console

    from thoughtpatch.cli.model import check_options
    from thoughtpatch.errors import ThoughtpatchError

    if family not in FAMILIES:
        raise ThoughtpatchError(f"--family: unknown family '{family}' (choose from {', '.join(FAMILIES)})")
    check_options("float32", threads=threads, eval_n=eval_n, steps=steps)
    if minutes is not None and minutes <= 0:
        raise ThoughtpatchError("--minutes must be positive")
    if aux is not None and aux < 0:
        raise ThoughtpatchError("--aux must be >= 0")
    if out.exists() and not out.is_dir():
        raise ThoughtpatchError(f"--out {out}: is a file, not a directory")
    if family == "codi":
        from thoughtpatch.model.organism.train import TrainConfig, steps_for_minutes, train
    else:
        from thoughtpatch.model.organism.coconut_train import CoconutTrainConfig as TrainConfig
        from thoughtpatch.model.organism.coconut_train import steps_for_minutes
        from thoughtpatch.model.organism.coconut_train import train_coconut as train

    cfg = TrainConfig(seed=seed)
    if threads is not None:
        cfg.threads = threads
    if steps is not None:
        cfg.steps = steps
    elif minutes is not None:
        cfg.steps = steps_for_minutes(minutes)
    if aux is not None:
        cfg.w_aux = aux
    con = Console(stderr=True)
    con.print(f"training the {family} organism: {cfg.steps} steps, seed {seed}, {cfg.threads} threads -> {out}")
    train(cfg, out_dir=out, eval_problems=eval_n)
    import json

    acc = json.loads((out / "thoughtpatch.json").read_text())["accuracy"]
    from thoughtpatch.model.organism.coconut_export import COCONUT_LABELS
    from thoughtpatch.model.organism.export import LABELS, accuracy_markdown

    con.print(accuracy_markdown(acc, COCONUT_LABELS if family == "coconut" else LABELS))
    con.print(f"wrote {out}")
