"""Validation checks run on every experiment (DESIGN §3). A check is a finding, not an
assertion: each reports a value and a verdict and a failure is shown, never hidden.
Verdicts: pass; info (a value without a threshold); warn (the run is valid but describes
something other than it seems, e.g. a model that does not solve the questions); fail."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

import torch

from thoughtpatch.model.runtime import INPUT, Intervention, Site, ThoughtModel
from thoughtpatch.patching import metrics as M
from thoughtpatch.patching.engine import BatchedEngine, Patch, ReferenceEngine, Variant
from thoughtpatch.patching.experiments import Direction, PairRuns, all_layers, locations, site_at, unpatched_run

MAX_SELF_PATCH_SITES = 128  # one reference run per site: a wide head grid is sampled evenly


def check(name: str, value, verdict: str, detail: str = "") -> dict:
    if isinstance(value, float) and math.isnan(value):
        value = None
    return {"name": name, "value": value, "verdict": verdict, "detail": detail}


def _mean_by(rows: list[dict], keys: tuple[str, ...], metric: str) -> dict[tuple, float]:
    acc: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        v = r[metric]
        if not (isinstance(v, float) and math.isnan(v)):
            acc[tuple(_loc(r) if k == "layer" else r.get(k) for k in keys)].append(float(v))
    return {k: sum(v) / len(v) for k, v in acc.items() if v}


def _loc(r: dict):
    """A grid row's location: the layer, or (layer, head) on the head site."""
    return r["layer"] if r.get("head") is None else (r["layer"], r["head"])


def alone(model: ThoughtModel, runs: PairRuns) -> PairRuns:
    """The pair's unpatched runs computed one at a time. The null checks compare with them bit
    for bit; runs read from a batch of many prompts (`unpatched_runs`) differ in the last bits."""
    return PairRuns(
        runs.pair, runs.clean_ids, runs.corrupted_prompt, runs.target,
        unpatched_run(model, runs.clean_ids, runs.target), unpatched_run(model, runs.corrupted_prompt, runs.target),
    )


def self_patch_checks(model: ThoughtModel, runs: PairRuns, direction: Direction, site: str = "resid") -> list[dict]:
    """1. Writing the receiving run's own activations back, site by site, changes nothing."""
    runs = alone(model, runs)
    prompt, receiving, _ = runs.roles(direction)
    locs = locations(model, site, all_layers(model))
    sites = [site_at(site, loc, k) for k in range(model.num_thoughts) for loc in locs]
    sampled = len(sites) > MAX_SELF_PATCH_SITES
    if sampled:
        sites = [sites[i * len(sites) // MAX_SELF_PATCH_SITES] for i in range(MAX_SELF_PATCH_SITES)]
    variants = [Variant((Patch(s, model.site_value(receiving.acts, s)),)) for s in sites]
    rec = (site,) if site != INPUT else (INPUT,)
    ref = ReferenceEngine(model).run(prompt, variants, runs.target, record=rec)
    exact = max(float((ro.decision_logits - receiving.decision_logits).abs().max()) for ro in ref)
    same_answers = all(ro.answer.token_ids == receiving.answer.token_ids for ro in ref)
    bat = BatchedEngine(model).run(prompt, variants, runs.target, record=rec)
    batched = max(float((ro.decision_logits - receiving.decision_logits).abs().max()) for ro in bat)
    pid = runs.pair.pair_id
    what = f"{len(sites)} {site} sites" + (" (an even sample of the grid)" if sampled else "")
    return [
        check(
            "self_patch_exact", exact, "pass" if exact == 0 and same_answers else "fail",
            f"pair {pid}: receiving activations written back at each of {what}, one run each; max |Δ logit| at the decision position (must be 0)",
        ),
        check(
            "self_patch_batched", batched, "pass" if batched <= 1e-4 else "fail",
            f"pair {pid}: the same {len(sites)} self-patches through the batched engine; max |Δ logit| (batch arithmetic may differ in the last bits)",
        ),
    ]


def all_sites_check(model: ThoughtModel, runs: PairRuns, direction: Direction) -> list[dict]:
    """2. Every thought site from the source: the thoughts become the source's thoughts; with
    the source prompt as well, the whole run is the source run."""
    runs = alone(model, runs)
    prompt, receiving, source = runs.roles(direction)
    src_prompt = runs.roles("noising" if direction == "denoising" else "denoising")[0]
    sites = [site_at("resid", loc, k) for k in range(model.num_thoughts) for loc in all_layers(model)]
    v = Variant(tuple(Patch(s, model.site_value(source.acts, s)) for s in sites))
    ref = ReferenceEngine(model)
    (ro,) = ref.run(prompt, [v], runs.target)
    thoughts = max(float((ro.resid - source.resid).abs().max()), float((ro.inputs - source.inputs).abs().max()))
    (full,) = ref.run(src_prompt, [v], runs.target)
    whole = float((full.decision_logits - source.decision_logits).abs().max())
    kl_left = M.kl_runs(source, ro)
    flip = ro.answer.same(source.answer)
    pid = runs.pair.pair_id
    return [
        check(
            "all_sites_reproduce_source", max(thoughts, whole), "pass" if thoughts == 0 and whole == 0 else "fail",
            f"pair {pid}: all {len(sites)} thought sites patched; max |Δ| of thought states vs the source run, and of decision logits when the prompt is the source's too",
        ),
        check(
            "all_thought_sites_kl_to_source", kl_left, "info",
            f"pair {pid}: with only the question left from the receiving run, KL(source ‖ patched) = {kl_left:.4g}, answer flips: {flip} — how much the answer re-reads the question",
        ),
    ]


def grid_checks(position: list[dict], layer: list[dict], direction: Direction, site: str = "resid") -> list[dict]:
    """3–6 from the Exp 1 grid and layer patching. Check 6 asks the whole state at one cell
    (resid, input) to favour the source outright; one component (attn, mlp, a head, a kv
    entry) adds to a state it does not replace, so there it asks the cell to move the pair's
    log-prob difference towards the source."""
    out = []
    grid = _mean_by(position, ("layer", "thought"), "kl")
    by_layer = _mean_by(layer, ("layer",), "kl")
    ratios = {}
    for (l,), lk in by_layer.items():
        s = sum(v for (gl, _), v in grid.items() if gl == l)
        ratios[str(l)] = s / lk if lk > 0 else math.nan
    finite = [r for r in ratios.values() if not math.isnan(r)]
    out.append(
        check(
            "sum_single_kl_vs_layer_kl", statistics.median(finite) if finite else math.nan, "info",
            "per layer Σ_k KL(l,k) / KL(layer l, all thoughts): " + ", ".join(f"{k}: {v:.3g}" for k, v in ratios.items()),
        )
    )
    vals = list(grid.values())
    med = statistics.median(vals) if vals else math.nan
    l0 = next((v for (loc, k), v in grid.items() if k == 0 and loc in (0, (0, 0))), math.nan)
    out.append(check("layer0_thought0_vs_median", l0 / med if med > 0 else math.nan, "info", f"mean KL at (0, 0) = {l0:.4g}, grid median = {med:.4g}"))
    mean = sum(vals) / len(vals) if vals else math.nan
    cv = statistics.pstdev(vals) / mean if vals and mean > 0 else math.nan
    out.append(check("heatmap_nonuniform", cv, "pass" if cv >= 0.1 else "fail", "coefficient of variation of the mean-KL grid over (layer, thought) cells (pass ≥ 0.1)"))
    if position:
        # "Most effective" = moves the answer furthest towards the source on average (KL alone
        # also rewards cells that merely break the run).
        sign = 1 if direction == "denoising" else -1
        toward = _mean_by(position, ("layer", "thought"), "answer_logit_diff")
        best = max(toward, key=lambda c: sign * toward[c])
        first = next(r["pair_id"] for r in position)
        row = next(r for r in position if r["pair_id"] == first and (_loc(r), r["thought"]) == best)
        where = f"pair {first} at the most effective cell (layer {best[0]}, thought {best[1]}: largest mean answer logit diff towards the source): "
        if site in ("resid", "input") or "logprob_diff_receiving" not in row:
            value, want = row["answer_logit_diff"], "its answer logit diff clean − corrupted should favour the source"
        else:
            value = row["logprob_diff"] - row["logprob_diff_receiving"]
            want = f"one {site} component: its log-prob difference should move towards the source (patched − unpatched shown)"
        out.append(check("first_pair_best_cell_logit_diff", value, "pass" if sign * value > 0 else "fail", where + want))
    return out


def iterative_checks(iterative: list[dict], position: list[dict], layer: list[dict], model) -> list[dict]:
    """7. Exp 2 sanity: iteration 0 ≡ Exp 1 (l, 0); activations move; no NaN; final vs others."""
    out = []
    exp1 = {(r["pair_id"], _loc(r)): r for r in position if r["thought"] == 0}
    keys = ("kl", "kl_to_clean", "answer_logit_diff", "logprob_diff", "answer")
    worst, n = 0.0, 0
    for r in iterative:
        if r["iteration"] == 0 and (r["pair_id"], _loc(r)) in exp1:
            e = exp1[(r["pair_id"], _loc(r))]
            n += 1
            for k in keys:
                a, b = float(r[k]), float(e[k])
                if not (math.isnan(a) and math.isnan(b)):
                    worst = max(worst, abs(a - b))
    out.append(check("iteration0_equals_exp1", worst, "pass" if n and worst <= 1e-5 else "fail", f"max |Δ| over {n} (pair, layer) rows and metrics {', '.join(keys)}"))
    norms: dict[tuple, list[float]] = defaultdict(list)
    for r in sorted(iterative, key=lambda r: r["iteration"]):
        norms[(r["pair_id"], _loc(r))].append(r["norm"])
    moving = sum(1 for v in norms.values() if len(set(v)) > 1)
    out.append(check("activations_change_between_iterations", moving / len(norms) if norms else math.nan, "pass" if moving == len(norms) and norms else "fail", f"{moving} of {len(norms)} (pair, layer) chains have norms that change across iterations"))
    nans = sum(1 for rows in (iterative, position, layer) for r in rows for k, v in r.items() if k in ("kl", "logprob_diff", "answer_logit_diff") and isinstance(v, float) and math.isnan(v))
    out.append(check("no_nan", nans, "pass" if nans == 0 else "fail", "NaN values in kl, logprob_diff and answer_logit_diff across all results"))
    last = model.num_thoughts - 1
    fin = _mean_by([r for r in iterative if r["iteration"] == last], ("layer",), "kl")
    e1 = _mean_by([r for r in position if r["thought"] == last], ("layer",), "kl")
    lp = _mean_by(layer, ("layer",), "kl")
    detail = "; ".join(f"layer {l}: Exp2 {fin[(l,)]:.3g} / Exp1 {e1.get((l,), math.nan):.3g} / layer {lp.get((l,), math.nan):.3g}" for (l,) in fin)
    out.append(check("final_iteration_vs_exp1_and_layer", statistics.mean(fin.values()) if fin else math.nan, "info", f"mean KL at the final iteration ({last}) — {detail}"))
    return out


AGGREGATE = {
    "sum_single_kl_vs_layer_kl", "layer0_thought0_vs_median", "heatmap_nonuniform", "first_pair_best_cell_logit_diff",
    "iteration0_equals_exp1", "activations_change_between_iterations", "no_nan", "final_iteration_vs_exp1_and_layer",
}


def base_name(name: str) -> str:
    """A check's name without its site ("heatmap_nonuniform[attn]" → "heatmap_nonuniform")."""
    return name.split("[", 1)[0]


def for_site(checks: list[dict], site: str) -> list[dict]:
    """The resid grid's checks keep their names; another site's are named with it."""
    return checks if site == "resid" else [c | {"name": f"{c['name']}[{site}]"} for c in checks]


def aggregate_checks(results: dict[str, list[dict]], direction: Direction, num_thoughts: int) -> list[dict]:
    """3–7 per site from the results alone (a run and a merge of shards compute them alike)."""
    from types import SimpleNamespace

    out = []
    sites = list(dict.fromkeys(r.get("site", "resid") for e in ("position", "layer", "iterative") for r in results.get(e, [])))
    for site in sites:
        of = {e: [r for r in results.get(e, []) if r.get("site", "resid") == site] for e in ("position", "layer", "iterative")}
        got = []
        if of["position"] and of["layer"]:
            got += grid_checks(of["position"], of["layer"], direction, site)
        if of["iterative"] and of["position"]:
            got += iterative_checks(of["iterative"], of["position"], of["layer"], SimpleNamespace(num_thoughts=num_thoughts))
        out += for_site(got, site)
    return out


def knockout_checks(model: ThoughtModel, runs: PairRuns) -> list[dict]:
    """Null check of the knockout: the later thoughts are the readers of the last thought's
    key, and there are none — nothing may change (one run alone, exactly)."""
    from thoughtpatch.patching.engine import Knockout

    k = model.num_thoughts - 1
    (ro,) = ReferenceEngine(model).run(runs.clean_ids, [Variant(knockouts=(Knockout(0, k, "thoughts"),))], runs.target)
    d = float((ro.decision_logits - runs.clean.decision_logits).abs().max())
    return [check("knockout_without_readers", d, "pass" if d == 0 else "fail",
                  f"pair {runs.pair.pair_id}: thought {k}'s key knocked out for the later thoughts (there are none); max |Δ logit| (must be 0)")]


def trace_checks(model: ThoughtModel, runs: PairRuns) -> list[dict]:
    """Null checks of causal tracing on the first question: restoring every thought site from
    the clean run gives the clean run's thoughts exactly; the noise reached the run at all."""
    sites = [site_at("resid", loc, k) for k in range(model.num_thoughts) for loc in all_layers(model)]
    v = Variant(tuple(Patch(s, model.site_value(runs.clean.acts, s)) for s in sites))
    (ro,) = ReferenceEngine(model).run(runs.corrupted_prompt, [v], runs.target)
    d = max(float((ro.resid - runs.clean.resid).abs().max()), float((ro.inputs - runs.clean.inputs).abs().max()))
    moved = M.kl_runs(runs.corrupted, runs.clean)
    pid = runs.pair.pair_id
    return [
        check("trace_restore_all_sites", d, "pass" if d == 0 else "fail",
              f"question {pid}: every thought site restored from the clean run; max |Δ| of the thoughts vs the clean run (must be 0)"),
        check("trace_noise_moves_the_answer", moved, "info",
              f"question {pid}: KL(noised ‖ clean) at the decision position = {moved:.4g} (0 would leave nothing to restore)"),
    ]


def run_checks(model: ThoughtModel, runs: PairRuns, direction: Direction, sites: list[str], results: dict[str, list[dict]], trace: bool = False, knockout: bool = False) -> list[dict]:
    """Every check a run computes after its experiments (the baseline ones come first)."""
    out = []
    patches = [e for e in results if e != "knockout"]
    if patches:
        for site in sites:
            out += for_site(self_patch_checks(model, runs, direction, site), site)
    if trace:
        out += trace_checks(model, runs)
    elif patches:
        out += all_sites_check(model, runs, direction)
    out += aggregate_checks(results, direction, model.num_thoughts)
    if knockout:
        out += knockout_checks(model, runs)
    return out


# The baseline checks are counts over pairs (value = count / (per-pair units × pairs)), so
# shards merge by adding counts. name: (units per pair, detail).
BASELINE = {
    "baseline_accuracy_clean": (1, "{k}/{d} clean questions answered right (greedy)"),
    "baseline_accuracy_corrupted": (1, "{k}/{d} corrupted questions answered right"),
    "accuracy_thoughts_zeroed": (2, "{k}/{d} questions right with every fed thought zeroed (is the model using its thoughts here?)"),
    "unpatched_answers_agree": (
        1,
        "{k}/{d} pairs whose clean and corrupted runs already give the same answer: there a patch that changes "
        "nothing counts as a flip, so this is the floor of every flip rate",
    ),
}


# Below this clean accuracy (half) the patching results describe a model that does not solve
# the questions: the run warns before patching and every report opens with it.
BASELINE_GATE = 0.5


def baseline_from_counts(counts: dict[str, int], n_pairs: int) -> list[dict]:
    out = []
    for name, (units, detail) in BASELINE.items():
        if name in counts:
            d = units * n_pairs
            value, verdict, text = counts[name] / d, "info", detail.format(k=counts[name], d=d)
            if name == "baseline_accuracy_clean":
                verdict = "pass" if value >= BASELINE_GATE else "warn"
                if verdict == "warn":
                    text += ", fewer than half: the results describe a model that does not solve these questions"
            out.append(check(name, value, verdict, text))
    return out


@torch.inference_mode()
def baseline_checks(model: ThoughtModel, pairs_runs: list[PairRuns], max_new_tokens: int | None, stop_ids) -> list[dict]:
    """8. Do the runs answer right, do they need their thoughts on these pairs, and do the
    two runs of a pair answer differently (else `flip` is true without any patch)?"""
    counts = {
        "baseline_accuracy_clean": sum(model.correct(r.clean.answer, r.pair.clean.answer) for r in pairs_runs),
        "baseline_accuracy_corrupted": sum(model.correct(r.corrupted.answer, r.pair.corrupted.answer) for r in pairs_runs),
        "unpatched_answers_agree": sum(r.clean.answer.same(r.corrupted.answer) for r in pairs_runs),
    }
    zero = [Intervention.zero(Site(INPUT, thought=k)) for k in range(model.num_thoughts)]
    ablated = 0
    for r in pairs_runs:
        for ids, gold in ((r.clean_ids, r.pair.clean.answer), (r.corrupted_ids, r.pair.corrupted.answer)):
            # decoding within the pair's own limit (its target's: the model's positions may cut it)
            limits = [x for x in (max_new_tokens, r.target.max_new_tokens) if x is not None]
            gens, _ = model.generate(model.think(model.encode(ids), zero, record_logits=False), max_new_tokens=min(limits) if limits else None, stop_ids=stop_ids)
            ablated += model.correct(gens[0], gold)
    return baseline_from_counts(counts | {"accuracy_thoughts_zeroed": ablated}, len(pairs_runs))
