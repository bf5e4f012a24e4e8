"""Slide fixtures: synthetic slices written as real pyramidal TIFFs, read back through OpenSlide."""

from __future__ import annotations

import numpy as np
import pytest

from stainmil.data.synth import _style, render_slice


@pytest.fixture(scope="session")
def rendered():
    """One rendered slice per stain and class: {(stain, label): (rgb (256, 256, 3), tissue mask)}."""
    out = {}
    for stain in ("he", "melan", "sox10"):
        for label in (0, 1):
            rgb, tissue, _ = render_slice(np.random.default_rng([7, label]), stain, 256, _style(label, 1.0))
            out[stain, label] = rgb, tissue
    return out
