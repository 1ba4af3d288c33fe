"""Accuracy of a continuous-thought model, and how much it depends on its thoughts.

Conditions (greedy, CODI's decoding and answer rule, via the faithful runtime):
* with_thoughts   — the model as it is;
* thoughts_zeroed — every fed thought vector z_k replaced by zeros;
* thoughts_mean   — z_k replaced by its mean over the evaluated problems (per k);
* no_thoughts     — K = 0: <bot> straight to <eot>;
* cot             — organism only: the explicit-CoT (teacher) mode, question without <bot>,
                    greedy CoT then answer, with a plain HF forward.
Reported overall and by number of reasoning steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from thoughtpatch.errors import ThoughtpatchError

CONDITIONS = ("with_thoughts", "thoughts_zeroed", "thoughts_mean", "no_thoughts", "cot")


@dataclass(frozen=True)
class EvalProblem:
    question: str
    answer: float
    n_steps: int | None = None


def problems_from_pairs(pairs) -> list[EvalProblem]:
    """Both sides of every pair, each distinct question once."""
    out, seen = [], set()
    for p in pairs:
        n = p.meta.get("n_steps")
        for side in (p.clean, p.corrupted):
            if side.question not in seen:
                seen.add(side.question)
                out.append(EvalProblem(side.question, float(side.answer), side.reasoning_steps or n))
    return out


def problems_from_heldout(path: str | Path) -> list[EvalProblem]:
    """The organism's held-out file: a list of problems ({question, answer, meta.n_steps})
    or of pairs."""
    data = json.loads(Path(path).read_text())
    if data and isinstance(data[0], dict) and "clean" in data[0]:
        from thoughtpatch.data.schema import pair_from_dict

        return problems_from_pairs([pair_from_dict(d, path, i) for i, d in enumerate(data)])
    return [EvalProblem(d["question"], float(d["answer"]), d.get("reasoning_steps") or d.get("meta", {}).get("n_steps")) for d in data]


def spread(items: list, n: int | None) -> list:
    """n items evenly spaced over the list (the held-out set is ordered by steps, so this
    keeps the mix); all when n is None or too large."""
    if n is None or n >= len(items):
        return items
    if n < 1:
        raise ThoughtpatchError("--n must be at least 1")
    return [items[i * len(items) // n] for i in range(n)]


def _buckets(lengths: list[int], batch: int) -> list[list[int]]:
    """Indices grouped by prompt length (no padding, CODI's batch-1 semantics), chunked."""
    by: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by.setdefault(n, []).append(i)
    return [idx[c : c + batch] for _, idx in sorted(by.items()) for c in range(0, len(idx), batch)]


def table(correct: list[bool], problems: list[EvalProblem]) -> dict[str, Any]:
    steps: dict[str, list[bool]] = {}
    for ok, p in zip(correct, problems):
        if p.n_steps is not None:
            steps.setdefault(str(p.n_steps), []).append(ok)
    return {
        "all": sum(correct) / max(1, len(correct)),
        "steps": {k: sum(v) / len(v) for k, v in sorted(steps.items(), key=lambda kv: int(kv[0]))},
    }


def latent_predictions(m, problems: list[EvalProblem], condition: str, mean: torch.Tensor | None = None,
                       batch: int = 64, max_new_tokens: int = 256, on_batch: Callable[[int], None] | None = None
                       ) -> tuple[list[float], torch.Tensor | None]:
    """Greedy answers under one latent condition; also returns the mean fed thought vectors
    [K, H] (for thoughts_mean) when the condition is with_thoughts."""
    from thoughtpatch.model import INPUT, Intervention, Site

    k = m.num_thoughts
    if condition == "thoughts_zeroed":
        ivs = [Intervention.zero(Site(INPUT, j)) for j in range(k)]
    elif condition == "thoughts_mean":
        if mean is None:
            raise ValueError("thoughts_mean needs the mean thought vectors")
        ivs = [Intervention.replace(Site(INPUT, j), mean[j]) for j in range(k)]
    elif condition in ("with_thoughts", "no_thoughts"):
        ivs = []
    else:
        raise ValueError(f"unknown latent condition {condition}")
    ids = [m.prompt_ids(p.question) for p in problems]
    preds = [float("inf")] * len(problems)
    total = None
    for chunk in _buckets([len(x) for x in ids], batch):
        st = m.encode(torch.tensor([ids[i] for i in chunk], device=m.device))
        st = m.think(st, ivs, until=0 if condition == "no_thoughts" else k, record_logits=False)
        if condition == "with_thoughts" and k:
            s = torch.stack(st.inputs, 1).float().sum(0)  # [K, H]
            total = s if total is None else total + s
        gens, _ = m.generate(st, max_new_tokens=max_new_tokens)
        for i, g in zip(chunk, gens):
            preds[i] = g.number
        if on_batch:
            on_batch(len(chunk))
    return preds, (total / len(problems) if total is not None else None)


@torch.inference_mode()
def cot_predictions(m, problems: list[EvalProblem], batch: int = 64, max_new_tokens: int = 64,
                    on_batch: Callable[[int], None] | None = None) -> list[float]:
    """Explicit-CoT (teacher) mode with a plain HF forward: question ids without <bot>,
    greedy over every id but eot, stop at eos; the last number of the text is the answer."""
    from thoughtpatch.model import extract_number

    hf, tok = m.hf, m.tokenizer
    cache_kw = "cache" if "cache" in __import__("inspect").signature(hf.forward).parameters else "past_key_values"
    ids = [list(tok(p.question.strip().replace("  ", " "))["input_ids"]) for p in problems]
    eos = set(m.eos_ids)
    preds = [float("inf")] * len(problems)
    for chunk in _buckets([len(x) for x in ids], batch):
        x = torch.tensor([ids[i] for i in chunk], device=m.device)
        out = hf(input_ids=x, use_cache=True)
        toks: list[list[int]] = [[] for _ in chunk]
        done = [False] * len(chunk)
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1, : m.vocab_size - 1].argmax(-1)
            for r, t in enumerate(nxt.tolist()):
                if not done[r]:
                    toks[r].append(t)
                    done[r] = t in eos
            if all(done):
                break
            cache = out.get("cache") if "cache" in out else out.past_key_values
            out = hf(input_ids=nxt[:, None], use_cache=True, **{cache_kw: cache})
        for i, t in zip(chunk, toks):
            preds[i] = extract_number(tok.decode([a for a in t if a < m.pad_id], skip_special_tokens=True))
        if on_batch:
            on_batch(len(chunk))
    return preds


def evaluate(m, problems: list[EvalProblem], conditions: tuple[str, ...] = CONDITIONS[:4], batch: int = 64,
             max_new_tokens: int = 256, progress: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """{"n": N, "accuracy": {condition: {"all": x, "steps": {"1": x, ...}}}}."""
    if not problems:
        raise ThoughtpatchError("no problems to evaluate")
    acc: dict[str, Any] = {}
    mean = None
    need_mean = "thoughts_mean" in conditions
    order = [c for c in CONDITIONS if c in conditions]
    if need_mean and "with_thoughts" not in order:
        order.insert(0, "with_thoughts")
    for cond in order:
        cb = (lambda n, c=cond: progress(c, n)) if progress else None
        if cond == "cot":
            preds = cot_predictions(m, problems, batch, on_batch=cb)
        else:
            preds, mu = latent_predictions(m, problems, cond, mean, batch, max_new_tokens, cb)
            if cond == "with_thoughts":
                mean = mu
        if cond in conditions:
            acc[cond] = table([p == q.answer for p, q in zip(preds, problems)], problems)
    return {"n": len(problems), "accuracy": acc}
