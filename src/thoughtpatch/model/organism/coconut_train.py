"""Train the Coconut organism with Coconut's recipe (Hao et al. 2024, facebookresearch/coconut;
COCONUT_SPEC) on the CODI organism's problems, base architecture and tokenizer ("#" appended).

Phases, defined in steps so that a seed gives the same model whatever the machine load:
* CoT (before stages[0]): question ⊕ CoT ⊕ "### N" eos without markers, CE on CoT and answer:
  the language-CoT model Coconut's GSM8K run starts from (its `cot: True` stage);
* stage s = 0 .. max_latent_stage: question ⊕ <|start-latent|> ⊕ c_thought·s latents ⊕
  <|end-latent|> ⊕ the CoT steps after the first s ⊕ "### N" eos; CE on those steps and the
  answer only (never on a marker or a latent). Every problem gets c_thought·s latents, even
  one with fewer steps (Coconut's rule). Problems have at most max_latent_stage steps, so the
  last stage is Coconut's pad_latent_to_max stage: no language step, K latents for all.
* a fresh AdamW at each phase (reset_optimizer); full fine-tuning; no distillation.

Each latent's input is the final-norm state of the position before it, produced by the
model's own forward passes with gradients flowing through them (Coconut's multi-pass forward).

Departures from Coconut's GSM8K recipe (for a 1 M-parameter model trained from scratch on
two CPU threads): number embeddings initialised from Fourier features; problems sampled
1 : 2 : 2 by number of steps, batches from one question-length bucket; lr 1e-3 with warm-up
and cosine decay instead of a constant 1e-4; a step schedule instead of epochs; and, unless
w_aux = 0, an auxiliary loss that is not Coconut's (`aux_targets`): the thoughts that follow
a replaced step must decode its result. With the plain recipe (w_aux = 0) this model learns
to use the latent *positions* (K = 0 costs ~30 points) but not the thought *content*: its six
thoughts are one near-constant vector and zeroing or mean-ablating them changes almost nothing.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from thoughtpatch.model.families import COCONUT, COCONUT_MARKERS
from thoughtpatch.model.organism.latent import coconut_pass
from thoughtpatch.model.organism.model import OrganismConfig, build_coconut_organism
from thoughtpatch.model.organism.tokenizer import COCONUT_EXTRA, build_tokenizer
from thoughtpatch.model.organism.train import (
    DEFAULT_MINUTES, Encoder, Example, _ce, _pad, determinism, heldout_questions, heldout_set, optimise,
    training_batches,
)

CODI_ONLY = ("prj_dim", "prj_ln_init")  # OrganismConfig fields the Coconut organism has no use for


@dataclass
class CoconutTrainConfig:
    steps: int = 3000  # the shipped organism's: ~20 min of CPU on one thread
    batch: int = 64
    lr: float = 1e-3
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac
    warmup: int = 100
    weight_decay: float = 0.01  # matrices only
    betas: tuple[float, float] = (0.9, 0.98)
    clip: float = 1.0
    stages: tuple[float, ...] = (0.15, 0.2, 0.35, 0.5)  # start of stage 0, 1, ..., max_latent_stage (fractions of steps)
    c_thought: int = 2  # latents per replaced CoT step
    step_mix: tuple[int, int, int] = (1, 2, 2)  # sampling weight of 1-, 2-, 3-step problems
    w_aux: float = 0.0  # auxiliary loss on the thoughts (not Coconut's; 0 = Coconut's plain recipe, the shipped organism)
    seed: int = 0
    threads: int = 1  # the shipped organism's (weights are bit-identical only for the same count)
    model: OrganismConfig = field(default_factory=OrganismConfig)

    def __post_init__(self):
        self.model = replace(self.model, num_thoughts=self.num_thoughts)

    @property
    def max_latent_stage(self) -> int:
        return len(self.stages) - 1

    @property
    def num_thoughts(self) -> int:
        """K at inference: c_thought x max_latent_stage (pad_latent_to_max)."""
        return self.c_thought * self.max_latent_stage

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = {k: v for k, v in d["model"].items() if k not in CODI_ONLY}
        return d | {"max_latent_stage": self.max_latent_stage, "pad_latent_to_max": True, "reset_optimizer": True}


def steps_for_minutes(minutes: float) -> int:
    """`--minutes M` scales the default step budget linearly (as the CODI organism's)."""
    return max(20, round(CoconutTrainConfig.steps * minutes / DEFAULT_MINUTES))


def stage_at(step: int, cfg: CoconutTrainConfig) -> int:
    """-1: the language-CoT phase (no markers); 0 .. max_latent_stage: Coconut's stage."""
    frac = step / cfg.steps
    return sum(frac >= f for f in cfg.stages) - 1


def stage_label(stage: int) -> str:
    return "CoT" if stage < 0 else str(stage)


def sequences(e: Example, stage: int, c_thought: int, ids: tuple[int, int, int]) -> tuple[list[int], int, list[int], list[int]]:
    """(prefix, number of latents, suffix, labels) of one example at a stage. labels[j] is the
    target of the logits before suffix token j (LatentPass.logits[:, j]); -100: no loss, as
    for <|end-latent|>, which Coconut never trains the model to predict. Stage -1 has no markers."""
    start, end, _ = ids
    if stage < 0:
        rest = sum(e.cot, []) + e.ans
        return e.q, 0, rest, rest
    rest = sum(e.cot[stage:], []) + e.ans
    return e.q + [start], c_thought * stage, [end] + rest, [-100] + rest


def coconut_losses(hf, batch: list[Example], stage: int, cfg: CoconutTrainConfig, ids: tuple[int, int, int], pad: int) -> dict[str, torch.Tensor]:
    """CE on the language part after the thoughts (remaining CoT steps and "### N" eos)."""
    rows = [sequences(e, stage, cfg.c_thought, ids) for e in batch]
    prefix = torch.tensor([r[0] for r in rows])  # one question-length bucket: no padding
    suffix = _pad([r[2] for r in rows], pad)
    labels = torch.full((len(rows), suffix.shape[1] + 1), -100)
    for i, r in enumerate(rows):
        labels[i, : len(r[3])] = torch.tensor(r[3])
    k = rows[0][1]
    lp = coconut_pass(hf, prefix, k, suffix)
    res = {"ce": _ce(lp.logits, labels)}
    res["loss"] = res["ce"]
    if cfg.w_aux and k:
        res["aux"] = _ce(hf.lm_head(lp.fed), aux_targets(batch, stage, cfg.c_thought, k))
        res["loss"] = res["loss"] + cfg.w_aux * res["aux"]
    return res


def aux_targets(batch: list[Example], stage: int, c_thought: int, k: int) -> torch.Tensor:
    """[B, k] targets of the auxiliary loss on the fed thoughts: for each CoT step j (1-based)
    a stage has replaced, the state fed as thought c_thought·j — the final-norm state at latent
    c_thought·j − 1 — must decode y_j through the LM head (for c_thought = 2: thoughts 2, 4, 6
    carry y_1, y_2, y_3). Every other thought: -100."""
    tgt = torch.full((len(batch), k), -100)
    for i, e in enumerate(batch):
        for j, y in enumerate(e.results[:stage]):
            if c_thought * (j + 1) <= k:
                tgt[i, c_thought * (j + 1) - 1] = y
    return tgt


def train_coconut(cfg: CoconutTrainConfig, out_dir: str | Path | None = None, progress: bool = True,
                  on_step: Callable[[int, dict], None] | None = None, eval_problems: int | None = None,
                  stop_after: int | None = None):
    """Train; save the organism to out_dir when given. Returns (hf, tok, log); `tok` holds the
    three markers. Same thread/determinism handling as the CODI organism's `train`."""
    with determinism(cfg.threads):
        return _train(cfg, out_dir, progress, on_step, eval_problems, stop_after)


def _train(cfg: CoconutTrainConfig, out_dir, progress: bool, on_step, eval_problems, stop_after):
    tok = build_tokenizer(COCONUT_EXTRA)
    tok.add_tokens(list(COCONUT_MARKERS))  # as Coconut's run.py: ids V0, V0 + 1, V0 + 2
    ids = tuple(tok.convert_tokens_to_ids(list(COCONUT_MARKERS)))
    hf = build_coconut_organism(cfg.model, tok, cfg.seed)
    heldout, pairs = heldout_set()
    enc = Encoder(tok, COCONUT.answer_template, "\n")
    batches = training_batches(enc, cfg, heldout_questions(heldout, pairs))
    pad = tok.eos_token_id  # Coconut: pad = eos (padded positions carry no loss)
    cpu0 = time.process_time()
    log, wall = optimise(cfg, [hf], lambda stage: coconut_losses(hf, next(batches), stage, cfg, ids, pad),
                         stage_at, stage_label, progress, on_step, stop_after, reset_optimizer=True)
    if out_dir is not None:
        from thoughtpatch.model.organism.coconut_export import save_coconut_organism

        save_coconut_organism(out_dir, hf, cfg, heldout, pairs, log, wall, time.process_time() - cpu0, eval_problems=eval_problems)
    return hf, tok, log
