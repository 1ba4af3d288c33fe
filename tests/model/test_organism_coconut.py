"""The shipped Coconut organism: its files in Coconut's layout, the CODI organism's problems,
and that it answers well *because of* its thoughts."""

import json

import pytest

from thoughtpatch.model.loader import TOY_COCONUT_DIR, TOY_DIR


@pytest.fixture(scope="module")
def organism():
    from thoughtpatch.model import load_model

    return load_model("toy-coconut")


def test_shipped_files():
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "model.safetensors", "thoughtpatch.json", "MODEL_CARD.md", "heldout.json", "pairs.json", "train_log.json"):
        assert (TOY_COCONUT_DIR / name).is_file(), name
    # The same held-out problems and default pairs as the CODI organism, byte for byte.
    for name in ("heldout.json", "pairs.json"):
        assert (TOY_COCONUT_DIR / name).read_bytes() == (TOY_DIR / name).read_bytes(), name
    tok = AutoTokenizer.from_pretrained(str(TOY_COCONUT_DIR))
    config = AutoConfig.from_pretrained(str(TOY_COCONUT_DIR))
    v0 = len(tok)
    assert config.vocab_size == v0 and "<|latent|>" not in tok.get_vocab() and tok.convert_tokens_to_ids("#") == v0 - 1
    side = json.loads((TOY_COCONUT_DIR / "thoughtpatch.json").read_text())
    assert side["family"] == "coconut" and side["num_thoughts"] == 6 and side["answer_template"] == "### {answer}"
    assert side["organism"] and side["max_new_tokens"] == 64 and side["eval_n"] == 600
    assert (TOY_COCONUT_DIR / "model.safetensors").stat().st_size < 10_000_000
    keys = set(load_file(str(TOY_COCONUT_DIR / "model.safetensors")))
    layer = {k.split("layers.0.", 1)[1] for k in keys if ".layers.0." in k}
    assert keys == {"embedding.weight", "base_causallm.model.embed_tokens.weight", "base_causallm.model.norm.weight",
                    "base_causallm.lm_head.weight"} | {f"base_causallm.model.layers.{i}.{n}" for i in range(config.num_hidden_layers) for n in layer}
    assert len(layer) == 9


def test_uses_its_latent_positions_not_their_content(organism):
    """What its card says: the latent positions matter (K = 0 costs), what is fed there hardly
    does (mean-ablated thoughts answer almost as well) — a negative control for CODI's."""
    from thoughtpatch.model.evaluate import evaluate, problems_from_heldout, spread

    assert organism.family.name == "coconut" and organism.num_thoughts == 6
    probs = spread(problems_from_heldout(TOY_COCONUT_DIR / "heldout.json"), 90)  # 30 per number of steps
    acc = evaluate(organism, probs, ("with_thoughts", "thoughts_mean", "no_thoughts"), max_new_tokens=16)["accuracy"]
    assert acc["with_thoughts"]["all"] >= 0.8, acc
    for steps in ("2", "3"):
        assert acc["with_thoughts"]["steps"][steps] - acc["no_thoughts"]["steps"][steps] >= 0.3, acc
    assert acc["with_thoughts"]["all"] - acc["thoughts_mean"]["all"] <= 0.1, acc
    card = (TOY_COCONUT_DIR / "MODEL_CARD.md").read_text()
    assert "latent *positions* but not what is" in card and "n = 600" in card
