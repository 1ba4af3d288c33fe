"""Write a trained Coconut organism as a directory that is both a Coconut checkpoint and its
own base: config.json (vocab = V0, no markers), tokenizer files (no markers: they are added
at load time with `add_tokens`, as Coconut's run.py does), model.safetensors in Coconut's
key layout (`base_causallm.<HF name>` + `embedding.weight`, V0 + 3 rows), thoughtpatch.json,
heldout.json, pairs.json (the CODI organism's), train_log.json and MODEL_CARD.md."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from thoughtpatch.data.schema import atomic_write_text, save_pairs
from thoughtpatch.model.checkpoint import SIDECAR, save_coconut_checkpoint
from thoughtpatch.model.families import COCONUT, COCONUT_MARKERS
from thoughtpatch.model.organism.export import CONDITIONS, EVAL_MAX_NEW_TOKENS, LABELS, accuracy_markdown, per_thought_markdown
from thoughtpatch.model.organism.tokenizer import COCONUT_EXTRA, build_tokenizer, save_tokenizer

COCONUT_LABELS = LABELS | {"cot": "explicit CoT (no markers)"}


def save_coconut_organism(out_dir, hf, cfg, heldout, pairs, log, wall_s: float, cpu_s: float,
                          eval_problems: int | None = None) -> dict:
    """Write everything, then measure the accuracy tables on the saved directory (`measure`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(COCONUT_EXTRA)  # the base tokenizer: the markers are added at load time
    v0 = len(tok)
    save_tokenizer(tok, out)
    config = copy.deepcopy(hf.config)
    config.vocab_size = v0  # the base's vocabulary; the checkpoint holds V0 + 3 rows (the markers)
    config.save_pretrained(str(out))
    atomic_write_text(out / "heldout.json", json.dumps(heldout, indent=1) + "\n")
    save_pairs(pairs, out / "pairs.json")
    every = max(1, len(log) // 200)
    atomic_write_text(out / "train_log.json", json.dumps([r for i, r in enumerate(log) if i % every == 0 or i == len(log) - 1]) + "\n")
    save_coconut_checkpoint(out, hf)

    sidecar = {
        "family": COCONUT.name,
        "num_thoughts": cfg.num_thoughts,
        "answer_template": COCONUT.answer_template,
        "organism": True,
        "max_new_tokens": COCONUT.max_new_tokens,
        "base_vocab": v0,
        "markers": dict(zip(COCONUT_MARKERS, range(v0, v0 + 3))),
        "parameters": sum(p.numel() for p in hf.parameters()),
        "train": cfg.to_dict(),
        "train_wall_s": round(wall_s, 1),
        "train_steps_per_s": round(len(log) / max(wall_s, 1e-9), 3),
        "train_cpu_s": round(cpu_s, 1),  # process CPU time, all threads: the idle-machine estimate
        "torch": torch.__version__,
    }
    atomic_write_text(out / SIDECAR, json.dumps(sidecar, indent=1) + "\n")  # the loader reads K from it
    return measure(out, eval_problems)


def measure(out_dir: str | Path, eval_problems: int | None = None) -> dict:
    """Reload an organism directory through the loader, measure its accuracy tables with the
    runtime (the numbers `thoughtpatch eval --model DIR` gives), store them in its sidecar and
    rewrite its model card."""
    from thoughtpatch.model import load_model
    from thoughtpatch.model.evaluate import evaluate, problems_from_heldout, spread

    out = Path(out_dir)
    sidecar = json.loads((out / SIDECAR).read_text())
    probs = spread(problems_from_heldout(out / "heldout.json"), eval_problems)
    res = evaluate(load_model(str(out)), probs, CONDITIONS, max_new_tokens=EVAL_MAX_NEW_TOKENS, per_thought=True)
    sidecar |= {"eval_n": res["n"], "eval_max_new_tokens": EVAL_MAX_NEW_TOKENS, "accuracy": res["accuracy"],
                "per_thought": res["per_thought"]}
    atomic_write_text(out / SIDECAR, json.dumps(sidecar, indent=1) + "\n")
    render_model_card(out)
    return sidecar


def uses_thoughts(acc: dict) -> str:
    """One sentence from the table: how far the best ablation falls short of the model."""
    ablations = {c: acc[c]["all"] for c in ("thoughts_zeroed", "thoughts_mean", "thoughts_resample", "no_thoughts") if c in acc}
    if "with_thoughts" not in acc or not ablations:
        return ""
    best = max(ablations, key=ablations.get)
    gap = 100 * (acc["with_thoughts"]["all"] - ablations[best])
    verdict = "it uses its thoughts" if gap >= 20 else ("it uses its thoughts only weakly" if gap >= 5 else "it does not use what is fed as its thoughts")
    return (f"With its thoughts the model answers {100 * acc['with_thoughts']['all']:.1f} %; the best ablation "
            f"({COCONUT_LABELS[best]}) {100 * ablations[best]:.1f} %, {gap:.1f} points less: {verdict}.")


PLAIN_RECIPE_FINDING = """\
At this scale Coconut's recipe gives a model that uses the latent *positions* but not what is
fed there: K = 0 costs about 30 points, while zeroing, mean-ablating or swapping in another
question's thoughts costs little (tables above). Its six thoughts are one near-constant vector
(pairwise cosine 0.90–1.00) that the LM head reads as `#`; the positions add computation
through attention, like pause tokens. A published analysis of Coconut models reports the same
(Zhang et al. 2025, "Do Latent Tokens Think?", arXiv 2512.21711: latent tokens are insensitive
to perturbation). Patching this organism is therefore a negative control for the CODI one: a
thought site that carries nothing should show nothing.

Tried: the same recipe, seed and step count in an earlier development run, whose losses equal
these to step 600 and part at the first latent stage (its working copy of the trainer was not
kept, so it cannot be rebuilt), ended using its thoughts (86.7 % with them, 37.8 % zeroed on
90 held-out problems): which solution the recipe lands on is fragile. `--aux 1` adds a loss
that is not Coconut's (each replaced step's result decoded from the thought after it);
initialising the final-norm gain at 0.05 so that thoughts start at embedding scale slowed the
CoT phase tenfold and was dropped."""


def render_model_card(out_dir: str | Path) -> str:
    """MODEL_CARD.md from the files of an organism directory (thoughtpatch.json, train_log.json)."""
    d = Path(out_dir)
    sc = json.loads((d / SIDECAR).read_text())
    log = json.loads((d / "train_log.json").read_text())
    n_heldout = len(json.loads((d / "heldout.json").read_text()))
    n_pairs = len(json.loads((d / "pairs.json").read_text()))
    text = model_card(sc, n_heldout, n_pairs, log[-1] if log else {})
    atomic_write_text(d / "MODEL_CARD.md", text)
    return text


def _phases(t: dict) -> list[tuple[int, int, int]]:
    """(stage, first step, steps) of each phase of the schedule in the training config `t`."""
    out: dict[int, list[int]] = {}
    for step in range(t["steps"]):  # stage_at's rule
        out.setdefault(sum(step / t["steps"] >= f for f in t["stages"]) - 1, [step, 0])[1] += 1
    return [(s, first, n) for s, (first, n) in out.items()]


def model_card(sc: dict, n_heldout: int, n_pairs: int, last: dict) -> str:
    t = sc["train"]
    m = t["model"]
    v0 = sc["base_vocab"]
    c, top = t["c_thought"], t["max_latent_stage"]
    aux = t.get("w_aux", 0) > 0
    rows = []
    for s, first, n in _phases(t):
        if s < 0:
            rows.append(f"| CoT (no markers) | {first} | {n} | 0 | every step, answer | – |")
            continue
        lang = "answer" if s >= top else ("every step, answer" if s == 0 else f"step{'s' * (s + 1 < top)} {s + 1}{f'–{top}' * (s + 1 < top)}, answer")
        aux_cell = (f"thought{'s' * (s > 1)} {', '.join(str(c * (j + 1)) for j in range(s))} → "
                    f"{', '.join(f'y{j + 1}' for j in range(s))}") if aux and s else "–"
        rows.append(f"| stage {s} | {first} | {n} | {c * s} | {lang} | {aux_cell} |")
    losses = ", ".join(f"{k} {last[k]:.3f}" for k in ("ce", "aux") if k in last)
    cpu = (f" and {sc['train_cpu_s'] / 60:.1f} min of CPU time, i.e. about {sc['train_cpu_s'] / t['threads'] / 60:.0f} min on "
           f"{t['threads']} idle cores") if "train_cpu_s" in sc else ""
    command = f"thoughtpatch toy train --family coconut --out DIR --seed {t['seed']}"
    if "trained_by" in sc:  # weights from an earlier revision of the trainer: name it
        by = sc["trained_by"]
        retrain = f"Retrain with `git checkout {by['commit']}` and then `{by['command']}` — {by['note']}"
    else:
        retrain = f"Retrain with `{command}` (same seed, steps and thread count give identical weights)."
    warning = f"""
**Not plain Coconut.** This organism adds an auxiliary loss that Coconut does not have (weight
{t['w_aux']:g}): for each CoT step j a stage has replaced by latents, the LM head applied to the
thought that follows it (thought {c}j, the final-norm state at latent {c}j − 1) must predict the
step's result y_j — where Coconut gives every latent position no label. Without it the
model does not use its thoughts (below). No distillation, no teacher, no projection: the
thoughts are still the raw final-norm states, fed back by Coconut's loop.
""" if aux else """
**Coconut's plain recipe** (no auxiliary loss): see the accuracy table for whether it uses
its thoughts.
"""
    return f"""# The Coconut organism: a tiny Coconut model

A {sc['parameters'] / 1e6:.2f} M-parameter LLaMA-architecture (`LlamaForCausalLM`) continuous-thought
model trained with Coconut's curriculum (Hao et al. 2024, "Training Large Language Models to
Reason in a Continuous Latent Space", facebookresearch/coconut) on the same synthetic 1–3 step
arithmetic problems, base architecture and tokenizer as the CODI organism (`thoughtpatch/toy/`),
so that the two families can be compared on the same {n_pairs} default pairs. `--model toy-coconut` loads it.
{warning}
## Files

This directory is both a Coconut checkpoint and its own base model:
`model.safetensors` (Coconut's keys: `base_causallm.<HF name>` for every LM parameter and
`embedding.weight`, the input embedding again; {v0 + 3} rows), `config.json` (LlamaConfig,
vocab = V0 = {v0}), the tokenizer without the markers (`tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json`), `thoughtpatch.json` (family, K, answer template, max new tokens,
training config, accuracy), `heldout.json` ({n_heldout} held-out problems) and `pairs.json`
({n_pairs} default pairs) — the CODI organism's files —, `train_log.json`.

The markers are added at load time with `tokenizer.add_tokens` in Coconut's order, as its
`run.py` does: `<|start-latent|>` = {v0}, `<|end-latent|>` = {v0 + 1}, `<|latent|>` = {v0 + 2}.

## Architecture

| | |
|---|---|
| layers / hidden / MLP | {m['layers']} / {m['hidden']} / {m['mlp']} |
| heads / KV heads | {m['heads']} / {m['kv_heads']} |
| embeddings | tied, V0 + 3 = {v0 + 3} rows; the marker rows start as copies of the `<<` row (Coconut's init) |
| max positions | {m['max_positions']} |
| thoughts K | {sc['num_thoughts']} (c_thought {c} × {top} stages) |
| extra parameters | none: a thought is the final-norm state, fed as is |
| tokenizer | the CODI organism's (word level, numbers 0–999 one token each, BOS prepended) with `#` appended as id {v0 - 1}; every other id unchanged |

Prompt: BOS, question, `<|start-latent|>`, K × `<|latent|>`, `<|end-latent|>`; answer
`{sc['answer_template']}` then eos. Thought 1 is the final-norm state at `<|start-latent|>`,
thought k + 1 the final-norm state at latent k, each fed raw as the input embedding of the next
latent position. (Coconut appends a newline to the question; this tokenizer splits on
whitespace, so it adds no token.)

## Data

The CODI organism's problems: templated word problems with 8 names, 8 item nouns, 2–3
phrasings per operation (+, −, ×, exact ÷), every intermediate result in 0–100; one CoT step
per operation (`<< 12 + 5 = 17 >>`); answers "### N". Training problems are sampled on the fly
(1 : 2 : 2 by number of steps), batched by question length, and never equal a held-out or
default-pair question.

## Recipe

| phase | from step | steps | latents | language targets | auxiliary targets |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Coconut's:
* stage s replaces the first s CoT steps by c_thought × s = {c}s latents; the CE loss is on the
  remaining steps and the answer, never on a latent or a marker; every problem gets the
  stage's latents, even one with fewer steps. Problems have at most {top} steps, so the last
  stage is Coconut's pad_latent_to_max stage: K = {sc['num_thoughts']} for every problem, no language step;
* the phase before stage 0 trains language CoT without markers — the CoT model Coconut's GSM8K
  recipe starts from; stage 0 adds the markers with no latent;
* the thoughts come from the model's own forward passes, with gradients through them
  (Coconut's multi-pass forward: one pass per latent on a KV cache);
* a fresh optimizer at every phase; full fine-tuning; no distillation.

Not Coconut's, for a 1 M-parameter model trained from scratch on two CPU threads:
{'* the auxiliary loss above;' + chr(10) if aux else ''}* number embeddings initialised from a fixed random projection of n/200 and cos/sin(2πn/T)
  (the CODI organism's init);
* problems sampled 1 : 2 : 2 by number of steps, batches from one question-length bucket
  (Coconut left-pads a batch so that the latents line up; here no padding is needed);
* AdamW β = {tuple(t['betas'])}, lr {t['lr']:g} with {t['warmup']} warm-up steps and cosine decay to {t['min_lr_frac']:g}× over the
  whole run (Coconut: constant 1e-4), weight decay {t['weight_decay']:g} on matrices only, clip {t['clip']:g}, batch {t['batch']};
* a schedule in steps ({t['steps']} in all, seed {t['seed']}) instead of epochs.

Final losses: {losses}. Training took {sc['train_wall_s'] / 60:.1f} min of wall time ({t['threads']} threads, torch
{sc['torch']}, {sc['train_steps_per_s']:.2f} steps/s on a machine shared with other jobs){cpu}. The schedule is
defined in steps, so machine load changes the time, not the model. {retrain}

## Accuracy (held-out, greedy, Coconut's decoding and answer rule; n = {sc['eval_n']}, %)

{accuracy_markdown(sc['accuracy'], COCONUT_LABELS)}

{uses_thoughts(sc['accuracy'])}

Measured by thoughtpatch's runtime on the saved directory (`thoughtpatch eval --model DIR`
gives the same numbers). Decoding as Coconut's `run.py`: argmax over every id, the first
token always kept, a later eos stops and is dropped (at most {sc['eval_max_new_tokens']} new tokens; Coconut's own limit,
{sc['max_new_tokens']}, changes nothing for answers of a few tokens); the answer is the text after the last `#` of
decode(prompt + generation, skip_special_tokens=True), commas removed, compared as a string.
"thoughts zeroed" feeds zero vectors at every latent; "thoughts → mean" feeds, at latent k,
the mean over the evaluated problems of the k-th thought; "thoughts → another question's"
feeds problem i the thoughts of problem i + 1; "K = 0" goes from `<|start-latent|>` straight
to `<|end-latent|>`; "explicit CoT" is the question alone (no marker): greedy language CoT,
then "### N" — a mode trained only in the first phase, as in Coconut.

Which thought is necessary — one thought ablated at a time (all problems, %; k = 0 is the
state at `<|start-latent|>`, fed at the first latent):

{per_thought_markdown(sc['per_thought']) if sc.get('per_thought') else '(not measured)'}

`thoughtpatch eval --model toy-coconut` prints both tables.

## Does it use its thoughts?

{PLAIN_RECIPE_FINDING if not aux else ''}
"""
