"""`thoughtpatch trace | inspect`: run the model itself, one question."""

from __future__ import annotations

from pathlib import Path

import typer

from thoughtpatch.cli import app

MODEL_HELP = "CODI checkpoint dir or file (pytorch_model.bin / model.safetensors); `toy` = the shipped organism."
BASE_HELP = "Base model dir (config + tokenizer), or a hub id when online; default: beside the checkpoint."


def check_options(dtype: str, lora_alpha: float | None = None, **at_least_1: int | None) -> None:
    """The options every model command shares, checked before anything loads."""
    import math

    from thoughtpatch.errors import ThoughtpatchError
    from thoughtpatch.model.loader import DTYPES

    if dtype not in DTYPES:
        raise ThoughtpatchError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'")
    if lora_alpha is not None and not (math.isfinite(lora_alpha) and lora_alpha > 0):
        raise ThoughtpatchError(f"--lora-alpha must be a positive number, not {lora_alpha}")
    for name, v in at_least_1.items():
        if v is not None and v < 1:
            raise ThoughtpatchError(f"--{name.replace('_', '-')} must be at least 1, not {v}")


def _load(model: str, base: str | None, dtype: str, thoughts: int | None, lora_alpha: float | None, **at_least_1: int | None):
    from thoughtpatch.errors import ThoughtpatchError
    from thoughtpatch.model import load_model

    check_options(dtype, lora_alpha, **at_least_1)
    if thoughts is not None and thoughts < 0:
        raise ThoughtpatchError("--thoughts must be ≥ 0")
    return load_model(model, base=base, dtype=dtype, num_thoughts=thoughts, lora_alpha=lora_alpha)


def _prompt(m, question: str, max_new_tokens: int) -> tuple[list[int], int]:
    """The prompt's ids and a decode limit that stays within the model's positions."""
    from thoughtpatch.run import fit_decode

    ids = m.prompt_ids(question)
    return ids, fit_decode(m, len(ids), max_new_tokens, "--question")


@app.command("trace")
def trace_cmd(
    question: str = typer.Option(..., "--question", "-q", help="The question (no template: CODI feeds it as is)."),
    out: Path = typer.Option(..., "--out", help="Output .safetensors file."),
    model: str = typer.Option("toy", "--model", help=MODEL_HELP),
    base: str = typer.Option(None, "--base", help=BASE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16 (CODI's eval dtype)."),
    thoughts: int = typer.Option(None, "--thoughts", help="Number of latent thoughts K (default: the model's own)."),
    lora_alpha: float = typer.Option(None, "--lora-alpha", help="LoRA alpha (default: from thoughtpatch.json, else 32 as released)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Greedy decode limit (CODI: 256)."),
) -> None:
    """Run one question through CODI's exact loop and save every tensor of it.

    Writes input_ids [T], latent_inputs [K,H] (the vectors fed at each thought),
    latent_hidden_states [K,L+1,H] (0 = embeddings, i = block i output, L = after the final
    norm), first_answer_logits [V] (at the eot position) and answer_token_ids [n] (greedy,
    eos included when hit)."""
    import torch
    from safetensors.torch import save_file

    from thoughtpatch.data.schema import atomic_path
    from thoughtpatch.errors import ThoughtpatchError

    if out.is_dir():
        raise ThoughtpatchError(f"--out {out}: is a directory; name the .safetensors file to write")
    m = _load(model, base, dtype, thoughts, lora_alpha, max_new_tokens=max_new_tokens)
    ids, limit = _prompt(m, question, max_new_tokens)
    st = m.think(m.encode(ids))
    gens, first = m.generate(st, max_new_tokens=limit)
    k = st.step
    tensors = {
        "input_ids": torch.tensor(ids),
        "latent_inputs": st.latent_inputs()[0] if k else torch.zeros(0, m.hidden_size, dtype=m.dtype),
        "latent_hidden_states": st.latent_hidden()[0] if k else torch.zeros(0, m.num_layers + 1, m.hidden_size, dtype=m.dtype),
        "first_answer_logits": first[0],
        "answer_token_ids": torch.tensor(gens[0].token_ids, dtype=torch.long),
    }
    meta = {k2: str(v) for k2, v in m.source.items()} | {"question": question, "num_thoughts": str(k), "answer_text": gens[0].text}
    with atomic_path(out) as tmp:
        save_file({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, str(tmp), metadata=meta)
    print(f"answer: {gens[0].text!r}")
    print(f"number: {gens[0].number:g}")
    print(f"wrote {out}")


@app.command("inspect")
def inspect_cmd(
    question: str = typer.Option(..., "--question", "-q", help="The question."),
    model: str = typer.Option("toy", "--model", help=MODEL_HELP),
    base: str = typer.Option(None, "--base", help=BASE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16."),
    thoughts: int = typer.Option(None, "--thoughts", help="Number of latent thoughts K (default: the model's own)."),
    lora_alpha: float = typer.Option(None, "--lora-alpha", help="LoRA alpha (default: from thoughtpatch.json, else 32)."),
    top: int = typer.Option(5, "--top", help="Tokens per row."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Greedy decode limit."),
) -> None:
    """The greedy answer, and the logit lens (top tokens of the final-norm state through the
    LM head, as CODI's probe script) at <bot> and at every thought."""
    from rich.console import Console
    from rich.table import Table

    from thoughtpatch.model.lens import probe_top_k, token_label

    m = _load(model, base, dtype, thoughts, lora_alpha, top=top, max_new_tokens=max_new_tokens)
    ids, limit = _prompt(m, question, max_new_tokens)
    st = m.think(m.encode(ids))
    gens, _ = m.generate(st, max_new_tokens=limit)
    ids, probs = probe_top_k(m, st, k=top)
    table = Table(title=f"logit lens — {Path(str(m.source['checkpoint'])).name}, K = {st.step}")
    table.add_column("position", style="bold")
    for j in range(top):
        table.add_column(f"#{j + 1}")
    for row in range(ids.shape[1]):
        name = "<bot>" if row == 0 else f"thought {row - 1}"
        table.add_row(name, *[f"{token_label(m, int(t))!r} {float(p):.2f}" for t, p in zip(ids[0, row], probs[0, row])])
    con = Console()
    con.print(table)
    con.print(f"answer: {gens[0].text!r}  →  {gens[0].number:g}")
