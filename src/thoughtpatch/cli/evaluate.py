"""`thoughtpatch eval`: accuracy with thoughts, with them ablated, without them, and (for the
organism) with explicit CoT."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from thoughtpatch.cli import app


@app.command("eval")
def eval_cmd(
    model: str = typer.Option("toy", "--model", help="Checkpoint dir or file; `toy` = the shipped organism."),
    base: str = typer.Option(None, "--base", help="Base model dir or hub id (config + tokenizer); default: beside the checkpoint."),
    pairs: Path = typer.Option(None, "--pairs", help="Pairs file: both questions of every pair are evaluated."),
    n: int = typer.Option(None, "--n", help="Evaluate N problems (evenly spread over the set)."),
    batch: int = typer.Option(64, "--batch", help="Questions per forward (same-length prompts only)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Decode limit (CODI: 256; organism default 32)."),
    per_thought: bool = typer.Option(True, "--per-thought/--no-per-thought", help="Also ablate each single thought (zero, mean, resample)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Does the model use its thoughts? Greedy accuracy with thoughts, with every thought
    zero-, mean- and resample-ablated, with no thoughts (K = 0) and, for an organism, with
    explicit CoT; overall and by number of steps. Then the accuracy with one thought at a time
    ablated each way (which thought is necessary). Without --pairs an organism is evaluated on
    its fixed held-out set (never trained on)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from rich.console import Console
    from rich.progress import Progress

    from thoughtpatch.data.schema import load_pairs
    from thoughtpatch.errors import ThoughtpatchError
    from thoughtpatch.model import load_model
    from thoughtpatch.model.checkpoint import read_sidecar
    from thoughtpatch.model.evaluate import CONDITIONS, evaluate, problems_from_heldout, problems_from_pairs, spread
    from thoughtpatch.model.loader import resolve_model

    from thoughtpatch.cli.model import check_options

    check_options(dtype, batch=batch, n=n, max_new_tokens=max_new_tokens)
    ckpt_path, _ = resolve_model(model, base)
    sidecar = read_sidecar(ckpt_path)
    organism = bool(sidecar.get("organism"))
    if pairs is not None:
        problems = problems_from_pairs(load_pairs(pairs))
    elif organism:
        d = ckpt_path if ckpt_path.is_dir() else ckpt_path.parent
        if not (d / "heldout.json").is_file():
            raise ThoughtpatchError(f"{d}: no heldout.json; pass --pairs FILE")
        problems = problems_from_heldout(d / "heldout.json")
    else:
        raise ThoughtpatchError("no default evaluation set for this model; pass --pairs FILE")
    problems = spread(problems, n)
    if not problems:
        raise ThoughtpatchError(f"{pairs}: no pairs to evaluate")
    conditions = CONDITIONS if organism else CONDITIONS[:5]
    m = load_model(model, base=base, dtype=dtype)
    mnt = max_new_tokens or (32 if organism else None)  # None: the family's own limit

    err = Console(stderr=True)
    passes = len(conditions) + (3 * m.num_thoughts if per_thought else 0)
    with Progress(console=err, transient=True, disable=as_json and not err.is_terminal) as bar:
        task = bar.add_task("eval", total=len(problems) * passes)
        res = evaluate(m, problems, conditions, batch=batch, max_new_tokens=mnt, per_thought=per_thought,
                       progress=lambda c, k: bar.update(task, advance=k, description=c))
    if as_json:
        print(json.dumps(res))
        return
    from rich.table import Table

    steps = sorted({s for v in res["accuracy"].values() for s in v["steps"]}, key=int)
    t = Table(title=f"{model}: accuracy on {res['n']} problems (%)")
    for col in ["condition", "all", *[f"{s}-step" for s in steps]]:
        t.add_column(col, justify="left" if col == "condition" else "right")
    for cond, a in res["accuracy"].items():
        t.add_row(cond, f"{100 * a['all']:.1f}", *[f"{100 * a['steps'][s]:.1f}" if s in a["steps"] else "–" for s in steps])
    con = Console()
    con.print(t)
    if "per_thought" in res:
        k = len(res["per_thought"]["zero"])
        pt = Table(title="accuracy with one thought ablated (%)")
        for col in ["ablation", *[f"k={j}" for j in range(k)]]:
            pt.add_column(col, justify="left" if col == "ablation" else "right")
        for how, accs in res["per_thought"].items():
            pt.add_row(how, *[f"{100 * a:.1f}" for a in accs])
        con.print(pt)
