"""Accuracy of a continuous-thought model, and how much it depends on its thoughts.

Conditions (greedy, the family's decoding and answer rule, via the faithful runtime):
* with_thoughts       — the model as it is;
* thoughts_zeroed     — every fed thought vector z_k replaced by zeros;
* thoughts_mean       — z_k replaced by its mean over the evaluated problems (per k);
* thoughts_resample   — z_k replaced by problem (i+1) mod n's own z_k (another question's thought);
* no_thoughts         — K = 0: the prompt straight to the read-out token;
* cot                 — organism only: the explicit-CoT mode, question without latent markers,
                        greedy CoT then answer, with a plain HF forward.
Reported overall and by number of reasoning steps; and, per single thought k, the accuracy
with only z_k zeroed, mean-ablated or resampled (which thought is necessary).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from thoughtpatch.errors import ThoughtpatchError

CONDITIONS = ("with_thoughts", "thoughts_zeroed", "thoughts_mean", "thoughts_resample", "no_thoughts", "cot")
ABLATIONS = ("zero", "mean", "resample")


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
    """Indices grouped by prompt length (no padding, the families' batch-1 semantics), chunked."""
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


def _ablation(m, how: str, thoughts: list[int], chunk: list[int], fed: torch.Tensor | None) -> list:
    """Interventions replacing z_k (k in `thoughts`) for the problems of `chunk`: zeros, the mean
    over all problems, or problem (i+1) mod n's own z_k. `fed` is [n, K, H] from with_thoughts."""
    from thoughtpatch.model import INPUT, Intervention, Site

    if how == "zero":
        return [Intervention.zero(Site(INPUT, thought=k)) for k in thoughts]
    if fed is None:
        raise ValueError(f"{how} ablation needs the thoughts of the with_thoughts pass")
    if how == "mean":
        mean = fed.mean(0)
        return [Intervention.replace(Site(INPUT, thought=k), mean[k]) for k in thoughts]
    partner = torch.tensor([(i + 1) % fed.shape[0] for i in chunk])
    return [Intervention.replace(Site(INPUT, thought=k), fed[partner, k]) for k in thoughts]


def latent_predictions(m, problems: list[EvalProblem], how: str | None = None, thoughts: list[int] | None = None,
                       fed: torch.Tensor | None = None, k: int | None = None, batch: int = 64, max_new_tokens: int | None = None,
                       on_batch: Callable[[int], None] | None = None) -> tuple[list[bool], torch.Tensor | None]:
    """Greedy correctness with the thoughts in `thoughts` ablated by `how` (None: as they are),
    running k thoughts (default K). Returns [correct] and, when nothing is ablated, the fed
    thought vectors [n, K, H] (for the mean and resample ablations)."""
    k = m.num_thoughts if k is None else k
    ids = [m.prompt_ids(p.question) for p in problems]
    ok = [False] * len(problems)
    out = torch.zeros(len(problems), k, m.hidden_size) if how is None and k else None
    for chunk in _buckets([len(x) for x in ids], batch):
        ivs = _ablation(m, how, thoughts or list(range(k)), chunk, fed) if how else []
        st = m.encode(torch.tensor([ids[i] for i in chunk], device=m.device))
        st = m.think(st, ivs, until=k, record_logits=False, record=("input",))
        if out is not None:
            out[chunk] = st.latent_inputs().float().cpu()
        gens, _ = m.generate(st, max_new_tokens=max_new_tokens)
        for i, g in zip(chunk, gens):
            ok[i] = m.correct(g, problems[i].answer)
        if on_batch:
            on_batch(len(chunk))
    return ok, out


@torch.inference_mode()
def cot_predictions(m, problems: list[EvalProblem], batch: int = 64, max_new_tokens: int = 64,
                    on_batch: Callable[[int], None] | None = None) -> list[bool]:
    """Explicit-CoT mode with a plain HF forward: the question as the family writes it, no
    latent markers; greedy with the family's argmax range and stop rule; the family's answer rule."""
    from thoughtpatch.model.runtime import Generation

    hf, tok = m.hf, m.tokenizer
    cache_kw = "cache" if "cache" in __import__("inspect").signature(hf.forward).parameters else "past_key_values"
    ids = [list(tok(m.family.question_text(p.question))["input_ids"]) for p in problems]
    eos = set(m.eos_ids)
    codi = m.family.name == "codi"
    ok = [False] * len(problems)
    for chunk in _buckets([len(x) for x in ids], batch):
        x = torch.tensor([ids[i] for i in chunk], device=m.device)
        out = hf(input_ids=x, use_cache=True)
        toks: list[list[int]] = [[] for _ in chunk]
        done = [False] * len(chunk)
        for step in range(max_new_tokens):
            nxt = out.logits[:, -1, : m.argmax_ids].argmax(-1)
            for r, t in enumerate(nxt.tolist()):
                if done[r]:
                    continue
                if codi:
                    toks[r].append(t)
                    done[r] = t in eos
                elif step > 0 and t in eos:
                    done[r] = True
                else:
                    toks[r].append(t)
            if all(done):
                break
            cache = out.get("cache") if "cache" in out else out.past_key_values
            out = hf(input_ids=nxt[:, None], use_cache=True, **{cache_kw: cache})
        for i, t in zip(chunk, toks):
            if codi:
                g = m.generation(ids[i], [a for a in t if a < m.base_vocab])
            else:  # Coconut reads the answer from the decoded prompt + generation
                ans, num = m.family.extract(tok.decode([*ids[i], *t], skip_special_tokens=True), "")
                g = Generation(t, "", ans, num, ans)
            ok[i] = m.correct(g, problems[i].answer)
        if on_batch:
            on_batch(len(chunk))
    return ok


def evaluate(m, problems: list[EvalProblem], conditions: tuple[str, ...] = CONDITIONS[:5], batch: int = 64,
             max_new_tokens: int | None = None, per_thought: bool = False,
             progress: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """{"n": N, "accuracy": {condition: {"all": x, "steps": {"1": x, ...}}},
    "per_thought": {"zero" | "mean" | "resample": [accuracy with only thought k ablated, k = 0…K-1]}}."""
    if not problems:
        raise ThoughtpatchError("no problems to evaluate")
    acc: dict[str, Any] = {}
    cb = (lambda c: (lambda n: progress(c, n))) if progress else (lambda c: None)  # noqa: E731
    kw = dict(batch=batch, max_new_tokens=max_new_tokens)
    ok, fed = latent_predictions(m, problems, on_batch=cb("with_thoughts"), **kw)
    if "with_thoughts" in conditions:
        acc["with_thoughts"] = table(ok, problems)
    for cond, how in (("thoughts_zeroed", "zero"), ("thoughts_mean", "mean"), ("thoughts_resample", "resample")):
        if cond in conditions and m.num_thoughts:
            acc[cond] = table(latent_predictions(m, problems, how, fed=fed, on_batch=cb(cond), **kw)[0], problems)
    if "no_thoughts" in conditions:
        acc["no_thoughts"] = table(latent_predictions(m, problems, k=0, on_batch=cb("no_thoughts"), **kw)[0], problems)
    if "cot" in conditions:
        acc["cot"] = table(cot_predictions(m, problems, batch, on_batch=cb("cot")), problems)
    res: dict[str, Any] = {"n": len(problems), "accuracy": acc}
    if per_thought and m.num_thoughts:
        res["per_thought"] = {
            how: [table(latent_predictions(m, problems, how, [k], fed=fed, on_batch=cb(f"{how} thought {k}"), **kw)[0], problems)["all"]
                  for k in range(m.num_thoughts)]
            for how in ABLATIONS
        }
    return res
