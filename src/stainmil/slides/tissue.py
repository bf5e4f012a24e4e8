"""Tissue masks that work on H&E and IHC alike, from a low-resolution view of the slide.

Tissue detection works on the **optical density** of the image, OD = -log10(I / I_background),
summed over RGB, so pale IHC sections (light hematoxylin counterstain, a little DAB) separate from
the glass as well as saturated H&E does. The OD image is smoothed and thresholded by Otsu's method
on **log** OD (on linear OD, a dark lesion or a DAB-rich region pulls the threshold above the pale
tissue around it), with a floor against empty slides, then closed, hole-filled and cleaned of specks.
Pen marks (saturated blue/green/black ink) and near-white glass are not tissue.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_objects

MIN_OD = 0.02  # floor of the threshold on summed optical density: glass never counts as tissue


def optical_density(rgb: np.ndarray, smooth: float = 2.0) -> np.ndarray:
    """Summed optical density (H, W) of an RGB uint8 image (smoothed), relative to its bright background."""
    rgb = ndimage.gaussian_filter(rgb.astype(np.float64), (smooth, smooth, 0))  # denoise before the background
    background = np.percentile(rgb.reshape(-1, 3), 99, axis=0).clip(200, 255)  # the glass
    return -np.log10(np.clip(rgb / background, 1e-3, 1.0)).sum(-1)


def pen_marks(rgb: np.ndarray) -> np.ndarray:
    """Ink, not tissue: strongly blue or green pixels (red channel far below the others) and near-black ones.

    Stained tissue is pink/purple (H&E) or brown/blue-violet (IHC), where red stays close to blue; marker
    ink is cyan/blue/green with red far below both, pure green (red and blue far below green), or black.
    """
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    blue_green = (np.maximum(g, b) - r > 60) & (np.minimum(g, b) - r > 20)
    green = (g - r > 60) & (g - b > 40)  # a pure green marker (blue low too); no stain is greener than blue
    black = rgb.max(-1) < 30  # near-black only: melanin is dark *brown* (red stays well above 30)
    return ndimage.binary_dilation(blue_green | green | black, iterations=2)


def tissue_mask(rgb: np.ndarray, min_object_fraction: float = 0.001) -> np.ndarray:
    """Tissue (True) vs background for H&E and IHC alike. rgb: (H, W, 3) uint8 -> (H, W) bool."""
    od = optical_density(rgb)
    ink = pen_marks(rgb)
    log_od = np.log(od + 1e-3)
    if np.ptp(log_od[~ink] if (~ink).any() else log_od) < 1e-6:  # a constant image
        return np.zeros(od.shape, bool)
    threshold = max(float(np.exp(threshold_otsu(log_od[~ink] if (~ink).sum() > 16 else log_od)) - 1e-3), MIN_OD)
    mask = (od > threshold) & ~ink
    mask = ndimage.binary_closing(mask, iterations=3)
    mask = ndimage.binary_fill_holes(mask) & ~ink
    return remove_small_objects(mask, max_size=max(16, int(min_object_fraction * mask.size)))
