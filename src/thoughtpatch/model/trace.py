"""`model.run(question, patches=...)`: one question through the loop, every site recorded, in
an object a notebook can poke at (`Trace`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from thoughtpatch.errors import ThoughtpatchError
from thoughtpatch.model.runtime import INPUT, RECORDABLE, Generation, Intervention, LatentState, Site

if TYPE_CHECKING:
    from thoughtpatch.model.runtime import ThoughtModel


@dataclass(repr=False)
class Trace:
    """One run. Tensors are fp32 on the CPU, indexed [thought, layer, ...]:

    thoughts [K,H] the fed vectors z_k (site `input`); resid, attn, mlp [K,L,H];
    head [K,L,n_heads,head_dim]; kv [K,L,2,n_kv_heads,head_dim]; hidden [K,L+1,H] (HF hidden
    states: 0 = the fed vector plus position embedding where the model adds one, L = final norm);
    first_logits [V] at the read-out token. `state` is the finished run, for further read-outs."""

    model: "ThoughtModel"
    question: str
    ids: list[int]  # the prompt as the family builds it (Coconut: with <|latent|>×K and <|end-latent|>)
    generation: Generation
    first_logits: torch.Tensor
    acts: dict[str, torch.Tensor]
    patched: tuple[Site, ...] = ()
    state: LatentState | None = field(default=None)

    @property
    def answer(self) -> float:
        return self.generation.number

    @property
    def text(self) -> str:
        return self.generation.text

    @property
    def thoughts(self) -> torch.Tensor:
        return self.acts[INPUT]

    @property
    def resid(self) -> torch.Tensor:
        return self.acts["resid"]

    @property
    def attn(self) -> torch.Tensor:
        return self.acts["attn"]

    @property
    def mlp(self) -> torch.Tensor:
        return self.acts["mlp"]

    @property
    def head(self) -> torch.Tensor:
        m = self.model
        return self.acts["head"].reshape(*self.acts["head"].shape[:2], m.num_heads, m.head_dim)

    @property
    def kv(self) -> torch.Tensor:
        return self.acts["kv"]

    @property
    def hidden(self) -> torch.Tensor:
        return self.acts["hidden"]

    def __getitem__(self, site: Site) -> torch.Tensor:
        """The value at one site, e.g. tr[tp.Site("head", layer=1, thought=3, head=2)]."""
        self.model.check_site(site)
        return self.model.site_value(self.acts, site)

    def logits_after(self, tokens: list[int] | str = ()) -> torch.Tensor:
        """fp32 next-token logits [V] after the read-out token and `tokens` (ids, or text such as
        "The answer is:"), teacher-forced on this run: e.g. the logits at an answer's number."""
        m, st = self.model, self.state
        ids = m.tokenizer(tokens, add_special_tokens=False)["input_ids"] if isinstance(tokens, str) else list(tokens)
        try:
            return m.teacher_force(st, [m.readout_id, *ids], keep=1)[0, 0].cpu()
        finally:
            m.rewind(st)

    def lens(self, top: int = 5):
        """Logit lens (CODI's probe): the top tokens of the final-norm state through the LM head at
        the prompt's last token and at each thought, as a small DataFrame."""
        import pandas as pd

        from thoughtpatch.model.lens import probe_top_k, token_label

        ids, probs = probe_top_k(self.model, self.state, k=top)
        opener = self.model.markers[self.model.open_id]
        rows = []
        for r in range(ids.shape[1]):
            row = {"position": opener if r == 0 else f"thought {r - 1}"}
            for j in range(top):
                row[f"top{j + 1}"] = token_label(self.model, int(ids[0, r, j]))
                row[f"p{j + 1}"] = round(float(probs[0, r, j]), 4)
            rows.append(row)
        return pd.DataFrame(rows).set_index("position")

    def __repr__(self) -> str:
        m = self.model
        ans = f"{self.answer:g}" if self.generation.answer else repr(self.generation.answer)
        return (
            f"Trace(answer={ans}, text={self.text[:40]!r}, K={m.num_thoughts}, L={m.num_layers}, H={m.hidden_size}, "
            f"family={m.family.name}, patched={len(self.patched)})"
        )


def run_trace(model: "ThoughtModel", question: str, patches: dict, max_new_tokens: int | None = None) -> Trace:
    """Validate {Site: tensor | callable}, run with every site recorded, wrap as a Trace. The
    patches go through the same `Intervention` code the engine drives."""
    ivs = []
    for site, value in patches.items():
        if not isinstance(site, Site):
            raise ThoughtpatchError(f"patches: keys must be Site objects, not {type(site).__name__}")
        model.check_site(site)
        if callable(value) and not isinstance(value, torch.Tensor):
            fn: Callable = value
            ivs.append(Intervention(site, fn))
            continue
        v = torch.as_tensor(value)
        want = model.site_shape(site.kind)
        if tuple(v.shape) != tuple(want):
            raise ThoughtpatchError(f"patches[{site}]: shape {list(v.shape)}, the site needs {list(want)}")
        ivs.append(Intervention.replace(site, v.to(model.device)))
    prompt = model.prompt_ids(question)
    st = model.think(model.encode(prompt), ivs, record_logits=False, record=RECORDABLE)
    gens, first = model.generate(st, max_new_tokens=max_new_tokens)
    acts = {k: st.stacked(k)[0].float().cpu() for k in st.acts if k != "logits"} if st.step else {}
    return Trace(model, question, model.layout_ids(prompt), gens[0], first[0].float().cpu(), acts, tuple(patches), st)
