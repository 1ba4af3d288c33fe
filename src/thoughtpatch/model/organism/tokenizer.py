"""The organisms' tokenizer: word level, every number 0..999 one token (as LLaMA-3 keeps
digit chunks of up to 3), built with the `tokenizers` library so it saves and loads as an
ordinary HF tokenizer directory. It prepends BOS like LLaMA-3. The CODI organism's markers
are not in it (CODI puts pad/bot/eot at ids V0, V0+1, V0+2 of the embedding only); the
Coconut organism appends "#" (its answers read "### N") and adds its three markers at load
time with `add_tokens`, as Coconut's run.py does.
"""

from __future__ import annotations

import re
from pathlib import Path

from thoughtpatch.data import synth

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
# Digits in chunks of <= 3, words, CODI's << >> brackets, any other single character.
SPLIT = r"\d{1,3}|[A-Za-z]+|<<|>>|[^\sA-Za-z\d]"
ANSWER_TEMPLATE = "The answer is: {answer}"
# Coconut: answers are "### N" (the answer is the text after the last "#"). "#" goes at the
# end of the vocabulary so every other token keeps its CODI-organism id.
COCONUT_EXTRA = ("#",)


def _template_words() -> list[str]:
    texts = [ANSWER_TEMPLATE.replace("{answer}", ""), *synth.ITEMS, *synth.QUESTIONS]
    texts += [w for nm in synth.NAMES for w in nm] + [w.capitalize() for nm in synth.NAMES for w in nm[1:]]
    texts += [p for ps in synth.PHRASES.values() for p in ps]
    words: list[str] = []
    for t in texts:
        for w in re.findall(SPLIT, re.sub(r"\{\w+\}", " ", t)):
            if not w.isdigit() and w not in words:
                words.append(w)
    return words


def vocabulary(extra: tuple[str, ...] = ()) -> list[str]:
    """Specials, numbers 0..999, every word and symbol the templates and CoT use, then `extra`."""
    syms = ["<<", ">>", "=", "+", "-", "*", "/", ".", ",", "?", ":", "!", "'", "(", ")", "$", "%"]
    vocab = [UNK, BOS, EOS] + [str(i) for i in range(1000)]
    for w in syms + _template_words():
        if w not in vocab:
            vocab.append(w)
    return vocab + [w for w in extra if w not in vocab]


def build_tokenizer(extra: tuple[str, ...] = ()):
    """A transformers fast tokenizer (BOS prepended by the default call); `extra` tokens are
    appended to the vocabulary (COCONUT_EXTRA for the Coconut organism)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary(extra)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(SPLIT), behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab.index(BOS))]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK)


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    import json

    out_dir = Path(out_dir)
    tokenizer.save_pretrained(str(out_dir))
    # transformers 5 names its class TokenizersBackend, which 4.x cannot resolve; both
    # versions load the same tokenizer.json under the older name.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    # Older readers look for this file; newer transformers versions no longer write it.
    smap = out_dir / "special_tokens_map.json"
    if not smap.exists():
        smap.write_text(json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}, indent=2) + "\n")
