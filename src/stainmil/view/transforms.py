"""A registered pair's transform as the browser reads it to link the viewers: the affine, the two displacement
grids as base64 float32, their spacing and the slides' µm/px — see :mod:`stainmil.data.registration`."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from stainmil.data.registration import read_pair

MAX_GRID = 512                 # transform grids larger than this per side are resampled for the browser


def transform_json(path: Path) -> dict | None:
    """The transform of ``path`` for the browser, or None when the file holds none."""
    transform, attrs = read_pair(path)
    if transform is None:
        return None
    u, v, spacing = transform.u, transform.v, transform.spacing
    height, width = u.shape[1:]
    if max(height, width) > MAX_GRID:  # resampled so pixel centres keep their physical places
        factor = max(height, width) / MAX_GRID
        u, v = (_resample(g, factor) for g in (u, v))
        spacing = spacing * width / u.shape[2]
    return {"affine": np.asarray(transform.affine, float).tolist(), "spacing_um": float(spacing),
            "shape": list(u.shape[1:]), "fixed_mpp": float(attrs["fixed_mpp"]),
            "moving_mpp": float(attrs["moving_mpp"]), "flipped": bool(transform.flipped),
            "u": _b64(u), "v": _b64(v)}


def _resample(grid: np.ndarray, factor: float) -> np.ndarray:
    from scipy import ndimage

    return np.stack([ndimage.zoom(g, 1 / factor, order=1, grid_mode=True, mode="nearest") for g in grid])


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode()
