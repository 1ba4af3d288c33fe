"""`thoughtpatch pairs ...` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from thoughtpatch.cli import app

FIXTURES = Path(__file__).parent / "fixtures"
runner = CliRunner()


def _ok(*args: str) -> str:
    result = runner.invoke(app, ["pairs", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def test_prepare_and_back(tmp_path: Path) -> None:
    out = _ok("prepare", str(FIXTURES / "seed_source.json"), "--out", str(tmp_path / "p.json"))
    assert "pairs: 3" in out and "reasoning steps: 1: 2, 2: 1" in out
    _ok("prepare", str(tmp_path / "p.json"), "--out", str(tmp_path / "s.json"), "--out-format", "seed-source")
    assert json.loads((tmp_path / "s.json").read_text()) == json.loads((FIXTURES / "seed_source.json").read_text())


def test_filter_names_removed_pairs(tmp_path: Path) -> None:
    out = _ok("filter", str(FIXTURES / "filter_pairs.json"), "--out", str(tmp_path / "k.json"))
    lines = out.splitlines()
    assert lines[:2] == ["removed pair 11: same answer (0)", "removed pair 14: same answer (9)"]
    assert "removed 2, kept 4" in lines[2]
    assert "same answer: 0" in out
    data = json.loads(_ok("filter", str(FIXTURES / "filter_pairs.json"), "--out", str(tmp_path / "k.json"), "--json"))
    assert [r["pair_id"] for r in data["removed"]] == [11, 14] and data["stats"]["count"] == 4


def test_stats_json_is_one_object() -> None:
    out = _ok("stats", str(FIXTURES / "stats_pairs.json"), "--json")
    assert len(out.strip().splitlines()) == 1
    stats = json.loads(out)
    assert stats["count"] == 4 and stats["answer_difference"] == {"min": 0, "max": 4, "mean": 1.5}


def test_from_gsm8k_prints_reasons(tmp_path: Path) -> None:
    src = tmp_path / "g.jsonl"
    src.write_text(
        json.dumps({"question": "Sam has 12 marbles and buys 5 more. He gives 4 away. How many?",
                    "answer": "12+5=<<12+5=17>>17\n17-4=<<17-4=13>>13\n#### 13"}) + "\n"
        + json.dumps({"question": "Ann has 5 red and 5 blue pens. How many?", "answer": "<<5+5=10>>\n#### 10"}) + "\n"
    )
    out = _ok("from-gsm8k", str(src), "--out", str(tmp_path / "p.json"), "--delta", "-2", "--max-per-problem", "2")
    assert out.startswith("1 of 2 problems gave pairs (50.0 %), 2 pairs")
    assert "number occurs twice in the question" in out and "every number rejected" in out
    pairs = json.loads((tmp_path / "p.json").read_text())
    assert [p["corrupted"]["answer"] for p in pairs] == [11, 11]


def test_error_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"pair_id": 0, "clean": {"question": "q", "answer": "x"},
                                "corrupted": {"question": "r", "answer": 2}}]))
    exe = Path(sys.executable).parent / "thoughtpatch"
    proc = subprocess.run([str(exe), "pairs", "prepare", str(bad), "--out", str(tmp_path / "o.json")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == f"error: {bad}, row 0, field 'clean.answer': expected a number, got 'x'\n"
    assert not (tmp_path / "o.json").exists()
