"""The three experiments as variant sets over one engine (DESIGN §3).

* layer patching: for each layer, every thought at that layer from the source run;
* Exp 1 (position): each single site (layer, thought);
* Exp 2 (iterative): per layer, iteration 0 patches (l, 0) with the source activation; the
  patched run's own activation at (l, 1) becomes a₁; iteration i patches only (l, i) with aᵢ
  and records aᵢ₊₁. (Keeping earlier patches would make every iteration equal iteration 0.)

Layers are block indices 0…L-1 or "input" (the fed thought vector, HF hidden_states[0]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from thoughtpatch.data.schema import Pair
from thoughtpatch.model.runtime import INPUT, CodiModel, Layer, Site
from thoughtpatch.patching import metrics as M
from thoughtpatch.patching.engine import BatchedEngine, Patch, Readout, ReferenceEngine, Target, Variant, read_out

Direction = Literal["denoising", "noising"]
Engine = BatchedEngine | ReferenceEngine


@dataclass
class PairRuns:
    """A pair's two unpatched runs, measured against the same target."""

    pair: Pair
    clean_ids: list[int]
    corrupted_ids: list[int]
    target: Target
    clean: Readout
    corrupted: Readout

    def roles(self, direction: Direction) -> tuple[list[int], Readout, Readout]:
        """(receiving prompt, receiving run, source run)."""
        if direction == "denoising":
            return self.corrupted_ids, self.corrupted, self.clean
        return self.clean_ids, self.clean, self.corrupted


def unpatched_run(model: CodiModel, ids: list[int], target: Target) -> Readout:
    return read_out(model, model.think(model.encode(ids), record_logits=False), target)[0]


def pair_runs(model: CodiModel, pair: Pair, max_new_tokens: int = 256, stop_ids=None) -> PairRuns:
    target = Target.for_answers(model, pair.clean.answer, pair.corrupted.answer, max_new_tokens=max_new_tokens, stop_ids=stop_ids)
    ci, ri = model.prompt_ids(pair.clean.question), model.prompt_ids(pair.corrupted.question)
    return PairRuns(pair, ci, ri, target, unpatched_run(model, ci, target), unpatched_run(model, ri, target))


def activation(ro: Readout, layer: Layer, thought: int) -> torch.Tensor:
    return ro.inputs[thought] if layer == INPUT else ro.resid[thought, int(layer)]


def _rows(runs: PairRuns, direction: Direction, keys: list[dict], readouts: list[Readout]) -> list[dict]:
    _, receiving, source = runs.roles(direction)
    # The unpatched runs' logprob differences travel with every row, so that aggregates
    # (recovered as a ratio of means) can be recomputed from results.jsonl alone.
    base = {"logprob_diff_receiving": M.logprob_diff(receiving), "logprob_diff_source": M.logprob_diff(source)}
    return [
        {"pair_id": runs.pair.pair_id, "direction": direction, **key, **M.readout_metrics(ro, receiving, source, runs.target), **base}
        for key, ro in zip(keys, readouts)
    ]


def _layer_variants(source: Readout, layers: list[Layer], thoughts: list[int], num_thoughts: int) -> tuple[list[Variant], list[dict]]:
    variants = [Variant(tuple(Patch(Site(l, k), activation(source, l, k)) for k in thoughts)) for l in layers]
    return variants, [{"experiment": "layer", "layer": l} for l in layers]


def _position_variants(source: Readout, layers: list[Layer], thoughts: list[int], num_thoughts: int) -> tuple[list[Variant], list[dict]]:
    sites = [(l, k) for k in thoughts for l in layers]
    variants = [Variant((Patch(Site(l, k), activation(source, l, k)),)) for l, k in sites]
    return variants, [{"experiment": "position", "layer": l, "thought": k} for l, k in sites]


def _iterative_variants(source: Readout, layers: list[Layer], thoughts: list[int], num_thoughts: int) -> tuple[list[Variant], list[dict]]:
    """Exp 2. Variant (l, i) patches only (l, i): with the source activation when i = 0, else
    with what variant (l, i-1) itself produced at (l, i). The batched engine runs every chain
    in one pass (each link reads its predecessor's activation in the same forward); the
    reference engine runs the links one after another. `from_variant` indices are local."""
    variants, keys = [], []
    for i in range(num_thoughts):
        for n, l in enumerate(layers):
            if i == 0:
                patch = Patch(Site(l, 0), activation(source, l, 0))
            else:
                patch = Patch(Site(l, i), None, from_variant=len(variants) - len(layers))
            variants.append(Variant((patch,)))
            keys.append({"experiment": "iterative", "layer": l, "iteration": i})
    return variants, keys


BUILDERS = {"layer": _layer_variants, "position": _position_variants, "iterative": _iterative_variants}


def patch_pair(
    engine: Engine,
    runs: PairRuns,
    experiments: list[str],
    layers: list[Layer],
    thoughts: list[int],
    num_thoughts: int,
    direction: Direction = "denoising",
) -> dict[str, list[dict]]:
    """Every variant of the requested experiments for one pair, through one engine call (the
    batched engine then needs a single pass of K thoughts and one read-out for all of them)."""
    ids, _, source = runs.roles(direction)
    variants: list[Variant] = []
    spans: dict[str, tuple[int, list[dict]]] = {}
    for exp in experiments:
        vs, keys = BUILDERS[exp](source, layers, thoughts, num_thoughts)
        off = len(variants)
        # from_variant indices are local to each experiment's list: shift them
        variants += [Variant(tuple(Patch(p.site, p.value, p.mode, None if p.from_variant is None else p.from_variant + off) for p in v.patches)) for v in vs]
        spans[exp] = (off, keys)
    readouts = engine.run(ids, variants, runs.target)
    out = {}
    for exp, (off, keys) in spans.items():
        ros = readouts[off : off + len(keys)]
        if exp == "iterative":
            for key, ro in zip(keys, ros):
                l, i = key["layer"], key["iteration"]
                a = activation(ro, l, i)  # the activation this iteration patched in (a_i)
                key |= {"norm": M.norm(a), "cos_clean": M.cos(a, activation(runs.clean, l, i)), "cos_corrupted": M.cos(a, activation(runs.corrupted, l, i))}
        out[exp] = _rows(runs, direction, keys, ros)
    return out


def layer_patching(engine: Engine, runs: PairRuns, layers: list[Layer], thoughts: list[int], direction: Direction = "denoising") -> list[dict]:
    """Layer patching: for each layer, every thought in `thoughts` at once."""
    return patch_pair(engine, runs, ["layer"], layers, thoughts, len(runs.clean.inputs), direction)["layer"]


def position_patching(engine: Engine, runs: PairRuns, layers: list[Layer], thoughts: list[int], direction: Direction = "denoising") -> list[dict]:
    """Exp 1: each single site (layer, thought)."""
    return patch_pair(engine, runs, ["position"], layers, thoughts, len(runs.clean.inputs), direction)["position"]


def iterative_patching(engine: Engine, runs: PairRuns, layers: list[Layer], num_thoughts: int, direction: Direction = "denoising") -> list[dict]:
    """Exp 2: per layer, chained iterations (see `_iterative_variants`)."""
    return patch_pair(engine, runs, ["iterative"], layers, [], num_thoughts, direction)["iterative"]


def all_layers(model: CodiModel) -> list[Layer]:
    return [INPUT, *range(model.num_layers)]
