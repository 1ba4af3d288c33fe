import json
import random
import re

from thoughtpatch.data import synth
from thoughtpatch.data.schema import load_pairs, save_pairs


def test_chains_are_valid_and_cot_matches():
    rng = random.Random(0)
    for k in (1, 2, 3):
        for _ in range(200):
            c = synth.sample_chain(rng, k)
            res = c.results()
            assert res is not None and len(res) == k
            assert all(0 <= y <= synth.MAX_VALUE for y in res)
            steps = re.findall(r"<<(\d+)([-+*/])(\d+)=(\d+)>>", c.cot())
            assert len(steps) == k
            prev = c.start
            for (a, op, b, y), yy in zip(steps, res):
                assert int(a) == prev and int(y) == yy
                prev = yy
            assert c.answer() == res[-1]
            assert all(str(n) in c.text() for n in c.numbers())


def test_pairs_deterministic_and_differ():
    a = synth.synth_pairs(30, seed=5)
    b = synth.synth_pairs(30, seed=5)
    assert [p.to_dict() for p in a] == [p.to_dict() for p in b]
    assert [p.to_dict() for p in a] != [p.to_dict() for p in synth.synth_pairs(30, seed=6)]
    qs = set()
    for p in a:
        assert p.clean.answer != p.corrupted.answer
        assert p.meta["n_steps"] in (1, 2, 3) and p.clean.reasoning_steps == p.meta["n_steps"]
        assert p.meta["cot"].count("<<") == p.meta["n_steps"]
        ch = p.meta["changed"]
        assert ch["clean"] != ch["corrupted"]
        # one number changed: same words, same length
        wc, wd = p.clean.question.split(), p.corrupted.question.split()
        assert len(wc) == len(wd) and sum(x != y for x, y in zip(wc, wd)) == 1
        qs.update((p.clean.question, p.corrupted.question))
    assert len(qs) == 60


def test_exclude_and_roundtrip(tmp_path):
    held = synth.synth_problems(20, seed=1)
    ex = {p["question"] for p in held}
    pairs = synth.synth_pairs(40, seed=1, exclude=ex)
    assert not ex & {q for p in pairs for q in (p.clean.question, p.corrupted.question)}
    save_pairs(pairs, tmp_path / "p.json")
    back = load_pairs(tmp_path / "p.json")
    assert [p.to_dict() for p in back] == [p.to_dict() for p in pairs]
    assert len(held) == 60 and len({p["question"] for p in held}) == 60


def test_cli_synth(tmp_path):
    from typer.testing import CliRunner

    import thoughtpatch.cli.synth  # noqa: F401  (registers the command)
    from thoughtpatch.cli import app

    out = tmp_path / "pairs.json"
    r = CliRunner().invoke(app, ["pairs", "synth", "--n", "12", "--seed", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert len(data) == 12 and {d["meta"]["n_steps"] for d in data} == {1, 2, 3}
    r = CliRunner().invoke(app, ["pairs", "synth", "--n", "3", "--steps", "5", "--out", str(out)])
    assert r.exit_code != 0


def test_numbers_are_single_tokens():
    from thoughtpatch.model.organism.tokenizer import build_tokenizer

    tok = build_tokenizer()
    for n in (0, 7, 42, 100, 999):
        ids = tok(str(n), add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids)[0] == str(n)
    assert tok("1234", add_special_tokens=False)["input_ids"] == tok("123 4", add_special_tokens=False)["input_ids"]
    p = synth.synth_pairs(30, seed=2)
    for pr in p:
        ic, idc = tok(pr.clean.question)["input_ids"], tok(pr.corrupted.question)["input_ids"]
        assert len(ic) == len(idc) and ic[0] == tok.bos_token_id and tok.unk_token_id not in ic
