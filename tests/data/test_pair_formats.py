"""Pair file formats: detection, round trips, and one-line errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from thoughtpatch.data import formats
from thoughtpatch.data.formats import pairs_to_rows, prepare, read_pairs, write_pairs
from thoughtpatch.data.schema import load_pairs
from thoughtpatch.errors import ThoughtpatchError

FIXTURES = Path(__file__).parent / "fixtures"


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())


@pytest.mark.parametrize(
    ("name", "fmt"), [("seed_source.json", "seed-source"), ("seed_prepared.json", "seed-prepared")]
)
def test_seed_formats_round_trip(tmp_path: Path, name: str, fmt: str) -> None:
    src = FIXTURES / name
    rows = formats.read_rows(src)
    assert formats.detect_format(rows, src) == fmt
    pairs = read_pairs(src)
    # seed -> ours on disk -> back to the seed format: identical rows.
    ours = tmp_path / "ours.json"
    prepare(src, ours)
    assert formats.detect_format(formats.read_rows(ours), ours) == "ours"
    back = tmp_path / "back.json"
    prepare(ours, back, out_format=fmt)
    assert _rows(back) == _rows(src)
    assert pairs_to_rows(read_pairs(ours), fmt) == _rows(src)
    assert [p.pair_id for p in pairs] == list(dict.fromkeys(r["pair_id"] for r in _rows(src)))


def test_seed_source_fields_are_kept() -> None:
    p = read_pairs(FIXTURES / "seed_source.json")[0]
    assert (p.pair_id, p.clean.answer, p.corrupted.answer, p.clean.reasoning_steps) == (0, 5, 6, 1)
    assert p.clean.extra == {"baseline_correct": True, "ablated_correct": False, "needs_cot": True}
    assert p.corrupted.extra["needs_cot"] is False


def test_cross_conversion_and_meta(tmp_path: Path) -> None:
    pairs = read_pairs(FIXTURES / "seed_source.json")
    write_pairs(pairs, tmp_path / "p.json", "seed-prepared")
    again = read_pairs(tmp_path / "p.json")
    assert pairs_to_rows(again, "seed-source") == _rows(FIXTURES / "seed_source.json")
    # our format keeps meta; seed-prepared carries it as extra top-level keys.
    prepared = read_pairs(FIXTURES / "seed_prepared.json")
    tagged = [type(p)(p.pair_id, p.clean, p.corrupted, {"source_index": i}) for i, p in enumerate(prepared)]
    write_pairs(tagged, tmp_path / "ours.json")
    assert [p.meta for p in load_pairs(tmp_path / "ours.json")] == [{"source_index": i} for i in range(3)]
    write_pairs(tagged, tmp_path / "sp.json", "seed-prepared")
    assert [p.meta for p in read_pairs(tmp_path / "sp.json", "seed-prepared")] == [{"source_index": i} for i in range(3)]


def test_jsonl_and_wrapped_list(tmp_path: Path) -> None:
    rows = _rows(FIXTURES / "seed_source.json")
    jl = tmp_path / "rows.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert pairs_to_rows(read_pairs(jl), "seed-source") == rows
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"pairs": _rows(FIXTURES / "seed_prepared.json")}))
    assert len(read_pairs(wrapped)) == 3


def test_numeric_strings_and_integral_floats(tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    f.write_text(json.dumps([{"pair_id": 0, "clean": {"question": "q", "answer": "1,200"},
                              "corrupted": {"question": "r", "answer": 1201.0}}]))
    p = read_pairs(f)[0]
    assert (p.clean.answer, p.corrupted.answer) == (1200, 1201)
    assert isinstance(p.corrupted.answer, int)


_GOOD = {"pair_id": 0, "clean": {"question": "Tom has 3 apples.", "answer": 3},
         "corrupted": {"question": "Tom has 4 apples.", "answer": 4}}


def _with(**changes: object) -> dict:
    d = json.loads(json.dumps(_GOOD))
    for path, value in changes.items():
        *head, last = path.split("__")
        target = d
        for k in head:
            target = target[k]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value
    return d


_DELETE = object()
_SEED = json.loads((FIXTURES / "seed_source.json").read_text())

BAD = {
    "malformed JSON": ('[{"pair_id": 0, "clean": {"question": "q"', ["malformed JSON", "line 1", "column"]),
    "empty file": ("  \n", ["empty file"]),
    "missing field": (json.dumps([_GOOD, _with(clean__answer=_DELETE)]), ["row 1", "field 'clean.answer'", "missing"]),
    "missing pair id": (json.dumps([_with(pair_id=_DELETE)]), ["row 0", "field 'pair_id'", "missing"]),
    "missing side": (json.dumps([_with(corrupted=_DELETE)]), ["row 0", "field 'corrupted'", "missing"]),
    "wrong type question": (json.dumps([_with(clean__question=7)]), ["row 0", "field 'clean.question'", "expected a string, got integer"]),
    "wrong type pair id": (json.dumps([_with(pair_id="0")]), ["row 0", "field 'pair_id'", "expected an integer, got string"]),
    "wrong type side": (json.dumps([_with(clean=[1])]), ["row 0", "field 'clean'", "expected an object, got list"]),
    "wrong type meta": (json.dumps([_with(meta=3)]), ["row 0", "field 'meta'", "expected an object"]),
    "wrong type steps": (json.dumps([_with(clean__reasoning_steps=1.5)]), ["row 0", "field 'clean.reasoning_steps'"]),
    "non-numeric answer": (json.dumps([_with(corrupted__answer="eighteen")]), ["row 0", "field 'corrupted.answer'", "expected a number, got 'eighteen'"]),
    "boolean answer": (json.dumps([_with(clean__answer=True)]), ["row 0", "field 'clean.answer'", "boolean"]),
    "null answer": (json.dumps([_with(clean__answer=None)]), ["row 0", "field 'clean.answer'", "null"]),
    "infinite answer": (json.dumps([_with(clean__answer="inf")]), ["row 0", "field 'clean.answer'"]),
    "duplicate pair id": (json.dumps([_GOOD, _with(pair_id=1), _GOOD]), ["row 2", "field 'pair_id'", "duplicate pair id 0", "first at row 0"]),
    "duplicate pair id seed-source": (json.dumps(_SEED + [_SEED[2]]), ["row 6", "field 'pair_id'", "duplicate pair id 1", "second clean row", "first at row 2"]),
    "missing corrupted row": (json.dumps(_SEED[:3] + _SEED[4:]), ["row 2", "field 'variant'", "pair 1 has no corrupted row"]),
    "missing clean row": (json.dumps(_SEED[1:]), ["row 0", "field 'variant'", "pair 0 has no clean row"]),
    "bad variant": (json.dumps([{**_SEED[0], "variant": "dirty"}, _SEED[1]]), ["row 0", "field 'variant'", "'dirty'"]),
    "seed-source missing question": (json.dumps([_SEED[0], {k: v for k, v in _SEED[1].items() if k != "question"}]), ["row 1", "field 'question'", "missing"]),
    "unknown format": (json.dumps([{"prompt": "x", "target": 3}]), ["row 0", "unknown format", "prompt, target"]),
    "raw gsm8k": ('{"question": "q 1", "answer": "<<1+1=2>> #### 2"}\n', ["line 1", "unknown format", "from-gsm8k"]),
    "not a list": ("3", ["expected a list of rows, got integer"]),
    "not an object": ("[3]", ["row 0", "expected an object, got integer"]),
    "bad jsonl line": (json.dumps(_SEED[0]) + "\n" + json.dumps(_SEED[1]) + "\n{oops\n", ["line 3", "malformed JSON"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_naming_file_row_field(tmp_path: Path, case: str) -> None:
    text, expected = BAD[case]
    src = tmp_path / "bad.json"
    src.write_text(text)
    out = tmp_path / "out.json"
    with pytest.raises(ThoughtpatchError) as err:
        prepare(src, out)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(str(src))
    for part in expected:
        assert part in msg, (part, msg)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [src]  # no temporary file left behind either


def test_unknown_format_names(tmp_path: Path) -> None:
    with pytest.raises(ThoughtpatchError, match="unknown format 'csv'"):
        read_pairs(FIXTURES / "seed_source.json", "csv")
    with pytest.raises(ThoughtpatchError, match="unknown output format 'csv'"):
        prepare(FIXTURES / "seed_source.json", tmp_path / "o.json", out_format="csv")
    assert not (tmp_path / "o.json").exists()


def test_forced_format_mismatch_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ThoughtpatchError, match=r"row 0, field 'variant': missing"):
        read_pairs(FIXTURES / "seed_prepared.json", "seed-source")


def test_missing_file() -> None:
    with pytest.raises(ThoughtpatchError, match="cannot read"):
        read_pairs(FIXTURES / "nope.json")
