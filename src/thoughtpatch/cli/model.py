"""`thoughtpatch inspect` (and `trace -q`): run the model itself, one question."""

from __future__ import annotations

from pathlib import Path

import typer

from thoughtpatch.cli import app

MODEL_HELP = "Checkpoint dir or file: CODI (pytorch_model.bin / model.safetensors) or Coconut (its raw checkpoint_N); `toy` / `toy-coconut` = the organisms."
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


def _load(model: str, base: str | None, dtype: str, thoughts: int | None, lora_alpha: float | None, family: str | None = None, **at_least_1: int | None):
    from thoughtpatch.errors import ThoughtpatchError
    from thoughtpatch.model import load_model

    check_options(dtype, lora_alpha, **at_least_1)
    if thoughts is not None and thoughts < 0:
        raise ThoughtpatchError("--thoughts must be ≥ 0")
    if family not in (None, "codi", "coconut"):
        raise ThoughtpatchError(f"--family must be codi or coconut, not '{family}'")
    return load_model(model, base=base, dtype=dtype, num_thoughts=thoughts, lora_alpha=lora_alpha, family=family)


def _prompt(m, question: str, max_new_tokens: int) -> tuple[list[int], int]:
    """The prompt's ids and a decode limit that stays within the model's positions."""
    from thoughtpatch.sweep import fit_decode

    ids = m.prompt_ids(question)
    return ids, fit_decode(m, len(ids), max_new_tokens, "--question")


def dump_trace(question: str, out: Path, model: str, base: str | None, dtype: str, thoughts: int | None, lora_alpha: float | None,
               max_new_tokens: int | None, family: str | None = None) -> None:
    """One question through the family's exact loop, every tensor saved (`thoughtpatch trace -q`).

    Writes input_ids [T] (the whole prompt as the family builds it: Coconut's with its latent
    and end markers), latent_inputs [K,H] (the vectors fed at each thought),
    latent_hidden_states [K,L+1,H] (0 = embeddings, i = block i output, L = after the final
    norm), first_answer_logits [V] (at the read-out token) and answer_token_ids [n] (greedy)."""
    import torch
    from safetensors.torch import save_file

    from thoughtpatch.data.schema import atomic_path
    from thoughtpatch.errors import ThoughtpatchError

    if out.is_dir():
        raise ThoughtpatchError(f"--out {out}: is a directory; name the .safetensors file to write")
    m = _load(model, base, dtype, thoughts, lora_alpha, family=family, max_new_tokens=max_new_tokens)
    ids, limit = _prompt(m, question, max_new_tokens or m.max_new_tokens)
    st = m.think(m.encode(ids))
    gens, first = m.generate(st, max_new_tokens=limit)
    k = st.step
    tensors = {
        "input_ids": torch.tensor(m.layout_ids(ids, k)),
        "latent_inputs": st.latent_inputs()[0] if k else torch.zeros(0, m.hidden_size, dtype=m.dtype),
        "latent_hidden_states": st.latent_hidden()[0] if k else torch.zeros(0, m.num_layers + 1, m.hidden_size, dtype=m.dtype),
        "first_answer_logits": first[0],
        "answer_token_ids": torch.tensor(gens[0].token_ids, dtype=torch.long),
    }
    meta = {k2: str(v) for k2, v in m.source.items()} | {"question": question, "num_thoughts": str(k), "answer_text": gens[0].text, "answer": gens[0].answer}
    with atomic_path(out) as tmp:
        save_file({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, str(tmp), metadata=meta)
    print(f"family: {m.family.name}")
    print(f"answer: {gens[0].text!r}")
    print(f"extracted: {gens[0].answer!r}")
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
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Greedy decode limit (default: the family's own)."),
    family: str = typer.Option(None, "--family", help="codi | coconut: confirms what the checkpoint's keys say."),
) -> None:
    """The greedy answer, and the logit lens (top tokens of the final-norm state through the
    LM head, as CODI's probe script) at the prompt's last token and at every thought."""
    from rich.console import Console
    from rich.table import Table

    from thoughtpatch.model.lens import probe_top_k, token_label

    m = _load(model, base, dtype, thoughts, lora_alpha, family=family, top=top, max_new_tokens=max_new_tokens)
    ids, limit = _prompt(m, question, max_new_tokens or m.max_new_tokens)
    st = m.think(m.encode(ids))
    gens, _ = m.generate(st, max_new_tokens=limit)
    ids, probs = probe_top_k(m, st, k=top)
    table = Table(title=f"logit lens — {Path(str(m.source['checkpoint'])).name}, K = {st.step}")
    table.add_column("position", style="bold")
    for j in range(top):
        table.add_column(f"#{j + 1}")
    for row in range(ids.shape[1]):
        name = m.markers[m.open_id] if row == 0 else f"thought {row - 1}"
        table.add_row(name, *[f"{token_label(m, int(t))!r} {float(p):.2f}" for t, p in zip(ids[0, row], probs[0, row])])
    con = Console()
    con.print(table)
    con.print(f"answer: {gens[0].text!r}  →  {gens[0].answer!r}")
