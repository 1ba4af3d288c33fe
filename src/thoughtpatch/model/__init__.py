"""Model room: the CODI runtime (latent loop, intervention sites) and its loader."""

from thoughtpatch.model.loader import load_model
from thoughtpatch.model.runtime import INPUT, CodiModel, Generation, Intervention, LatentState, Site, extract_number

__all__ = ["INPUT", "CodiModel", "Generation", "Intervention", "LatentState", "Site", "extract_number", "load_model"]
