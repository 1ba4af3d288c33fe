"""Batch surgery on HF KV caches that works with the cache layouts of transformers 4.x
(`key_cache`/`value_cache` lists) and later ones (`layers[i].keys/values`), and, where
caches are made of layers, a layer that grows in place (`GrowingLayer`, see `make_growing`)."""

from __future__ import annotations

import copy
from typing import Any

import torch


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, each [B, kv_heads, T, head_dim]; writing into them edits the cache."""
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


def take_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A new cache holding `rows` of `cache` (indices may repeat); `cache` is left as it is."""
    out = copy.copy(cache)
    if hasattr(out, "layers"):
        out.layers = [copy.copy(lay) for lay in out.layers]
    else:
        out.key_cache, out.value_cache = list(out.key_cache), list(out.value_cache)
    if grows(out):
        for lay in out.layers:
            lay.take(rows)
        return out
    _set_layers(out, [(k[rows], v[rows]) for k, v in cache_layers(cache)])
    return out


try:  # per-layer cache objects (transformers 5, and late 4.x such as 4.57)
    from transformers.cache_utils import DynamicLayer
except ImportError:  # older 4.x: caches stay as they are (correct, a little slower)
    DynamicLayer = None

SPARE = 32  # positions of room added whenever a layer's buffer must grow (a short answer fits)


def _prefix_of(t: torch.Tensor, buf: torch.Tensor | None) -> bool:
    """`t` is buf[:b, :, :n] (a view handed out here), not a tensor set from outside."""
    return buf is not None and t.data_ptr() == buf.data_ptr() and t.stride() == buf.stride() and t.shape[0] <= buf.shape[0] and t.shape[1] == buf.shape[1]


def _room(t: torch.Tensor, rows: int, positions: int) -> torch.Tensor:
    """A [rows, h, positions, d] buffer starting with `t`."""
    buf = t.new_empty(rows, t.shape[1], positions, t.shape[3])
    buf[: t.shape[0], :, : t.shape[2]] = t
    return buf


if DynamicLayer is not None:

    class GrowingLayer(DynamicLayer):
        """A DynamicLayer that writes new positions (and new batch rows) into spare room of
        one buffer instead of concatenating the whole cache at every step, the copy that
        dominates cache time when a hundred variants decode side by side. Keys and values
        are views buf[:b, :, :n]; `crop` (a shorter view) lets the next step overwrite what
        was dropped. Any other assignment (take, deepcopy) simply starts a new buffer
        on the next update. Same values, same attention inputs: only the copying changes."""

        _kbuf: torch.Tensor | None = None
        _vbuf: torch.Tensor | None = None
        grow_source: torch.Tensor | None = None  # set while rows join a step part-way (`set_grow`)

        def _fits(self, rows: int, positions: int) -> bool:
            return (
                _prefix_of(self.keys, self._kbuf)
                and _prefix_of(self.values, self._vbuf)
                and rows <= self._kbuf.shape[0]  # type: ignore[union-attr]
                and positions <= self._kbuf.shape[2]  # type: ignore[union-attr]
            )

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized or self.keys.numel() == 0:
                keys, values = super().update(key_states, value_states, *args, **kwargs)
                self._kbuf = self._vbuf = None
                return keys, values
            b, n, t = self.keys.shape[0], self.keys.shape[2], key_states.shape[2]
            a = key_states.shape[0]  # < b: the rows past a take their source rows' new keys and values
            if not self._fits(b, n + t):
                self._kbuf, self._vbuf = _room(self.keys, b, n + t + SPARE), _room(self.values, b, n + t + SPARE)
            self._kbuf[:a, :, n : n + t] = key_states
            self._vbuf[:a, :, n : n + t] = value_states
            if a < b:
                src = self.grow_source[a:b]  # type: ignore[index]
                self._kbuf[a:b, :, n : n + t] = self._kbuf[src, :, n : n + t]
                self._vbuf[a:b, :, n : n + t] = self._vbuf[src, :, n : n + t]
            self.keys, self.values = self._kbuf[:b, :, : n + t], self._vbuf[:b, :, : n + t]
            return self.keys[:a], self.values[:a]

        def take(self, rows: torch.Tensor) -> None:
            """Keep only `rows` (in place: call on a copy). Whole buffer rows are gathered, so
            the result keeps the room the next steps write into."""
            if not self.is_initialized or not self.keys.numel():
                return
            b, n = self.keys.shape[0], self.keys.shape[2]
            if self._fits(b, n):
                self._kbuf = torch.index_select(self._kbuf[:b], 0, rows)  # type: ignore[index]
                self._vbuf = torch.index_select(self._vbuf[:b], 0, rows)  # type: ignore[index]
                self.keys, self.values = self._kbuf[:, :, :n], self._vbuf[:, :, :n]
            else:
                self.keys, self.values = self.keys[rows], self.values[rows]
                self._kbuf = self._vbuf = None

        def append_rows(self, src: torch.Tensor, room: int) -> None:
            b, n, count = self.keys.shape[0], self.keys.shape[2], src.shape[0]
            if not self._fits(b + count, n):
                self._kbuf = _room(self.keys, b + count + room, n + SPARE)
                self._vbuf = _room(self.values, b + count + room, n + SPARE)
            # rows b… are past every view handed out, so nothing aliases what is written. Whole
            # buffer rows are copied (their spare positions too, unread until overwritten):
            # one contiguous block, a quarter of the time of gathering the [:n] views
            torch.index_select(self._kbuf[:b], 0, src, out=self._kbuf[b : b + count])
            torch.index_select(self._vbuf[:b], 0, src, out=self._vbuf[b : b + count])
            self.keys, self.values = self._kbuf[: b + count, :, :n], self._vbuf[: b + count, :, :n]

def with_copies(t: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """`t` with a copy of each of its batch rows `src` appended."""
    return torch.cat([t, t[src.to(t.device)]])


def append_rows(cache: Any, src: torch.Tensor, room: int = 0) -> Any:
    """`cache` with a copy of each batch row in `src` appended, in place. Growing layers keep
    room for `room` further rows, so a later append copies only its own rows."""
    if DynamicLayer is not None and hasattr(cache, "layers"):
        for lay in cache.layers:
            if isinstance(lay, GrowingLayer) and lay.is_initialized and lay.keys.numel():
                lay.append_rows(src, room)
            elif lay.is_initialized and lay.keys.numel():
                lay.keys, lay.values = with_copies(lay.keys, src), with_copies(lay.values, src)
        return cache
    _set_layers(cache, [(with_copies(k, src), with_copies(v, src)) for k, v in cache_layers(cache)])
    return cache


def grows(cache: Any) -> bool:
    """Every layer of `cache` is a `GrowingLayer` (rows can join a step part-way)."""
    return DynamicLayer is not None and hasattr(cache, "layers") and all(isinstance(lay, GrowingLayer) for lay in cache.layers)


def set_grow(cache: Any, source: torch.Tensor | None) -> None:
    """While a step runs with rows joining part-way: each row's source row (None: done)."""
    for lay in cache.layers:
        lay.grow_source = source


def make_growing(cache: Any) -> Any:
    """Switch a fresh HF cache's plain dynamic layers to `GrowingLayer` (in place); other
    layer kinds (sliding windows) and caches without layers are left as they are."""
    if DynamicLayer is not None and hasattr(cache, "layers"):
        for lay in cache.layers:
            if type(lay) is DynamicLayer:
                lay.__class__ = GrowingLayer
    return cache
