"""Question files for causal tracing: GSM8K rows as they are, {question, answer} lists, pair
files (their clean sides), and one-line errors."""

import json

import pytest

from tests.conftest import FIXTURES
from thoughtpatch.data.questions import load_questions
from thoughtpatch.errors import ThoughtpatchError


def test_gsm8k_rows_as_they_are():
    units = load_questions(FIXTURES / "gsm8k" / "train_sample.jsonl")
    first = json.loads((FIXTURES / "gsm8k" / "train_sample.jsonl").read_text().splitlines()[0])
    assert units[0].clean.question == first["question"] == units[0].corrupted.question
    assert units[0].clean.answer == float(first["answer"].rsplit("####", 1)[1].replace(",", ""))
    assert [u.pair_id for u in units] == list(range(len(units)))


def test_list_and_pair_file(tmp_path):
    qs = tmp_path / "q.json"
    qs.write_text(json.dumps([{"question": "a b ?", "answer": 3}, {"question": "c d ?", "answer": "4"}]))
    assert [(u.clean.question, u.clean.answer) for u in load_questions(qs)] == [("a b ?", 3), ("c d ?", 4)]
    pairs = tmp_path / "p.json"
    pairs.write_text(json.dumps([{"pair_id": 7, "clean": {"question": "x y ?", "answer": 5}, "corrupted": {"question": "x z ?", "answer": 6}}]))
    (u,) = load_questions(pairs)
    assert (u.pair_id, u.clean.question, u.corrupted.question, u.meta["from_pair"]) == (7, "x y ?", "x y ?", 7)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty file"),
        ('{"question": "a"}\n{"question": "b", "answer": 1}\n', "line 1, field 'answer': missing"),
        ('{"question": "a", "answer": 1}\n{"question": \n', "line 2: malformed JSON"),
        ('[{"question": "", "answer": 1}]', "row 0, field 'question': expected a non-empty string"),
    ],
)
def test_errors_name_file_and_row(tmp_path, text, message):
    f = tmp_path / "q.jsonl"
    f.write_text(text)
    with pytest.raises(ThoughtpatchError, match=message):
        load_questions(f)
