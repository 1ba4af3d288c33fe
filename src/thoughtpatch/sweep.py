"""One run: baselines and the activation cache, the experiments, summaries, checks, W&B.

    config + pairs + --out validated → model (pairs checked against it) → lock the run dir
           → unpatched runs (cache) → keep/drop → mode statistics → experiments per site
           → results.jsonl (pair by pair) + summary.json → checks.json → (reports)

`sweep` is the one path: the CLI (`run_experiments`, from a config) and the Python API
(`thoughtpatch.run`, from a loaded model and pairs) both call it; without an output
directory it keeps everything in memory. Nothing is loaded before the settings, pairs and
--out are checked, and nothing is written before the model has accepted every pair.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from thoughtpatch.data.schema import Pair, atomic_write_text, load_pairs
from thoughtpatch.errors import ThoughtpatchError
from thoughtpatch.report.rundir import RunLock, claim_out

EXPERIMENTS = ("layer", "position", "iterative", "knockout", "trace")
DEFAULT_EXPERIMENTS = ("layer", "position", "iterative")
SITES = ("input", "resid", "attn", "mlp", "head", "kv")  # = thoughtpatch.model.SITE_KINDS (no torch import here)
MODES = ("replace", "zero", "mean", "resample", "add", "noise")  # = thoughtpatch.patching.modes.MODES
KEEP = ("all", "correct")  # which pairs to patch (patching/selection.py)


@dataclass
class RunConfig:
    """Every setting of a run (the TOML config file uses these names)."""

    model: str = "toy"  # checkpoint dir/file, or `toy` / `toy-coconut`
    base: str | None = None  # base model dir or hub id (config + tokenizer)
    family: str | None = None  # codi | coconut: confirms what the checkpoint's keys say
    pairs: str | None = None  # pairs file; default: the organism's 57 pairs
    questions: str | None = None  # trace: a question file (GSM8K jsonl as is, {question, answer} rows, or pairs)
    n: int | None = None  # trace: N questions evenly from an organism's held-out set
    limit: int | None = None  # the first N pairs / questions
    out: str | None = None  # run directory; default runs/<model>-<time>
    layers: str | None = None  # e.g. "input,0-3"; default every layer and the input row
    thoughts: str | None = None  # e.g. "0-5"; default every thought
    experiments: list[str] = field(default_factory=lambda: list(DEFAULT_EXPERIMENTS))
    site: str = "resid"  # input | resid | attn | mlp | head | kv, or several: "attn,mlp"
    direction: str = "denoising"  # or noising
    mode: str = "replace"  # replace | zero | mean | resample | add | noise (DESIGN §8)
    alpha: float = 1.0  # add: value + alpha·v
    vector: str | None = None  # add: FILE.safetensors (one vector per site key) or "diff"
    noise_scale: float = 1.0  # noise: sigma = noise_scale × the site's spread over the pair set
    seed: int = 0  # noise and trace: every draw depends on (seed, pair, site) only
    readers: str = "answer"  # knockout: answer | thoughts | both
    knock_on: str = "clean"  # knockout: the unpatched run it is applied to: clean | corrupted | both
    noise_tokens: str = "numbers"  # trace: noise the number tokens' embeddings, or all question tokens
    dtype: str = "float32"
    lora_alpha: float | None = None
    num_thoughts: int | None = None  # K; default the model's own
    test_mode: bool = False  # first 5 pairs
    max_new_tokens: int | None = None  # greedy decode limit; default the model's own (CODI 256, Coconut 64)
    stop: str = "codi"  # codi: the tokenizer's eos only (as CODI's eval); all: every eos id of the model
    engine: str = "batched"  # or reference
    batch_size: int | None = None  # variants per batch; default all of a pair
    keep: str = "all"  # all: patch every pair (and summarise the correct ones too); correct: only pairs answered right on both sides
    wandb: str | None = None  # online | offline | disabled; default offline unless a key is set
    resume: bool = False
    report: bool = True
    shard: str | None = None  # "i/n": only the pairs at positions p (after test_mode) with p % n == i

    # Settings that change results: a resumed run must match them.
    RESULT_KEYS = (
        "model", "base", "family", "pairs", "questions", "n", "limit", "layers", "thoughts", "site", "direction", "mode", "alpha", "vector",
        "noise_scale", "seed", "readers", "knock_on", "noise_tokens", "dtype", "lora_alpha", "num_thoughts", "test_mode", "max_new_tokens",
        "stop", "engine", "keep",
    )

    def validate(self) -> None:
        """Types and values of every setting: nothing is loaded or written before this passes."""
        check_types({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, where="")
        from thoughtpatch.model.loader import DTYPES

        choices = {
            "direction": ("denoising", "noising"), "stop": ("codi", "all"), "engine": ("batched", "reference"), "keep": KEEP, "dtype": tuple(DTYPES),
            "mode": MODES, "readers": ("answer", "thoughts", "both"), "knock_on": ("clean", "corrupted", "both"), "noise_tokens": ("numbers", "all"),
        }
        if self.family is not None:
            choices["family"] = ("codi", "coconut")
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ThoughtpatchError(f"{_flag(name)} must be {' or '.join(allowed)}, not '{getattr(self, name)}'")
        if self.wandb not in (None, "online", "offline", "disabled"):
            raise ThoughtpatchError(f"--wandb must be online, offline or disabled, not '{self.wandb}'")
        for name in ("model", "base", "pairs", "out"):
            v = getattr(self, name)
            if v is not None and not v.strip():
                raise ThoughtpatchError(f"{_flag(name)} is empty")
        if not self.experiments:
            raise ThoughtpatchError(f"experiments is empty; choose from {', '.join(EXPERIMENTS)}")
        bad = [e for e in self.experiments if e not in EXPERIMENTS]
        if bad:
            raise ThoughtpatchError(f"unknown experiment(s) {bad}; choose from {', '.join(EXPERIMENTS)}")
        bad_sites = [x for x in self.sites if x not in SITES]
        if bad_sites or not self.sites:
            raise ThoughtpatchError(f"--site: unknown site(s) {bad_sites or [self.site]}; choose from {', '.join(SITES)}")
        if "trace" in self.experiments and len(self.experiments) > 1:
            raise ThoughtpatchError("trace (causal tracing) runs on questions, not pairs: run it alone")
        if "trace" in self.experiments and self.direction != "denoising":
            raise ThoughtpatchError("trace restores the clean run's values into the noised run: --direction must be denoising")
        if self.mode == "add" and not self.vector:
            raise ThoughtpatchError("--mode add needs --vector FILE.safetensors or --vector diff")
        if self.vector not in (None, "diff") and not Path(self.vector).is_file():
            raise ThoughtpatchError(f"--vector {self.vector}: file not found")
        for name in ("alpha", "noise_scale"):
            if not math.isfinite(getattr(self, name)):
                raise ThoughtpatchError(f"{_flag(name)} must be a finite number, not {getattr(self, name)}")
        if self.noise_scale < 0:
            raise ThoughtpatchError(f"--noise-scale must be >= 0, not {self.noise_scale}")
        if (self.questions or self.n) and "trace" not in self.experiments:
            raise ThoughtpatchError("--questions and --n are for trace (causal tracing); pair experiments read --pairs")
        for name in ("max_new_tokens", "num_thoughts", "batch_size", "n", "limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ThoughtpatchError(f"{_flag(name)} must be at least 1, not {v}")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ThoughtpatchError(f"--lora-alpha must be a positive number, not {self.lora_alpha}")
        parse_range_spec(self.layers, "layers")
        parse_range_spec(self.thoughts, "thoughts")
        if self.shard is not None:
            parse_shard(self.shard)

    @property
    def sites(self) -> list[str]:
        return [x.strip() for x in str(self.site).split(",") if x.strip()]

    @property
    def experiment_list(self) -> list[str]:
        return [e for e in EXPERIMENTS if e in self.experiments]

    def mode_spec(self):
        from thoughtpatch.patching.modes import Mode

        return Mode(self.mode, self.alpha, self.vector, self.noise_scale, self.seed)

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
        except UnicodeDecodeError:
            raise ThoughtpatchError(f"{p}: not UTF-8 text") from None
        except tomllib.TOMLDecodeError as e:
            raise ThoughtpatchError(f"{p}: malformed TOML: {e}") from None
        names = {f.name for f in dataclasses.fields(RunConfig)}
        unknown = [k for k in data if k.replace("-", "_") not in names]
        if unknown:
            raise ThoughtpatchError(f"{p}: unknown key(s) {', '.join(unknown)}")
        values = {k.replace("-", "_"): v for k, v in data.items()}
        check_types(values, where=f"{p}: ")
        return RunConfig(**(values | {k: v for k, v in overrides.items() if v is not None}))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(v) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}.get(type(v), type(v).__name__)
    return f"{kind} ({v!r})" if not isinstance(v, (list, dict)) else kind


def check_types(values: dict, where: str) -> None:
    """Each setting has its field's type: a string is not a bool or an int, a list is a list
    (TOML `experiments = "layer"` is refused rather than split into characters)."""
    hints = typing.get_type_hints(RunConfig)
    for name, v in values.items():
        tp = hints[name]
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
        if v is None and optional:
            continue
        base = next(a for a in typing.get_args(tp) if a is not type(None)) if optional else tp
        if typing.get_origin(base) is list:
            ok, want = isinstance(v, list) and all(isinstance(x, str) for x in v), 'a list of names, e.g. ["layer", "position"]'
        elif base is bool:
            ok, want = isinstance(v, bool), "true or false"
        elif base is int:
            ok, want = isinstance(v, int) and not isinstance(v, bool), "an integer"
        elif base is float:
            ok, want = isinstance(v, (int, float)) and not isinstance(v, bool), "a number"
        else:
            ok, want = isinstance(v, base), "a string"
        if not ok:
            key = f"key '{name}'" if where else _flag(name)
            raise ThoughtpatchError(f"{where}{key}: expected {want}, got {_shown(v)}")


def parse_range_spec(spec: str | None, what: str) -> set | None:
    """The syntax of a --layers / --thoughts value, checked without a model: None = all."""
    if spec is None or spec == "all":
        return None
    chosen: set = set()
    for part in str(spec).split(","):
        part = part.strip()
        if part == "input":
            chosen.add("input")
        elif "-" in part:
            a, b = part.split("-", 1)
            if not (a.isascii() and a.isdigit() and b.isascii() and b.isdigit()):
                raise ThoughtpatchError(f"--{what}: cannot read '{part}'")
            if int(a) > int(b):
                raise ThoughtpatchError(f"--{what}: '{part}' is reversed (write {b}-{a})")
            chosen.update(range(int(a), int(b) + 1))
        elif part.isascii() and part.isdigit():
            chosen.add(int(part))
        else:
            raise ThoughtpatchError(f"--{what}: cannot read '{part}'")
    return chosen


def parse_range(spec: str | None, universe: list, what: str) -> list:
    """"input,0-3,5" → ["input", 0, 1, 2, 3, 5] (keeping the universe's order)."""
    chosen = parse_range_spec(spec, what)
    if chosen is None:
        return list(universe)
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
    from thoughtpatch.model.loader import ORGANISMS

    if cfg.model in ORGANISMS:
        return ORGANISMS[cfg.model] / "pairs.json"
    raise ThoughtpatchError("--pairs is required for a model other than the organism")


def input_pairs(cfg: RunConfig, say: Callable[[str], None]) -> tuple[Path, list[Pair], list[Pair], list[Pair]]:
    """The pairs of this run, read and checked before any model loads: pairs whose two answers
    are equal are dropped with a warning naming them (nothing to patch towards), then --limit
    and --test-mode take the first ones, then --shard its share. Causal tracing reads
    questions instead (each a unit whose two sides are the same question). Returns (the file
    read, the set the shards split, this run's pairs, the pairs dropped for equal answers)."""
    same: list[Pair] = []
    if "trace" in cfg.experiments:
        pairs_path, pairs = trace_units(cfg)
    else:
        pairs_path = Path(cfg.pairs) if cfg.pairs else default_pairs_path(cfg)
        pairs = load_pairs(pairs_path)
        same = [p for p in pairs if p.clean.answer == p.corrupted.answer]
        if same:
            say(
                f"warning: {pairs_path}: dropped {len(same)} pair(s) whose clean and corrupted answers are equal "
                f"(pair ids {', '.join(str(p.pair_id) for p in same)}); `thoughtpatch pairs filter` removes them from the file"
            )
            pairs = [p for p in pairs if p.clean.answer != p.corrupted.answer]
    if cfg.limit:
        pairs = pairs[: cfg.limit]
    if cfg.test_mode:
        pairs = pairs[:5]
    if not pairs:
        raise ThoughtpatchError(f"{pairs_path}: no pairs" + (" left once those with equal answers are dropped" if same else ""))
    full_pairs = pairs
    if cfg.shard:
        i, n = parse_shard(cfg.shard)
        pairs = [p for pos, p in enumerate(full_pairs) if pos % n == i]
        if not pairs:
            raise ThoughtpatchError(f"--shard {cfg.shard}: this shard has no pairs ({len(full_pairs)} pairs in {pairs_path})")
    return pairs_path, full_pairs, pairs, same


def trace_units(cfg: RunConfig) -> tuple[Path, list[Pair]]:
    """Causal tracing's questions: --questions FILE, else the clean questions of --pairs FILE,
    else (an organism) N questions evenly from its held-out set (--n) or its default pairs."""
    from thoughtpatch.data.questions import load_questions
    from thoughtpatch.model.loader import ORGANISMS

    if cfg.questions:
        path = Path(cfg.questions)
    elif cfg.pairs:
        path = Path(cfg.pairs)
    elif cfg.model in ORGANISMS:
        path = ORGANISMS[cfg.model] / ("heldout.json" if cfg.n else "pairs.json")
    else:
        raise ThoughtpatchError("trace needs questions: --questions FILE (e.g. GSM8K test as it is) or --pairs FILE")
    units = load_questions(path)
    if cfg.n:
        units = [units[i * len(units) // cfg.n] for i in range(min(cfg.n, len(units)))]
    return path, units


def max_positions(model) -> int | None:
    """How many positions the model has (GPT-2's n_positions is aliased to this name)."""
    return getattr(model.hf.config, "max_position_embeddings", None)


def positions_left(model, prompt_len: int) -> int | None:
    """Positions left after a prompt and its K thoughts: for <eot> and the answer tokens
    (greedy decoding of n tokens uses n of them). None when the model has no limit."""
    limit = max_positions(model)
    return None if limit is None else limit - prompt_len - model.num_thoughts


def fit_decode(model, prompt_len: int, max_new_tokens: int, what: str) -> int:
    """The decode limit for one prompt: refused when the prompt and its thoughts leave no
    position for an answer, else max_new_tokens or the positions left, whichever is smaller."""
    room = positions_left(model, prompt_len)
    if room is None:
        return max_new_tokens
    if room < 1:
        raise ThoughtpatchError(
            f"{what}: the prompt is {prompt_len} tokens; with {model.num_thoughts} thoughts that leaves no room for an answer in the model's {max_positions(model)} positions"
        )
    return min(max_new_tokens, room)


def plan_pairs(model, pairs: list[Pair], pairs_path: Path, max_new_tokens: int, stop_ids, trace: bool = False) -> tuple[dict, int]:
    """Each pair's two prompts and its target, checked against the loaded model before anything
    is written: the answers must tokenise apart, and prompt + K thoughts + the longer answer
    continuation must fit the model's positions. Greedy decoding stops at the model's last
    position (a pair's decode limit is max_new_tokens or the room left, whichever is smaller).
    Returns ({pair id: (clean ids, corrupted ids, target)}, how many pairs had their limit cut).
    A causal-tracing unit has one question and one answer: both sides are its prompt."""
    from thoughtpatch.patching.engine import Target

    limit, k = max_positions(model), model.num_thoughts
    plans, cut = {}, 0
    for p in pairs:
        ids = {"clean": model.prompt_ids(p.clean.question), "corrupted": model.prompt_ids(p.corrupted.question)}
        try:
            if trace:
                target = Target.for_answer(model, p.clean.answer, max_new_tokens=max_new_tokens, stop_ids=stop_ids)
            else:
                target = Target.for_answers(model, p.clean.answer, p.corrupted.answer, max_new_tokens=max_new_tokens, stop_ids=stop_ids)
        except ValueError as e:  # e.g. 5 and 5.0 after the template: nothing to patch towards
            raise ThoughtpatchError(f"{pairs_path}: pair {p.pair_id}: {e}; remove it (thoughtpatch pairs filter)") from None
        need = max(len(target.clean), len(target.corrupted))  # <eot> + the answer, teacher-forced
        for side, t in ids.items():
            room = positions_left(model, len(t))
            if room is not None and need > room:
                raise ThoughtpatchError(
                    f"{pairs_path}: pair {p.pair_id}: the {side} prompt is {len(t)} tokens; with {k} thoughts and the "
                    f"{need}-token answer it needs {len(t) + k + need} positions, the model has {limit}"
                )
        decode = fit_decode(model, max(map(len, ids.values())), max_new_tokens, f"{pairs_path}: pair {p.pair_id}")
        if decode < max_new_tokens:
            target = dataclasses.replace(target, max_new_tokens=decode)
            cut += 1
        plans[p.pair_id] = (ids["clean"], ids["corrupted"], target)
    return plans, cut


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
    shard_dirs = [root / f"shard-{r}-of-{world}" for r in range(world)]
    claim_out(root, cfg.resume, allowed=frozenset(d.name for d in shard_dirs))
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
    merges the shards into the run directory.

    Order: validate (settings, pairs, --out and what a resume continues; no model, no writes)
    → load the model → own the directory (lock) → `sweep` → reports."""
    if cfg.shard is None and (state := distributed_state()) is not None:
        cfg.validate()
        return _run_distributed(cfg, state, progress, log)
    say = log or (lambda s: print(s, file=sys.stderr))
    cfg.validate()
    pairs_path, full_pairs, pairs, same_answer = input_pairs(cfg, say)
    out = Path(cfg.out) if cfg.out else Path("runs") / f"{Path(str(cfg.model)).name}-{time.strftime('%Y%m%d-%H%M%S')}"

    from thoughtpatch.model import load_model
    from thoughtpatch.model.checkpoint import find_checkpoint_file
    from thoughtpatch.model.loader import resolve_model

    ckpt_path, _ = resolve_model(cfg.model, cfg.base)
    model_sha = sha256_file(find_checkpoint_file(ckpt_path))
    check_resume(out, claim_out(out, cfg.resume), result_config(cfg, pairs_path), model_sha, pairs_sha256(pairs))
    model = load_model(cfg.model, base=cfg.base, dtype=cfg.dtype, lora_alpha=cfg.lora_alpha, num_thoughts=cfg.num_thoughts, device=device or "cpu", family=cfg.family)
    sweep(model, pairs, cfg, out=out, full_pairs=full_pairs, same_answer=same_answer, pairs_path=pairs_path, model_sha=model_sha, progress=progress, say=say)
    if cfg.report:
        from thoughtpatch.report.markdown import write_reports

        write_reports(out)
    return out


def result_config(cfg: RunConfig, pairs_path) -> dict:
    return {k: getattr(cfg, k) for k in RunConfig.RESULT_KEYS} | {"pairs": str(pairs_path)}


def check_resume(out: Path, old: dict | None, new_cfg: dict, model_sha: str, pairs_sha: str) -> None:
    """A resumed run must have the settings that change results, the model weights and the
    pairs of the run it continues (settings a run made before they existed count as their
    defaults)."""
    if old is None:
        return
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.name in RunConfig.RESULT_KEYS and not isinstance(f.default, dataclasses._MISSING_TYPE)}
    old_cfg = defaults | old.get("result_config", {})
    diff = [k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k)]
    if old["model"].get("sha256") != model_sha:
        diff.append("model weights")
    if old.get("pairs", {}).get("sha256") != pairs_sha:
        diff.append("pairs content")
    if diff:
        raise ThoughtpatchError(f"{out}: cannot resume, the config changed ({', '.join(sorted(diff))})")


def _cells(model, exp: str, sites: list[str], layers: list, thoughts: list[int], knock_on: list[str]) -> list[tuple]:
    """Every cell key (results.CELL_KEYS order) one pair writes for `exp`."""
    from thoughtpatch.patching.experiments import loc_columns, locations

    if exp == "knockout":
        blocks = [l for l in layers if l != "input"]
        return [(run, l, k) for run in knock_on for k in thoughts for l in blocks]
    steps = range(model.num_thoughts) if exp == "iterative" else thoughts
    out = []
    for site in sites:
        for loc in locations(model, site, layers):
            c = loc_columns(site, loc)
            base = (c["site"], c["layer"], c.get("head"))
            out += [base] if exp == "layer" else [(*base, k) for k in steps]
    return out


def sweep(
    model, pairs: list[Pair], cfg: RunConfig, *, out: Path | None = None, full_pairs: list[Pair] | None = None,
    same_answer: list[Pair] = (), pairs_path=None, model_sha: str | None = None, progress: bool = False,
    say: Callable[[str], None] = lambda s: None,
):
    """Every experiment of `cfg` on `pairs` with a loaded model: the one path of a run. With
    `out` the run directory is locked, written pair by pair and resumable; without it nothing
    is written. Returns the run as `RunData` (what `thoughtpatch.open_run` reads back)."""
    from thoughtpatch.patching.experiments import all_layers

    full_pairs = full_pairs or pairs
    pairs_path = pairs_path or "(in memory)"
    layers = parse_range(cfg.layers, all_layers(model), "layers")
    thoughts = parse_range(cfg.thoughts, list(range(model.num_thoughts)), "thoughts")
    stop_ids = stop_ids_for(model, cfg.stop)
    max_new = cfg.max_new_tokens or model.max_new_tokens
    trace = "trace" in cfg.experiments
    plans, cut = plan_pairs(model, pairs, pairs_path, max_new, stop_ids, trace=trace)
    mode = cfg.mode_spec()
    if len(full_pairs) > len(pairs) and (mode.needs_stats or mode.name == "resample"):
        # a shard's mode statistics and resample partners come from the whole pair set
        ours = {p.pair_id for p in pairs}
        plans |= plan_pairs(model, [p for p in full_pairs if p.pair_id not in ours], pairs_path, max_new, stop_ids, trace=trace)[0]
    if cut:
        say(f"note: the model has {max_positions(model)} positions: greedy decoding of {cut} of {len(pairs)} pairs stops at the last one, before --max-new-tokens {max_new}")
    manifest = {
        "config": dataclasses.asdict(cfg) | {"pairs": str(pairs_path), "out": str(out) if out else None},
        "result_config": result_config(cfg, pairs_path),
        "model": {
            "checkpoint": str(model.source.get("checkpoint")),
            "sha256": model_sha,
            **{k: v for k, v in model.source.items() if k != "checkpoint"},
            "family": model.family.name,
            "arch": model.arch.name,
            "num_layers": model.num_layers,
            "num_heads": model.num_heads,
            "num_kv_heads": model.num_kv_heads,
            "hidden_size": model.hidden_size,
            "num_thoughts": model.num_thoughts,
            "max_positions": max_positions(model),
            "answer_template": model.answer_template,
            "stop_ids": list(stop_ids),
            "max_new_tokens": max_new,
        },
        "pairs": {"path": str(pairs_path), "sha256": pairs_sha256(pairs), "n": len(pairs), "ids": [p.pair_id for p in pairs]},
        # The whole set the shards split (the same as the above when unsharded); merge checks it.
        "full_pairs": {"sha256": pairs_sha256(full_pairs), "n": len(full_pairs), "ids": [p.pair_id for p in full_pairs]},
        "shard": {"index": parse_shard(cfg.shard)[0], "count": parse_shard(cfg.shard)[1]} if cfg.shard else None,
        "experiments": cfg.experiment_list,
        "sites": cfg.sites,
        "mode": cfg.mode_spec().columns(),
        "layers": [str(l) for l in layers],
        "thoughts": thoughts,
        "versions": _versions(),
    }
    if out is None:
        manifest["started"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        return _sweep(model, pairs, full_pairs, cfg, plans, same_answer, layers, thoughts, manifest, None, progress, say)
    with RunLock(out):
        # Checked again now that no other process can write here.
        old = claim_out(out, cfg.resume)
        check_resume(out, old, manifest["result_config"], model_sha, manifest["pairs"]["sha256"])
        manifest["started"] = old.get("started") if old else time.strftime("%Y-%m-%dT%H:%M:%S")
        if old:
            manifest["resumed"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        return _sweep(model, pairs, full_pairs, cfg, plans, same_answer, layers, thoughts, manifest, out, progress, say)


def _sweep(model, pairs, full_pairs, cfg, plans, same_answer, layers, thoughts, manifest, out: Path | None, progress: bool, say):
    """Everything after the checks (the caller holds the run directory's lock when `out` is set)."""
    import torch

    from thoughtpatch.patching import checks as C
    from thoughtpatch.patching.engine import BatchedEngine, Prompt, ReferenceEngine
    from thoughtpatch.patching.experiments import PairRuns, Spec, patch_pair, trace_noise, unpatched_run
    from thoughtpatch.patching.modes import ModeContext, SiteStats
    from thoughtpatch.patching.selection import select
    from thoughtpatch.report.cache import load_cache, save_cache
    from thoughtpatch.report.results import open_results, read_rows, summary_doc
    from thoughtpatch.report.rundata import RunData, warnings_of
    from thoughtpatch.report.tracking import Tracker

    trace = "trace" in cfg.experiments
    cache_meta = {
        "model": manifest["model"]["sha256"],
        "pairs_sha256": manifest["pairs"]["sha256"],
        "num_thoughts": model.num_thoughts,
        "num_layers": model.num_layers,
        "hidden_size": model.hidden_size,
        "dtype": cfg.dtype,
        "max_new_tokens": manifest["model"]["max_new_tokens"],
        "stop_ids": manifest["model"]["stop_ids"],
    } | ({"noise_tokens": cfg.noise_tokens, "seed": cfg.seed} if trace else {})
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def prompts_of(p: Pair) -> tuple[list[int], Prompt]:
        ci, ri, _ = plans[p.pair_id]
        if trace:  # the same question, its number tokens' embeddings noised (seeded by the unit)
            return ci, Prompt(tuple(ci), trace_noise(model, ci, p.pair_id, cfg.noise_tokens, cfg.seed))
        return ci, Prompt(tuple(ri))

    def unpatched(p: Pair) -> PairRuns:
        ci, rp = prompts_of(p)
        target = plans[p.pair_id][2]
        return PairRuns(p, ci, rp, target, unpatched_run(model, ci, target), unpatched_run(model, rp, target))

    def runs_from(clean: dict, corrupted: dict) -> list[PairRuns]:
        return [PairRuns(p, *prompts_of(p), plans[p.pair_id][2], clean[p.pair_id], corrupted[p.pair_id]) for p in pairs]

    cache_paths = {role: out / f"{role}_activations.safetensors" for role in ("clean", "corrupted")} if out else {}
    with Progress(progress) as prog:
        t0 = time.perf_counter()
        cached = bool(cache_paths) and all(p.exists() for p in cache_paths.values())
        if cached:
            runs = runs_from(*(load_cache(path, model, cache_meta | {"role": role}) for role, path in cache_paths.items()))
        else:
            step = prog.task("unpatched runs (cache)", len(pairs))
            runs = []
            for p in pairs:
                runs.append(unpatched(p))
                step()
        timings["unpatched_runs"] = time.perf_counter() - t0

        patched, right, wrong = select(model, runs, cfg.keep, trace=trace)
        if not patched:
            raise ThoughtpatchError(
                f"--keep correct: the model answers none of the {len(runs)} pairs right on both sides; nothing to patch (--keep all patches them anyway)"
            )
        dropped = [{"pair_id": p.pair_id, "reason": f"same answer ({p.clean.answer})", "patched": False} for p in same_answer]
        dropped += [{**w, "reason": "answered wrong", "patched": cfg.keep == "all"} for w in wrong]
        manifest["selection"] = {
            "keep": cfg.keep,
            "same_answer": [p.pair_id for p in same_answer],
            "unpatched": len(runs),
            "correct": len(right),
            "wrong": len(wrong),
            "patched": len(patched),
            "dropped": len(same_answer) + (len(wrong) if cfg.keep == "correct" else 0),
        }
        exps = cfg.experiment_list
        knock_on = ["clean", "corrupted"] if cfg.knock_on == "both" else [cfg.knock_on]
        cells = {e: _cells(model, e, cfg.sites, layers, thoughts, knock_on) for e in exps}
        manifest["cells_per_pair"] = {e: len(c) for e, c in cells.items()}  # what merge expects of every pair
        paths = {e: out / e / "results.jsonl" for e in exps} if out else {}
        # What a resumed run holds is checked (and a torn pair dropped) before anything is written.
        writers, done = open_results(paths, cells, [r.pair.pair_id for r in patched], cfg.direction) if out else ({}, set())

        # The mode's pair-set statistics (mean, spread, mean difference) and resample partners:
        # over the receiving runs of the whole pair set (other shards' pairs are run here too).
        mode = cfg.mode_spec()
        by_id = {r.pair.pair_id: r for r in runs}

        def runs_of(p: Pair) -> PairRuns:
            if p.pair_id not in by_id:
                by_id[p.pair_id] = unpatched(p)
            return by_id[p.pair_id]

        ctx = ModeContext(mode, vectors=ModeContext.load_vectors(mode.vector) if mode.vector not in (None, "diff") else None)
        if mode.needs_stats:
            roles = [runs_of(p).roles(cfg.direction) for p in full_pairs]
            ctx.stats = SiteStats.of([r[1].acts for r in roles], [r[2].acts for r in roles])
            manifest["mode"]["stats_n"] = ctx.stats.n
        position = {p.pair_id: i for i, p in enumerate(full_pairs)}
        partner_of = {p.pair_id: full_pairs[(i + 1) % len(full_pairs)] for i, p in enumerate(full_pairs)} if mode.name == "resample" else {}

        if out:
            # The first outputs: a directory holding a manifest is a run that --resume continues.
            atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
            atomic_write_text(out / "pairs.json", json.dumps([p.to_dict() for p in pairs], indent=1) + "\n")
            atomic_write_text(out / "dropped_pairs.json", json.dumps(dropped, indent=1) + "\n")
            if not cached:
                for role, path in cache_paths.items():
                    save_cache(path, {r.pair.pair_id: (getattr(r, f"{role}_ids"), getattr(r, role)) for r in runs}, cache_meta | {"role": role})
            if ctx.stats is not None:
                _save_stats(out / "site_stats.safetensors", ctx.stats, manifest["mode"])
        # W&B logs beside a run directory; an in-memory run has none to log to
        tracker = Tracker(cfg.wandb if out else "disabled", out or Path("."), manifest["config"], name=out.name if out else "")

        base_checks = C.baseline_checks(model, runs, manifest["model"]["max_new_tokens"], manifest["model"]["stop_ids"])
        acc = {c["name"]: c["value"] for c in base_checks}
        say(
            f"baseline: clean {acc['baseline_accuracy_clean']:.1%}, {'noised' if trace else 'corrupted'} {acc['baseline_accuracy_corrupted']:.1%}, "
            f"thoughts zeroed {acc['accuracy_thoughts_zeroed']:.1%} ({len(pairs)} {'questions' if trace else 'pairs'}); "
            f"{len(right)} answered right{'' if trace else ' on both sides'}, patching {'all ' if cfg.keep == 'all' else 'those '}{len(patched)}"
        )
        for w in warnings_of(base_checks):
            say(f"\n{'!' * 78}\nWARNING {w}\n{'!' * 78}\n")

        engine = BatchedEngine(model, cfg.batch_size) if cfg.engine == "batched" else ReferenceEngine(model)
        if cached:  # the experiments reuse the activation cache from disk, after checking it is this run's
            fresh = {r.pair.pair_id: r for r in runs_from(*(load_cache(path, model, cache_meta | {"role": role}) for role, path in cache_paths.items()))}
            patched = [fresh[r.pair.pair_id] for r in patched]
        specs = [Spec(site, tuple(layers), tuple(thoughts), cfg.direction, mode, cfg.readers, tuple(knock_on)) for site in cfg.sites]
        rows: dict[str, list[dict]] = {e: [] for e in exps}
        todo = [r for r in patched if r.pair.pair_id not in done]
        t0 = time.perf_counter()
        step = prog.task(f"patching ({', '.join(exps)})", len(patched), done=len(patched) - len(todo))
        for r in todo:
            # Every experiment and site of a pair in this pair's turn: the same batches whether
            # the run was interrupted or not (a pair is done only when all are written).
            partner = runs_of(partner_of[r.pair.pair_id]) if partner_of else None
            got: dict[str, list[dict]] = {e: [] for e in exps}
            for i, spec in enumerate(specs):
                wanted = [e for e in exps if e != "knockout" or i == 0]  # knockout has no site
                for e, rs in patch_pair(engine, r, wanted, spec, ctx, partner).items():
                    got[e] += rs
            for e in exps:
                if out:
                    writers[e].write_pair(got[e])
                else:
                    rows[e] += got[e]
                tracker.log_pair(got[e])
            step()
        timings["patching"] = time.perf_counter() - t0
        if out:
            rows = {e: read_rows(writers[e].path, e) for e in exps}
        summaries, right_ids = {}, {r.pair.pair_id for r in right}
        for exp in exps:
            rows[exp].sort(key=lambda row: position[row["pair_id"]])  # stable: a pair's rows keep their order
            extra = {"direction": cfg.direction, "model": manifest["model"]["checkpoint"], "pair_set": cfg.keep}
            summaries[exp] = summary_doc(rows[exp], exp, extra)
            if out:
                atomic_write_text(out / exp / "summary.json", json.dumps(summaries[exp], indent=1) + "\n")
                if cfg.keep == "all":  # the correct-only analysis from the same rows: no second model pass
                    correct = summary_doc([row for row in rows[exp] if row["pair_id"] in right_ids], exp, extra | {"pair_set": "correct"})
                    atomic_write_text(out / exp / "summary_correct.json", json.dumps(correct, indent=1) + "\n")
            tracker.log_summary(exp, summaries[exp]["cells"])

        t0 = time.perf_counter()
        checks = list(base_checks) + C.run_checks(model, patched[0], cfg.direction, cfg.sites, rows, trace=trace, knockout="knockout" in exps)
        timings["checks"] = time.perf_counter() - t0
    wandb_dir = tracker.finish()
    timings["total"] = time.perf_counter() - t_start
    manifest["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    manifest["device"] = str(model.device) + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "")
    if wandb_dir:
        manifest["wandb_dir"] = wandb_dir
    if out:
        atomic_write_text(out / "checks.json", json.dumps({"checks": checks}, indent=1) + "\n")
        atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    from thoughtpatch.report.rundata import verdict_counts

    say(f"checks: {verdict_counts(checks)}")
    say(f"{'wrote ' + str(out) if out else 'done'} in {timings['total']:.1f} s")
    return RunData(out or Path("."), manifest, [p.to_dict() for p in pairs], checks, rows, summaries, dropped=dropped)


def _save_stats(path: Path, stats, mode_cols: dict) -> None:
    """The mode's pair-set statistics, stored with the run (n in the metadata)."""
    from safetensors.torch import save_file

    from thoughtpatch.data.schema import atomic_path

    with atomic_path(path) as tmp:
        save_file(stats.to_tensors(), str(tmp), metadata={"thoughtpatch": json.dumps(mode_cols | {"n": stats.n})})
