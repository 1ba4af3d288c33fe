"""The shipped organism: its files, and that it answers well *because of* its thoughts."""

import json

import pytest

from thoughtpatch.model.loader import TOY_DIR


@pytest.fixture(scope="module")
def toy():
    from thoughtpatch.model import load_model

    return load_model("toy")


def test_shipped_files():
    from transformers import AutoConfig, AutoTokenizer

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "model.safetensors", "thoughtpatch.json", "MODEL_CARD.md", "heldout.json", "pairs.json"):
        assert (TOY_DIR / name).is_file(), name
    tok = AutoTokenizer.from_pretrained(str(TOY_DIR))
    assert AutoConfig.from_pretrained(str(TOY_DIR)).vocab_size == len(tok)
    side = json.loads((TOY_DIR / "thoughtpatch.json").read_text())
    assert side["num_thoughts"] == 6 and side["family"] == "llama" and side["organism"]
    assert (TOY_DIR / "model.safetensors").stat().st_size < 10_000_000

    from thoughtpatch.data.schema import load_pairs

    pairs = load_pairs(TOY_DIR / "pairs.json")
    held = json.loads((TOY_DIR / "heldout.json").read_text())
    assert len(pairs) == 57 and len(held) >= 300
    seen = {p["question"] for p in held}
    assert not seen & {q for p in pairs for q in (p.clean.question, p.corrupted.question)}


def test_uses_its_thoughts(toy):
    from thoughtpatch.model.evaluate import evaluate, problems_from_heldout, spread

    probs = spread(problems_from_heldout(TOY_DIR / "heldout.json"), 90)  # 30 per number of steps
    res = evaluate(toy, probs, ("with_thoughts", "thoughts_zeroed"), max_new_tokens=16)
    acc = res["accuracy"]
    assert res["n"] == 90
    assert acc["with_thoughts"]["all"] >= 0.8, acc
    assert acc["with_thoughts"]["steps"]["2"] >= 0.75, acc
    assert acc["with_thoughts"]["steps"]["2"] - acc["thoughts_zeroed"]["steps"]["2"] >= 0.3, acc


def test_eval_cli_json():
    from typer.testing import CliRunner

    import thoughtpatch.cli.evaluate  # noqa: F401  (registers `eval`)
    from thoughtpatch.cli import app

    # one problem per number of steps (the held-out set is ordered by steps)
    r = CliRunner().invoke(app, ["eval", "--model", "toy", "--n", "3", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["n"] == 3
    assert set(res["accuracy"]) == {"with_thoughts", "thoughts_zeroed", "thoughts_mean", "thoughts_resample", "no_thoughts", "cot"}
    for v in res["accuracy"].values():
        assert 0 <= v["all"] <= 1 and set(v["steps"]) == {"1", "2", "3"}
    # one thought at a time, each ablation: K accuracies per row
    assert set(res["per_thought"]) == {"zero", "mean", "resample"}
    assert all(len(v) == 6 and all(0 <= a <= 1 for a in v) for v in res["per_thought"].values())
    # A pairs file: both questions of each pair.
    r = CliRunner().invoke(app, ["eval", "--model", "toy", "--pairs", str(TOY_DIR / "pairs.json"), "--n", "4", "--json", "--no-per-thought"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["n"] == 4


def test_eval_cli_errors(tmp_path):
    from typer.testing import CliRunner

    import thoughtpatch.cli.evaluate  # noqa: F401
    from thoughtpatch.cli import app
    from thoughtpatch.errors import ThoughtpatchError

    r = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "nope")])
    assert isinstance(r.exception, ThoughtpatchError)
