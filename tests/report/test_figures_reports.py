"""Figures and reports of a tiny real run: every section, every image link a valid PNG, the
offline HTML pages, the journal and the inventory; `thoughtpatch report` on the results alone
reproduces the same bytes."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from tests.tiny import make_tiny_codi
from thoughtpatch.report.rundata import MAIN_METRICS
from thoughtpatch.report.markdown import INVENTORY, JOURNAL, REPORT_FILES, SECTIONS, update_journal
from thoughtpatch.run import RunConfig, run_experiments

Q = "tom has {} apples and he buys 5 more . how many apples has tom ?"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RESULT_FILES = ("manifest.json", "pairs.json", "checks.json", "*/results.jsonl", "*/summary.json")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    ckpt, base = make_tiny_codi(root, "llama")
    pairs = [{"pair_id": i, "clean": {"question": Q.format(2 + i), "answer": 7 + i}, "corrupted": {"question": Q.format(30 + i), "answer": 35 + i}} for i in range(3)]
    (root / "pairs.json").write_text(json.dumps(pairs))
    out = root / "runs" / "tiny-run"
    cfg = RunConfig(model=str(ckpt), base=str(base), pairs=str(root / "pairs.json"), out=str(out), wandb="disabled", max_new_tokens=6)
    run_experiments(cfg, progress=False, log=lambda s: None)
    return out


def _outputs(d: Path) -> dict[str, bytes]:
    files = [p for sub in ("figures", "reports") for p in (d / sub).rglob("*") if p.is_file()] + [d / JOURNAL]
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(files)}


def test_reports_have_every_section_and_valid_images(run_dir):
    from matplotlib.image import imread

    for exp, name in REPORT_FILES.items():
        path = run_dir / "reports" / name
        text = path.read_text()
        for section in SECTIONS:
            assert re.search(rf"^{re.escape(section)}", text, re.M), f"{name}: missing '{section}'"
        images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
        assert images, f"{name}: no embedded figure"
        for link in images:
            target = (path.parent / link).resolve()
            data = target.read_bytes()
            assert data.startswith(PNG_MAGIC) and len(data) > 1000, f"{name}: {link} is not a PNG"
            h, w = imread(target).shape[:2]
            assert h > 100 and w > 100, link
        for link in re.findall(r"(?<!!)\[[^\]]*\]\(([^)#]+)\)", text):  # every other relative link resolves
            assert (path.parent / link).exists(), f"{name}: dead link {link}"
        # the checklist has every check with its verdict; top-5 tables have 5 ranked rows each
        for c in json.loads((run_dir / "checks.json").read_text())["checks"]:
            assert f"`{c['name']}`" in text
        assert len(re.findall(r"^\| 1 \| ", text.split("## Top-5")[1].split("## Validation")[0], re.M)) == len(MAIN_METRICS)
        assert "Baseline" in text and "never move" in text


def test_html_pages_work_offline(run_dir):
    for exp in ("position", "iterative", "layer"):
        page = run_dir / "figures" / f"{exp}.html"
        text = page.read_text()
        assert page.stat().st_size > 1_000_000  # plotly.js inlined
        assert "Plotly.newPlot" in text
        assert not re.search(r"<script[^>]+src=", text), "the page must not load scripts from elsewhere"


def test_journal_and_inventory(run_dir):
    journal = (run_dir / JOURNAL).read_text()
    assert journal.count("<!-- entry: ") == 1
    assert "Exp 1 top cells by KL" in journal and "Iterative vs parallel" in journal
    inv = (run_dir / INVENTORY).read_text()
    listed = dict(re.findall(r"^\| `([^`]+)` \| [\d,]+ \| `([0-9a-f]{64})` \|", inv, re.M))
    on_disk = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file() and p.name != INVENTORY}
    assert set(listed) == on_disk
    for rel, sha in listed.items():
        assert hashlib.sha256((run_dir / rel).read_bytes()).hexdigest() == sha, rel


def test_report_from_results_alone_is_identical(run_dir, tmp_path):
    from typer.testing import CliRunner

    from thoughtpatch.cli import app

    copy = tmp_path / run_dir.name  # same directory name: the run id is name@start time
    for pattern in RESULT_FILES:
        for p in run_dir.glob(pattern):
            (copy / p.relative_to(run_dir)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, copy / p.relative_to(run_dir))
    r = CliRunner().invoke(app, ["report", str(copy)])
    assert r.exit_code == 0, r.output
    want, got = _outputs(run_dir), _outputs(copy)
    assert sorted(got) == sorted(want)
    for rel in want:
        assert got[rel] == want[rel], f"{rel} differs when rebuilt from results"
    assert not (copy / "clean_activations.safetensors").exists()


def test_journal_one_entry_per_run(tmp_path):
    path = tmp_path / JOURNAL
    a1 = "## 2026-01-01 · a\n<!-- entry: a@1 -->\nfirst\n<!-- /entry: a@1 -->\n"
    b = "## 2026-01-02 · b\n<!-- entry: b@2 -->\nother run\n<!-- /entry: b@2 -->\n"
    a2 = a1.replace("first", "regenerated")
    update_journal(path, a1, "a@1")
    update_journal(path, b, "b@2")
    update_journal(path, a2, "a@1")
    text = path.read_text()
    assert text.count("<!-- entry: a@1 -->") == 1 and text.count("<!-- entry: b@2 -->") == 1
    assert "regenerated" in text and "first" not in text
    assert text.index("a@1") < text.index("b@2")  # replaced in place, order kept
