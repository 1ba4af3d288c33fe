"""`thoughtpatch pairs synth`: templated word problems for the organism."""

from __future__ import annotations

from pathlib import Path

import typer

from thoughtpatch.cli.pairs import pairs_app


@pairs_app.command("synth")
def synth_cmd(
    n: int = typer.Option(..., "--n", help="Number of pairs."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same pairs)."),
    out: Path = typer.Option(..., "--out", help="Output pairs file (JSON)."),
    steps: str = typer.Option("1,2,3", "--steps", help="Numbers of operations to cycle through, e.g. 2 or 1,2,3."),
) -> None:
    """Templated 1-3 step word problems as clean/corrupted pairs (one number changed, answers
    differ); meta keeps the CoT (`<<expr=result>>`), the program, n_steps and the change."""
    from rich.console import Console

    from thoughtpatch.data.schema import save_pairs
    from thoughtpatch.data.synth import synth_pairs
    from thoughtpatch.errors import ThoughtpatchError

    if n < 1:
        raise ThoughtpatchError("--n must be at least 1")
    try:
        ks = tuple(int(s) for s in steps.split(","))
    except ValueError:
        raise ThoughtpatchError(f"--steps: expected numbers like 1,2,3, got {steps!r}") from None
    if not ks or any(k not in (1, 2, 3) for k in ks):
        raise ThoughtpatchError(f"--steps: each number of operations must be 1, 2 or 3, got {steps!r}")
    pairs = synth_pairs(n, seed, ks)
    save_pairs(pairs, out)
    by = {k: sum(p.meta["n_steps"] == k for p in pairs) for k in sorted(set(ks))}
    Console(stderr=True).print(f"wrote {len(pairs)} pairs to {out} (" + ", ".join(f"{k}-step {v}" for k, v in by.items()) + ")")
