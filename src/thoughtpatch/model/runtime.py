"""The latent loop of a continuous-thought model, exactly as the family's own inference code
runs it, with intervention sites.

    prompt  ... <open>                  one forward with cache; h = final-norm state at <open>
    thought k = 0…K-1                   feed z_k = thought(h_{k-1}) as inputs_embeds (length 1, no mask)
    <readout>, then greedy answer       the family's greedy and stop rules

(CODI: <open> = <bot>, thought(h) = prj(h), <readout> = <eot>; Coconut: <|start-latent|>, h
itself, <|end-latent|> — see `families.py`.)

Sites (DESIGN §8) at thought k: `input` (z_k), and per block l `resid` (block output),
`attn` and `mlp` (the sub-layer outputs added to the residual), `head` (head h's slice of the
attention output projection's input) and `kv` (the key and value block l caches for thought
k — keys after rotary embedding — read by every later position). Interventions are applied
*during* the step, so a patch at (l, k) reaches thought k's later layers, z_{k+1} and all later
attention, as in the model; a `kv` patch is written into the cache after thought k's own
forward, so thought k's residual stream is untouched and only its readers see it. A `Block`
(attention knockout) sets the pre-softmax score of one cached key to −inf for chosen rows in
one block, through the attention mask of that block alone — exact with the KV cache and with
batches of variants.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn

from thoughtpatch.errors import ThoughtpatchError
from thoughtpatch.model.argmax import ArgmaxScreen, fast_bf16
from thoughtpatch.model.families import CODI, Arch, Family, last_number, submodule
from thoughtpatch.model.kvcache import cache_layers, grows as _grows, make_growing, set_grow as _set_grow

SITE_KINDS = ("input", "resid", "attn", "mlp", "head", "kv")
HOOKED = ("resid", "attn", "mlp", "head")  # recorded by forward hooks inside the step
RECORDABLE = (*SITE_KINDS, "hidden")
INPUT = "input"


@dataclass(frozen=True)
class Site:
    """One activation at thought `thought`: Site("input", thought=k), Site("resid", layer=l,
    thought=k), Site("head", layer=l, thought=k, head=h), ..."""

    kind: str = "resid"
    layer: int | None = None
    thought: int = 0
    head: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise ThoughtpatchError(f"unknown site '{self.kind}' (choose {', '.join(SITE_KINDS)})")
        if self.kind == INPUT:
            if self.layer is not None:
                raise ThoughtpatchError("the input site (the fed thought vector) has no layer")
        elif not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
            raise ThoughtpatchError(f"site {self.kind} needs a block index layer >= 0, not {self.layer!r}")
        if (self.kind == "head") != (self.head is not None):
            raise ThoughtpatchError("a head index is given for the head site, and only for it")
        if not isinstance(self.thought, int) or self.thought < 0:
            raise ThoughtpatchError(f"thought must be an int >= 0, not {self.thought!r}")

    def __str__(self) -> str:
        where = "" if self.layer is None else f" L{self.layer}" + ("" if self.head is None else f".h{self.head}")
        return f"{self.kind}{where} t{self.thought}"


@dataclass(frozen=True)
class Intervention:
    """Rewrite the activation at `site` for some batch rows: act[rows] = fn(act[rows]), or, in
    copy mode, act[rows] = act[from_rows] (the value other rows have in this very forward)."""

    site: Site
    fn: Callable[[torch.Tensor], torch.Tensor] | None
    rows: tuple[int, ...] | None = None  # None = every row
    from_rows: tuple[int, ...] | None = None

    @staticmethod
    def copy(site: Site, rows: tuple[int, ...], from_rows: tuple[int, ...]) -> "Intervention":
        return Intervention(site, None, rows, from_rows)

    @staticmethod
    def replace(site: Site, value: torch.Tensor, rows: tuple[int, ...] | None = None) -> "Intervention":
        return Intervention(site, lambda a: value.to(a.device, a.dtype).expand_as(a), rows)

    @staticmethod
    def add(site: Site, value: torch.Tensor, rows: tuple[int, ...] | None = None) -> "Intervention":
        return Intervention(site, lambda a: a + value.to(a.device, a.dtype), rows)

    @staticmethod
    def zero(site: Site, rows: tuple[int, ...] | None = None) -> "Intervention":
        return Intervention(site, torch.zeros_like, rows)

    def apply(self, act: torch.Tensor) -> torch.Tensor:
        """`act` is the whole activation of the site's kind at this thought, [B, ...] (for `head`
        [B, n_heads, head_dim]: only head `site.head` is touched)."""
        h = self.site.head
        part = act[:, h] if h is not None else act
        if self.rows is None and self.from_rows is None:
            new = self.fn(part)
        else:
            new = part.clone()
            idx = torch.as_tensor(self.rows, device=act.device) if self.rows is not None else slice(None)
            if self.from_rows is not None:
                new[idx] = part[torch.as_tensor(self.from_rows, device=act.device)]
            else:
                new[idx] = self.fn(part[idx])
        if h is None:
            return new
        out = act.clone()
        out[:, h] = new
        return out


@dataclass(frozen=True)
class Block:
    """Attention knockout: in block `layer`, queries of `rows` (None = every row) may not attend
    to the key at cache position `position` (pre-softmax score −inf)."""

    layer: int
    position: int
    rows: tuple[int, ...] | None = None


@dataclass
class LatentState:
    """A run in progress: the KV cache, the next vector to feed, and what was recorded.

    `acts[kind]` holds one tensor per completed thought: input [B,H]; resid, attn, mlp [B,L,H];
    head [B,L,n_heads·head_dim]; kv [B,L,2,n_kv_heads,head_dim]; hidden (HF hidden states:
    0 = embedding output, L = final norm) [B,L+1,H]; logits [B,V] fp32 when recorded.
    `blocked` are knockouts the read-out positions (<readout> on) obey.

    Rows of several prompts share a batch with their prompts left-padded: every prompt then
    ends, and every thought sits, at the same cache position (`prompt_len` + k). `valid` says
    which cache positions each row reads (None: all of them); a row's position id is the
    number of positions it reads, so padding shifts no row's positions."""

    cache: Any
    next_input: torch.Tensor  # [B,H] the thought the next step feeds
    bot_hidden: torch.Tensor  # [B,H] final-norm state at the prompt's last token (<bot> / <|start-latent|>)
    prompt_ids: torch.Tensor  # [B,T]
    step: int = 0
    acts: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    blocked: list[Block] = field(default_factory=list)
    valid: torch.Tensor | None = None  # [B, cache length] bool, or None: every row reads every position

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def batch_size(self) -> int:
        return self.next_input.shape[0]

    def prompt_rows(self) -> list[list[int]]:
        """Each row's prompt ids without padding."""
        ids = self.prompt_ids.tolist()
        if self.valid is None:
            return ids
        keep = self.valid[:, : self.prompt_len].tolist()
        return [[t for t, k in zip(row, ks) if k] for row, ks in zip(ids, keep)]

    def stacked(self, kind: str) -> torch.Tensor:
        """[B, K, ...] over the thoughts run so far."""
        return torch.stack(self.acts[kind], 1)

    # the names the rest of the package reads most
    @property
    def inputs(self) -> list[torch.Tensor]:
        return self.acts.setdefault(INPUT, [])

    @property
    def hidden(self) -> list[torch.Tensor]:
        return self.acts.setdefault("hidden", [])

    @property
    def logits(self) -> list[torch.Tensor]:
        return self.acts.setdefault("logits", [])

    def latent_inputs(self) -> torch.Tensor:
        return self.stacked(INPUT)  # [B,K,H]

    def latent_resid(self) -> torch.Tensor:
        return self.stacked("resid")  # [B,K,L,H]

    def latent_hidden(self) -> torch.Tensor:
        return self.stacked("hidden")  # [B,K,L+1,H]

    def _with_rows(self, cache: Any, f: Callable[[torch.Tensor], torch.Tensor], acts: bool = True) -> "LatentState":
        """A copy with this cache and `f` applied to every per-row tensor (recorded
        activations left out unless `acts`)."""
        if self.blocked:
            raise ValueError("read-out knockouts name rows: set them after the batch is assembled")
        return replace(
            self,
            cache=cache,
            next_input=f(self.next_input),
            bot_hidden=f(self.bot_hidden),
            prompt_ids=f(self.prompt_ids),
            acts={k: [f(t) for t in v] for k, v in self.acts.items()} if acts else {},
            blocked=[],
            valid=None if self.valid is None else f(self.valid),
        )

    def fork(self, repeat: int = 1) -> "LatentState":
        """An independent copy (own cache), each row repeated `repeat` times along the batch."""
        cache = copy.deepcopy(self.cache)
        if repeat == 1:
            return self._with_rows(cache, lambda t: t)
        cache.batch_repeat_interleave(repeat)
        return self._with_rows(cache, lambda t: t.repeat_interleave(repeat, 0))

    def take(self, rows: list[int], acts: bool = True) -> "LatentState":
        """A copy holding `rows` of this batch (indices may repeat), with or without the
        recorded activations."""
        from thoughtpatch.model.kvcache import take_rows

        idx = torch.as_tensor(rows, dtype=torch.long, device=self.next_input.device)
        return self._with_rows(take_rows(self.cache, idx), lambda t: t[idx], acts)

    def join(self, rows: int | list[int], count: int = 1, room: int = 0) -> "LatentState":
        """This batch with a copy of each of `rows` appended (an int: `count` copies of that row).
        The state is consumed: its cache grows in place, keeping room for `room` more rows so
        later joins copy only theirs."""
        from thoughtpatch.model.kvcache import append_rows, with_copies

        src = torch.as_tensor([rows] * count if isinstance(rows, int) else list(rows), dtype=torch.long, device=self.next_input.device)
        return self._with_rows(append_rows(self.cache, src, room), lambda t: with_copies(t, src))


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    text: str  # the generated text (special tokens skipped)
    answer: str  # the answer as the family's own eval reads it
    number: float  # the answer as a number (CODI: +inf when none; Coconut: NaN when not a number)
    key: float | str  # what the family's eval compares: CODI the number, Coconut the string

    def same(self, other: "Generation") -> bool:
        return self.key == other.key


def extract_number(text: str) -> float:
    """CODI's answer extraction (test.py): drop commas, take the last number; none → inf."""
    s = last_number(text)
    return float(s) if s else float("inf")


@contextlib.contextmanager
def _gqa_despite_mask(device: torch.device):
    """Several tokens on top of a cache need a mask, and with a mask transformers repeats
    every K/V head per query head (a copy of the whole cache per layer) because CUDA kernels
    would fall back to slow math. torch's CPU kernel takes grouped K/V with a mask directly,
    bit for bit the same; recent transformers (5.24) reads this switch at each call, older
    versions (4.x) ignore it and repeat the heads as before."""
    key = "TRANSFORMERS_SDPA_FORCE_GQA"
    if device.type != "cpu" or key in os.environ:
        yield
        return
    os.environ[key] = "1"
    try:
        yield
    finally:
        del os.environ[key]


def logsumexp64(logits: torch.Tensor, block: int = 16) -> torch.Tensor:
    """Float64 log-sum-exp of each row, in blocks of rows that stay in cache: one float64 copy
    of a whole read-out chunk is bound by memory traffic (same values, several times slower:
    bench/readout_head.py)."""
    return torch.cat([g.double().logsumexp(-1) for g in logits.split(block)])


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(-1)` (the first maximum of each row): the index half of `max`, which torch's
    CPU kernel finds about three times faster over a vocabulary."""
    return x.max(-1).indices


def sliced_linear(lm: nn.Linear, h: torch.Tensor, width: int) -> torch.Tensor:
    """`lm(h)` computed `width` output columns at a time (see `ThoughtModel.HEAD_SLICE`)."""
    w, b = lm.weight, lm.bias
    return torch.cat([nn.functional.linear(h, w[s : s + width], None if b is None else b[s : s + width]) for s in range(0, lm.out_features, width)], -1)


def _as_cache(cache: Any) -> Any:
    """transformers 4.x GPT-2 hands back the legacy tuple of (K, V) when it was given no cache
    object; every later step needs the object (and then keeps it)."""
    if isinstance(cache, tuple):
        from transformers import DynamicCache

        return DynamicCache.from_legacy_cache(cache)
    return cache


def _tensor_of(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_tensor(output: Any, t: torch.Tensor) -> Any:
    return (t, *output[1:]) if isinstance(output, tuple) else t


def _patched_last(h: torch.Tensor, ivs: list[Intervention], shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """`h` [B,T,D] with the interventions applied to its last position (viewed as `shape`)."""
    last = h[:, -1]
    view = last.reshape(last.shape[0], *shape) if shape else last
    for iv in ivs:
        view = iv.apply(view)
    last = view.reshape(last.shape)
    return torch.cat([h[:, :-1], last[:, None]], 1) if h.shape[1] > 1 else last[:, None]


def _blocks_for(blocks: list[Block], rows: torch.Tensor) -> list[Block]:
    """Knockouts of a batch, for the batch made of its rows `rows` (renumbered)."""
    at = {r: i for i, r in enumerate(rows.tolist())}
    out = []
    for blk in blocks:
        if blk.rows is None:
            out.append(blk)
        elif mine := tuple(at[r] for r in blk.rows if r in at):
            out.append(Block(blk.layer, blk.position, mine))
    return out


def _rows_of(state: "LatentState", rows: torch.Tensor) -> "LatentState":
    """`state.take(rows)` without recorded activations, its read-out knockouts kept for those
    rows (`take` refuses states that hold any: they name rows); `state` is left as it was."""
    blocked, state.blocked = state.blocked, []
    try:
        sub = state.take(rows.tolist(), acts=False)
    finally:
        state.blocked = blocked
    sub.blocked = _blocks_for(blocked, rows)
    return sub


@dataclass
class Scored:
    """A read-out of a batch (`ThoughtModel.read`)."""

    decision_logits: torch.Tensor  # [B,V] fp32 at the decision position
    logprob: torch.Tensor  # [B,2] float64: log P(clean), log P(corrupted) from the decision position on
    generations: list[Generation]


@dataclass
class _Grow:
    """Rows that join a step part-way: block i computes the first `active[i]` rows of the
    batch; a row past them holds its `source` row's values there (its own K/V included)."""

    active: list[int]
    source: torch.Tensor  # [B] a row's source row (itself for rows computed from the first block)

    def rows(self, n: int, have: int) -> torch.Tensor:
        """Indices taking a per-row tensor of `have` rows to the batch's first `n` rows."""
        r = torch.arange(n, device=self.source.device)
        return torch.where(r < have, r, self.source[:n])

    def fit(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """A per-row model input (mask, positions) for n rows; one row broadcasts (every
        row then reads and sits as the first)."""
        return t if t.shape[0] in (1, n) else t[self.rows(n, min(t.shape[0], n))]

    def full(self, t: torch.Tensor) -> torch.Tensor:
        """A per-row output of the rows that computed it, for the whole batch."""
        n = len(self.source)
        return t if t.shape[0] == n else t[self.rows(n, t.shape[0])]


@dataclass
class _Step:
    """What the hooks do during one latent step."""

    patches: dict[tuple[str, int], list[Intervention]]
    record: dict[str, list[torch.Tensor]]


class ThoughtModel:
    """A loaded continuous-thought model: LM (LoRA unmerged), the thought map (CODI's prj or
    none), marker ids, tokenizer, K — and the hook points of its architecture."""

    def __init__(
        self, *, net, hf, prj, tokenizer, arch: Arch, family: Family, base_vocab: int, num_thoughts: int,
        answer_template: str, max_new_tokens: int, source: dict,
    ):
        self.net = net  # what forward runs (peft wrapper or the plain LM)
        self.hf = hf  # the underlying HF causal LM
        self.prj = prj  # CODI's projection; None for Coconut (thoughts fed raw)
        self.tokenizer = tokenizer
        self.arch = arch
        self.family = family
        self.base_vocab = base_vocab
        self.vocab_size = base_vocab + 3
        if family.name == "codi":
            self.pad_id, self.open_id, self.readout_id = base_vocab, base_vocab + 1, base_vocab + 2
            self.markers = {self.pad_id: "<pad>", self.open_id: "<bot>", self.readout_id: "<eot>"}
            self.argmax_ids = self.vocab_size - 1  # every id but <eot> (the last)
        else:
            self.open_id, self.readout_id, self.latent_id = base_vocab, base_vocab + 1, base_vocab + 2
            self.markers = {self.open_id: "<|start-latent|>", self.readout_id: "<|end-latent|>", self.latent_id: "<|latent|>"}
            self.argmax_ids = self.vocab_size  # every id
        self.num_thoughts = num_thoughts
        self.answer_template = answer_template
        self.max_new_tokens = max_new_tokens
        self.source = source
        self.eos_ids: tuple[int, ...] = (tokenizer.eos_token_id,)  # both families stop on the tokenizer's eos only
        self.blocks: nn.ModuleList = submodule(hf, arch.blocks)
        self.num_layers = len(self.blocks)
        cfg = hf.config
        self.hidden_size = hf.get_input_embeddings().weight.shape[1]
        self.num_heads = int(getattr(cfg, "num_attention_heads", None) or cfg.n_head)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or self.hidden_size // self.num_heads)
        self.max_positions = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 0) or 0) or None
        # transformers 5 renamed `past_key_values` to `cache`; speak whichever this one knows.
        self._cache_kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
        # The decoder without its LM head (LoRA layers sit inside it): thoughts need no logits.
        self.body = hf.base_model
        self._body_cache_kw = "cache" if "cache" in inspect.signature(self.body.forward).parameters else "past_key_values"
        # Hook state: `_step` only while a latent step runs; `_blocks` while knockouts apply.
        self._step: _Step | None = None
        self._blocks: dict[int, list[Block]] = {}
        self._past = 0
        self._grow: _Grow | None = None
        self._screen: ArgmaxScreen | None = None  # built at the first screened decode
        for i, block in enumerate(self.blocks):
            block.register_forward_pre_hook(self._grow_hook(i), with_kwargs=True)
            block.register_forward_hook(self._output_hook("resid", i))
            attn = submodule(block, arch.attn)
            attn.register_forward_hook(self._output_hook("attn", i))
            attn.register_forward_pre_hook(self._mask_hook(i), with_kwargs=True)
            submodule(block, arch.mlp).register_forward_hook(self._output_hook("mlp", i))
            submodule(block, arch.out_proj).register_forward_pre_hook(self._heads_hook(i))

    def __repr__(self) -> str:
        name = self.source.get("name") or os.path.basename(str(self.source.get("checkpoint", "?")).rstrip("/"))
        return (
            f"ThoughtModel({name!r}, family={self.family.name}, arch={self.arch.name}, K={self.num_thoughts}, "
            f"L={self.num_layers}, H={self.hidden_size}, heads={self.num_heads}/{self.num_kv_heads}, "
            f"dtype={str(self.dtype).removeprefix('torch.')}, device={self.device})"
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.hf.get_input_embeddings().weight.device

    # ---------------------------------------------------------------- hooks

    def _output_hook(self, kind: str, layer: int):
        def hook(_module, _inputs, output):
            step = self._step
            if step is None:
                return None
            ivs = step.patches.get((kind, layer))
            if ivs:
                output = _with_tensor(output, _patched_last(_tensor_of(output), ivs))
            rec = step.record.get(kind)
            if rec is not None:
                rec.append(_tensor_of(output)[:, -1])
            return output

        return hook

    def _heads_hook(self, layer: int):
        """Pre-hook on the attention output projection: its input is the heads' outputs side by side."""

        def hook(_module, args):
            step = self._step
            if step is None:
                return None
            x = args[0]
            ivs = step.patches.get(("head", layer))
            if ivs:
                x = _patched_last(x, ivs, (self.num_heads, self.head_dim))
                args = (x, *args[1:])
            rec = step.record.get("head")
            if rec is not None:
                rec.append(x[:, -1])
            return args if ivs else None

        return hook

    def _grow_hook(self, layer: int):
        """Pre-hook on block `layer`: rows that start computing at this block join the batch
        as copies of their source rows' states here (see `think`'s `enter`)."""

        def hook(_module, args, kwargs):
            grow = self._grow
            if grow is None:
                return None
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cur, want = h.shape[0], grow.active[layer]
            if want > cur:
                h = torch.cat([h, h[grow.source[cur:want]]])
                if "hidden_states" in kwargs:
                    kwargs["hidden_states"] = h
                else:
                    args = (h, *args[1:])
            for name in ("position_embeddings", "position_ids"):
                v = kwargs.get(name)
                if isinstance(v, tuple):
                    kwargs[name] = tuple(grow.fit(t, want) for t in v)
                elif isinstance(v, torch.Tensor):
                    kwargs[name] = grow.fit(v, want)
            return args, kwargs

        return hook

    def _mask_hook(self, layer: int):
        """Pre-hook on block `layer`'s attention: knockouts become False entries of a boolean
        attention mask for this block alone (keys before this forward: `_past`)."""

        def hook(_module, args, kwargs):
            blocks = self._blocks.get(layer)
            grow = self._grow
            if not blocks and grow is None:
                return None
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            b, q = h.shape[:2]
            am = kwargs.get("attention_mask")
            if grow is not None and isinstance(am, torch.Tensor) and am.dim() == 4:
                am = kwargs["attention_mask"] = grow.fit(am, b)  # the rows this block computes (a joining row reads what its source reads)
            if not blocks:
                return args, kwargs
            kv = self._past + q
            if am is None:  # causal over [past + q] keys
                qpos = torch.arange(self._past, kv, device=h.device)
                allowed = (torch.arange(kv, device=h.device)[None, :] <= qpos[:, None])[None, None]
            elif am.dtype == torch.bool:
                allowed = am[..., :kv]
            else:  # additive: 0 where a key may be read
                allowed = am[..., :kv] == 0
            allowed = allowed.expand(b, 1, q, kv).clone()
            for blk in blocks:
                rows = slice(None) if blk.rows is None else torch.as_tensor(blk.rows, device=h.device)
                allowed[rows, :, :, blk.position] = False
            kwargs["attention_mask"] = allowed
            return args, kwargs

        return hook

    @contextlib.contextmanager
    def _blocking(self, blocks: list[Block] | tuple[Block, ...], past: int):
        by_layer: dict[int, list[Block]] = {}
        for b in blocks:
            by_layer.setdefault(b.layer, []).append(b)
        self._blocks, self._past = by_layer, past
        try:
            yield
        finally:
            self._blocks, self._past = {}, 0

    # ---------------------------------------------------------------- prompt

    def prompt_ids(self, question: str) -> list[int]:
        """The family's prompt: CODI `[BOS?] question.strip() <bot>`; Coconut
        `encode(question + "\\n") <|start-latent|>` (the latent and end markers are fed later)."""
        return list(self.tokenizer(self.family.question_text(question))["input_ids"]) + [self.open_id]

    def layout_ids(self, prompt: list[int], k: int | None = None) -> list[int]:
        """The whole prompt as the family's code builds it: CODI's ids end at <bot> (thoughts
        are fed after it); Coconut's hold K <|latent|> placeholders and <|end-latent|>."""
        k = self.num_thoughts if k is None else k
        return list(prompt) if self.family.name == "codi" else [*prompt, *[self.latent_id] * k, self.readout_id]

    def check_length(self, prompt_len: int, answer_len: int, what: str = "prompt") -> None:
        """A run needs prompt + K thoughts + <readout> + the answer within the model's positions."""
        need = prompt_len + self.num_thoughts + 1 + answer_len
        if self.max_positions and need > self.max_positions:
            raise ThoughtpatchError(
                f"{what}: {prompt_len} prompt tokens + {self.num_thoughts} thoughts + {answer_len + 1} answer positions = {need} "
                f"exceed the model's {self.max_positions} positions"
            )

    def _forward(self, cache=None, **kw):
        if cache is not None:
            kw[self._cache_kw] = cache
        out = self.net(use_cache=True, **kw)
        new_cache = out.get("cache") if "cache" in out else out.past_key_values
        return out, _as_cache(new_cache)

    def _body_forward(self, cache, **kw):
        """The decoder stack only: (final-norm hidden states [B,T,H], all hidden states, cache)."""
        kw[self._body_cache_kw] = cache
        out = self.body(use_cache=True, **kw)
        new_cache = out.get("cache") if "cache" in out else out.past_key_values
        return out.last_hidden_state, out.hidden_states, _as_cache(new_cache)

    def _feed(
        self, state: LatentState, embeds: torch.Tensor, blocked=(), attend: torch.Tensor | None = None,
        positions: torch.Tensor | None = None, hidden: bool = False,
    ):
        """Feed `embeds` [B,q,H] on top of `state`, extending its cache (and `valid`); returns
        (final-norm states [B,q,H], all hidden states or None). `attend` [B,q,q] says which
        of the new tokens each new token reads (default: causal). Where rows skip cache
        positions or `attend` is given, the mask and the position ids are explicit (a 4-D
        boolean mask, which transformers passes to attention as it is); otherwise the model
        builds them as it always does."""
        b, q = embeds.shape[:2]  # b < batch size: the first b rows (see `think`'s `enter`)
        rows = state.batch_size
        past = state.cache.get_seq_length()
        kw: dict[str, Any] = {"inputs_embeds": embeds}
        if hidden:
            kw["output_hidden_states"] = True
        if state.valid is not None or attend is not None:
            dev = embeds.device
            old = state.valid if state.valid is not None else torch.ones(rows, past, dtype=torch.bool, device=dev)
            if attend is None:
                attend = torch.ones(q, q, dtype=torch.bool, device=dev).tril().expand(rows, q, q)
            kw["attention_mask"] = torch.cat([old[:, None, :].expand(rows, q, past), attend], -1)[:, None]
            if positions is None:
                positions = old[:b].sum(-1, keepdim=True) + torch.arange(q, device=dev)
            kw["position_ids"] = positions
        with _gqa_despite_mask(self.device), self._blocking(blocked, past):
            last, hidden_states, state.cache = self._body_forward(state.cache, **kw)
        if state.valid is not None:
            state.valid = torch.cat([state.valid, state.valid.new_ones(rows, q)], 1)
        return last, hidden_states

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.hf.get_output_embeddings()(h)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf.get_input_embeddings()(ids)

    def thought_from(self, h: torch.Tensor) -> torch.Tensor:
        """The next thought from a final-norm state: CODI prj(h), Coconut h as is."""
        return self.prj(h) if self.prj is not None else h

    def _pad_id(self) -> int:
        return self.pad_id if self.family.name == "codi" else self.eos_ids[0]

    @torch.inference_mode()
    def encode(
        self, input_ids: torch.Tensor | list[int] | list[list[int]], record: bool = False,
        embed_noise: torch.Tensor | list[torch.Tensor | None] | None = None,
    ) -> LatentState:
        """The prompt pass for one prompt or a batch. Prompts of different lengths are
        left-padded (pads read only themselves and no real token reads them; position ids
        count real tokens only). `embed_noise` ([B or 1,T,H], or one [T_b,H] or None per
        prompt) is added to the token embeddings (causal tracing's corrupted run)."""
        if isinstance(input_ids, torch.Tensor):
            rows = input_ids.tolist() if input_ids.dim() == 2 else [input_ids.tolist()]
        else:
            rows = [list(r) for r in input_ids] if input_ids and not isinstance(input_ids[0], int) else [list(input_ids)]
        lens = [len(r) for r in rows]
        t = max(lens)
        dev = self.device
        ids = torch.tensor([[self._pad_id()] * (t - n) + r for n, r in zip(lens, rows)], device=dev)
        ragged = min(lens) != t
        if isinstance(embed_noise, list):
            if all(e is None for e in embed_noise):
                embed_noise = None
            else:
                embed_noise = torch.stack([
                    torch.cat([torch.zeros(t - n, self.hidden_size), e.float().cpu() if e is not None else torch.zeros(n, self.hidden_size)])
                    for n, e in zip(lens, embed_noise)
                ])
        emb = self.embed(ids)
        if embed_noise is not None:
            emb = emb + embed_noise.to(dev, self.dtype)
        kw: dict[str, Any] = {"inputs_embeds": emb}
        valid = None
        if ragged:
            valid = torch.tensor([[False] * (t - n) + [True] * n for n in lens], device=dev)
            causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
            kw["attention_mask"] = (causal & valid[:, None, :] | torch.eye(t, dtype=torch.bool, device=dev))[:, None]
            kw["position_ids"] = (valid.long().cumsum(-1) - 1).clamp_min(0)
        else:
            kw["attention_mask"] = torch.ones_like(ids)
        extra = {}
        if record:  # the whole LM: every position's logits and hidden states
            out, cache = self._forward(output_hidden_states=True, **kw)
            h = out.hidden_states[-1][:, -1]
            extra = {"prompt_hidden": torch.stack(out.hidden_states, 1), "prompt_logits": out.logits.float()}  # [B,L+1,T,H], [B,T,V]
        else:  # the decoder only: a thought needs no logits
            with _gqa_despite_mask(dev):
                last, _, cache = self._body_forward(None, **kw)
            h = last[:, -1]
        make_growing(cache)  # later steps append in place rather than re-copying the cache
        st = LatentState(cache=cache, next_input=self.thought_from(h), bot_hidden=h, prompt_ids=ids, valid=valid)
        for name, value in extra.items():
            setattr(st, name, value)
        return st

    # ---------------------------------------------------------------- latent loop

    @torch.inference_mode()
    def think(
        self,
        state: LatentState,
        interventions: list[Intervention] | tuple[Intervention, ...] = (),
        until: int | None = None,
        record_logits: bool = True,
        record: tuple[str, ...] = (INPUT, "resid", "hidden"),
        blocked: list[Block] | tuple[Block, ...] = (),
        enter: list[int] | None = None,
        source: list[int] | None = None,
    ) -> LatentState:
        """Run thoughts state.step … until-1 (default: all K), consuming `state`'s cache.
        `record` names what to keep per thought (any of RECORDABLE); `blocked` knockouts apply
        to every step run here.

        `enter`/`source`: rows that are copies of row source[r], changed at this step only
        from block enter[r] on (their patches and knockouts start there; L: only in what
        later positions read, e.g. a kv patch). At the first step they are not computed
        below that block: they join the batch there with their source's state, and take
        its keys and values below it. `enter` must not decrease along the batch, and rows
        that enter at block 0 are their own source."""
        grow = None
        if enter is not None and any(enter) and state.step < until:
            if list(enter) != sorted(enter) or len(enter) != state.batch_size or not _grows(state.cache):
                raise ValueError("think: enter needs one non-decreasing block index per row (and a growing cache)")
            src = torch.tensor([r if e == 0 else source[r] for r, e in enumerate(enter)], device=self.device)  # type: ignore[index]
            grow = _Grow([sum(1 for e in enter if e <= i) for i in range(self.num_layers)], src)
        until = self.num_thoughts if until is None else until
        by_thought: dict[int, list[Intervention]] = {}
        for iv in interventions:
            by_thought.setdefault(iv.site.thought, []).append(iv)
        st = state
        for k in range(st.step, until):
            ivs = by_thought.get(k, [])
            z = st.next_input
            patches: dict[tuple[str, int], list[Intervention]] = {}
            for iv in ivs:
                if iv.site.kind == INPUT:
                    z = iv.apply(z)
                else:
                    patches.setdefault((iv.site.kind, iv.site.layer), []).append(iv)  # type: ignore[arg-type]
            step = _Step(patches, {kind: [] for kind in HOOKED if kind in record})
            now = grow if k == state.step else None
            self._step, self._grow = step, now
            if now is not None:
                _set_grow(st.cache, now.source)
            try:
                last, hidden_states = self._feed(st, z[: now.active[0] if now else None, None], blocked, hidden="hidden" in record)
            finally:
                self._step, self._grow = None, None
                if now is not None:
                    _set_grow(st.cache, None)
            full = now.full if now is not None else (lambda t: t)
            kv_patches = {l: v for (kind, l), v in patches.items() if kind == "kv"}
            if kv_patches or "kv" in record:
                layers = cache_layers(st.cache)
                for l, lv in kv_patches.items():
                    keys, values = layers[l]
                    act = torch.stack([keys[:, :, -1], values[:, :, -1]], 1)  # [B,2,n_kv,hd]
                    for iv in lv:
                        act = iv.apply(act)
                    keys[:, :, -1], values[:, :, -1] = act[:, 0], act[:, 1]
                if "kv" in record:
                    st.acts.setdefault("kv", []).append(torch.stack([torch.stack([kk[:, :, -1], vv[:, :, -1]], 1) for kk, vv in layers], 1))
            h = full(last[:, -1])
            if INPUT in record:
                st.acts.setdefault(INPUT, []).append(z)
            for kind, rec in step.record.items():
                st.acts.setdefault(kind, []).append(torch.stack([full(t) for t in rec], 1))
            if "hidden" in record:
                st.acts.setdefault("hidden", []).append(torch.stack([full(t[:, -1]) for t in hidden_states], 1))
            if record_logits:
                st.acts.setdefault("logits", []).append(self.head(h).float())
            st.next_input = self.thought_from(h)
            st.step = k + 1
        return st

    # ---------------------------------------------------------------- read-outs

    @torch.inference_mode()
    def score(self, state: LatentState, continuation: list[int]) -> torch.Tensor:
        """Feed <readout> then teacher-force `continuation` (same for every row); fp32 logits
        [B, len+1, V]: row 0 predicts the first continuation token. The state is unchanged."""
        try:
            return self.teacher_force(state, [self.readout_id, *continuation], keep=len(continuation) + 1)
        finally:
            self.rewind(state)

    @torch.inference_mode()
    def teacher_force(self, state: LatentState, tokens: list[int], keep: int) -> torch.Tensor:
        """Feed `tokens` (same for every row) on top of `state` and return fp32 logits of the
        last `keep` positions [B, keep, V]. The state is extended: crop it with `rewind`."""
        ids = torch.tensor(tokens, device=self.device).expand(state.batch_size, -1)
        last, _ = self._feed(state, self.embed(ids), state.blocked)
        return self.head(last[:, last.shape[1] - keep :]).float() if keep else last.new_zeros(0)

    def rewind(self, state: LatentState, extra: int = 0) -> None:
        """Drop every cached position after the last thought (+ `extra` kept); a negative crop
        works in transformers 4.x and 5.x."""
        keep = state.prompt_len + state.step + extra
        over = state.cache.get_seq_length() - keep
        if over > 0:
            state.cache.crop(-over)
        if state.valid is not None:
            state.valid = state.valid[:, :keep]

    def _ends(self, ids: torch.Tensor, index: torch.Tensor | int, n_max: torch.Tensor, stop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's stop rule for greedy ids at answer index `index` (0 = the token after
        <readout>): (the row ends here, the id is kept). CODI keeps every id and ends after a
        stop id; Coconut always keeps the first id and ends at a later stop id, unkept. Either
        ends after `n_max` ids."""
        hit = (ids[..., None] == stop).any(-1)
        if self.family.name != "codi":
            hit = hit & (torch.as_tensor(index, device=ids.device) > 0)
            keep = ~hit
        else:
            keep = torch.ones_like(hit)
        return hit | (torch.as_tensor(index, device=ids.device) + 1 >= n_max), keep

    def _stop_tensor(self, b: int, stop_ids) -> torch.Tensor:
        """[B, s] stop ids per row (-1 pads a shorter list) from one tuple or one per row."""
        rows = [tuple(stop_ids or self.eos_ids)] * b if stop_ids is None or isinstance(stop_ids[0], int) else [tuple(s or self.eos_ids) for s in stop_ids]
        width = max(len(r) for r in rows)
        return torch.tensor([[*r, *[-1] * (width - len(r))] for r in rows], device=self.device)

    def _limits(self, b: int, max_new_tokens) -> torch.Tensor:
        if max_new_tokens is None or isinstance(max_new_tokens, int):
            max_new_tokens = [max_new_tokens] * b
        return torch.tensor([self.max_new_tokens if n is None else n for n in max_new_tokens], device=self.device)

    @torch.inference_mode()
    def generate(
        self, state: LatentState, max_new_tokens: int | None = None, stop_ids: tuple[int, ...] | None = None, keep_logits: bool = False
    ) -> tuple[list[Generation], torch.Tensor]:
        """The family's greedy decode after <readout>, one token at a time. Returns the
        generations and the logits at the <readout> position ([B,V], fp32) — or every decode
        step's logits [B,n,V] with keep_logits. CODI: argmax over every id but <eot>, each id
        appended, then a stop id ends the row. Coconut: argmax over every id, the first id
        always appended, a later stop id ends the row unappended. Finished rows keep being
        fed; their ids are not kept. (`read` gives the same ids with less work.)"""
        n_max = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        b = state.batch_size
        limit = self._limits(b, n_max)
        stop = self._stop_tensor(b, stop_ids)[:, None, :]
        ids = torch.full((b, 1), self.readout_id, device=self.device)
        alive = torch.ones(b, dtype=torch.bool, device=self.device)
        cols: list[torch.Tensor] = []  # per step: the id appended, or -1
        steps: list[torch.Tensor] = []
        try:
            for t in range(n_max):
                last, _ = self._feed(state, self.embed(ids), state.blocked)
                logits = self.head(last[:, -1])
                if keep_logits or not steps:
                    steps.append(logits.float())
                nxt = logits[:, : self.argmax_ids].argmax(-1)  # ties → lowest id
                ends, kept = self._ends(nxt[:, None], t, limit[:, None], stop)
                cols.append(torch.where(alive & kept[:, 0], nxt, -1))
                alive = alive & ~ends[:, 0]
                if not bool(alive.any()):
                    break
                ids = nxt[:, None]
        finally:
            self.rewind(state)
        rows = torch.stack(cols, 1).tolist() if cols else [[] for _ in range(b)]
        gens = [self.generation(p, [t for t in r if t >= 0], state.step) for p, r in zip(state.prompt_rows(), rows)]
        return gens, (torch.stack(steps, 1) if keep_logits else steps[0])

    @torch.inference_mode()
    def read(
        self, state: LatentState, clean: list[list[int]], corrupted: list[list[int]], decision: list[int],
        max_new_tokens: int | list[int | None] | None = None, stop_ids=None, check_every: int = 4,
        drafts: list[list[list[int]] | tuple[tuple[int, ...], ...] | None] | None = None,
    ) -> Scored:
        """Read out every row against its own two continuations (`clean`, `corrupted`, equal
        before `decision`): the logits at the decision position, each continuation's log-prob
        from the decision position on, and the family's greedy answer — the ids `generate`
        gives, found with less work.

        One forward feeds a token tree per row: <readout> and the clean continuation, and the
        corrupted tail branching off after the shared part (it reads <readout> and the shared
        tokens, never the clean tail). Greedy decoding starts by verification: as long as the
        argmax at a position is the next token of a continuation, the greedy path *is* that
        continuation, already computed. Only rows whose path leaves both continuations before
        they stop are decoded further, from their first disagreement, all in one batch that
        drops finished rows as it goes; the device is asked whether any row is left only
        every `check_every` tokens. `drafts` (per row, optional): id sequences the greedy path is
        likely to follow where it leaves both continuations, e.g. the answers of the runs a
        patch mixes; a row on one of them verifies the rest of it in one forward instead of
        decoding it token by token (`_follow`). The state is left as it was."""
        b, dev = state.batch_size, self.device
        if not (len(clean) == len(corrupted) == len(decision) == b):
            raise ValueError(f"read: {b} rows but {len(clean)} clean, {len(corrupted)} corrupted, {len(decision)} decision entries")
        limit = self._limits(b, max_new_tokens)
        stop = self._stop_tensor(b, stop_ids)
        single = [tuple(c) == tuple(x) for c, x in zip(clean, corrupted)]
        tails = [[] if s else list(x[d:-1]) for s, x, d in zip(single, corrupted, decision)]
        na = torch.tensor([len(c) for c in clean], device=dev)
        nx = torch.tensor([len(x) for x in corrupted], device=dev)
        d = torch.tensor(decision, device=dev)
        big_a, big_t = int(na.max()), max(len(t) for t in tails)
        q = big_a + big_t
        pad = self.readout_id
        feed = torch.tensor([[self.readout_id, *c[:-1], *[pad] * (big_a - len(c)), *t, *[pad] * (big_t - len(t))] for c, t in zip(clean, tails)], device=dev)
        j = torch.arange(q, device=dev)
        in_a = j[None] < na[:, None]
        in_t = (j[None] >= big_a) & (j[None] < big_a + torch.tensor([len(t) for t in tails], device=dev)[:, None])
        real = in_a | in_t
        q_in_a = (j < big_a)[None, :, None]
        k_in_a = (j < big_a)[None, None, :]
        reads = torch.where(q_in_a, k_in_a, ~k_in_a | (j[None, None, :] <= d[:, None, None]))
        attend = (reads & (j[:, None] >= j[None, :]) & real[:, :, None] & real[:, None, :]) | torch.eye(q, dtype=torch.bool, device=dev)
        base = state.valid.sum(-1) if state.valid is not None else torch.full((b,), state.cache.get_seq_length(), device=dev)
        positions = base[:, None] + torch.where(j[None] < big_a, j[None], 1 + d[:, None] + j[None] - big_a)
        if self.max_positions:  # padding only: real positions fit (check_length)
            positions = positions.clamp_max(self.max_positions - 1)
        # the id each position is scored on: clean[j] in block 1, corrupted[d+1+i] in block 2
        want = torch.tensor([[*c, *[0] * (big_a - len(c)), *x[d_ + 1 : d_ + 1 + len(t)], *[0] * (big_t - len(t))] for c, x, d_, t in zip(clean, corrupted, decision, tails)], device=dev)
        first_x = torch.tensor([x[d_] for x, d_ in zip(corrupted, decision)], device=dev)
        valid = state.valid
        before = valid if valid is not None else torch.ones(b, state.cache.get_seq_length(), dtype=torch.bool, device=dev)
        draft = None  # [B, n drafts, longest] ids, -1 padded
        if drafts is not None and any(x for row in drafts for x in row or ()):
            if len(drafts) != b:
                raise ValueError(f"read: {b} rows but {len(drafts)} draft lists")
            n, w = max(len(row or ()) for row in drafts), max(len(x) for row in drafts for x in row or ())
            pad = lambda row: [[*x, *[-1] * (w - len(x))] for x in row or ()] + [[-1] * w] * (n - len(row or ()))  # noqa: E731
            draft = torch.tensor([pad(row) for row in drafts], device=dev)
        try:
            last, _ = self._feed(state, self.embed(feed), state.blocked, attend=attend, positions=positions)
            greedy, lp, lp_first_x, dec = self._score_tree(last, want, first_x, d, real, torch.tensor([c[0] for c in clean], device=dev))
            ids, todo, e, src, known = self._verify(greedy, clean, corrupted, single, na, nx, d, limit, stop, q)
            if len(todo):
                # the rest of the path: each row reads its prompt, thoughts, <readout> and the
                # continuation tokens it verified, and is fed its first unverified greedy id
                keep = torch.zeros(b, q + 1, dtype=torch.bool, device=dev)
                keep.scatter_(1, torch.where(known, src, q), True)
                keep = keep[:, :q]
                lead = int(e[todo].max()) + 1
                if bool((keep[todo] == (j[None] < lead)).all()):
                    # every row to decode reads the same first tree positions and no others (a
                    # row that leaves at once reads <readout> alone): the rest of the tree goes,
                    # and with it the mask decoding over it would need
                    self.rewind(state, extra=lead)
                    self._decode_rest(state, todo, state.valid, ids, e, limit, stop, check_every, draft)
                else:
                    self._decode_rest(state, todo, torch.cat([before, keep], 1), ids, e, limit, stop, check_every, draft)
        finally:
            self.rewind(state)
            state.valid = valid
        lp_a = torch.where(in_a & (j[None] >= d[:, None]), lp, 0).sum(-1)
        lp_x = torch.where(torch.tensor(single, device=dev), lp_a, lp_first_x + torch.where(in_t, lp, 0).sum(-1))

        cols = torch.arange(ids.shape[1], device=dev)[None]
        ends, kept = self._ends(ids, cols, limit[:, None], stop[:, None, :])
        ends = ends & (ids >= 0)
        any_end = ends.any(-1)
        first = torch.where(any_end, ends.long().argmax(-1), (ids >= 0).sum(-1))
        length = first + (any_end & kept.gather(1, first.clamp_max(ids.shape[1] - 1)[:, None])[:, 0]).long()
        length = torch.where(limit <= 0, 0, length)
        rows = [r[:n] for r, n in zip(ids.tolist(), length.tolist())]
        gens = [self.generation(p, r, state.step) for p, r in zip(state.prompt_rows(), rows)]
        return Scored(dec, torch.stack([lp_a, lp_x], 1), gens)

    def _verify(self, greedy, clean, corrupted, single, na, nx, d, limit, stop, q):
        """The longest continuation each row's greedy path follows. Returns ids [B,n] (the
        greedy ids known so far, -1 after), the rows still to decode, e (the last known
        index), the tree position of each path index, and which path indices are known."""
        b, dev = greedy.shape[0], greedy.device
        big_a = int(na.max())
        width = max(big_a, int(nx.max()))
        w = torch.arange(width, device=dev)
        src_a = w.expand(b, width).clamp_max(q - 1)
        src_x = torch.where(w[None] <= d[:, None], w[None], big_a + w[None] - d[:, None] - 1).clamp(0, q - 1)
        path_a = torch.tensor([[*c, *[-1] * (width - len(c))] for c in clean], device=dev)
        path_x = torch.tensor([[*x, *[-1] * (width - len(x))] for x in corrupted], device=dev)
        g_a, g_x = greedy.gather(1, src_a), greedy.gather(1, src_x)
        m_a = ((g_a == path_a) & (w[None] < na[:, None])).long().cumprod(-1).sum(-1)
        m_x = ((g_x == path_x) & (w[None] < nx[:, None])).long().cumprod(-1).sum(-1)
        m_x = torch.where(torch.tensor(single, device=dev), -1, m_x)
        use_x = m_x > m_a
        e = torch.minimum(torch.where(use_x, m_x, m_a), torch.where(use_x, nx, na) - 1)  # ids 0…e are greedy ids known here
        known = w[None] <= e[:, None]
        ids = torch.full((b, max(int(limit.max()), width)), -1, dtype=torch.long, device=dev)
        ids[:, :width] = torch.where(known, torch.where(use_x[:, None], g_x, g_a), -1)
        ends, _ = self._ends(ids[:, :width], w[None], limit[:, None], stop[:, None, :])
        done = (ends & known).any(-1) | (limit <= 0)
        return ids, (~done).nonzero()[:, 0], e, torch.where(use_x[:, None], src_x, src_a), known

    HEAD_CHUNK = 1 << 24  # logits elements computed at once in a read-out (bounds its memory)
    # On CPU the read-out's LM head runs in slices of the vocabulary: a GEMM whose output width
    # is not a multiple of the BLAS's block (32,003; 128,259) can run up to ~30 % slower than
    # slices of 8,192 columns, never faster (bench/readout_head.py). Each logit is the same
    # row-times-row dot product.
    HEAD_SLICE = 8192

    def _read_head(self, h: torch.Tensor) -> torch.Tensor:
        """`head` for the batched read-out (`read`); the plain read-out keeps `head` itself."""
        lm = self.hf.get_output_embeddings()
        if h.device.type != "cpu" or not isinstance(lm, nn.Linear) or lm.out_features <= self.HEAD_SLICE:
            return lm(h)
        return sliced_linear(lm, h, self.HEAD_SLICE)

    # On a CPU with bf16 matrix units the read-out's greedy ids come from a bf16 screen of the
    # head that keeps only the ids that can win and recomputes those in fp32: the fp32 head's
    # argmax, exactly, at a third to two fifths of its cost (bench/readout_head.py: 2.5-3.0x
    # for 32k ids, 3.4x for 128k). Off for small vocabularies, where the head is cheap. The
    # bf16 copy of the head it keeps costs half the head's fp32 memory.
    SCREEN = fast_bf16()
    SCREEN_MIN_VOCAB = 4096

    def _greedy(self, h: torch.Tensor) -> torch.Tensor:
        """Greedy ids [N] of final-norm states h [N, H] (ties → lowest id): the batched read-out's
        `head(h)[:, :argmax_ids].argmax(-1)`."""
        lm = self.hf.get_output_embeddings()
        screen = (
            self.SCREEN and h.device.type == "cpu" and h.dtype == torch.float32 and isinstance(lm, nn.Linear)
            and lm.bias is None and self.argmax_ids >= self.SCREEN_MIN_VOCAB
        )
        if not screen:
            return first_argmax(self._read_head(h)[:, : self.argmax_ids])
        if self._screen is None or not self._screen.current(lm.weight, self.argmax_ids):
            self._screen = ArgmaxScreen(lm.weight, self.argmax_ids)
        return self._screen(h)

    def _score_tree(self, last: torch.Tensor, want: torch.Tensor, first_x: torch.Tensor, d: torch.Tensor, real: torch.Tensor, clean0: torch.Tensor):
        """The LM head over the read-out tree, only where it is read: greedy ids [B,q] (-1
        where not needed), log-probs (float64, of fp32 logits) of `want` [B,q] from the
        decision position on, of `first_x` at it [B], and its fp32 logits [B,V]. Positions
        between <readout> and the decision (the answer template) are needed only to verify
        rows whose greedy path starts on the clean continuation."""
        b, q = want.shape
        dev = last.device
        j = torch.arange(q, device=dev)
        greedy = torch.full((b, q), -1, dtype=torch.long, device=dev)
        lp = torch.zeros(b, q, dtype=torch.float64, device=dev)
        lp_first = torch.zeros(b, dtype=torch.float64, device=dev)
        dec = torch.zeros(b, self.vocab_size, dtype=torch.float32, device=dev)
        scored = real & (j[None] >= d[:, None])
        rows, cols = (scored | (j[None] == 0)).nonzero(as_tuple=True)
        self._heads(last, rows, cols, scored[rows, cols], want, first_x, d, greedy, lp, lp_first, dec)
        template = (greedy[:, :1] == clean0[:, None]) & (j[None] >= 1) & (j[None] < d[:, None])
        rows, cols = template.nonzero(as_tuple=True)
        if len(rows):
            self._heads(last, rows, cols, torch.zeros_like(rows, dtype=torch.bool), want, first_x, d, greedy, lp, lp_first, dec)
        return greedy, lp, lp_first, dec

    def _heads(self, last, rows, cols, scored, want, first_x, d, greedy, lp, lp_first, dec) -> None:
        """LM head at positions (rows, cols) of `last`, in chunks; fills the outputs of `_score_tree`."""
        step = max(1, self.HEAD_CHUNK // self.vocab_size)
        for s in range(0, len(rows), step):
            r, c, sc = rows[s : s + step], cols[s : s + step], scored[s : s + step]
            if not bool(sc.all()):  # positions read only for their greedy id
                greedy[r[~sc], c[~sc]] = self._greedy(last[r[~sc], c[~sc]])
            if not bool(sc.any()):
                continue
            r, c = r[sc], c[sc]
            f = self._read_head(last[r, c]).float()
            greedy[r, c] = first_argmax(f[:, : self.argmax_ids])  # ties → lowest id, as `generate`
            lse = logsumexp64(f)
            lp[r, c] = f.gather(-1, want[r, c][:, None])[:, 0].double() - lse
            at = c == d[r]
            dec[r[at]] = f[at]
            lp_first[r[at]] = f[at].gather(-1, first_x[r[at]][:, None])[:, 0].double() - lse[at]

    def _decode_rest(
        self, state: LatentState, todo: torch.Tensor, valid: torch.Tensor | None, ids: torch.Tensor, e: torch.Tensor,
        limit: torch.Tensor, stop: torch.Tensor, check_every: int, draft: torch.Tensor | None = None,
    ) -> None:
        """Greedy decoding of rows `todo` on from their first unverified id (ids[r, e[r]]),
        reading the cache positions `valid` [B, S] (None: all of them); fills `ids` [B, n] in
        place. Rows whose path so far is one of their drafts' [B, n, w] (-1 padded) start with `_follow`."""
        if len(todo) == state.batch_size:  # every row: decode on the state itself (the caller rewinds it)
            sub = state
            sub.valid = valid
        else:
            sub = _rows_of(state, todo)
            sub.valid = None if valid is None else valid[todo]
        rows = todo  # batch row of `sub` → row of `ids`
        stop = stop[rows][:, None, :]
        idx = e[rows] + 1  # the answer index the next argmax is
        tok = ids[rows, e[rows]]
        lim = limit[rows]
        alive = idx < lim
        if draft is not None:
            tok, idx, alive = self._follow(sub, rows, draft[rows], ids, tok, idx, lim, alive, stop)
        s, steps = 0, 0  # steps: set at each check, the first before any step
        while True:
            if s % check_every == 0:  # before the first step too: `_follow` may have finished most rows
                n_alive = int(alive.sum())
                if n_alive == 0:
                    break
                if n_alive <= len(rows) // 2:  # drop finished rows: later steps cost what is left
                    keep = alive.nonzero()[:, 0]
                    sub = _rows_of(sub, keep)
                    rows, stop, idx, tok, lim, alive = rows[keep], stop[keep], idx[keep], tok[keep], lim[keep], alive[keep]
                loops = self._loops(ids, rows, idx, lim, alive)
                if loops is not None:
                    tok, idx, alive = self._follow(sub, rows, loops, ids, tok, idx, lim, alive, stop)
                steps = s + int(torch.where(alive, lim - idx, 0).max())  # the rows still decoding bound the steps
            if s >= steps:
                break
            last, _ = self._feed(sub, self.embed(tok[:, None]), sub.blocked)
            nxt = self._greedy(last[:, -1])
            ids[rows, idx.clamp_max(ids.shape[1] - 1)] = torch.where(alive, nxt, ids[rows, idx.clamp_max(ids.shape[1] - 1)])
            ends, _ = self._ends(nxt[:, None], idx[:, None], lim[:, None], stop)
            alive = alive & ~ends[:, 0]
            tok, idx, s = nxt, idx + 1, s + 1

    LOOP_PERIODS = 4  # a path ending in two equal cycles of up to this many ids is drafted to go on
    LOOP_DRAFT = 32  # ids drafted per loop

    def _loops(self, ids: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, lim: torch.Tensor, alive: torch.Tensor) -> torch.Tensor | None:
        """Drafts [b, 1, w] for rows whose path (ids 0…idx-1) ends in the same cycle twice
        (a degenerate loop, as patched runs and random weights produce): the path, then the
        cycle repeated; -1 for other rows. None when no row loops."""
        b, n, dev = len(rows), ids.shape[1], ids.device
        path = ids[rows]
        period = torch.zeros(b, dtype=torch.long, device=dev)
        for p in range(self.LOOP_PERIODS, 0, -1):  # the shortest period wins
            at = (idx[:, None] - p + torch.arange(p, device=dev)[None]).clamp(0, n - 1)
            cyc, prev = path.gather(1, at), path.gather(1, (at - p).clamp(0, n - 1))
            period = torch.where((idx >= 2 * p) & (cyc == prev).all(-1) & (cyc >= 0).all(-1), p, period)
        period = torch.where(alive & (idx < lim), period, 0)
        if not bool((period > 0).any()):
            return None
        length = idx + torch.clamp(lim - idx, max=self.LOOP_DRAFT)
        k = torch.arange(int(length.max()), device=dev)[None]
        cyc = period.clamp_min(1)[:, None]
        src = torch.where(k < idx[:, None], k, idx[:, None] - cyc + (k - idx[:, None]) % cyc)
        draft = path.gather(1, src.clamp(0, n - 1))
        return torch.where((period[:, None] > 0) & (k < length[:, None]), draft, -1)[:, None]

    def _follow(self, sub: LatentState, rows, draft, ids, tok, idx, lim, alive, stop):
        """One forward that feeds every row its next token (`tok`, answer index idx-1) and,
        where the row's path so far is one of its drafts [b, n, w], that draft's next ids: the
        greedy id at each fed position is computed, and a row keeps the positions whose input
        is the id its own path has there, until it stops. A row on no draft gets one ordinary
        decode step. Writes the ids found into `ids`, marks the cache positions a row does not
        keep as unread in `sub.valid`, and returns the next (tok, idx, alive)."""
        b, dev = len(rows), ids.device
        e = idx - 1  # the index `tok` has
        w = draft.shape[2]
        col = torch.arange(w, device=dev)
        known = ids[rows, : min(w, ids.shape[1])]
        # a draft fits a row when its path so far (indices 0…e) is the draft's start
        fits = ((known[:, None] == draft[:, :, : known.shape[1]]) | (col[: known.shape[1]] > e[:, None, None])).all(-1)
        fits &= e[:, None] < (draft >= 0).sum(-1)
        pick = fits.long().argmax(-1)  # the first draft that fits
        draft = draft[torch.arange(b, device=dev), pick]
        n_draft = (draft >= 0).sum(-1)
        on = alive & fits.any(-1)
        # positions 0..m_r-1: position j feeds index e+j and predicts index e+j+1 (< lim)
        m_r = torch.where(on, torch.minimum(n_draft - e, lim - e - 1), 1)
        m = int(m_r.max()) if b else 1
        if m <= 1 or 2 * int(on.sum()) < int(alive.sum()):  # every row is fed m positions: worth it when most follow
            return tok, idx, alive
        j = torch.arange(m, device=dev)
        real = j[None] < m_r[:, None]
        at = (e[:, None] + j[None]).clamp(0, w - 1)
        feed = torch.where(real & (j[None] > 0), draft.gather(1, at), tok[:, None])
        past = sub.cache.get_seq_length()
        last, _ = self._feed(sub, self.embed(feed), sub.blocked)
        g = self._greedy(last.reshape(b * m, -1)).view(b, m)
        index = e[:, None] + 1 + j[None]  # the answer index each prediction is
        ends, _ = self._ends(g, index, lim[:, None], stop)
        # position j >= 1 counts when the prediction before it is its input and did not end the row
        ok = real[:, 1:] & (g[:, :-1] == feed[:, 1:]) & ~ends[:, :-1]
        cnt = 1 + ok.long().cumprod(-1).sum(-1)  # positions kept, >= 1
        write = (j[None] < cnt[:, None]) & alive[:, None]
        r, c = write.nonzero(as_tuple=True)
        ids[rows[r], index[r, c].clamp_max(ids.shape[1] - 1)] = g[r, c]
        lastpos = (cnt - 1)[:, None]
        ended = ends.gather(1, lastpos)[:, 0]
        kept = j[None] < cnt[:, None]
        if not bool(kept.all()):
            if sub.valid is None:
                sub.valid = torch.ones(b, past + m, dtype=torch.bool, device=dev)
            sub.valid[:, past:] = kept
        return g.gather(1, lastpos)[:, 0], idx + cnt, alive & ~ended

    def generation(self, prompt_ids: list[int], token_ids: list[int], k: int | None = None) -> Generation:
        """Text and answer of generated ids, by the family's rule (Coconut reads the answer
        from the decoded prompt + generation, markers included)."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if self.family.name == "codi":
            answer, number = self.family.extract("", text)
            return Generation(list(token_ids), text, answer, number, number)
        full = self.tokenizer.decode([*self.layout_ids(prompt_ids, k), *token_ids], skip_special_tokens=True)
        answer, number = self.family.extract(full, "")
        return Generation(list(token_ids), text, answer, number, answer)

    def correct(self, gen: Generation, gold) -> bool:
        """The family's accuracy rule against a gold answer."""
        return self.family.correct(gen.answer, gen.number, gold)

    # ---------------------------------------------------------------- conveniences

    def answer_ids(self, answer: int | float | str) -> list[int]:
        """Token ids of the answer continuation (template filled, no special tokens)."""
        text = self.answer_template.format(answer=answer)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def site_value(self, acts: dict[str, torch.Tensor], site: Site) -> torch.Tensor:
        """A site's value from per-run activations `acts[kind]` ([K, ...] as a Readout holds them)."""
        a = acts[site.kind]
        if site.kind == INPUT:
            return a[site.thought]
        v = a[site.thought, site.layer]
        return v.reshape(self.num_heads, self.head_dim)[site.head] if site.kind == "head" else v

    def check_site(self, site: Site) -> None:
        if site.thought >= self.num_thoughts:
            raise ThoughtpatchError(f"{site}: thought {site.thought} out of range (K = {self.num_thoughts})")
        if site.layer is not None and site.layer >= self.num_layers:
            raise ThoughtpatchError(f"{site}: layer {site.layer} out of range (L = {self.num_layers})")
        if site.head is not None and site.head >= self.num_heads:
            raise ThoughtpatchError(f"{site}: head {site.head} out of range ({self.num_heads} heads)")

    def site_shape(self, kind: str) -> tuple[int, ...]:
        return {
            INPUT: (self.hidden_size,), "resid": (self.hidden_size,), "attn": (self.hidden_size,), "mlp": (self.hidden_size,),
            "head": (self.head_dim,), "kv": (2, self.num_kv_heads, self.head_dim),
        }[kind]

    def run(self, question: str, patches: dict | None = None, max_new_tokens: int | None = None):
        """One question through the loop (batch of 1) with optional patches {Site: tensor or
        callable(act) -> act}; returns a `Trace` (answer, text, ids, every site's values, lens)."""
        from thoughtpatch.model.trace import run_trace

        return run_trace(self, question, patches or {}, max_new_tokens)

