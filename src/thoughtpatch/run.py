"""One run: baselines and the activation cache, the experiments, summaries, checks, W&B.

    config → model + pairs → unpatched runs (cache) → layer / position / iterative
           → results.jsonl (pair by pair) + summary.json → checks.json → (reports)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from thoughtpatch.data.schema import Pair, atomic_write_text, load_pairs
from thoughtpatch.errors import ThoughtpatchError

EXPERIMENTS = ("layer", "position", "iterative")


@dataclass
class RunConfig:
    """Every setting of a run (the TOML config file uses these names)."""

    model: str = "toy"  # checkpoint dir/file, or `toy`
    base: str | None = None  # base model dir or hub id (config + tokenizer)
    pairs: str | None = None  # pairs file; default: the organism's 57 pairs
    out: str | None = None  # run directory; default runs/<model>-<time>
    layers: str | None = None  # e.g. "input,0-3"; default every layer and the input row
    thoughts: str | None = None  # e.g. "0-5"; default every thought
    experiments: list[str] = field(default_factory=lambda: list(EXPERIMENTS))
    direction: str = "denoising"  # or noising
    dtype: str = "float32"
    lora_alpha: float | None = None
    num_thoughts: int | None = None  # K; default the model's own
    test_mode: bool = False  # first 5 pairs
    max_new_tokens: int = 256  # CODI's limit
    stop: str = "codi"  # codi: the tokenizer's eos only (as CODI's eval); all: every eos id of the model
    engine: str = "batched"  # or reference
    batch_size: int | None = None  # variants per batch; default all of a pair
    wandb: str | None = None  # online | offline | disabled; default offline unless a key is set
    resume: bool = False
    report: bool = True
    shard: str | None = None  # "i/n": only the pairs at positions p (after test_mode) with p % n == i

    # Settings that change results: a resumed run must match them.
    RESULT_KEYS = ("model", "base", "pairs", "layers", "thoughts", "direction", "dtype", "lora_alpha", "num_thoughts", "test_mode", "max_new_tokens", "stop", "engine")

    def validate(self) -> None:
        if self.direction not in ("denoising", "noising"):
            raise ThoughtpatchError(f"direction must be denoising or noising, not '{self.direction}'")
        if self.stop not in ("codi", "all"):
            raise ThoughtpatchError(f"stop must be codi or all, not '{self.stop}'")
        if self.engine not in ("batched", "reference"):
            raise ThoughtpatchError(f"engine must be batched or reference, not '{self.engine}'")
        if self.wandb not in (None, "online", "offline", "disabled"):
            raise ThoughtpatchError(f"wandb must be online, offline or disabled, not '{self.wandb}'")
        bad = [e for e in self.experiments if e not in EXPERIMENTS]
        if bad:
            raise ThoughtpatchError(f"unknown experiment(s) {bad}; choose from {', '.join(EXPERIMENTS)}")
        if self.shard is not None:
            parse_shard(self.shard)

    @staticmethod
    def from_toml(path: str | Path, **overrides) -> "RunConfig":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ThoughtpatchError(f"{p}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ThoughtpatchError(f"{p}: malformed TOML: {e}") from None
        names = {f.name for f in dataclasses.fields(RunConfig)}
        unknown = [k for k in data if k.replace("-", "_") not in names]
        if unknown:
            raise ThoughtpatchError(f"{p}: unknown key(s) {', '.join(unknown)}")
        values = {k.replace("-", "_"): v for k, v in data.items()} | {k: v for k, v in overrides.items() if v is not None}
        return RunConfig(**values)


def parse_range(spec: str | None, universe: list, what: str) -> list:
    """"input,0-3,5" → ["input", 0, 1, 2, 3, 5] (keeping the universe's order)."""
    if spec is None or spec == "all":
        return list(universe)
    chosen = set()
    for part in str(spec).split(","):
        part = part.strip()
        if part == "input":
            chosen.add("input")
        elif "-" in part:
            a, b = part.split("-", 1)
            if not (a.isdigit() and b.isdigit()):
                raise ThoughtpatchError(f"--{what}: cannot read '{part}'")
            chosen.update(range(int(a), int(b) + 1))
        elif part.isdigit():
            chosen.add(int(part))
        else:
            raise ThoughtpatchError(f"--{what}: cannot read '{part}'")
    missing = chosen - set(universe)
    if missing:
        raise ThoughtpatchError(f"--{what}: {sorted(map(str, missing))} not in this model (have {universe[0]}…{universe[-1]})")
    return [u for u in universe if u in chosen]


def parse_shard(spec: str) -> tuple[int, int]:
    """"i/n" → (i, n) with 0 ≤ i < n. Shard i of n holds the pairs at positions p with p % n == i
    (positions in the pair file, after --test-mode), so n shards partition any pair set."""
    parts = str(spec).split("/")
    if len(parts) != 2 or not all(x.strip().isdigit() for x in parts):
        raise ThoughtpatchError(f"--shard: cannot read '{spec}' (want i/n, e.g. 0/4)")
    i, n = int(parts[0]), int(parts[1])
    if n < 1 or i >= n:
        raise ThoughtpatchError(f"--shard {spec}: need 0 <= i < n")
    return i, n


def pairs_sha256(pairs: list[Pair]) -> str:
    return hashlib.sha256(json.dumps([p.to_dict() for p in pairs], sort_keys=True).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_pairs_path(cfg: RunConfig) -> Path:
    from thoughtpatch.model.loader import TOY_DIR

    if cfg.model == "toy":
        return TOY_DIR / "pairs.json"
    raise ThoughtpatchError("--pairs is required for a model other than the organism")


def stop_ids_for(model, policy: str) -> tuple[int, ...]:
    """codi: the loaded tokenizer's eos only (CODI's eval as scripted); all: every eos id the
    tokenizer, config and generation config name (e.g. Llama-3's 128001 and 128009)."""
    if policy == "codi":
        return model.eos_ids
    ids = set(model.eos_ids)
    for cfg in (model.hf.config, getattr(model.hf, "generation_config", None)):
        e = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        ids.update(e if isinstance(e, list) else [e] if e is not None else [])
    return tuple(sorted(ids))


class Progress:
    """A rich progress bar with pairs/s and ETA (quiet when disabled)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._p = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as P, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._p = P(
                TextColumn("{task.description:<26}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                transient=False,
            )
            self._p.__enter__()
        return self

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)

    def task(self, name: str, total: int, done: int = 0) -> Callable[[], None]:
        if self._p is None:
            return lambda: None
        tid = self._p.add_task(name, total=total, completed=done, rate="")
        t0, start = time.perf_counter(), done

        def step() -> None:
            self._p.advance(tid)
            n = self._p.tasks[tid].completed - start
            self._p.update(tid, rate=f"{n / max(time.perf_counter() - t0, 1e-9):.2f} pairs/s")

        return step


def _versions() -> dict:
    import torch
    import transformers

    import thoughtpatch

    v = {"thoughtpatch": thoughtpatch.__version__, "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        v["peft"] = peft.__version__
    except ImportError:
        pass
    return v


def distributed_state():
    """accelerate's PartialState when this process is one of several (`accelerate launch`,
    torchrun), else None. Without an accelerator (or with ACCELERATE_USE_CPU) the processes
    talk over gloo on CPU."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    acc = getattr(torch, "accelerator", None)
    has_acc = acc.is_available() if acc is not None else torch.cuda.is_available()
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not has_acc)
    return state if state.num_processes > 1 else None


def _run_distributed(cfg: RunConfig, state, progress: bool, log: Callable[[str], None] | None) -> Path:
    """One shard per process (shard rank/world into OUT/shard-{rank}-of-{world}, the model on the
    process's device); when all are done, rank 0 merges them into OUT."""
    from accelerate.utils import broadcast_object_list

    from thoughtpatch.report.merge import merge_runs

    rank, world = state.process_index, state.num_processes
    say = log or (lambda s: print(s, file=sys.stderr))
    out = [cfg.out or str(Path("runs") / f"{Path(str(cfg.model)).name}-{time.strftime('%Y%m%d-%H%M%S')}")]
    broadcast_object_list(out)  # one directory for every process (the default name has the time in it)
    root = Path(out[0])
    if (root / "manifest.json").exists() and not cfg.resume:
        raise ThoughtpatchError(f"{root} already holds a run; pass --resume to continue it or choose another --out")
    shard_dirs = [root / f"shard-{r}-of-{world}" for r in range(world)]
    shard_cfg = dataclasses.replace(cfg, shard=f"{rank}/{world}", out=str(shard_dirs[rank]), report=False)
    shard_log = say if state.is_main_process else (lambda s: say(f"[rank {rank}] {s}"))
    run_experiments(shard_cfg, progress=progress and state.is_main_process, log=shard_log, device=state.device)
    state.wait_for_everyone()
    if state.is_main_process:
        merge_runs(shard_dirs, root, overwrite=cfg.resume, report=cfg.report, log=say)
    state.wait_for_everyone()
    return root


def run_experiments(cfg: RunConfig, progress: bool = True, log: Callable[[str], None] | None = None, device=None) -> Path:
    """Run what `cfg` asks for into its run directory; returns the directory. Under
    `accelerate launch` (several processes) the pairs are split across the processes and rank 0
    merges the shards into the run directory."""
    if cfg.shard is None and (state := distributed_state()) is not None:
        cfg.validate()
        return _run_distributed(cfg, state, progress, log)
    import torch

    from thoughtpatch.model import load_model
    from thoughtpatch.model.checkpoint import find_checkpoint_file
    from thoughtpatch.model.loader import resolve_model
    from thoughtpatch.patching import checks as C
    from thoughtpatch.patching.engine import BatchedEngine, Prompt, ReferenceEngine, Target
    from thoughtpatch.patching.experiments import PairRuns, Spec, all_layers, pair_runs, patch_pair
    from thoughtpatch.report.cache import load_cache, save_cache
    from thoughtpatch.report.results import ResultsWriter, read_rows, write_summary
    from thoughtpatch.report.tracking import Tracker

    say = log or (lambda s: print(s, file=sys.stderr))
    cfg.validate()
    pairs_path = Path(cfg.pairs) if cfg.pairs else default_pairs_path(cfg)
    pairs: list[Pair] = load_pairs(pairs_path)
    if cfg.test_mode:
        pairs = pairs[:5]
    if not pairs:
        raise ThoughtpatchError(f"{pairs_path}: no pairs")
    full_pairs = pairs
    shard = parse_shard(cfg.shard) if cfg.shard else None
    if shard:
        pairs = [p for pos, p in enumerate(full_pairs) if pos % shard[1] == shard[0]]
        if not pairs:
            raise ThoughtpatchError(f"--shard {cfg.shard}: this shard has no pairs ({len(full_pairs)} pairs in {pairs_path})")
    ckpt_path, _ = resolve_model(cfg.model, cfg.base)
    model = load_model(cfg.model, base=cfg.base, dtype=cfg.dtype, lora_alpha=cfg.lora_alpha, num_thoughts=cfg.num_thoughts, device=device or "cpu")
    layers = parse_range(cfg.layers, all_layers(model), "layers")
    thoughts = parse_range(cfg.thoughts, list(range(model.num_thoughts)), "thoughts")
    k_total = model.num_thoughts
    stop_ids = stop_ids_for(model, cfg.stop)

    out = Path(cfg.out) if cfg.out else Path("runs") / f"{Path(str(cfg.model)).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    result_cfg = {k: getattr(cfg, k) for k in RunConfig.RESULT_KEYS} | {"pairs": str(pairs_path)}
    manifest = {
        "config": dataclasses.asdict(cfg) | {"pairs": str(pairs_path), "out": str(out)},
        "result_config": result_cfg,
        "model": {
            "checkpoint": str(ckpt_path),
            "sha256": sha256_file(find_checkpoint_file(ckpt_path)),
            **{k: v for k, v in model.source.items() if k != "checkpoint"},
            "family": model.family.name,
            "num_layers": model.num_layers,
            "hidden_size": model.hidden_size,
            "num_thoughts": k_total,
            "answer_template": model.answer_template,
            "stop_ids": list(stop_ids),
        },
        "pairs": {"path": str(pairs_path), "sha256": hashlib.sha256(json.dumps([p.to_dict() for p in pairs], sort_keys=True).encode()).hexdigest(), "n": len(pairs), "ids": [p.pair_id for p in pairs]},
        # The whole set the shards split (the same as the above when unsharded); merge checks it.
        "full_pairs": {"sha256": pairs_sha256(full_pairs), "n": len(full_pairs), "ids": [p.pair_id for p in full_pairs]},
        "shard": {"index": shard[0], "count": shard[1]} if shard else None,
        "layers": [str(l) for l in layers],
        "thoughts": thoughts,
        "versions": _versions(),
    }
    mf = out / "manifest.json"
    if mf.exists():
        old = json.loads(mf.read_text())
        if not cfg.resume:
            raise ThoughtpatchError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        diff = [k for k in set(old.get("result_config", {})) | set(result_cfg) if old.get("result_config", {}).get(k) != result_cfg.get(k)]
        if old["model"]["sha256"] != manifest["model"]["sha256"]:
            diff.append("model weights")
        if old["pairs"]["sha256"] != manifest["pairs"]["sha256"]:
            diff.append("pairs content")
        if diff:
            raise ThoughtpatchError(f"{out}: cannot resume, the config changed ({', '.join(sorted(diff))})")
        manifest["started"] = old.get("started")
        manifest["resumed"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    else:
        manifest["started"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(mf, json.dumps(manifest, indent=1) + "\n")
    atomic_write_text(out / "pairs.json", json.dumps([p.to_dict() for p in pairs], indent=1) + "\n")

    cache_meta = {
        "model": manifest["model"]["sha256"],
        "pairs_sha256": manifest["pairs"]["sha256"],
        "num_thoughts": k_total,
        "num_layers": model.num_layers,
        "hidden_size": model.hidden_size,
        "dtype": cfg.dtype,
        "max_new_tokens": cfg.max_new_tokens,
        "stop_ids": list(stop_ids),
    }
    tracker = Tracker(cfg.wandb, out, manifest["config"], name=out.name)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def runs_from(clean: dict, corrupted: dict) -> list[PairRuns]:
        rs = []
        for p in pairs:
            target = Target.for_answers(model, p.clean.answer, p.corrupted.answer, max_new_tokens=cfg.max_new_tokens, stop_ids=stop_ids)
            rs.append(PairRuns(p, model.prompt_ids(p.clean.question), Prompt(tuple(model.prompt_ids(p.corrupted.question))), target, clean[p.pair_id], corrupted[p.pair_id]))
        return rs

    cache_paths = {role: out / f"{role}_activations.safetensors" for role in ("clean", "corrupted")}
    with Progress(progress) as prog:
        t0 = time.perf_counter()
        if all(p.exists() for p in cache_paths.values()):
            cached = {role: load_cache(path, model, cache_meta | {"role": role}) for role, path in cache_paths.items()}
            runs = runs_from(cached["clean"], cached["corrupted"])
        else:
            step = prog.task("unpatched runs (cache)", len(pairs))
            runs = []
            for p in pairs:
                runs.append(pair_runs(model, p, cfg.max_new_tokens, stop_ids))
                step()
            for role, path in cache_paths.items():
                save_cache(path, {r.pair.pair_id: (getattr(r, f"{role}_ids"), getattr(r, role)) for r in runs}, cache_meta | {"role": role})
        timings["unpatched_runs"] = time.perf_counter() - t0
        base_checks = C.baseline_checks(model, runs, cfg.max_new_tokens, stop_ids)
        acc = {c["name"]: c["value"] for c in base_checks}
        say(
            f"baseline: clean {acc['baseline_accuracy_clean']:.1%}, corrupted {acc['baseline_accuracy_corrupted']:.1%}, "
            f"thoughts zeroed {acc['accuracy_thoughts_zeroed']:.1%} ({len(pairs)} pairs)"
        )

        engine = BatchedEngine(model, cfg.batch_size) if cfg.engine == "batched" else ReferenceEngine(model)
        per_pair = {"layer": len(layers), "position": len(layers) * len(thoughts), "iterative": len(layers) * k_total}
        exps = [e for e in EXPERIMENTS if e in cfg.experiments]
        # The experiments reuse the activation cache from disk, after checking it is this run's.
        cached = {role: load_cache(path, model, cache_meta | {"role": role}) for role, path in cache_paths.items()}
        runs = runs_from(cached["clean"], cached["corrupted"])
        writers = {e: ResultsWriter(out / e / "results.jsonl", per_pair[e]) for e in exps}
        todo = [r for r in runs if any(r.pair.pair_id not in w.done for w in writers.values())]
        t0 = time.perf_counter()
        step = prog.task(f"patching ({', '.join(exps)})", len(runs), done=len(runs) - len(todo))
        for r in todo:
            # One engine call per pair for every experiment still missing: a single pass.
            missing = [e for e in exps if r.pair.pair_id not in writers[e].done]
            rows = patch_pair(engine, r, missing, Spec("resid", tuple(layers), tuple(thoughts), cfg.direction))
            for e in missing:
                writers[e].write_pair(rows[e])
                tracker.log_pair(rows[e])
            step()
        timings["patching"] = time.perf_counter() - t0
        results: dict[str, list[dict]] = {}
        for exp in exps:
            results[exp] = read_rows(writers[exp].path)
            doc = write_summary(out / exp / "summary.json", results[exp], exp, {"direction": cfg.direction, "model": manifest["model"]["checkpoint"]})
            tracker.log_summary(exp, doc["cells"])

        t0 = time.perf_counter()
        checks = list(base_checks)
        checks += C.self_patch_checks(model, runs[0], cfg.direction)
        checks += C.all_sites_check(model, runs[0], cfg.direction)
        if "position" in results and "layer" in results:
            checks += C.grid_checks(results["position"], results["layer"], cfg.direction)
        if "iterative" in results and "position" in results:
            checks += C.iterative_checks(results["iterative"], results["position"], results.get("layer", []), model)
        timings["checks"] = time.perf_counter() - t0
    atomic_write_text(out / "checks.json", json.dumps({"checks": checks}, indent=1) + "\n")
    wandb_dir = tracker.finish()
    timings["total"] = time.perf_counter() - t_start
    manifest["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    manifest["device"] = str(model.device) + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "")
    if wandb_dir:
        manifest["wandb_dir"] = wandb_dir
    atomic_write_text(mf, json.dumps(manifest, indent=1) + "\n")
    if cfg.report:
        from thoughtpatch.report.markdown import write_reports

        write_reports(out)
    failed = [c["name"] for c in checks if c["verdict"] == "fail"]
    say(f"checks: {sum(c['verdict'] == 'pass' for c in checks)} pass, {len(failed)} fail{' (' + ', '.join(failed) + ')' if failed else ''}, {sum(c['verdict'] == 'info' for c in checks)} info")
    say(f"wrote {out} in {timings['total']:.1f} s")
    return out
