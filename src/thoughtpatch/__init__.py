"""thoughtpatch: faithful activation patching for continuous-thought language models."""

__version__ = "0.1.0"
