"""Data room: pair schema, readers, GSM8K pair maker, synthetic problems."""

from thoughtpatch.data.formats import prepare, read_pairs, write_pairs
from thoughtpatch.data.gsm8k import gsm8k_to_file, pairs_from_gsm8k
from thoughtpatch.data.schema import Pair, Problem, load_pairs, save_pairs
from thoughtpatch.data.stats import filter_file, filter_pairs, pair_stats

__all__ = [
    "Pair",
    "Problem",
    "filter_file",
    "filter_pairs",
    "gsm8k_to_file",
    "load_pairs",
    "pair_stats",
    "pairs_from_gsm8k",
    "prepare",
    "read_pairs",
    "save_pairs",
    "write_pairs",
]
