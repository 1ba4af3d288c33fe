"""Patching room: the engine (batched + reference), experiments, metrics, checks."""
