"""Questions for causal tracing, which needs no pairs: each becomes a unit whose clean and
"corrupted" sides are the same question (the corrupted run is made by noising embeddings).

Sources: a GSM8K jsonl file as it is (`"answer": "... #### 18"`), a JSON list or JSON lines
of {"question", "answer": number}, or a pair file (its clean questions)."""

from __future__ import annotations

from pathlib import Path

from thoughtpatch.data.formats import read_rows
from thoughtpatch.data.schema import Pair, Problem, parse_answer
from thoughtpatch.errors import ThoughtpatchError


def as_unit(i: int, question: str, answer, meta: dict | None = None) -> Pair:
    p = Problem(question, answer)
    return Pair(i, p, p, {"unit": "question", **(meta or {})})


def _answer(v, where: str):
    if isinstance(v, str) and "####" in v:  # GSM8K: the number after ####
        v = v.rsplit("####", 1)[1].strip().replace(",", "")
    return parse_answer(v, where)


def load_questions(path: str | Path) -> list[Pair]:
    """Trace units from a question file (see the module doc); ids count from 0 in file order."""
    path = Path(path)
    rows = read_rows(path)  # JSON list, {"pairs": [...]} or JSON lines: the pair files' reader
    if rows and isinstance(rows[0][1], dict) and ("clean" in rows[0][1] or "variant" in rows[0][1]):
        from thoughtpatch.data.schema import load_pairs

        return [as_unit(p.pair_id, p.clean.question, p.clean.answer, {"from_pair": p.pair_id}) for p in load_pairs(path)]
    units = []
    for row, d in rows:
        where = f"{path}, {row if isinstance(row, str) else f'row {row}'}"
        if not isinstance(d, dict):
            raise ThoughtpatchError(f"{where}: expected an object with 'question' and 'answer'")
        for key in ("question", "answer"):
            if key not in d:
                raise ThoughtpatchError(f"{where}, field '{key}': missing")
        if not isinstance(d["question"], str) or not d["question"].strip():
            raise ThoughtpatchError(f"{where}, field 'question': expected a non-empty string")
        units.append(as_unit(len(units), d["question"], _answer(d["answer"], f"{where}, field 'answer'")))
    if not units:
        raise ThoughtpatchError(f"{path}: contains no questions")
    return units
