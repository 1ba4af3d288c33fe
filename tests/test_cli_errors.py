"""Every command ends an expected fault in one line and exit status 2, before loading a model
when the options alone are wrong, and writes nothing partial."""

from __future__ import annotations

import json

import pytest

from tests.test_run_errors import cli, no_model  # noqa: F401 - a fixture
from thoughtpatch.model.loader import TOY_DIR


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--dtype", "float16"], "--dtype must be one of float32, fp32, bfloat16, bf16, not 'float16'"),
        (["eval", "--n", "0"], "--n must be at least 1, not 0"),
        (["eval", "--batch", "0"], "--batch must be at least 1, not 0"),
        (["inspect", "-q", "x", "--top", "0"], "--top must be at least 1, not 0"),
        (["inspect", "-q", "x", "--lora-alpha", "nan"], "--lora-alpha must be a positive number, not nan"),
        (["trace", "-q", "x", "--out", "{tmp}/t.safetensors", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, not 0"),
        (["trace", "-q", "x", "--out", "{tmp}"], "--out {tmp}: is a directory; name the .safetensors file to write"),
        (["toy", "train", "--out", "{tmp}/o", "--threads", "0", "--steps", "1", "--eval-n", "1"], "--threads must be at least 1, not 0"),
        (["toy", "train", "--out", "{tmp}/file", "--steps", "1", "--eval-n", "1"], "--out {tmp}/file: is a file, not a directory"),
    ],
)
def test_bad_options_before_any_model(args, message, tmp_path, no_model):  # noqa: F811
    (tmp_path / "file").write_text("mine")
    code, err = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2 and err == f"error: {message.replace('{tmp}', str(tmp_path))}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_question_longer_than_the_models_positions(tmp_path):
    positions = json.loads((TOY_DIR / "config.json").read_text())["max_position_embeddings"]
    question = " ".join(["tom has 3 apples ."] * positions)
    code, err = cli("trace", "-q", question, "--out", str(tmp_path / "t.safetensors"))
    assert code == 2 and err.startswith("error: --question: the prompt is ") and err.endswith(f"no room for an answer in the model's {positions} positions\n")
    assert list(tmp_path.iterdir()) == []


def test_pairs_output_that_cannot_be_written(tmp_path):
    src = tmp_path / "p.json"
    src.write_text(json.dumps(json.loads((TOY_DIR / "pairs.json").read_text())[:2]))
    (tmp_path / "dir").mkdir()
    code, err = cli("pairs", "filter", str(src), "--out", str(tmp_path / "dir"))
    assert code == 2 and err.startswith(f"error: {tmp_path / 'dir'}: cannot write") and err.count("\n") == 1
    assert list((tmp_path / "dir").iterdir()) == []
