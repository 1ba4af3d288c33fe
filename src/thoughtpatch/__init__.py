"""thoughtpatch: faithful activation patching for continuous-thought language models.

    import thoughtpatch as tp
    model = tp.load("toy"); pairs = tp.load_pairs("toy")
    res = tp.run(model, pairs[:5], experiments=["position"]); res.grid("position", "kl")

Names load on first use, so `import thoughtpatch` stays light (no torch, W&B or plotly)."""

__version__ = "0.1.0"

_LAZY = {
    "load": "thoughtpatch.api",
    "load_pairs": "thoughtpatch.api",
    "load_questions": "thoughtpatch.api",
    "run": "thoughtpatch.api",
    "PairList": "thoughtpatch.api",
    "open_run": "thoughtpatch.results",
    "Results": "thoughtpatch.results",
    "Site": "thoughtpatch.model.runtime",
    "ThoughtModel": "thoughtpatch.model.runtime",
    "Trace": "thoughtpatch.model.trace",
    "Pair": "thoughtpatch.data.schema",
    "Problem": "thoughtpatch.data.schema",
    "ThoughtpatchError": "thoughtpatch.errors",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'thoughtpatch' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
