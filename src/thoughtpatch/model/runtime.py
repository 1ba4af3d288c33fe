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
from thoughtpatch.model.families import CODI, Arch, Family, last_number, submodule
from thoughtpatch.model.kvcache import cache_layers, make_growing

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
    `blocked` are knockouts the read-out positions (<readout> on) obey."""

    cache: Any
    next_input: torch.Tensor  # [B,H] the thought the next step feeds
    bot_hidden: torch.Tensor  # [B,H] final-norm state at the prompt's last token (<bot> / <|start-latent|>)
    prompt_ids: torch.Tensor  # [B,T]
    step: int = 0
    acts: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    blocked: list[Block] = field(default_factory=list)

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def batch_size(self) -> int:
        return self.next_input.shape[0]

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

    def _with_rows(self, cache: Any, f: Callable[[torch.Tensor], torch.Tensor]) -> "LatentState":
        """A copy with this cache and `f` applied to every per-row tensor."""
        if self.blocked:
            raise ValueError("read-out knockouts name rows: set them after the batch is assembled")
        return replace(
            self,
            cache=cache,
            next_input=f(self.next_input),
            bot_hidden=f(self.bot_hidden),
            prompt_ids=f(self.prompt_ids),
            acts={k: [f(t) for t in v] for k, v in self.acts.items()},
            blocked=[],
        )

    def fork(self, repeat: int = 1) -> "LatentState":
        """An independent copy (own cache), each row repeated `repeat` times along the batch."""
        cache = copy.deepcopy(self.cache)
        if repeat == 1:
            return self._with_rows(cache, lambda t: t)
        cache.batch_repeat_interleave(repeat)
        return self._with_rows(cache, lambda t: t.repeat_interleave(repeat, 0))

    def take(self, rows: list[int]) -> "LatentState":
        """A copy holding `rows` of this batch (indices may repeat)."""
        from thoughtpatch.model.kvcache import take_rows

        idx = torch.as_tensor(rows, device=self.next_input.device)
        return self._with_rows(take_rows(self.cache, idx), lambda t: t[idx])

    def join(self, row: int, count: int, room: int = 0) -> "LatentState":
        """This batch with `count` copies of `row` appended (the state is consumed: its cache
        grows in place, keeping room for `room` more rows so later joins copy only theirs)."""
        from thoughtpatch.model.kvcache import append_rows, with_copies

        return self._with_rows(append_rows(self.cache, row, count, room), lambda t: with_copies(t, row, count))


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
        for i, block in enumerate(self.blocks):
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

    def _mask_hook(self, layer: int):
        """Pre-hook on block `layer`'s attention: knockouts become False entries of a boolean
        attention mask for this block alone (keys before this forward: `_past`)."""

        def hook(_module, args, kwargs):
            blocks = self._blocks.get(layer)
            if not blocks:
                return None
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            b, q = h.shape[:2]
            kv = self._past + q
            am = kwargs.get("attention_mask")
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

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.hf.get_output_embeddings()(h)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf.get_input_embeddings()(ids)

    def thought_from(self, h: torch.Tensor) -> torch.Tensor:
        """The next thought from a final-norm state: CODI prj(h), Coconut h as is."""
        return self.prj(h) if self.prj is not None else h

    @torch.inference_mode()
    def encode(self, input_ids: torch.Tensor | list[int], record: bool = False, embed_noise: torch.Tensor | None = None) -> LatentState:
        """The prompt pass (batch of equal-length prompts, no padding). `embed_noise` [B or 1,T,H]
        is added to the token embeddings (causal tracing's corrupted run)."""
        ids = torch.as_tensor(input_ids, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        kw: dict[str, Any] = {"attention_mask": torch.ones_like(ids), "output_hidden_states": True}
        if embed_noise is None:
            kw["input_ids"] = ids
        else:
            kw["inputs_embeds"] = self.embed(ids) + embed_noise.to(self.device, self.dtype)
        out, cache = self._forward(**kw)
        make_growing(cache)  # later steps append in place rather than re-copying the cache
        h = out.hidden_states[-1][:, -1]
        st = LatentState(cache=cache, next_input=self.thought_from(h), bot_hidden=h, prompt_ids=ids)
        if record:
            st.prompt_hidden = torch.stack(out.hidden_states, 1)  # type: ignore[attr-defined]  [B,L+1,T,H]
            st.prompt_logits = out.logits.float()  # type: ignore[attr-defined]
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
    ) -> LatentState:
        """Run thoughts state.step … until-1 (default: all K), consuming `state`'s cache.
        `record` names what to keep per thought (any of RECORDABLE); `blocked` knockouts apply
        to every step run here."""
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
            self._step = step
            try:
                with self._blocking(blocked, st.cache.get_seq_length() if blocked else 0):
                    last, hidden_states, cache = self._body_forward(st.cache, inputs_embeds=z[:, None], output_hidden_states=True)
            finally:
                self._step = None
            kv_patches = {l: v for (kind, l), v in patches.items() if kind == "kv"}
            if kv_patches or "kv" in record:
                layers = cache_layers(cache)
                for l, lv in kv_patches.items():
                    keys, values = layers[l]
                    act = torch.stack([keys[:, :, -1], values[:, :, -1]], 1)  # [B,2,n_kv,hd]
                    for iv in lv:
                        act = iv.apply(act)
                    keys[:, :, -1], values[:, :, -1] = act[:, 0], act[:, 1]
                if "kv" in record:
                    st.acts.setdefault("kv", []).append(torch.stack([torch.stack([kk[:, :, -1], vv[:, :, -1]], 1) for kk, vv in layers], 1))
            h = last[:, -1]
            if INPUT in record:
                st.acts.setdefault(INPUT, []).append(z)
            for kind, rec in step.record.items():
                st.acts.setdefault(kind, []).append(torch.stack(rec, 1))
            if "hidden" in record:
                st.acts.setdefault("hidden", []).append(torch.stack([t[:, -1] for t in hidden_states], 1))
            if record_logits:
                st.acts.setdefault("logits", []).append(self.head(h).float())
            st.cache = cache
            st.next_input = self.thought_from(h)
            st.step = k + 1
        return st

    # ---------------------------------------------------------------- read-outs

    @torch.inference_mode()
    def score(self, state: LatentState, continuation: list[int]) -> torch.Tensor:
        """Feed <readout> then teacher-force `continuation` (same for every row); fp32 logits
        [B, len+1, V]: row 0 predicts the first continuation token. The state is unchanged."""
        b = state.batch_size
        ids = torch.tensor([self.readout_id, *continuation], device=self.device).expand(b, -1)
        try:
            with self._blocking(state.blocked, state.cache.get_seq_length()):
                out, _ = self._forward(state.cache, inputs_embeds=self.embed(ids))
        finally:
            self.rewind(state)
        return out.logits.float()

    @torch.inference_mode()
    def teacher_force(self, state: LatentState, tokens: list[int], keep: int) -> torch.Tensor:
        """Feed `tokens` (same for every row) on top of `state` and return fp32 logits of the
        last `keep` positions [B, keep, V]. The state is extended: crop it with `rewind`."""
        ids = torch.tensor(tokens, device=self.device).expand(state.batch_size, -1)
        with _gqa_despite_mask(self.device), self._blocking(state.blocked, state.cache.get_seq_length()):
            last, _, state.cache = self._body_forward(state.cache, inputs_embeds=self.embed(ids))
        return self.head(last[:, last.shape[1] - keep :]).float() if keep else last.new_zeros(0)

    def rewind(self, state: LatentState, extra: int = 0) -> None:
        """Drop every cached position after the last thought (+ `extra` kept); a negative crop
        works in transformers 4.x and 5.x."""
        over = state.cache.get_seq_length() - (state.prompt_len + state.step + extra)
        if over > 0:
            state.cache.crop(-over)

    @torch.inference_mode()
    def generate(
        self, state: LatentState, max_new_tokens: int | None = None, stop_ids: tuple[int, ...] | None = None, keep_logits: bool = False
    ) -> tuple[list[Generation], torch.Tensor]:
        """The family's greedy decode after <readout>. Returns the generations and the logits at
        the <readout> position ([B,V], fp32) — or every decode step's logits [B,n,V] with
        keep_logits. CODI: argmax over every id but <eot>, each id appended, then a stop id ends
        the row. Coconut: argmax over every id, the first id always appended, a later stop id
        ends the row unappended. Finished rows keep being fed; their ids are not kept."""
        n_max = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        stop = torch.tensor(stop_ids or self.eos_ids, device=self.device)
        b = state.batch_size
        ids = torch.full((b, 1), self.readout_id, device=self.device)
        alive = torch.ones(b, dtype=torch.bool, device=self.device)
        cols: list[torch.Tensor] = []  # per step: the id appended, or -1
        steps: list[torch.Tensor] = []
        codi = self.family.name == "codi"
        try:
            with self._blocking(state.blocked, 0):
                for t in range(n_max):
                    self._past = state.cache.get_seq_length()
                    out, _ = self._forward(state.cache, inputs_embeds=self.embed(ids))
                    logits = out.logits[:, -1]
                    if keep_logits or not steps:
                        steps.append(logits.float())
                    nxt = logits[:, : self.argmax_ids].argmax(-1)  # ties → lowest id
                    hit = torch.isin(nxt, stop)
                    if codi:
                        cols.append(torch.where(alive, nxt, -1))
                        alive = alive & ~hit
                    else:
                        if t > 0:
                            alive = alive & ~hit
                        cols.append(torch.where(alive, nxt, -1))
                    if not bool(alive.any()):
                        break
                    ids = nxt[:, None]
        finally:
            self.rewind(state)
        rows = torch.stack(cols, 1).tolist() if cols else [[] for _ in range(b)]
        prompts = state.prompt_ids.tolist()
        gens = [self.generation(p, [t for t in r if t >= 0], state.step) for p, r in zip(prompts, rows)]
        return gens, (torch.stack(steps, 1) if keep_logits else steps[0])

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

