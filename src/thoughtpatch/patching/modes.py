"""What a patched site receives (DESIGN §8 modes), as a value the engine replaces or adds.

* replace  — the source run's activation (denoising: clean → corrupted; noising: the reverse);
* zero     — zeros;
* mean     — the site's mean over the receiving runs of the whole pair set;
* resample — pair (p+1) mod n's receiving activation at the same site (the partner is recorded);
* add      — value + α·v, v from a safetensors file (one vector per site key) or `diff`
             (mean source − mean receiving at that site);
* noise    — value + σ·ε, σ = ν × the site's spread over the receiving runs of the pair set,
             ε Gaussian from a seed derived from (seed, pair, site), so every run, shard and
             resume draws the same noise.

The pair-set statistics (`SiteStats`) are computed once per run from the activation cache.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from thoughtpatch.errors import ThoughtpatchError
from thoughtpatch.model.runtime import INPUT, Site, ThoughtModel

MODES = ("replace", "zero", "mean", "resample", "add", "noise")


@dataclass(frozen=True)
class Mode:
    name: str = "replace"
    alpha: float = 1.0  # add: the vector's weight
    vector: str | None = None  # add: a safetensors file of vectors keyed by `site_key`, or "diff"
    noise_scale: float = 1.0  # noise: ν (σ = ν × the site's spread over the pair set)
    seed: int = 0  # noise

    def __post_init__(self) -> None:
        if self.name not in MODES:
            raise ThoughtpatchError(f"--mode: unknown mode '{self.name}' (choose {', '.join(MODES)})")
        if self.name == "add" and not self.vector:
            raise ThoughtpatchError("--mode add needs --vector FILE.safetensors or --vector diff")
        if not math.isfinite(self.alpha):
            raise ThoughtpatchError(f"--alpha must be a finite number, not {self.alpha}")
        if not math.isfinite(self.noise_scale) or self.noise_scale < 0:
            raise ThoughtpatchError(f"--noise-scale must be a finite number >= 0, not {self.noise_scale}")

    @property
    def needs_stats(self) -> bool:
        return self.name in ("mean", "noise") or (self.name == "add" and self.vector == "diff")

    def columns(self) -> dict:
        """What every result row records about the mode."""
        cols: dict = {"mode": self.name}
        if self.name == "add":
            cols |= {"alpha": self.alpha, "vector": self.vector}
        if self.name == "noise":
            cols |= {"noise_scale": self.noise_scale, "seed": self.seed}
        return cols


def site_key(site: Site) -> str:
    """The key of a site in vector files and the stats file: input.3, resid.2.3 (layer 2,
    thought 3), head.2.5.3 (layer 2, head 5, thought 3)."""
    if site.kind == INPUT:
        return f"input.{site.thought}"
    if site.kind == "head":
        return f"head.{site.layer}.{site.head}.{site.thought}"
    return f"{site.kind}.{site.layer}.{site.thought}"


@dataclass
class SiteStats:
    """Per kind [K, ...] statistics of the receiving (and source) runs over the pair set."""

    n: int
    mean_receiving: dict[str, torch.Tensor] = field(default_factory=dict)
    mean_source: dict[str, torch.Tensor] = field(default_factory=dict)
    spread: dict[str, torch.Tensor] = field(default_factory=dict)  # [K, L] (input: [K]) root-mean-square std over the set

    @staticmethod
    def of(receiving: list[dict[str, torch.Tensor]], source: list[dict[str, torch.Tensor]]) -> "SiteStats":
        """From per-pair activations (Readout.acts). The spread of a site is the RMS over its
        elements of their standard deviation across pairs — one σ per site."""
        st = SiteStats(len(receiving))
        for kind in receiving[0]:
            r = torch.stack([a[kind].double() for a in receiving])  # [n, K, ...]
            st.mean_receiving[kind] = r.mean(0).float()
            st.mean_source[kind] = torch.stack([a[kind].double() for a in source]).mean(0).float()
            var = r.var(0, unbiased=True) if len(receiving) > 1 else torch.zeros_like(r[0])
            dims = 1 if kind == INPUT else 2  # keep [K] or [K, L]
            st.spread[kind] = var.flatten(dims).mean(-1).sqrt().float()
        return st

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for kind in self.mean_receiving:
            out[f"mean_receiving.{kind}"] = self.mean_receiving[kind].contiguous()
            out[f"mean_source.{kind}"] = self.mean_source[kind].contiguous()
            out[f"spread.{kind}"] = self.spread[kind].contiguous()
        return out

    @staticmethod
    def from_tensors(t: dict[str, torch.Tensor], n: int) -> "SiteStats":
        st = SiteStats(n)
        for key, v in t.items():
            what, kind = key.split(".", 1)
            getattr(st, what)[kind] = v
        return st


def _spread(stats: SiteStats, site: Site) -> float:
    s = stats.spread[site.kind]
    return float(s[site.thought] if site.kind == INPUT else s[site.thought, site.layer])


def noise_for(seed: int, pair_id: int, site: Site, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard Gaussian noise that depends only on (seed, pair, site)."""
    digest = hashlib.sha256(f"{seed}/{pair_id}/{site_key(site)}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn(shape, generator=g)


@dataclass
class ModeContext:
    """Everything a mode needs beyond the pair itself: the pair-set statistics, the resample
    partner's receiving activations, and vectors loaded from a file."""

    mode: Mode
    stats: SiteStats | None = None
    vectors: dict[str, torch.Tensor] | None = None

    @staticmethod
    def load_vectors(path: str | Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        p = Path(path)
        if not p.is_file():
            raise ThoughtpatchError(f"--vector {p}: file not found")
        try:
            return load_file(str(p))
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad file for the user
            raise ThoughtpatchError(f"--vector {p}: not a safetensors file ({type(e).__name__})") from None

    def value(self, model: ThoughtModel, site: Site, source: dict, receiving: dict, partner: dict | None, pair_id: int) -> tuple[torch.Tensor, str]:
        """(value, engine mode) for one site of one pair; activations are Readout.acts dicts."""
        m = self.mode
        if m.name == "replace":
            return model.site_value(source, site), "replace"
        if m.name == "zero":
            return torch.zeros_like(model.site_value(receiving, site)), "replace"
        if m.name == "resample":
            if partner is None:
                raise ValueError("resample needs the partner pair's activations")
            return model.site_value(partner, site), "replace"
        if m.name == "mean":
            return model.site_value(self._stats().mean_receiving, site), "replace"
        if m.name == "add":
            if m.vector == "diff":
                st = self._stats()
                v = model.site_value(st.mean_source, site) - model.site_value(st.mean_receiving, site)
            else:
                key = site_key(site)
                if self.vectors is None or key not in self.vectors:
                    raise ThoughtpatchError(f"--vector {m.vector}: no vector for site key '{key}'")
                v = self.vectors[key].float()
                want = tuple(model.site_shape(site.kind))
                if tuple(v.shape) != want:
                    raise ThoughtpatchError(f"--vector {m.vector}: '{key}' has shape {list(v.shape)}, the site needs {list(want)}")
            return m.alpha * v, "add"
        # noise
        sigma = m.noise_scale * _spread(self._stats(), site)
        shape = tuple(model.site_value(receiving, site).shape)
        return sigma * noise_for(m.seed, pair_id, site, shape), "add"

    def _stats(self) -> SiteStats:
        if self.stats is None:
            raise ValueError(f"mode {self.mode.name} needs the pair set's statistics")
        return self.stats

