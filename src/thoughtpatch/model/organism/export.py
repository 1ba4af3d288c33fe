"""Write a trained organism as a directory that is both a CODI checkpoint and its own base:
config.json (vocab = V0), tokenizer files, model.safetensors (CODI keys), thoughtpatch.json,
heldout.json, pairs.json, train_log.json and MODEL_CARD.md (with the accuracy table)."""

from __future__ import annotations

import copy
import json
import platform
from pathlib import Path

import torch

from thoughtpatch.data.schema import atomic_write_text, save_pairs
from thoughtpatch.model.checkpoint import save_codi_checkpoint
from thoughtpatch.model.organism.tokenizer import ANSWER_TEMPLATE, save_tokenizer

CONDITIONS = ("with_thoughts", "thoughts_zeroed", "thoughts_mean", "thoughts_resample", "no_thoughts", "cot")
EVAL_MAX_NEW_TOKENS = 32  # the organisms' answers are a few tokens; `thoughtpatch eval` uses the same limit for them
LABELS = {"with_thoughts": "with thoughts", "thoughts_zeroed": "thoughts zeroed", "thoughts_mean": "thoughts → mean",
          "thoughts_resample": "thoughts → another question's", "no_thoughts": "no thoughts (K = 0)", "cot": "explicit CoT (teacher)"}


def accuracy_markdown(acc: dict, labels: dict[str, str] = LABELS) -> str:
    steps = sorted({s for v in acc.values() for s in v["steps"]})
    head = "| condition | all | " + " | ".join(f"{s}-step" for s in steps) + " |"
    rows = [head, "|" + "---|" * (2 + len(steps))]
    for cond in CONDITIONS:
        if cond in acc:
            a = acc[cond]
            cells = [f"{100 * a['all']:.1f}"] + [f"{100 * a['steps'][s]:.1f}" if s in a["steps"] else "–" for s in steps]
            rows.append(f"| {labels[cond]} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def per_thought_markdown(per_thought: dict) -> str:
    """Accuracy with one thought ablated (zero, mean, resample), a row per ablation."""
    k = len(next(iter(per_thought.values())))
    rows = ["| one thought ablated | " + " | ".join(f"k = {j}" for j in range(k)) + " |", "|" + "---|" * (k + 1)]
    rows += [f"| {how} | " + " | ".join(f"{100 * a:.1f}" for a in accs) + " |" for how, accs in per_thought.items()]
    return "\n".join(rows)


def save_organism(out_dir, hf, prj, tok, cfg, heldout, pairs, log, wall_s: float, eval_problems: int | None = None) -> dict:
    """Write everything, then reload the directory through the CODI loader and measure the
    accuracy table with the runtime (the same numbers `thoughtpatch eval --model DIR` gives)."""
    from thoughtpatch.model import load_model
    from thoughtpatch.model.checkpoint import SIDECAR
    from thoughtpatch.model.evaluate import evaluate, problems_from_heldout, spread

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    v0 = len(tok)
    save_tokenizer(tok, out)
    config = copy.deepcopy(hf.config)
    config.vocab_size = v0  # the base's vocabulary; the checkpoint holds V0 + 3 rows (pad, bot, eot)
    config.save_pretrained(str(out))
    atomic_write_text(out / "heldout.json", json.dumps(heldout, indent=1) + "\n")
    save_pairs(pairs, out / "pairs.json")
    every = max(1, len(log) // 200)
    atomic_write_text(out / "train_log.json", json.dumps([r for i, r in enumerate(log) if i % every == 0 or i == len(log) - 1]) + "\n")

    n_params = sum(p.numel() for p in hf.parameters()) + sum(p.numel() for p in prj.parameters())
    sidecar = {
        "num_thoughts": cfg.model.num_thoughts,
        "answer_template": ANSWER_TEMPLATE,
        "family": "llama",
        "organism": True,
        "base_vocab": v0,
        "pad_id": v0, "bot_id": v0 + 1, "eot_id": v0 + 2,
        "parameters": n_params,
        "train": cfg.to_dict(),
        "train_wall_s": round(wall_s, 1),
        "torch": torch.__version__,
    }
    save_codi_checkpoint(out, hf, prj, sidecar)

    probs = spread(problems_from_heldout(out / "heldout.json"), eval_problems)
    res = evaluate(load_model(str(out)), probs, CONDITIONS, max_new_tokens=EVAL_MAX_NEW_TOKENS, per_thought=True)
    sidecar |= {"eval_n": res["n"], "accuracy": res["accuracy"], "per_thought": res["per_thought"]}
    atomic_write_text(out / SIDECAR, json.dumps(sidecar, indent=1) + "\n")
    atomic_write_text(out / "MODEL_CARD.md", model_card(cfg, sidecar, len(heldout), len(pairs), log, wall_s))
    return sidecar


def model_card(cfg, sc: dict, n_heldout: int, n_pairs: int, log: list[dict], wall_s: float) -> str:
    m = cfg.model
    last = log[-1] if log else {}
    losses = ", ".join(f"{k} {last[k]:.3f}" for k in ("teacher", "student", "distill", "aux") if k in last)
    return f"""# The organism: a tiny CODI model

A {sc['parameters'] / 1e6:.2f} M-parameter LLaMA-architecture (`LlamaForCausalLM`) continuous-thought
model trained with CODI's recipe on synthetic 1–3 step arithmetic word problems. It exists so
that thoughtpatch can be run and tested without downloading CODI weights. `--model toy` loads it.

## Files

This directory is both a CODI checkpoint and its own base model:
`model.safetensors` (CODI keys: `codi.base_model.model.<HF name>`, `prj.{{1,3,ln}}.*`; no LoRA),
`config.json` (LlamaConfig, vocab = V0 = {sc['base_vocab']}), the tokenizer (`tokenizer.json`,
`tokenizer_config.json`, `special_tokens_map.json`), `thoughtpatch.json` (K, answer template,
training config, accuracy), `heldout.json` ({n_heldout} held-out problems), `pairs.json`
({n_pairs} default clean/corrupted pairs from the held-out distribution), `train_log.json`.

## Architecture

| | |
|---|---|
| layers / hidden / MLP | {m.layers} / {m.hidden} / {m.mlp} |
| heads / KV heads | {m.heads} / {m.kv_heads} |
| embeddings | tied, V0 + 3 = {sc['base_vocab'] + 3} rows (pad = {sc['pad_id']}, bot = {sc['bot_id']}, eot = {sc['eot_id']}) |
| max positions | {m.max_positions} |
| thoughts K | {m.num_thoughts} |
| prj | Linear({m.hidden}, {m.prj_dim}) – GELU – Linear({m.prj_dim}, {m.hidden}) – LayerNorm (gain initialised to {m.prj_ln_init}) |
| tokenizer | word level; every number 0–999 is one token (LLaMA-3 keeps ≤ 3-digit chunks); BOS prepended |

Prompt: BOS, question, `<bot>`; then K thoughts, `<eot>`, `{sc['answer_template']}`, eos.

## Data

Templated word problems ("Tom has 12 apples. He buys 5 more. He gives 3 to a friend. How many
apples are left?"): 8 names, 8 item nouns, 2–3 phrasings per operation (+, −, ×, exact ÷),
start 2–20, ± 1–10, × and ÷ 2–5, every intermediate result in 0–100. CoT in CODI's format
(`<<12+5=17>> <<17-3=14>>`). Unlike CODI, which drops the last CoT step, every step is
kept, so the thoughts are trained to carry every intermediate result. Training problems are sampled on the fly
(1 : 2 : 2 by number of steps), batched by question length (no padding in the student prefix),
and never equal a held-out or default-pair question. Make more with `thoughtpatch pairs synth`.

## Recipe

* teacher CE on question ⊕ CoT ⊕ answer; student CE after the latent loop; distillation
  = per layer (all {m.layers + 1} hidden states) mean |h_student − sg(h_teacher)| / std(h_teacher) at
  the ":" that predicts the answer; weights 1 : 1 : {cfg.w_distill:g};
* number embeddings initialised from a fixed random projection of n/200 and cos/sin(2πn/T);
* teacher only for the first {cfg.teacher_only:.0%} of steps, then a Coconut-style curriculum
  (2s thoughts replace the first s CoT steps, s = 1 from {cfg.stages[0]:.0%}, s = 2 from {cfg.stages[1]:.0%}), full
  latent mode with K = {m.num_thoughts} from {cfg.stages[2]:.0%};
* auxiliary loss in full latent mode (weight {cfg.w_aux:g}): the LM head at the output of thought
  2j−1 predicts the intermediate result y_j — this makes the thoughts carry values that
  activation patching can move;
* AdamW β = {cfg.betas}, lr {cfg.lr:g}, weight decay {cfg.weight_decay:g} on matrices, warm-up {cfg.warmup} steps, cosine to
  {cfg.min_lr_frac:g}×, clip {cfg.clip:g}, batch {cfg.batch}, {cfg.steps} steps, seed {cfg.seed}, CPU threads: {cfg.threads}
  (deterministic algorithms on); final losses: {losses}.

Training took {wall_s / 60:.1f} min of wall time on {platform.machine()} ({cfg.threads} threads, torch {sc['torch']});
the schedule is defined in steps, so machine load changes the time, not the model.
Retrain with `thoughtpatch toy train --out DIR --seed {cfg.seed}` (same seed, steps and thread
count give identical weights).

## Accuracy (held-out, greedy, CODI's answer rule; n = {sc['eval_n']}, %)

{accuracy_markdown(sc['accuracy'])}

"thoughts zeroed" feeds zero vectors at every thought; "thoughts → mean" feeds, at thought k,
the mean over the held-out set of the k-th thought vector; "thoughts → another question's"
feeds, at every thought, problem (i+1) mod n's own thought vectors (resample ablation); "K = 0"
goes from `<bot>` straight to `<eot>`; "explicit CoT" is the teacher mode (question without
`<bot>`, greedy CoT then answer).

Which thought is necessary — one thought ablated at a time (all problems, %):

{per_thought_markdown(sc['per_thought']) if sc.get('per_thought') else '(not measured)'}

`thoughtpatch eval --model toy` prints both tables.
"""
