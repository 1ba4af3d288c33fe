"""Model room: the latent-loop runtime (sites, interventions), the families and the loader."""

from thoughtpatch.model.loader import load_model
from thoughtpatch.model.runtime import INPUT, SITE_KINDS, Block, Generation, Intervention, LatentState, Site, ThoughtModel, extract_number

__all__ = ["INPUT", "SITE_KINDS", "Block", "Generation", "Intervention", "LatentState", "Site", "ThoughtModel", "extract_number", "load_model"]
