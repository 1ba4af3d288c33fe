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


def layer_patching(engine: Engine, runs: PairRuns, layers: list[Layer], thoughts: list[int], direction: Direction = "denoising") -> list[dict]:
    ids, _, source = runs.roles(direction)
    variants = [Variant(tuple(Patch(Site(l, k), activation(source, l, k)) for k in thoughts)) for l in layers]
    keys = [{"experiment": "layer", "layer": l} for l in layers]
    return _rows(runs, direction, keys, engine.run(ids, variants, runs.target))


def position_patching(engine: Engine, runs: PairRuns, layers: list[Layer], thoughts: list[int], direction: Direction = "denoising") -> list[dict]:
    ids, _, source = runs.roles(direction)
    sites = [(l, k) for k in thoughts for l in layers]
    variants = [Variant((Patch(Site(l, k), activation(source, l, k)),)) for l, k in sites]
    keys = [{"experiment": "position", "layer": l, "thought": k} for l, k in sites]
    return _rows(runs, direction, keys, engine.run(ids, variants, runs.target))


def iterative_patching(engine: Engine, runs: PairRuns, layers: list[Layer], num_thoughts: int, direction: Direction = "denoising") -> list[dict]:
    """Exp 2. Iteration i runs all layers' chains as one batch (each chain patches only (l, i))."""
    ids, _, source = runs.roles(direction)
    current = {l: activation(source, l, 0) for l in layers}  # a_0 = the source activation
    rows: list[dict] = []
    for i in range(num_thoughts):
        variants = [Variant((Patch(Site(l, i), current[l]),)) for l in layers]
        readouts = engine.run(ids, variants, runs.target)
        keys = []
        for l, ro in zip(layers, readouts):
            a = current[l]
            keys.append(
                {
                    "experiment": "iterative",
                    "layer": l,
                    "iteration": i,
                    "norm": M.norm(a),
                    "cos_clean": M.cos(a, activation(runs.clean, l, i)),
                    "cos_corrupted": M.cos(a, activation(runs.corrupted, l, i)),
                }
            )
            if i + 1 < num_thoughts:
                current[l] = activation(ro, l, i + 1)  # what the model made of the patched thought
        rows.extend(_rows(runs, direction, keys, readouts))
    return rows


def all_layers(model: CodiModel) -> list[Layer]:
    return [INPUT, *range(model.num_layers)]
