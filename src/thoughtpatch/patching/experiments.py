"""The experiments as variant sets over one engine (DESIGN §3, §8).

* layer patching: for each location (block, or block × head), every thought from the source;
* Exp 1 (position): each single site (location, thought);
* Exp 2 (iterative): per location, iteration 0 patches thought 0 as Exp 1 does; the patched
  run's own activation at thought 1 becomes a₁; iteration i patches only thought i with aᵢ
  and records aᵢ₊₁ (keeping earlier patches would make every iteration equal iteration 0);
* knockout: in block l, the readers of thought k's key are blocked; applied to an unpatched run
  and measured against it;
* trace (causal tracing): the receiving run is the same question with noise on its number
  tokens' embeddings; every single site is restored from the clean run.

A grid's rows are *locations* of one site kind: block indices (and "input", the fed thought
vector, in the `resid` grid), or (block, head) pairs for `head`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from thoughtpatch.data.schema import Pair
from thoughtpatch.model.runtime import INPUT, RECORDABLE, Site, ThoughtModel
from thoughtpatch.patching import metrics as M
from thoughtpatch.patching.engine import DEFAULT_MAX_TOKENS, BatchedEngine, Job, Knockout, Patch, Prompt, Readers, Readout, ReferenceEngine, Target, Variant, plain_read_out, shifted
from thoughtpatch.patching.modes import Mode, ModeContext

Direction = Literal["denoising", "noising"]
Engine = BatchedEngine | ReferenceEngine
Layer = int | Literal["input"]
Loc = int | Literal["input"] | tuple[int, int]
EXPERIMENTS = ("layer", "position", "iterative", "knockout", "trace")
PATCHING = ("layer", "position", "iterative")  # experiments that take values from a source run
SITE_RECORD = tuple(k for k in RECORDABLE if k != "hidden")  # every site kind


@dataclass
class PairRuns:
    """A pair's two unpatched runs, measured against the same target (for causal tracing the
    corrupted run is the clean question with noised number embeddings)."""

    pair: Pair
    clean_ids: list[int]
    corrupted_prompt: Prompt
    target: Target
    clean: Readout
    corrupted: Readout

    @property
    def corrupted_ids(self) -> list[int]:
        return list(self.corrupted_prompt.ids)

    def roles(self, direction: Direction) -> tuple[Prompt, Readout, Readout]:
        """(receiving prompt, receiving run, source run)."""
        if direction == "denoising":
            return self.corrupted_prompt, self.corrupted, self.clean
        return Prompt(tuple(self.clean_ids)), self.clean, self.corrupted


def unpatched_run(model: ThoughtModel, prompt, target: Target) -> Readout:
    """The plain loop, every site recorded (what the activation cache stores), read out as
    the reference engine reads out (its null checks compare with it bit for bit)."""
    st = model.think(Prompt.of(prompt).encode(model), record_logits=False, record=RECORDABLE)
    return plain_read_out(model, st, target)[0]


def unpatched_runs(
    model: ThoughtModel, prompts: list, targets: list[Target], record: tuple[str, ...] = RECORDABLE, max_tokens: int | None = DEFAULT_MAX_TOKENS,
) -> list[Readout]:
    """`unpatched_run` for many prompts in a few batches (prompts of similar length together,
    left-padded, `max_tokens` cached positions a batch; see `BatchedEngine`): each run within
    fp32 rounding of its own, not bit for bit (the batch shapes differ). `record` can keep
    fewer kinds (memory: every kind at every thought and block of every run)."""
    if len(prompts) != len(targets):
        raise ValueError(f"unpatched_runs: {len(prompts)} prompts but {len(targets)} targets")
    jobs = [Job(Prompt.of(p), [Variant()], t) for p, t in zip(prompts, targets)]
    return [ros[0] for ros in BatchedEngine(model, max_tokens=max_tokens).run_many(jobs, record)]


def pair_runs(model: ThoughtModel, pair: Pair, max_new_tokens: int | None = None, stop_ids=None) -> PairRuns:
    """A pair's two unpatched runs, each alone (batch of one: the engines' null checks compare
    with them bit for bit)."""
    target = Target.for_answers(model, pair.clean.answer, pair.corrupted.answer, max_new_tokens=max_new_tokens, stop_ids=stop_ids)
    ci, ri = model.prompt_ids(pair.clean.question), model.prompt_ids(pair.corrupted.question)
    return PairRuns(pair, ci, Prompt(tuple(ri)), target, unpatched_run(model, ci, target), unpatched_run(model, ri, target))


def pairs_runs(
    model: ThoughtModel, pairs: list[Pair], max_new_tokens: int | None = None, stop_ids=None, record: tuple[str, ...] = RECORDABLE,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
) -> list[PairRuns]:
    """`pair_runs` for many pairs, every unpatched run batched (`unpatched_runs`)."""
    targets, prompts = [], []
    for pair in pairs:
        target = Target.for_answers(model, pair.clean.answer, pair.corrupted.answer, max_new_tokens=max_new_tokens, stop_ids=stop_ids)
        targets += [target, target]
        prompts += [model.prompt_ids(pair.clean.question), model.prompt_ids(pair.corrupted.question)]
    ros = unpatched_runs(model, prompts, targets, record, max_tokens)
    return [
        PairRuns(pair, prompts[2 * i], Prompt(tuple(prompts[2 * i + 1])), targets[2 * i], ros[2 * i], ros[2 * i + 1])
        for i, pair in enumerate(pairs)
    ]


# ---------------------------------------------------------------- causal tracing inputs

TRACE_SIGMA = 3.0  # σ = 3 × the std of the embedding matrix (ROME)


def number_positions(model: ThoughtModel, ids: list[int]) -> list[int]:
    """Positions of prompt tokens that spell a number (any digit in the token's text)."""
    return [i for i, t in enumerate(ids) if t not in model.markers and any(c.isdigit() for c in model.tokenizer.decode([t]))]


def trace_noise(model: ThoughtModel, ids: list[int], question_id: int, tokens: str = "numbers", seed: int = 0, scale: float = TRACE_SIGMA) -> torch.Tensor:
    """[T, H] Gaussian noise, σ = scale × std(embedding matrix), on the number tokens (or every
    question token), seeded by (seed, question) so that runs, shards and resumes agree."""
    from thoughtpatch.patching.modes import noise_for

    emb = model.hf.get_input_embeddings().weight
    sigma = scale * float(emb.detach().float().std())
    positions = number_positions(model, ids) if tokens == "numbers" else [i for i, t in enumerate(ids) if t not in model.markers]
    eps = noise_for(seed, question_id, Site(INPUT, thought=0), (len(ids), model.hidden_size))
    mask = torch.zeros(len(ids), 1)
    mask[positions] = 1.0
    return sigma * eps * mask


def trace_runs(model: ThoughtModel, pair: Pair, tokens: str = "numbers", seed: int = 0, scale: float = TRACE_SIGMA,
               max_new_tokens: int | None = None, stop_ids=None) -> PairRuns:
    """A causal-tracing unit from the pair's clean question: clean run and noised run."""
    target = Target.for_answer(model, pair.clean.answer, max_new_tokens=max_new_tokens, stop_ids=stop_ids)
    ids = model.prompt_ids(pair.clean.question)
    noised = Prompt(tuple(ids), trace_noise(model, ids, pair.pair_id, tokens, seed, scale))
    return PairRuns(pair, ids, noised, target, unpatched_run(model, ids, target), unpatched_run(model, noised, target))


# ---------------------------------------------------------------- grids

@dataclass(frozen=True)
class Spec:
    """What a run patches, shared by every pair."""

    site: str = "resid"
    layers: tuple[Layer, ...] = ()  # "input" (the resid grid's input row) and block indices
    thoughts: tuple[int, ...] = ()
    direction: Direction = "denoising"
    mode: Mode = field(default_factory=Mode)
    readers: Readers = "answer"  # knockout
    knock_on: tuple[str, ...] = ("clean",)  # knockout: the unpatched runs it is applied to


def all_layers(model: ThoughtModel) -> list[Layer]:
    return [INPUT, *range(model.num_layers)]


def locations(model: ThoughtModel, site: str, layers) -> list[Loc]:
    """A grid's rows: the layers (the input row only in the resid grid), or (layer, head)."""
    blocks = [l for l in layers if l != INPUT]
    if site == "head":
        return [(l, h) for l in blocks for h in range(model.num_heads)]
    if site == "resid":
        return list(layers)
    return blocks


def site_at(kind: str, loc: Loc, thought: int) -> Site:
    if loc == INPUT:
        return Site(INPUT, thought=thought)
    if kind == "head":
        layer, head = loc  # type: ignore[misc]
        return Site("head", layer, thought, head)
    return Site(kind, loc, thought)  # type: ignore[arg-type]


def loc_columns(kind: str, loc: Loc) -> dict:
    if kind == "head":
        return {"site": kind, "layer": loc[0], "head": loc[1]}  # type: ignore[index]
    return {"site": kind, "layer": loc}


class _Values:
    """Values for one pair under the run's mode, memoised per site so that a variant patching
    the same site with the same value holds the same tensor (the engine runs such twins once)."""

    def __init__(self, model: ThoughtModel, runs: PairRuns, spec: Spec, ctx: ModeContext | None, partner: PairRuns | None):
        _, self.receiving, self.source = runs.roles(spec.direction)
        self.partner = partner.roles(spec.direction)[1] if partner is not None else None
        self.model, self.pid = model, runs.pair.pair_id
        self.ctx = ctx or ModeContext(spec.mode)
        self.memo: dict[Site, tuple[torch.Tensor, str]] = {}

    def patch(self, site: Site) -> Patch:
        if site not in self.memo:
            partner = self.partner.acts if self.partner is not None else None
            self.memo[site] = self.ctx.value(self.model, site, self.source.acts, self.receiving.acts, partner, self.pid)
        value, mode = self.memo[site]
        return Patch(site, value, mode)  # type: ignore[arg-type]


def _layer_variants(vals: _Values, kind: str, locs: list[Loc], thoughts, k_total: int):
    variants = [Variant(tuple(vals.patch(site_at(kind, loc, k)) for k in thoughts)) for loc in locs]
    return variants, [{"experiment": "layer", **loc_columns(kind, loc)} for loc in locs]


def _position_variants(vals: _Values, kind: str, locs: list[Loc], thoughts, k_total: int, name: str = "position"):
    cells = [(loc, k) for k in thoughts for loc in locs]
    variants = [Variant((vals.patch(site_at(kind, loc, k)),)) for loc, k in cells]
    return variants, [{"experiment": name, **loc_columns(kind, loc), "thought": k} for loc, k in cells]


def _iterative_variants(vals: _Values, kind: str, locs: list[Loc], thoughts, k_total: int):
    """Exp 2. Variant (loc, i) patches only (loc, i): with the mode's value when i = 0, else
    with what variant (loc, i-1) itself produced at (loc, i). The batched engine runs every
    chain in one pass (each link reads its predecessor's activation in the same forward); the
    reference engine runs the links one after another. `from_variant` indices are local."""
    variants, keys = [], []
    for i in range(k_total):
        for loc in locs:
            site = site_at(kind, loc, i)
            patch = vals.patch(site) if i == 0 else Patch(site, None, from_variant=len(variants) - len(locs))
            variants.append(Variant((patch,)))
            keys.append({"experiment": "iterative", **loc_columns(kind, loc), "iteration": i})
    return variants, keys


BUILDERS = {"layer": _layer_variants, "position": _position_variants, "iterative": _iterative_variants}


def _base_columns(runs: PairRuns, spec: Spec, partner: PairRuns | None) -> dict:
    cols = {"direction": spec.direction, **spec.mode.columns()}
    if spec.mode.name == "resample" and partner is not None:
        cols["resample_pair"] = partner.pair.pair_id
    return cols


@dataclass
class _Part:
    """One experiment's variants within an engine call, and what their rows need."""

    exp: str
    variants: list[Variant]
    keys: list[dict]
    receiving: Readout
    source: Readout


def _calls(model: ThoughtModel, runs: PairRuns, experiments: list[str], spec: Spec, ctx: ModeContext | None, partner: PairRuns | None) -> list[tuple[Prompt, list[_Part]]]:
    """A pair's engine calls: one per receiving run, holding every experiment applied to it."""
    k_total = model.num_thoughts
    calls: dict[tuple, tuple[Prompt, list[_Part]]] = {}

    def add(prompt: Prompt, part: _Part) -> None:
        calls.setdefault((prompt.ids, id(prompt.noise)), (prompt, []))[1].append(part)

    patching = [e for e in experiments if e in (*PATCHING, "trace")]
    if patching:
        prompt, receiving, source = runs.roles(spec.direction)
        vals = _Values(model, runs, spec, ctx, partner)
        locs = locations(model, spec.site, spec.layers)
        base = _base_columns(runs, spec, partner)
        for exp in patching:
            if exp == "trace":
                vs, keys = _position_variants(vals, spec.site, locs, spec.thoughts, k_total, name="trace")
            else:
                vs, keys = BUILDERS[exp](vals, spec.site, locs, spec.thoughts, k_total)
            add(prompt, _Part(exp, vs, [base | k for k in keys], receiving, source))
    if "knockout" in experiments:
        blocks = [l for l in spec.layers if l != INPUT]
        for run in spec.knock_on:
            prompt = Prompt(tuple(runs.clean_ids)) if run == "clean" else runs.corrupted_prompt
            receiving = runs.clean if run == "clean" else runs.corrupted
            cells = [(l, k) for k in spec.thoughts for l in blocks]
            vs = [Variant(knockouts=(Knockout(l, k, spec.readers),)) for l, k in cells]
            keys = [{"experiment": "knockout", "run": run, "readers": spec.readers, "layer": l, "thought": k} for l, k in cells]
            add(prompt, _Part("knockout", vs, keys, receiving, receiving))
    return list(calls.values())


def _rows(model: ThoughtModel, runs: PairRuns, spec: Spec, part: _Part, readouts: list[Readout]) -> list[dict]:
    rows = []
    for key, ro in zip(part.keys, readouts):
        if part.exp == "iterative":
            site = site_at(spec.site, key["layer"] if spec.site != "head" else (key["layer"], key["head"]), key["iteration"])
            a = model.site_value(ro.acts, site)  # the activation this iteration patched in (a_i)
            key = key | {
                "norm": M.norm(a),
                "cos_clean": M.cos(a, model.site_value(runs.clean.acts, site)),
                "cos_corrupted": M.cos(a, model.site_value(runs.corrupted.acts, site)),
            }
        if part.exp == "knockout":
            metrics = M.knockout_metrics(ro, part.receiving)
        elif part.exp == "trace":
            metrics = M.trace_metrics(ro, part.receiving, part.source)
        else:
            metrics = M.readout_metrics(ro, part.receiving, part.source, runs.target)
        rows.append({"pair_id": runs.pair.pair_id, **key, **metrics, **M.baseline_columns(part.exp, part.receiving, part.source)})
    return rows


def patch_pairs(
    engine: Engine,
    runs: list[PairRuns],
    experiments: list[str],
    spec: Spec,
    ctx: ModeContext | None = None,
    partners: list[PairRuns | None] | None = None,
) -> list[dict[str, list[dict]]]:
    """`patch_pair` for many pairs at once: the same rows, in the same order, per pair. The
    batched engine runs the variants of several pairs in one batch (its `max_tokens` sizes
    the batches) and hands each receiving run's readouts over as soon as they are complete,
    so memory does not grow with the number of pairs beyond their rows."""
    model = engine.model
    partners = partners if partners is not None else [None] * len(runs)
    if len(partners) != len(runs):
        raise ValueError(f"patch_pairs: {len(runs)} pairs but {len(partners)} partners")
    record = (INPUT, "resid") if spec.site in (INPUT, "resid") else (spec.site,)
    jobs: list[Job] = []
    owner: list[tuple[int, list[_Part], list[int]]] = []  # per job: pair index, its parts, their offsets
    for p, (r, partner) in enumerate(zip(runs, partners)):
        for prompt, parts in _calls(model, r, experiments, spec, ctx, partner):
            variants: list[Variant] = []
            offsets = []
            for part in parts:
                offsets.append(len(variants))
                variants += shifted(part.variants, len(variants))
            # a patched run mostly answers as the run it patches or the one its values come from
            drafts = dict.fromkeys(tuple(ro.answer.token_ids) for part in parts for ro in (part.receiving, part.source))
            jobs.append(Job(prompt, variants, replace(r.target, drafts=tuple(drafts))))
            owner.append((p, parts, offsets))
    got: dict[int, dict[str, list[list[dict]]]] = {}  # job → experiment → rows of each part

    def done(j: int, readouts: list[Readout]) -> None:
        p, parts, offsets = owner[j]
        got[j] = {}
        for part, off in zip(parts, offsets):
            got[j].setdefault(part.exp, []).append(_rows(model, runs[p], spec, part, readouts[off : off + len(part.variants)]))

    engine.run_many(jobs, record, done)
    out: list[dict[str, list[dict]]] = [{} for _ in runs]
    for j, (p, _, _) in enumerate(owner):  # jobs in order: rows in the order patch_pair gives them
        for exp, parts_rows in got.pop(j).items():
            for rows in parts_rows:
                out[p].setdefault(exp, []).extend(rows)
    return out


def patch_pair(
    engine: Engine,
    runs: PairRuns,
    experiments: list[str],
    spec: Spec,
    ctx: ModeContext | None = None,
    partner: PairRuns | None = None,
) -> dict[str, list[dict]]:
    """Every variant of the requested experiments for one pair, one engine call per receiving
    run (the batched engine then needs a single pass of K thoughts and one read-out for all of
    them). `ctx` carries what non-replace modes need; `partner` is the resample partner."""
    return patch_pairs(engine, [runs], experiments, spec, ctx, [partner])[0]


def layer_patching(engine: Engine, runs: PairRuns, layers, thoughts, direction: Direction = "denoising", site: str = "resid") -> list[dict]:
    """Layer patching: for each location, every thought in `thoughts` at once."""
    return patch_pair(engine, runs, ["layer"], Spec(site, tuple(layers), tuple(thoughts), direction))["layer"]


def position_patching(engine: Engine, runs: PairRuns, layers, thoughts, direction: Direction = "denoising", site: str = "resid") -> list[dict]:
    """Exp 1: each single site (location, thought)."""
    return patch_pair(engine, runs, ["position"], Spec(site, tuple(layers), tuple(thoughts), direction))["position"]


def iterative_patching(engine: Engine, runs: PairRuns, layers, num_thoughts: int, direction: Direction = "denoising", site: str = "resid") -> list[dict]:
    """Exp 2: per location, chained iterations (see `_iterative_variants`)."""
    return patch_pair(engine, runs, ["iterative"], Spec(site, tuple(layers), tuple(range(num_thoughts)), direction))["iterative"]
