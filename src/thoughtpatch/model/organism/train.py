"""Train the organism with CODI's recipe plus the curriculum the prototype showed is needed.

Losses (weights 1 : 1 : 1 : 1):
* teacher: next-token CE on `question ⊕ CoT ⊕ "The answer is: N" eos` (CoT and answer only);
* student: CE on `<eot> ⊕ [remaining CoT] ⊕ answer eos` after the latent loop;
* distillation: per layer (all L + 1 hidden states) mean |h_s - sg(h_t)| / std(h_t) at the
  ":" that predicts the answer, averaged over layers;
* aux (full-latent phase only): the LM head at the output of thought 2j-1 predicts the
  intermediate result y_j. Without it the thoughts are necessary but carry no patchable value.

Schedule, in steps so that a seed gives the same model whatever the machine load:
teacher only until 15 % of the steps; then Coconut-style stages where 2s thoughts replace
the first s CoT steps (s = 1 from 15 %, s = 2 from 30 %); full CODI with K thoughts from 45 %.
"""

from __future__ import annotations

from contextlib import contextmanager

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from thoughtpatch.data import synth
from thoughtpatch.model.organism.latent import cache_kw, cache_of, latent_loop
from thoughtpatch.model.organism.model import OrganismConfig, build_organism
from thoughtpatch.model.organism.tokenizer import ANSWER_TEMPLATE, build_tokenizer

HELDOUT_SEED = 1_000_003  # the fixed held-out set and default pairs (never trained on)
HELDOUT_PER_STEP = 200
DEFAULT_PAIRS = 57
DEFAULT_MINUTES = 30.0


@dataclass
class TrainConfig:
    steps: int = 4000  # default: ~30 min on 2 CPU threads
    batch: int = 64
    lr: float = 1e-3
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac
    warmup: int = 100
    weight_decay: float = 0.01  # matrices only
    betas: tuple[float, float] = (0.9, 0.98)
    clip: float = 1.0
    teacher_only: float = 0.15  # fraction of steps with the teacher loss alone
    stages: tuple[float, ...] = (0.15, 0.30, 0.45)  # start of stage 1, 2, full latent
    step_mix: tuple[int, int, int] = (1, 2, 2)  # sampling weight of 1-, 2-, 3-step problems
    w_distill: float = 1.0
    w_aux: float = 1.0
    seed: int = 0
    threads: int = 2
    model: OrganismConfig = field(default_factory=OrganismConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def steps_for_minutes(minutes: float, base: int = TrainConfig.steps) -> int:
    """`--minutes M` scales the step budget linearly: steps = default_steps * M / 30."""
    return max(20, round(base * minutes / DEFAULT_MINUTES))


# ---------------------------------------------------------------- data


@dataclass
class Example:
    q: list[int]  # BOS + question
    cot: list[list[int]]  # token ids of each CoT step
    ans: list[int]  # the answer template ("The answer is: N" / "### N") + eos
    results: list[int]  # token id of each intermediate result y_j
    n_steps: int


class Encoder:
    """Token ids of a problem; `answer_template` and `question_suffix` are the family's
    (CODI: "The answer is: N", nothing; Coconut: "### N", a newline)."""

    def __init__(self, tok, answer_template: str = ANSWER_TEMPLATE, question_suffix: str = ""):
        self.tok = tok
        self.answer_template = answer_template
        self.question_suffix = question_suffix
        self.eos = tok.eos_token_id
        self.num = {i: tok.convert_tokens_to_ids(str(i)) for i in range(1000)}

    def ids(self, text: str, bos: bool = False) -> list[int]:
        return self.tok(text, add_special_tokens=bos)["input_ids"]

    def example(self, question: str, cot: str, answer: int, results: list[int]) -> Example:
        steps = [self.ids(s) for s in cot.split(" ")]
        ans = self.ids(self.answer_template.format(answer=answer)) + [self.eos]
        return Example(self.ids(question + self.question_suffix, bos=True), steps, ans, [self.num[y] for y in results], len(steps))


def heldout_set() -> tuple[list[dict], list]:
    """The fixed held-out problems (200 per number of steps) and the default pairs; both
    excluded from training by question text."""
    problems = synth.synth_problems(HELDOUT_PER_STEP, HELDOUT_SEED)
    pairs = synth.synth_pairs(DEFAULT_PAIRS, HELDOUT_SEED + 1, exclude={p["question"] for p in problems})
    return problems, pairs


def training_batches(enc: Encoder, cfg, exclude: set[str]) -> Iterator[list[Example]]:
    """Endless batches, each from one question-length bucket (no padding in the student's
    prefix, like CODI inference at batch 1). Deterministic for cfg.seed."""
    rng = random.Random(cfg.seed)
    buckets: dict[int, list[Example]] = {}
    while True:
        k = rng.choices((1, 2, 3), weights=cfg.step_mix)[0]
        c = synth.sample_chain(rng, k)
        q = c.text()
        if q in exclude:
            continue
        ex = enc.example(q, c.cot(), c.answer(), c.results())
        b = buckets.setdefault(len(ex.q), [])
        b.append(ex)
        if len(b) == cfg.batch:
            yield b
            buckets[len(ex.q)] = []


def _pad(rows: list[list[int]], pad: int) -> torch.Tensor:
    n = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (n - len(r)) for r in rows])


# ---------------------------------------------------------------- losses


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE over non-ignored targets (sum / count: an all-ignored batch gives 0, not NaN)."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100, reduction="sum")
    return loss / (targets != -100).sum().clamp(min=1)


def _gather(hs: tuple[torch.Tensor, ...], idx: torch.Tensor) -> torch.Tensor:
    """[L+1, B, H]: every hidden-state entry at per-row position idx."""
    ar = torch.arange(idx.shape[0])
    return torch.stack([h[ar, idx] for h in hs])


def student_answer_ids(e: Example, mode: int, eot: int) -> list[int]:
    """What the student reads after its thoughts: <eot>, the CoT steps not yet replaced by
    thoughts (curriculum stage s keeps steps s+1..), the answer. Full latent mode: no CoT."""
    return [eot] + ([] if mode < 0 else sum(e.cot[mode:], [])) + e.ans


def losses(hf, prj, batch: list[Example], mode: int, cfg: TrainConfig, pad: int, bot: int, eot: int) -> dict[str, torch.Tensor]:
    """mode 0: teacher only; 1..n: curriculum stage s; -1: full latent (K thoughts + aux)."""
    B = len(batch)
    # Teacher: question ⊕ CoT ⊕ answer, right-padded; labels skip the question and padding.
    rows = [e.q + sum(e.cot, []) + e.ans for e in batch]
    ids = _pad(rows, pad)
    labels = ids.clone()
    labels[ids == pad] = -100
    labels[:, : len(batch[0].q)] = -100
    want_h = mode != 0
    out = hf(input_ids=ids, output_hidden_states=want_h, use_cache=want_h)
    res = {"teacher": _ce(out.logits[:, :-1], labels[:, 1:])}
    if mode == 0:
        res["loss"] = res["teacher"]
        return res
    # ":" predicts the answer: 2 tokens before the end of "... : N eos".
    t_idx = torch.tensor([len(r) - 3 for r in rows])
    h_t = _gather(out.hidden_states, t_idx).detach()

    # Student: question ⊕ <bot>, k thoughts, then <eot> ⊕ remaining CoT ⊕ answer.
    s = cfg.model.num_thoughts if mode < 0 else 2 * mode
    # The question is a causal prefix of the teacher's sequence, so its keys/values are the
    # student's too: reuse them (same values and gradients as a separate prompt pass, ~30 %
    # less compute). Bucketing makes the question length the same for every row.
    cache = cache_of(out)
    cache.crop(-(ids.shape[1] - len(batch[0].q)))
    lat = latent_loop(hf, prj, torch.full((B, 1), bot), s, want_logits=mode < 0, cache=cache)
    drows = [student_answer_ids(e, mode, eot) for e in batch]
    dec = _pad(drows, pad)
    dlabels = dec.clone()
    dlabels[dec == pad] = -100
    emb = hf.get_input_embeddings()(dec)
    out_s = hf(inputs_embeds=emb, use_cache=True, output_hidden_states=True, **{cache_kw(hf): lat.cache})
    res["student"] = _ce(out_s.logits[:, :-1], dlabels[:, 1:])
    s_idx = torch.tensor([len(r) - 3 for r in drows])
    h_s = _gather(out_s.hidden_states, s_idx)
    std = h_t.std(dim=(1, 2), keepdim=True).clamp(min=1e-6)  # per layer, over batch x hidden
    res["distill"] = ((h_s - h_t).abs() / std).mean()
    loss = res["teacher"] + res["student"] + cfg.w_distill * res["distill"]
    if mode < 0:
        # Thought 2j-1 (1-based) decodes y_j; steps a problem lacks are ignored.
        tgt = torch.full((B, s), -100)
        for i, e in enumerate(batch):
            for j, y in enumerate(e.results):
                if 2 * j < s:
                    tgt[i, 2 * j] = y
        res["aux"] = _ce(lat.thought_logits, tgt)
        loss = loss + cfg.w_aux * res["aux"]
    res["loss"] = loss
    return res


def mode_at(step: int, cfg: TrainConfig) -> int:
    frac = step / cfg.steps
    if frac < cfg.teacher_only:
        return 0
    stage = sum(frac >= f for f in cfg.stages)  # 1 .. len(stages)
    return -1 if stage == len(cfg.stages) else stage


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


# ---------------------------------------------------------------- main loop


def setup_determinism(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    # Deterministic mode also NaN-fills every new tensor (~9 % of a step here); nothing
    # reads uninitialised memory, so skip it.
    torch.utils.deterministic.fill_uninitialized_memory = False

@contextmanager
def determinism(threads: int):
    """Training's thread count and deterministic mode for the `with` block; the caller's
    settings come back afterwards (tests train in the same process as everything else)."""
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    try:
        setup_determinism(threads)
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        torch.utils.deterministic.fill_uninitialized_memory = saved[2]


def train(cfg: TrainConfig, out_dir: str | Path | None = None, progress: bool = True,
          on_step: Callable[[int, dict], None] | None = None, eval_problems: int | None = None,
          stop_after: int | None = None):
    """Train; save the organism to out_dir when given. Returns (hf, prj, tok, log).
    `stop_after` ends the run early with the schedule of the full cfg.steps (to check that
    two runs agree step by step). Sets torch's thread count and deterministic mode for the
    run, then restores them."""
    with determinism(cfg.threads):
        return _train(cfg, out_dir, progress, on_step, eval_problems, stop_after)


def _train(cfg: TrainConfig, out_dir, progress: bool, on_step, eval_problems, stop_after):
    tok = build_tokenizer()
    hf, prj = build_organism(cfg.model, tok, cfg.seed)
    v0 = len(tok)
    pad, bot, eot = v0, v0 + 1, v0 + 2
    heldout, pairs = heldout_set()
    enc = Encoder(tok)
    batches = training_batches(enc, cfg, heldout_questions(heldout, pairs))
    log, wall = optimise(cfg, [hf, prj], lambda mode: losses(hf, prj, next(batches), mode, cfg, pad, bot, eot),
                         mode_at, lambda mode: "T" if mode == 0 else ("K" if mode < 0 else str(mode)), progress, on_step, stop_after)
    if out_dir is not None:
        from thoughtpatch.model.organism.export import save_organism

        save_organism(out_dir, hf, prj, tok, cfg, heldout, pairs, log, wall, eval_problems=eval_problems)
    return hf, prj, tok, log


def heldout_questions(heldout: list[dict], pairs: list) -> set[str]:
    """Questions training must never see: the held-out problems and both sides of every pair."""
    return {p["question"] for p in heldout} | {q for p in pairs for q in (p.clean.question, p.corrupted.question)}


def adamw(params: list[torch.nn.Parameter], cfg) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=cfg.betas)


def optimise(cfg, modules: list[torch.nn.Module], loss_fn: Callable[[int], dict[str, torch.Tensor]],
             mode_fn: Callable[[int, object], int], label: Callable[[int], str], progress: bool,
             on_step: Callable[[int, dict], None] | None, stop_after: int | None,
             reset_optimizer: bool = False) -> tuple[list[dict], float]:
    """The organisms' shared loop: each step sets the lr (warm-up, cosine), takes
    `loss_fn(mode)` for the step's schedule mode, clips and steps AdamW. With
    `reset_optimizer`, a fresh AdamW (no moments) starts whenever the mode changes, as
    Coconut's `reset_optimizer` does at each stage. Returns (log, wall seconds); leaves the
    modules in eval mode."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    params = [p for m in modules for p in m.parameters()]
    opt = adamw(params, cfg)
    log: list[dict] = []
    t0 = time.time()
    prev = None
    bar = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), disable=not progress)
    with bar:
        task = bar.add_task("train", total=cfg.steps, info="")
        for step in range(cfg.steps if stop_after is None else min(stop_after, cfg.steps)):
            for m in modules:
                m.train()
            mode = mode_fn(step, cfg)
            if reset_optimizer and prev is not None and mode != prev:
                opt = adamw(params, cfg)
            prev = mode
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            res = loss_fn(mode)
            opt.zero_grad(set_to_none=True)
            res["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            row = {"step": step, "mode": mode, "time": round(time.time() - t0, 1), **{k: round(v.item(), 4) for k, v in res.items()}}
            log.append(row)
            if on_step is not None:
                on_step(step, row)
            info = " ".join(f"{k} {v:.3f}" for k, v in row.items() if k not in ("step", "mode", "time"))
            bar.update(task, advance=1, info=f"stage {label(mode)} {info}")
            if progress and not bar.console.is_terminal and (step % 100 == 0 or step == cfg.steps - 1):
                bar.console.print(f"step {step} {row['time']:.0f}s stage {label(mode)} {info}")  # a log file gets lines
    for m in modules:
        m.eval()
    return log, time.time() - t0
