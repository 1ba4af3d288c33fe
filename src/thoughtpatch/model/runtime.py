"""CODI's latent loop, exactly as its inference code runs it, with intervention sites.

    prompt  [BOS?] q_1 … q_n <bot>      one forward with cache; h = final-norm state at <bot>
    thought k = 0…K-1                   feed z_k = prj(h_{k-1}) as inputs_embeds (length 1, no mask)
    <eot>, then greedy answer           argmax over all ids but eot, stop at eos, ≤ 256 tokens

Sites: `Site(layer, k)` is the residual stream after decoder block `layer` at thought k;
`Site("input", k)` is the fed vector z_k itself. Interventions are applied *during* the
step, so a patch at (l, k) reaches thought k's later layers, z_{k+1} and all later
attention, as in the model.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal

import torch
from torch import nn

from thoughtpatch.model.kvcache import make_growing

INPUT = "input"
Layer = int | Literal["input"]


@dataclass(frozen=True)
class Site:
    layer: Layer  # decoder block index (0…L-1) or "input" (the fed thought vector)
    thought: int  # 0…K-1


@dataclass(frozen=True)
class Intervention:
    """Rewrite the activation at `site` for some batch rows: act[rows] = fn(act[rows])."""

    site: Site
    fn: Callable[[torch.Tensor], torch.Tensor] | None
    rows: tuple[int, ...] | None = None  # None = every row
    from_rows: tuple[int, ...] | None = None  # copy mode: act[rows] = act[from_rows], same forward

    @staticmethod
    def copy(site: Site, rows: tuple[int, ...], from_rows: tuple[int, ...]) -> "Intervention":
        """Give `rows` the activation that rows `from_rows` have at this site in this very
        forward pass (lets a chain of runs hand an activation on without a second pass)."""
        return Intervention(site, None, rows, from_rows)

    @staticmethod
    def replace(site: Site, value: torch.Tensor, rows: tuple[int, ...] | None = None) -> "Intervention":
        return Intervention(site, lambda a: value.to(a.dtype).expand_as(a), rows)

    @staticmethod
    def add(site: Site, value: torch.Tensor, rows: tuple[int, ...] | None = None) -> "Intervention":
        return Intervention(site, lambda a: a + value.to(a.dtype), rows)

    @staticmethod
    def zero(site: Site, rows: tuple[int, ...] | None = None) -> "Intervention":
        return Intervention(site, torch.zeros_like, rows)

    def apply(self, act: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return self.fn(act)
        idx = torch.as_tensor(self.rows, device=act.device)
        out = act.clone()
        if self.from_rows is not None:
            out[idx] = act[torch.as_tensor(self.from_rows, device=act.device)]
        else:
            out[idx] = self.fn(act[idx])
        return out


@dataclass
class LatentState:
    """A run in progress: the KV cache, the next vector to feed, and what was recorded.

    Records per completed thought (lists indexed by k): the fed vector [B,H], block outputs
    [B,L,H] (after any patch), HF hidden states [B,L+1,H] (0 = embedding output, L = final
    norm) and logits [B,V] (fp32, when recorded).
    """

    cache: Any
    next_input: torch.Tensor  # [B,H] = prj(final-norm state of the last position)
    bot_hidden: torch.Tensor  # [B,H] final-norm state at <bot>
    prompt_len: int
    step: int = 0
    inputs: list[torch.Tensor] = field(default_factory=list)
    resid: list[torch.Tensor] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return self.next_input.shape[0]

    def latent_inputs(self) -> torch.Tensor:
        return torch.stack(self.inputs, 1)  # [B,K,H]

    def latent_resid(self) -> torch.Tensor:
        return torch.stack(self.resid, 1)  # [B,K,L,H]

    def latent_hidden(self) -> torch.Tensor:
        return torch.stack(self.hidden, 1)  # [B,K,L+1,H]

    def _with_rows(self, cache: Any, f: Callable[[torch.Tensor], torch.Tensor]) -> "LatentState":
        """A copy with this cache and `f` applied to every per-row tensor."""
        return replace(
            self,
            cache=cache,
            next_input=f(self.next_input),
            bot_hidden=f(self.bot_hidden),
            inputs=[f(t) for t in self.inputs],
            resid=[f(t) for t in self.resid],
            hidden=[f(t) for t in self.hidden],
            logits=[f(t) for t in self.logits],
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
    text: str
    number: float  # CODI's rule: commas dropped, last number in the text, +inf if none


_NUMBER = re.compile(r"-?\d+\.?\d*")


def extract_number(text: str) -> float:
    """CODI's answer extraction (test.py): drop commas, take the last number; none → inf."""
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else float("inf")


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


class CodiModel:
    """A loaded continuous-thought model: LM (LoRA unmerged), prj, special ids, tokenizer, K."""

    def __init__(self, *, net, hf, prj, tokenizer, family, base_vocab: int, num_thoughts: int, answer_template: str, source: dict):
        self.net = net  # what forward runs (peft wrapper or the plain LM)
        self.hf = hf  # the underlying HF causal LM
        self.prj = prj
        self.tokenizer = tokenizer
        self.family = family
        self.pad_id, self.bot_id, self.eot_id = base_vocab, base_vocab + 1, base_vocab + 2
        self.vocab_size = base_vocab + 3
        self.num_thoughts = num_thoughts
        self.answer_template = answer_template
        self.source = source
        self.eos_ids: tuple[int, ...] = (tokenizer.eos_token_id,)  # CODI stops on the tokenizer's eos only
        blocks = hf
        for part in family.blocks_path.split("."):
            blocks = getattr(blocks, part)
        self.blocks: nn.ModuleList = blocks
        self.num_layers = len(blocks)
        self.hidden_size = hf.get_input_embeddings().weight.shape[1]
        # transformers 5 renamed `past_key_values` to `cache`; speak whichever this one knows.
        self._cache_kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
        # The decoder without its LM head (LoRA layers sit inside it): thoughts need no logits.
        self.body = hf.base_model
        self._body_cache_kw = "cache" if "cache" in inspect.signature(self.body.forward).parameters else "past_key_values"
        # Hook state: set only while a latent step runs.
        self._patches: dict[int, list[Intervention]] = {}
        self._capture: list[torch.Tensor] | None = None
        for i, block in enumerate(blocks):
            block.register_forward_hook(self._block_hook(i))

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.hf.get_input_embeddings().weight.device

    def _block_hook(self, layer: int):
        def hook(_module, _inputs, output):
            if self._capture is None:
                return None
            h = _tensor_of(output)
            patches = self._patches.get(layer)
            if patches:
                last = h[:, -1]
                for iv in patches:
                    last = iv.apply(last)
                h = torch.cat([h[:, :-1], last[:, None]], 1) if h.shape[1] > 1 else last[:, None]
                output = _with_tensor(output, h)
            self._capture.append(h[:, -1])
            return output

        return hook

    # ---------------------------------------------------------------- prompt

    def prompt_ids(self, question: str) -> list[int]:
        """CODI's prompt: question stripped, double spaces collapsed once, default tokenizer
        call (BOS where the tokenizer adds one), then <bot>."""
        q = question.strip().replace("  ", " ")
        return list(self.tokenizer(q)["input_ids"]) + [self.bot_id]

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

    @torch.inference_mode()
    def encode(self, input_ids: torch.Tensor | list[int], record: bool = False) -> LatentState:
        """The prompt pass (batch of equal-length prompts, no padding)."""
        ids = torch.as_tensor(input_ids, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        out, cache = self._forward(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        make_growing(cache)  # later steps append in place rather than re-copying the cache
        h = out.hidden_states[-1][:, -1]
        st = LatentState(cache=cache, next_input=self.prj(h), bot_hidden=h, prompt_len=ids.shape[1])
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
    ) -> LatentState:
        """Run thoughts state.step … until-1 (default: all K), consuming `state`'s cache."""
        until = self.num_thoughts if until is None else until
        by_thought: dict[int, list[Intervention]] = {}
        for iv in interventions:
            by_thought.setdefault(iv.site.thought, []).append(iv)
        st = state
        for k in range(st.step, until):
            ivs = by_thought.get(k, [])
            z = st.next_input
            for iv in ivs:
                if iv.site.layer == INPUT:
                    z = iv.apply(z)
            self._patches = {}
            for iv in ivs:
                if iv.site.layer != INPUT:
                    self._patches.setdefault(int(iv.site.layer), []).append(iv)
            self._capture = []
            try:
                last, hidden_states, cache = self._body_forward(st.cache, inputs_embeds=z[:, None], output_hidden_states=True)
                resid = torch.stack(self._capture, 1)
            finally:
                self._patches, self._capture = {}, None
            h = last[:, -1]
            st.inputs.append(z)
            st.resid.append(resid)
            st.hidden.append(torch.stack([t[:, -1] for t in hidden_states], 1))
            if record_logits:
                st.logits.append(self.head(last[:, -1]).float())
            st.cache = cache
            st.next_input = self.prj(h)
            st.step = k + 1
        return st

    # ---------------------------------------------------------------- read-outs

    @torch.inference_mode()
    def score(self, state: LatentState, continuation: list[int]) -> torch.Tensor:
        """Feed <eot> then teacher-force `continuation` (same for every row); fp32 logits
        [B, len+1, V]: row 0 predicts the first continuation token. The state is unchanged."""
        b = state.batch_size
        ids = torch.tensor([self.eot_id, *continuation], device=self.device).expand(b, -1)
        try:
            out, _ = self._forward(state.cache, inputs_embeds=self.embed(ids))
        finally:
            self.rewind(state)
        return out.logits.float()

    @torch.inference_mode()
    def teacher_force(self, state: LatentState, tokens: list[int], keep: int) -> torch.Tensor:
        """Feed `tokens` (same for every row) on top of `state` and return fp32 logits of the
        last `keep` positions [B, keep, V]. The state is extended: crop it with `rewind`."""
        ids = torch.tensor(tokens, device=self.device).expand(state.batch_size, -1)
        with _gqa_despite_mask(self.device):
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
        self, state: LatentState, max_new_tokens: int = 256, stop_ids: tuple[int, ...] | None = None, keep_logits: bool = False
    ) -> tuple[list[Generation], torch.Tensor]:
        """CODI's greedy decode after <eot>. Returns the generations and the logits at the eot
        position ([B,V], fp32) — or every decode step's logits [B,n,V] with keep_logits."""
        stop = torch.tensor(stop_ids or self.eos_ids, device=self.device)
        b = state.batch_size
        ids = torch.full((b, 1), self.eot_id, device=self.device)
        tokens: list[list[int]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        steps: list[torch.Tensor] = []
        try:
            for _ in range(max_new_tokens):
                out, _ = self._forward(state.cache, inputs_embeds=self.embed(ids))
                logits = out.logits[:, -1]
                if keep_logits or not steps:
                    steps.append(logits.float())
                nxt = logits[:, : self.vocab_size - 1].argmax(-1)  # every id but eot; ties → lowest id
                for i in range(b):
                    if not done[i]:
                        tokens[i].append(int(nxt[i]))
                done |= torch.isin(nxt, stop)
                if bool(done.all()):
                    break
                ids = nxt[:, None]
        finally:
            self.rewind(state)
        gens = []
        for t in tokens:
            text = self.tokenizer.decode(t, skip_special_tokens=True)
            gens.append(Generation(t, text, extract_number(text)))
        return gens, (torch.stack(steps, 1) if keep_logits else steps[0])

    # ---------------------------------------------------------------- conveniences

    def answer_ids(self, answer: int | float | str) -> list[int]:
        """Token ids of the answer continuation (template filled, no special tokens)."""
        text = self.answer_template.format(answer=answer)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def run(self, question: str, interventions=(), **gen_kwargs) -> tuple[LatentState, list[Generation], torch.Tensor]:
        """Encode, think and generate one question (batch of 1)."""
        st = self.think(self.encode(self.prompt_ids(question)), interventions)
        gens, logits = self.generate(st, **gen_kwargs)
        return st, gens, logits
