"""What differs between models, in two small tables.

* An **architecture** (`Arch`, keyed on `config.model_type`, never on a name string) says
  where the hook points are: the decoder blocks, each block's attention and MLP sub-layers,
  the attention's output projection (whose input holds the per-head outputs), and which
  modules CODI adapts with LoRA.
* A **family** (`Family`: CODI or Coconut, DESIGN §10) says how a run is laid out: the prompt
  and its closing marker, where a thought comes from (CODI projects the final-norm state with
  `prj`, Coconut feeds it raw), the token that opens the answer, the greedy rules, and how the
  answer is read from the text. Sites, engine, metrics and reports are shared by both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from thoughtpatch.errors import ThoughtpatchError


@dataclass(frozen=True)
class Arch:
    name: str
    lora_targets: tuple[str, ...]  # CODI's LoRA target modules for this architecture
    blocks: str  # attribute path from the causal LM to its list of decoder blocks
    attn: str  # from a block: the attention sub-layer (output = what is added to the residual)
    mlp: str  # from a block: the MLP sub-layer
    out_proj: str  # from a block: the attention output projection; its input is the heads' outputs side by side


LLAMA = Arch("llama", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), "model.layers", "self_attn", "mlp", "self_attn.o_proj")
# GPT-2 fuses q, k, v in `c_attn` and merges the heads before `c_proj`, so the per-head outputs
# are the slices of c_proj's input, as for LLaMA's o_proj.
GPT2 = Arch("gpt2", ("c_attn", "c_proj", "c_fc"), "transformer.h", "attn", "mlp", "attn.c_proj")

# LLaMA-like decoders share module names (CODI's own list: llama|mistral|falcon|qwen).
_BY_TYPE = {t: LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")} | {"gpt2": GPT2}


def arch_for(model_type: str) -> Arch:
    try:
        return _BY_TYPE[model_type]
    except KeyError:
        known = ", ".join(sorted(_BY_TYPE))
        raise ThoughtpatchError(f"unknown model type '{model_type}' (supported: {known})") from None


def submodule(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


_NUMBER = re.compile(r"-?\d+\.?\d*")


def last_number(text: str) -> str:
    """CODI's answer extraction (test.py): commas dropped, the last number in the text ("" if none)."""
    found = _NUMBER.findall(text.replace(",", ""))
    return found[-1] if found else ""


def after_last_hash(text: str) -> str:
    """Coconut's answer extraction (run.py): the text after the last '#', commas removed, stripped
    (the whole text when there is no '#')."""
    return text.split("#")[-1].replace(",", "").strip()


def as_number(answer: str, none: float) -> float:
    try:
        return float(answer)
    except ValueError:
        return none


@dataclass(frozen=True)
class Family:
    """How one continuous-thought method lays out a run (CODI_SPEC §2, COCONUT_SPEC §2).

        prompt ... <open>   K thoughts   <readout> answer ...

    CODI: `[BOS] question.strip() <bot>`, thought k+1 = prj(final-norm h_k), `<eot>`, greedy over
    every id but <eot>, each id appended before the stop test, answer = the last number of the
    generated text. Coconut: `encode(question + "\\n") <|start-latent|>`, thought k+1 = final-norm
    h_k as is, `<|end-latent|>`, greedy over every id, the first token always appended and a
    later eos ending the text unappended, answer = the text after the last '#' of the decoded
    prompt + generation."""

    name: str
    projects: bool  # thought = prj(h) (CODI) or h itself (Coconut)
    answer_template: str
    max_new_tokens: int  # the family's own eval limit
    default_thoughts: int

    def question_text(self, question: str) -> str:
        if self.name == "codi":
            return question.strip().replace("  ", " ")  # CODI: strip, collapse double spaces once
        return question + "\n"  # Coconut: as stored, then a newline

    def extract(self, prompt_text: str, generated_text: str) -> tuple[str, float]:
        """(the answer string the family's own eval compares, the answer as a number)."""
        if self.name == "codi":
            s = last_number(generated_text)
            return s, as_number(s, float("inf"))  # CODI: no number → +inf
        s = after_last_hash(prompt_text + generated_text)
        return s, as_number(s, float("nan"))

    def correct(self, answer: str, number: float, gold) -> bool:
        """The family's accuracy rule: CODI compares floats, Coconut strings."""
        if self.name == "codi":
            return number == float(gold)
        g = str(gold).replace(",", "").strip()
        if isinstance(gold, float) and gold.is_integer():
            g = str(int(gold))
        return answer == g


CODI = Family("codi", projects=True, answer_template="The answer is: {answer}", max_new_tokens=256, default_thoughts=6)
COCONUT = Family("coconut", projects=False, answer_template="### {answer}", max_new_tokens=64, default_thoughts=6)
FAMILIES = {"codi": CODI, "coconut": COCONUT}

# Coconut's markers, added to the tokenizer in this order (ids V0, V0+1, V0+2).
COCONUT_MARKERS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")


def family_named(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ThoughtpatchError(f"unknown family '{name}' (choose codi or coconut)") from None
