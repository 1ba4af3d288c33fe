"""Run many patched variants of one receiving run.

A `Variant` is a set of patches (site → value, replaced or added) and attention knockouts.
The batched engine computes the receiving run's prompt once, advances one unpatched prefix
thought by thought, and lets the variants whose first change is at thought k join the batch
at k from a fork of that prefix (nothing before k can differ), so every variant of a pair
finishes in one batched pass of K thoughts plus read-out. The reference engine runs each
variant alone from scratch; the two must agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, NamedTuple

import torch

from thoughtpatch.model.kvcache import grows as _grows
from thoughtpatch.model.runtime import INPUT, Block, Generation, Intervention, LatentState, Site, ThoughtModel

Readers = Literal["answer", "thoughts", "both"]


@dataclass(frozen=True)
class Patch:
    """Set `site` to `value` (mode replace) or add `value` to it (mode add) — or, with
    `from_variant=j`, give it the activation variant j itself has at this site (j must change
    nothing at this site and start no later)."""

    site: Site
    value: torch.Tensor | None  # the site's shape (e.g. [H]; head [head_dim]; kv [2, n_kv, head_dim])
    mode: Literal["replace", "add"] = "replace"
    from_variant: int | None = None


@dataclass(frozen=True)
class Knockout:
    """In block `layer`, the readers of thought `thought`'s key do not attend to it: the read-out
    positions (<readout> on), the later thoughts, or both."""

    layer: int
    thought: int
    readers: Readers = "answer"

    def start(self, num_thoughts: int) -> int:
        """The first thought it changes (K: only the read-out)."""
        if self.readers != "answer" and self.thought + 1 < num_thoughts:
            return self.thought + 1
        return num_thoughts


@dataclass(frozen=True)
class Variant:
    patches: tuple[Patch, ...] = ()
    knockouts: tuple[Knockout, ...] = ()

    def start(self, num_thoughts: int) -> int:
        """First thought this variant changes (K for the unpatched run or a read-out-only change)."""
        firsts = [p.site.thought for p in self.patches] + [ko.start(num_thoughts) for ko in self.knockouts]
        return min(firsts, default=num_thoughts)

    def needs(self) -> set[int]:
        return {p.from_variant for p in self.patches if p.from_variant is not None}

    def entry(self, num_thoughts: int, num_layers: int) -> int:
        """The first block at which this variant's first changed thought differs from the
        unpatched run's: an input patch changes every block, a patch or knockout at block l
        leaves the blocks below it, a kv patch changes only what later positions read
        (num_layers: nothing of the thought's own forward)."""
        k = self.start(num_thoughts)
        firsts = [0 if p.site.kind == INPUT else num_layers if p.site.kind == "kv" else p.site.layer for p in self.patches if p.site.thought == k]
        firsts += [ko.layer for ko in self.knockouts if ko.start(num_thoughts) == k]
        return min(firsts, default=num_layers)  # type: ignore[type-var]


@dataclass(frozen=True, eq=False)
class Prompt:
    """A receiving run's prompt: token ids and, for causal tracing, noise added to their embeddings."""

    ids: tuple[int, ...]
    noise: torch.Tensor | None = None  # [T, H]

    @staticmethod
    def of(p: "Prompt | list[int] | tuple[int, ...]") -> "Prompt":
        return p if isinstance(p, Prompt) else Prompt(tuple(p))

    def encode(self, model: ThoughtModel, record: bool = False) -> LatentState:
        return model.encode(list(self.ids), record=record, embed_noise=None if self.noise is None else self.noise[None])


@dataclass(frozen=True)
class Target:
    """What to read out: two teacher-forced continuations after <readout> (clean and corrupted
    answer, each ending in eos) and the decision position where they first differ. A target of
    one answer (causal tracing) has clean == corrupted and its decision at the answer's first token."""

    clean: tuple[int, ...]
    corrupted: tuple[int, ...]
    decision: int
    max_new_tokens: int | None = None  # None: the model's own limit
    stop_ids: tuple[int, ...] | None = None
    # id sequences the greedy answer is likely to follow where it leaves both continuations
    # (the answers of the runs a patch mixes): the batched read-out verifies them in one
    # forward instead of decoding them one by one. Only the work changes, never the answer.
    drafts: tuple[tuple[int, ...], ...] = ()

    @staticmethod
    def for_answers(model: ThoughtModel, clean_answer, corrupted_answer, **kw) -> "Target":
        eos = model.eos_ids[0]
        c = (*model.answer_ids(clean_answer), eos)
        r = (*model.answer_ids(corrupted_answer), eos)
        d = next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), None)
        if d is None:
            raise ValueError(f"answers {clean_answer!r} and {corrupted_answer!r} tokenise identically")
        return Target(c, r, d, **kw)

    @staticmethod
    def for_answer(model: ThoughtModel, answer, **kw) -> "Target":
        """One continuation; the decision position is its first token after the template."""
        eos = model.eos_ids[0]
        c = (*model.answer_ids(answer), eos)
        bare = model.answer_ids("")
        d = next((i for i, (a, b) in enumerate(zip(c, bare)) if a != b), min(len(bare), len(c) - 1))
        return Target(c, c, d, **kw)

    @property
    def single(self) -> bool:
        return self.clean == self.corrupted


@dataclass
class Readout:
    """One variant's measurements, fp32."""

    decision_logits: torch.Tensor  # [V] next-token logits at the decision position
    logprob_clean: float  # Σ log P(clean continuation tokens from the decision position on)
    logprob_corrupted: float
    answer: Generation
    acts: dict[str, torch.Tensor]  # kind → [K, ...] activations at each thought (after patches)
    # derived from decision_logits, computed once (`_readouts` fills them for a whole batch at
    # once); not init fields, so `replace` never carries them over to other logits
    _log_probs: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _probs: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def log_probs(self) -> torch.Tensor:
        """fp32 log-softmax of `decision_logits`."""
        if self._log_probs is None:
            self._log_probs = torch.log_softmax(self.decision_logits.float(), -1)
        return self._log_probs

    def probs(self) -> torch.Tensor:
        """exp of `log_probs()`: the next-token distribution at the decision position."""
        if self._probs is None:
            self._probs = self.log_probs().exp()
        return self._probs

    @property
    def resid(self) -> torch.Tensor:
        return self.acts.get("resid", torch.zeros(0))  # [K,L,H]

    @property
    def inputs(self) -> torch.Tensor:
        return self.acts.get(INPUT, torch.zeros(0))  # [K,H]


def _readouts(st: LatentState, decision: torch.Tensor, lps: list[list[float]], gens: list[Generation]) -> list[Readout]:
    """The batch split into per-row readouts (lps: per row, clean and corrupted)."""
    kinds = [k for k in st.acts if k not in ("hidden", "logits")] if st.step else []
    acts = {k: st.stacked(k) for k in kinds}
    out = [
        Readout(decision_logits=decision[b], logprob_clean=lps[b][0], logprob_corrupted=lps[b][1], answer=gens[b], acts={k: a[b].float() for k, a in acts.items()})
        for b in range(st.batch_size)
    ]
    # every row's KLs need these: one batched op each instead of hundreds of small ones
    log_probs = torch.log_softmax(decision.float(), -1)
    probs = log_probs.exp()
    for b, ro in enumerate(out):
        ro._log_probs, ro._probs = log_probs[b], probs[b]
    return out


def read_out(model: ThoughtModel, st: LatentState, target: Target | list[Target]) -> list[Readout]:
    """Score both continuations, decode greedily, and split the batch into per-row readouts;
    `target` is one for every row or one per row (rows of different pairs).

    <readout>, the clean continuation and the corrupted one's tail after the shared part are
    fed in one forward (positions before the decision are identical in both, so their
    log-probs cancel and are not summed); the greedy answer is verified along them and
    decoded only where it leaves them (`ThoughtModel.read`)."""
    targets = [target] * st.batch_size if isinstance(target, Target) else list(target)
    sc = model.read(
        st, [list(t.clean) for t in targets], [list(t.corrupted) for t in targets], [t.decision for t in targets],
        [t.max_new_tokens for t in targets], [t.stop_ids for t in targets], drafts=[t.drafts for t in targets],
    )
    return _readouts(st, sc.decision_logits, sc.logprob.tolist(), sc.generations)


def plain_read_out(model: ThoughtModel, st: LatentState, target: Target) -> list[Readout]:
    """`read_out` the plain way, for the reference engine and the unpatched runs its null
    checks compare with bit for bit: <readout> and the shared part of the continuations fed
    once, each continuation's tail after the decision on top of it, then the family's greedy
    decode one token at a time from <readout> fed alone again, as the families' code does.
    An implementation independent of `ThoughtModel.read`, so the engines' equality is also
    a check of the verified read-out."""
    d = target.decision
    try:
        decision = model.teacher_force(st, [model.readout_id, *target.clean[:d]], keep=1)[:, 0]
        # float64 so the sum adds no rounding of its own to a difference of similar numbers
        first = decision.double().log_softmax(-1)
        lps = []
        for cont in (target.clean,) if target.single else (target.clean, target.corrupted):
            lp = first[:, cont[d]]
            tail = list(cont[d:-1])  # fed to predict cont[d+1:]
            if tail:
                logits = model.teacher_force(st, tail, keep=len(tail)).double()
                idx = torch.tensor(cont[d + 1 :], device=logits.device)[None, :, None].expand(logits.shape[0], -1, 1)
                lp = lp + (logits.gather(-1, idx).squeeze(-1) - logits.logsumexp(-1)).sum(-1)
                model.rewind(st, extra=1 + d)
            lps.append(lp)
        if target.single:
            lps.append(lps[0])
    finally:
        model.rewind(st)
    gens, _ = model.generate(st, max_new_tokens=target.max_new_tokens, stop_ids=target.stop_ids)
    return _readouts(st, decision, torch.stack(lps, 1).tolist(), gens)


def interventions_at(variants: list[Variant], thought: int, row_of: dict[int, int] | None = None) -> list[Intervention]:
    """One intervention per (site, mode) at this thought, covering all rows that patch it.
    `row_of` maps a variant id (for `from_variant`) to its row in this batch."""
    groups: dict[tuple, tuple[list[int], list[torch.Tensor]]] = {}
    copies: dict[Site, tuple[list[int], list[int]]] = {}
    for row, v in enumerate(variants):
        for p in v.patches:
            if p.site.thought != thought:
                continue
            if p.from_variant is not None:
                rows, src = copies.setdefault(p.site, ([], []))
                rows.append(row)
                src.append(row_of[p.from_variant])  # type: ignore[index]
            else:
                rows, vals = groups.setdefault((p.site, p.mode), ([], []))
                rows.append(row)
                vals.append(p.value)
    out = [Intervention.copy(site, tuple(rows), tuple(src)) for site, (rows, src) in copies.items()]
    for (site, mode), (rows, vals) in groups.items():
        value = torch.stack(vals)
        make = Intervention.replace if mode == "replace" else Intervention.add
        out.append(make(site, value, rows=tuple(rows)))
    return out


def blocks_at(variants: list[Variant], phase: int, num_thoughts: int, prompt_len: int) -> list[Block]:
    """The knockouts in force at thought `phase` (`num_thoughts` = the read-out), one `Block`
    per (layer, key position) covering every row that sets it."""
    rows_of: dict[tuple[int, int], list[int]] = {}
    for row, v in enumerate(variants):
        for ko in v.knockouts:
            reads = ko.readers in ("answer", "both") if phase == num_thoughts else ko.readers in ("thoughts", "both") and ko.thought < phase
            if reads:
                rows_of.setdefault((ko.layer, prompt_len + ko.thought), []).append(row)
    return [Block(layer, pos, tuple(rows)) for (layer, pos), rows in rows_of.items()]


def resolve(model: ThoughtModel, v: Variant, done: dict[int, Readout]) -> Variant:
    """Replace `from_variant` references by the values those variants produced."""
    if not v.needs():
        return v
    patches = []
    for p in v.patches:
        if p.from_variant is not None:
            p = Patch(p.site, model.site_value(done[p.from_variant].acts, p.site), p.mode)
        patches.append(p)
    return Variant(tuple(patches), v.knockouts)


def _record_for(variants: list[Variant], record: tuple[str, ...]) -> tuple[str, ...]:
    """What to record: what was asked, plus every kind a `from_variant` patch copies."""
    extra = {p.site.kind for v in variants for p in v.patches if p.from_variant is not None}
    return tuple(dict.fromkeys([*record, *sorted(extra)]))


class Job(NamedTuple):
    """The variants of one receiving run (an engine call of `run`)."""

    prompt: Prompt
    variants: list[Variant]
    target: Target


Done = Callable[[int, list[Readout]], None]


class ReferenceEngine:
    """One variant at a time, each from its own prompt pass, read out the plain way: slow,
    obviously right."""

    def __init__(self, model: ThoughtModel):
        self.model = model

    def run_many(self, jobs: list[Job], record: tuple[str, ...] = (INPUT, "resid"), done: Done | None = None) -> list[list[Readout]]:
        """`run` for each job (see `BatchedEngine.run_many`)."""
        out = []
        for i, job in enumerate(jobs):
            ros = self.run(job.prompt, job.variants, job.target, record)
            if done is not None:
                done(i, ros)
            else:
                out.append(ros)
        return out

    def run(self, prompt, variants: list[Variant], target: Target, record: tuple[str, ...] = (INPUT, "resid")) -> list[Readout]:
        m, prompt = self.model, Prompt.of(prompt)
        rec = _record_for(variants, record)
        out: list[Readout] = []
        for v in variants:  # a variant only refers to earlier ones, so values are known here
            v = resolve(m, v, dict(enumerate(out)))
            st = prompt.encode(m)
            thoughts = sorted({p.site.thought for p in v.patches})
            ivs = [iv for k in thoughts for iv in interventions_at([v], k)]
            # a knockout of later-thought readers holds from the thought after it; one think per stretch
            for k in range(m.num_thoughts):
                st = m.think(st, ivs, until=k + 1, record_logits=False, record=rec, blocked=blocks_at([v], k, m.num_thoughts, st.prompt_len))
            st.blocked = blocks_at([v], m.num_thoughts, m.num_thoughts, st.prompt_len)
            out.extend(plain_read_out(m, st, target))
        return out


def _linked_groups(variants: list[Variant]) -> list[list[int]]:
    """Connected components of the `from_variant` references, in order of first member."""
    parent = list(range(len(variants)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, v in enumerate(variants):
        for j in v.needs():
            parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(variants)):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def _distinct(variants: list[Variant]) -> tuple[list[Variant], list[int]]:
    """Variants that patch the same sites with the same tensors (Exp 2's iteration 0 and Exp
    1's thought 0, for one) are one run: the distinct variants, `from_variant` renumbered,
    and each input variant's index among them. Values match by identity (same memory, same
    view), so equal values held in different tensors merely run twice."""
    distinct: list[Variant] = []
    index: list[int] = []
    seen: dict[tuple, int] = {}
    for i, v in enumerate(variants):
        if any(j >= i for j in v.needs()):
            raise ValueError(f"variant {i} refers to variant {max(v.needs())}: a variant may only refer to earlier ones")
        patches = tuple(p if p.from_variant is None else Patch(p.site, p.value, p.mode, index[p.from_variant]) for p in v.patches)
        key = tuple(
            (p.site, p.mode, p.from_variant, None if p.value is None else (p.value.data_ptr(), p.value.shape, p.value.stride(), p.value.dtype, p.value.device))
            for p in patches
        ) + (v.knockouts,)
        if key not in seen:
            seen[key] = len(distinct)
            distinct.append(Variant(patches, v.knockouts))
        index.append(seen[key])
    return distinct, index


def _changes(v: Variant) -> bool:
    return bool(v.patches or v.knockouts)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def shifted(variants: list[Variant], off: int) -> list[Variant]:
    """`from_variant` indices moved by `off` (a list's place in a longer one)."""
    if not off:
        return variants
    return [
        Variant(tuple(Patch(p.site, p.value, p.mode, None if p.from_variant is None else p.from_variant + off) for p in v.patches), v.knockouts)
        for v in variants
    ]


DEFAULT_MAX_TOKENS = 1 << 16


class BatchedEngine:
    """All variants of one or many receiving runs in staggered batches: each prompt's
    variants share its prompt pass and unpatched prefix, and variants of different prompts
    share a batch (prompts left-padded; every row computes what it would alone).

    A batch is sized by `max_tokens`, the cached positions it may hold — rows × the batch's
    sequence length at the read-out (prompt, K thoughts, both continuations) — and, if given,
    by `max_batch` rows. Memory grows with both; on CUDA an out-of-memory error halves them
    and the batch is run again. On a CPU the default (65,536 positions: a few hundred rows of
    a GSM8K-length prompt) is about where larger batches stop paying; on a GPU set it from
    memory: a position costs 2 × layers × KV heads × head dim × bytes per value of cache
    (32 KiB for LLaMA-3.2-1B in bf16), plus the read-out's logits."""

    def __init__(self, model: ThoughtModel, max_batch: int | None = None, max_tokens: int | None = DEFAULT_MAX_TOKENS, reuse: bool = True):
        self.model = model
        self.max_batch = max_batch  # None = no row limit
        self.max_tokens = max_tokens  # None = no limit
        self.reuse = reuse  # a joining variant reuses its prefix row's blocks below its first change

    def run(self, prompt, variants: list[Variant], target: Target, record: tuple[str, ...] = (INPUT, "resid")) -> list[Readout]:
        return self.run_many([Job(Prompt.of(prompt), variants, target)], record)[0]

    def run_many(self, jobs: list[Job], record: tuple[str, ...] = (INPUT, "resid"), done: Done | None = None) -> list[list[Readout]]:
        """Every job's readouts, in order — or, with `done`, each job's handed to done(i,
        readouts) as soon as they are complete and then dropped (memory stays that of a few
        batches however many jobs there are); returns [] then."""
        m = self.model
        k_total = m.num_thoughts
        flat: list[Variant] = []
        job_of: list[int] = []
        index: list[list[int]] = []
        for j, job in enumerate(jobs):
            distinct, idx = _distinct(job.variants)
            index.append([len(flat) + i for i in idx])
            flat += shifted(distinct, len(flat))
            job_of += [j] * len(distinct)
        rec = _record_for(flat, record)
        results: dict[int, Readout] = {}
        left = [len(set(ix)) for ix in index]
        out: list[list[Readout]] = [[] for _ in jobs]

        def finish(j: int) -> None:
            ros = [results[i] for i in index[j]]
            if done is not None:
                done(j, ros)
                for i in set(index[j]):
                    del results[i]
            else:
                out[j] = ros

        for j in range(len(jobs)):
            if not left[j]:
                finish(j)
        # variants that refer to each other share a batch; prompts of similar length batch together
        length = [len(job.prompt.ids) + k_total + len(job.target.clean) + len(job.target.corrupted) for job in jobs]
        units = sorted(_linked_groups(flat), key=lambda g: (len(jobs[job_of[g[0]]].prompt.ids), job_of[g[0]], g[0]))
        pos = 0
        extra = [len([i for i in g if _changes(flat[i])]) for g in units]  # rows a unit adds to its prompt's
        while pos < len(units):
            start, chunk, prompts, longest, used = pos, [], set(), 0, 0
            while pos < len(units):
                g = units[pos]
                j = job_of[g[0]]
                rows = used + extra[pos] + (j not in prompts)
                seq = max(longest, length[j])
                if chunk and ((self.max_batch and rows > self.max_batch) or (self.max_tokens and rows * seq > self.max_tokens)):
                    break
                chunk += g
                prompts.add(j)
                longest, used = seq, rows
                pos += 1
            try:
                outs = self._run_chunk(chunk, flat, job_of, jobs, rec)
            except RuntimeError as e:
                if not _is_oom(e) or len(chunk) == 1:
                    raise
                torch.cuda.empty_cache()
                self.max_tokens = max(1, used * longest // 2)  # half of what this batch held
                if self.max_batch:
                    self.max_batch = max(1, used // 2)
                pos = start
                continue
            for i, r in zip(chunk, outs):
                results[i] = r
                left[job_of[i]] -= 1
                if not left[job_of[i]]:
                    finish(job_of[i])
        return out if done is None else []

    def _run_chunk(self, ids: list[int], variants: list[Variant], job_of: list[int], jobs: list[Job], record: tuple[str, ...]) -> list[Readout]:
        """Rows 0…P-1 of the batch are the unpatched prefixes of the chunk's P prompts; a
        variant joins as a copy of its prompt's prefix row when its first change is due, so
        one forward per thought serves every prefix and every variant already running.
        Returns the readouts of `ids`, in order."""
        m = self.model
        k_total = m.num_thoughts
        owners = list(dict.fromkeys(job_of[i] for i in sorted(ids)))
        prefix = {j: r for r, j in enumerate(owners)}
        # a variant that changes nothing is its prompt's prefix row (an unpatched run)
        # joining rows in order of the block they start computing at (see `ThoughtModel.think`)
        order = sorted((i for i in ids if _changes(variants[i])), key=lambda i: (variants[i].start(k_total), variants[i].entry(k_total, m.num_layers), i))
        rows = [Variant()] * len(owners) + [variants[i] for i in order]
        row_of = {vid: row for row, vid in enumerate(order, start=len(owners))}
        starts = [variants[i].start(k_total) for i in order]
        running = m.encode([list(jobs[j].prompt.ids) for j in owners], embed_noise=[jobs[j].prompt.noise for j in owners])
        joined = len(owners)
        reuse = self.reuse and _grows(running.cache)  # transformers without per-layer caches: every block
        for k in range(k_total + 1):
            new = [i for i, s in zip(order, starts) if s == k]
            if new:
                running = running.join([prefix[job_of[i]] for i in new], room=len(rows) - joined - len(new))
            if k == k_total:
                break
            # the rows joining here compute this thought only from the block where they change
            enter = [0] * joined + [variants[i].entry(k_total, m.num_layers) for i in new] if reuse else None
            source = list(range(joined)) + [prefix[job_of[i]] for i in new]
            joined += len(new)
            running = m.think(
                running, interventions_at(rows[:joined], k, row_of), until=k + 1, record_logits=False, record=record,
                blocked=blocks_at(rows[:joined], k, k_total, running.prompt_len), enter=enter, source=source,
            )
        running.blocked = blocks_at(rows, k_total, k_total, running.prompt_len)
        # the prefix rows are read out too (rows of many): they are the unpatched runs
        outs = read_out(m, running, [jobs[j].target for j in owners] + [jobs[job_of[i]].target for i in order])
        return [outs[row_of[i]] if i in row_of else outs[prefix[job_of[i]]] for i in ids]
