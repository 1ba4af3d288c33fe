"""Merge shard run directories into one run directory, as if the run had not been split.

Shards come from `thoughtpatch run --shard i/n` (shard i holds the pairs at positions p with
p % n == i) or from the processes of `accelerate launch`. The merged directory is a complete
run directory (it can be resumed, re-reported or merged again):

* `results.jsonl` per experiment: the shards' rows, in the pair set's original order
  (the rows themselves are copied verbatim);
* `summary.json`: recomputed over the union with `write_summary`;
* the clean / corrupted activation caches: the shards' tensors in one file, with the
  metadata of the whole pair set;
* `checks.json`: the baseline accuracies as count-weighted means over the shards, the
  aggregate checks (grid, iterative) recomputed over the union, and the per-pair checks that
  run the model (self-patch, all sites) taken from the shard that holds the first pair;
* `pairs.json` and `manifest.json` for the whole set (`merged_from` lists the shards).

* `dropped_pairs.json` and the manifest's `selection`: the shards' lists and counts together;
  `summary_correct.json` (under `--keep all`) over the pairs answered right.

Refused, before anything is written: shards of different result settings, model weights or
pair sets, shards that overlap or leave pairs out, shards that have not finished, and any
shard file that is missing, damaged or holds rows that are not the shard's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from thoughtpatch.data.schema import atomic_path, atomic_write_text
from thoughtpatch.errors import ThoughtpatchError
from thoughtpatch.report.results import NOT_METRICS, check_row, read_lines
from thoughtpatch.report.rundata import EXPERIMENTS, verdict_counts
from thoughtpatch.report.rundir import RunLock, claim_out, read_manifest

# Baseline checks every shard must have (later ones may be missing from older shards).
BASELINE_CHECKS = ("baseline_accuracy_clean", "baseline_accuracy_corrupted", "accuracy_thoughts_zeroed")

CACHE_ROLES = ("clean", "corrupted")
STAGE = ".merging"  # inside --out: merged files are written here, then moved into place


def _manifest(d: Path) -> dict:
    m = read_manifest(d) if d.is_dir() else None
    if m is None:
        raise ThoughtpatchError(f"{d}: not a run directory (no manifest.json)")
    if "finished" not in m:
        raise ThoughtpatchError(f"{d}: the run has not finished (resume it first)")
    if "full_pairs" not in m or "selection" not in m:
        raise ThoughtpatchError(f"{d}: manifest.json has no {'full_pairs' if 'full_pairs' not in m else 'selection'} (written by an older thoughtpatch); rerun it")
    return m


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ThoughtpatchError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ThoughtpatchError(f"{path}: damaged ({e})") from None


def _experiments(m: dict) -> list[str]:
    return [e for e in EXPERIMENTS if e in m["config"].get("experiments", EXPERIMENTS)]


def check_compatible(dirs: list[Path], manifests: list[dict]) -> None:
    """Same result settings (all but the shard), model weights, full pair set, experiments."""
    ref_dir, ref = dirs[0], manifests[0]
    for d, m in zip(dirs[1:], manifests[1:]):
        rc, rr = m.get("result_config", {}), ref.get("result_config", {})
        diff = sorted(k for k in set(rc) | set(rr) if k != "shard" and rc.get(k) != rr.get(k))
        if m["model"]["sha256"] != ref["model"]["sha256"]:
            diff.append("model weights")
        if m["full_pairs"]["sha256"] != ref["full_pairs"]["sha256"]:
            diff.append("pair set")
        if _experiments(m) != _experiments(ref):
            diff.append("experiments")
        if m.get("layers") != ref.get("layers") or m.get("thoughts") != ref.get("thoughts"):
            diff.append("layers/thoughts")
        if diff:
            raise ThoughtpatchError(f"{d}: not a shard of the same run as {ref_dir} ({', '.join(diff)} differ)")


def _order_shards(dirs: list[Path], manifests: list[dict]) -> dict[int, Path]:
    """Which shard holds each pair; refuses overlaps and gaps."""
    full = manifests[0]["full_pairs"]["ids"]
    known = set(full)
    owner: dict[int, Path] = {}
    for d, m in zip(dirs, manifests):
        for pid in m["pairs"]["ids"]:
            if pid in owner:
                raise ThoughtpatchError(f"pair {pid} is in both {owner[pid]} and {d}; shards must not overlap")
            if pid not in known:
                raise ThoughtpatchError(f"{d}: pair {pid} is not in the pair set")
            owner[pid] = d
    missing = [pid for pid in full if pid not in owner]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ThoughtpatchError(f"the shards leave out {len(missing)} of {len(full)} pairs: {', '.join(map(str, missing[:5]))}{more}; pass every shard")
    return owner


def _cells_per_pair(m: dict, exp: str) -> int:
    if exp in m.get("cells_per_pair", {}):  # recorded by the run (every site, head and knockout run)
        return m["cells_per_pair"][exp]
    layers, thoughts = len(m["layers"]), len(m["thoughts"])  # runs from before that record
    return {"layer": layers, "position": layers * thoughts, "iterative": layers * m["model"]["num_thoughts"]}[exp]


def _shard_rows(d: Path, m: dict, exp: str, patched: set[int]) -> list[dict]:
    """A shard's rows of one experiment, checked to be exactly its patched pairs' cells."""
    path = d / exp / "results.jsonl"
    if not path.is_file():
        raise ThoughtpatchError(f"{path}: missing")
    counts: dict[int, int] = {}
    rows = []
    for n, row in read_lines(path):
        check_row(row, path, n, exp)
        if row["pair_id"] not in patched:
            raise ThoughtpatchError(f"{path}, line {n}: pair {row['pair_id']} is not among this shard's patched pairs")
        counts[row["pair_id"]] = counts.get(row["pair_id"], 0) + 1
        rows.append(row)
    want = _cells_per_pair(m, exp)
    for pid in sorted(patched, key=lambda p: m["pairs"]["ids"].index(p)):
        if counts.get(pid, 0) != want:
            raise ThoughtpatchError(f"{path}: pair {pid} has {counts.get(pid, 0)} rows, expected {want}")
    return rows


def merge_caches(paths: list[Path], dest: Path, pairs_sha256: str) -> None:
    """One activation cache from the shards' caches (same tensors, the whole set's metadata)."""
    from safetensors.torch import save_file

    from thoughtpatch.report.cache import CHECKED, open_cache

    tensors, pair_ids, meta0 = {}, [], None
    for path in paths:
        f, meta = open_cache(path)
        if meta0 is None:
            meta0 = meta
        bad = [k for k in CHECKED if k != "pairs_sha256" and meta.get(k) != meta0.get(k)]
        if bad:
            raise ThoughtpatchError(f"{path}: cache made with other {', '.join(bad)} than {paths[0]}")
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
        pair_ids += meta["pair_ids"]
    meta = dict(meta0)
    meta["pairs_sha256"] = pairs_sha256
    meta["pair_ids"] = sorted(pair_ids)
    with atomic_path(dest) as tmp:
        save_file(tensors, str(tmp), metadata={"thoughtpatch": json.dumps(meta)})


def merge_baseline(checks_by_shard: list[list[dict]], sizes: list[int]) -> list[dict]:
    """The baseline checks over the union, from the shards' counts (a check that some shard
    lacks, written by an older thoughtpatch, is left out)."""
    from thoughtpatch.patching.checks import BASELINE, baseline_from_counts

    by_shard = [{c["name"]: c for c in checks} for checks in checks_by_shard]
    for name in BASELINE_CHECKS:
        if any(name not in by for by in by_shard):
            raise ThoughtpatchError(f"a shard's checks.json has no {name}")
    counts = {
        name: sum(round(by[name]["value"] * units * n) for by, n in zip(by_shard, sizes))
        for name, (units, _) in BASELINE.items()
        if all(name in by for by in by_shard)
    }
    return baseline_from_counts(counts, sum(sizes))


def merge_runs(
    dirs: list[str | Path], out: str | Path, overwrite: bool = False, report: bool = True, log: Callable[[str], None] | None = None
) -> Path:
    """Merge finished shard run directories into `out`; returns `out`. Every input is read and
    checked before anything is written; the merged files are written to a staging directory
    inside `out` and moved into place (manifest.json last), so a failure leaves no half-merged
    run."""
    from thoughtpatch.patching import checks as C
    from thoughtpatch.report.results import write_summary

    say = log or (lambda s: print(s, file=sys.stderr))
    dirs = [Path(d) for d in dirs]
    out = Path(out)
    if not dirs:
        raise ThoughtpatchError("merge: no run directories given")
    if any(d.resolve() == out.resolve() for d in dirs):
        raise ThoughtpatchError(f"--out {out} is one of the shards; merge into another directory")
    # Shards inside --out (as `accelerate launch` places them) may be there; nothing else.
    inside = frozenset(d.name for d in dirs if d.resolve().parent == out.resolve()) | {STAGE}
    claim_out(out, overwrite, allowed=inside, again="pass --overwrite to replace it")
    manifests = [_manifest(d) for d in dirs]
    check_compatible(dirs, manifests)
    owner = _order_shards(dirs, manifests)
    full = manifests[0]["full_pairs"]
    pos = {pid: i for i, pid in enumerate(full["ids"])}
    # Shards in the order of their first pair; the first holds the first pair.
    order = sorted(range(len(dirs)), key=lambda i: pos[manifests[i]["pairs"]["ids"][0]])
    dirs, manifests = [dirs[i] for i in order], [manifests[i] for i in order]
    first = manifests[0]
    assert owner[full["ids"][0]] == dirs[0]

    # pairs.json: the whole set, in its order, and it must be the set the shards were cut from.
    by_id = {}
    for d in dirs:
        for p in _read_json(d / "pairs.json"):
            by_id[p["pair_id"]] = p
    if set(by_id) != set(full["ids"]):
        raise ThoughtpatchError(f"the shards' pairs.json do not hold the pair set they were cut from ({full['sha256'][:12]}…)")
    pairs = [by_id[pid] for pid in full["ids"]]
    if hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest() != full["sha256"]:
        raise ThoughtpatchError(f"the shards' pairs.json do not make up the pair set they were cut from ({full['sha256'][:12]}…)")

    # Which pairs each shard patched, answered wrong, dropped (dropped_pairs.json).
    keep = first["selection"]["keep"]
    dropped_by_shard = [_read_json(d / "dropped_pairs.json") for d in dirs]
    wrong = sorted((e for ds in dropped_by_shard for e in ds if e.get("reason") == "answered wrong"), key=lambda e: pos[e["pair_id"]])
    wrong_ids = {e["pair_id"] for e in wrong}
    right_ids = set(full["ids"]) - wrong_ids
    dropped = [e for e in dropped_by_shard[0] if e.get("reason") != "answered wrong"] + wrong

    direction = first["config"]["direction"]
    results: dict[str, list[dict]] = {}
    for exp in _experiments(first):
        rows = []
        for d, m in zip(dirs, manifests):
            patched = set(m["pairs"]["ids"]) - (wrong_ids if keep == "correct" else set())
            rows += _shard_rows(d, m, exp, patched)
        results[exp] = sorted(rows, key=lambda r: pos[r["pair_id"]])  # stable: each pair's rows keep their order
    caches = {role: [d / f"{role}_activations.safetensors" for d in dirs] for role in CACHE_ROLES}
    shard_checks = [_read_json(d / "checks.json")["checks"] for d in dirs]
    checks = merge_baseline(shard_checks, [m["pairs"]["n"] for m in manifests])
    # per-pair checks (they run the model on the first pair) come from the shard holding it;
    # the aggregate ones are functions of results.jsonl: recomputed over the union
    checks += [c for c in shard_checks[0] if c["name"] not in C.BASELINE and C.base_name(c["name"]) not in C.AGGREGATE]
    nan_rows = {exp: [{k: (math.nan if v is None and k not in NOT_METRICS else v) for k, v in r.items()} for r in rows] for exp, rows in results.items()}
    checks += C.aggregate_checks(nan_rows, direction, first["model"]["num_thoughts"])

    manifest = {k: v for k, v in first.items() if k not in ("wandb_dir", "resumed", "timings_s", "device", "finished", "started")}
    manifest["config"] = first["config"] | {"shard": None, "out": str(out)}
    manifest["pairs"] = {"path": first["pairs"]["path"], "sha256": full["sha256"], "n": full["n"], "ids": full["ids"]}
    manifest["shard"] = None
    sel = [m["selection"] for m in manifests]
    manifest["selection"] = {"keep": keep, "same_answer": sel[0]["same_answer"]} | {k: sum(s[k] for s in sel) for k in ("unpatched", "correct", "wrong", "patched")}
    manifest["selection"]["dropped"] = len(sel[0]["same_answer"]) + (len(wrong) if keep == "correct" else 0)
    manifest["started"] = min(m["started"] for m in manifests if m.get("started"))
    manifest["finished"] = max(m["finished"] for m in manifests)
    timings: dict[str, float] = {}
    for m in manifests:
        for k, v in m.get("timings_s", {}).items():
            timings[k] = round(timings.get(k, 0.0) + v, 3)
    manifest["timings_s"] = timings  # summed over the shards (process-seconds)
    manifest["merged"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    manifest["merged_from"] = [
        {"dir": str(d), "shard": m.get("shard"), "n": m["pairs"]["n"], "device": m.get("device"), "timings_s": m.get("timings_s"), "started": m.get("started"), "finished": m.get("finished")}
        for d, m in zip(dirs, manifests)
    ]

    with RunLock(out):
        claim_out(out, overwrite, allowed=inside, again="pass --overwrite to replace it")
        stage = out / STAGE
        shutil.rmtree(stage, ignore_errors=True)  # a killed merge's leftovers
        try:
            for exp, rows in results.items():
                atomic_write_text(stage / exp / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
                extra = {"direction": direction, "model": first["model"]["checkpoint"]}
                write_summary(stage / exp / "summary.json", nan_rows[exp], exp, extra | {"pair_set": keep})
                if keep == "all":
                    write_summary(stage / exp / "summary_correct.json", [r for r in nan_rows[exp] if r["pair_id"] in right_ids], exp, extra | {"pair_set": "correct"})
            for role, paths in caches.items():
                merge_caches(paths, stage / f"{role}_activations.safetensors", full["sha256"])
            atomic_write_text(stage / "pairs.json", json.dumps(pairs, indent=1) + "\n")
            atomic_write_text(stage / "dropped_pairs.json", json.dumps(dropped, indent=1) + "\n")
            atomic_write_text(stage / "checks.json", json.dumps({"checks": checks}, indent=1) + "\n")
            atomic_write_text(stage / "manifest.json", json.dumps(manifest, indent=1) + "\n")
            _install(stage, out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        say(f"merged {len(dirs)} shard(s), {full['n']} pairs, into {out}; checks: {verdict_counts(checks)}")
        if report:
            from thoughtpatch.report.markdown import write_reports

            write_reports(out)
    return out


def _install(stage: Path, out: Path) -> None:
    """Move the staged files into `out` (renames on one file system); an old manifest goes
    first and the new one last, so `out` is never a run whose files are half old, half new."""
    (out / "manifest.json").unlink(missing_ok=True)
    files = sorted((p for p in stage.rglob("*") if p.is_file()), key=lambda p: (p.name == "manifest.json", str(p)))
    for f in files:
        dest = out / f.relative_to(stage)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, dest)
