"""Batch surgery on HF KV caches that works with the cache layouts of transformers 4.x
(`key_cache`/`value_cache` lists) and 5.x (`layers[i].keys/values`)."""

from __future__ import annotations

import copy
from typing import Any

import torch


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(lay.keys, lay.values) for lay in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _set_layers(cache: Any, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    if hasattr(cache, "layers"):
        for lay, (k, v) in zip(cache.layers, kv):
            lay.keys, lay.values = k, v
    else:
        cache.key_cache[:] = [k for k, _ in kv]
        cache.value_cache[:] = [v for _, v in kv]


def cat_caches(caches: list[Any]) -> Any:
    """One cache holding every row of `caches` (equal sequence lengths), in order."""
    if len(caches) == 1:
        return caches[0]
    out = copy.copy(caches[0])
    if hasattr(out, "layers"):
        out.layers = [copy.copy(lay) for lay in out.layers]
    else:
        out.key_cache, out.value_cache = list(out.key_cache), list(out.value_cache)
    per_cache = [_layers(c) for c in caches]
    _set_layers(out, [(torch.cat([p[i][0] for p in per_cache]), torch.cat([p[i][1] for p in per_cache])) for i in range(len(per_cache[0]))])
    return out


def take_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A new cache holding `rows` of `cache` (indices may repeat); `cache` is left as it is."""
    out = copy.copy(cache)
    if hasattr(out, "layers"):
        out.layers = [copy.copy(lay) for lay in out.layers]
    else:
        out.key_cache, out.value_cache = list(out.key_cache), list(out.value_cache)
    _set_layers(out, [(k[rows], v[rows]) for k, v in _layers(cache)])
    return out
