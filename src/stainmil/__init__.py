"""stainmil: hierarchical multiple-instance learning on multi-stain pathology patches."""

__version__ = "0.1.0"
