"""Models built for several stains of one patient: late fusion of per-stain MIL models, cross-stain attention."""
