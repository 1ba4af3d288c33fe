"""Data room: pair schema, readers, GSM8K pair maker, synthetic problems."""

from thoughtpatch.data.schema import Pair, Problem, load_pairs, save_pairs

__all__ = ["Pair", "Problem", "load_pairs", "save_pairs"]
