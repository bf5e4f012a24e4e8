"""Serial sections with a known answer, for registration: every stain of a case is cut from one block (one
tissue outline, one lesion geometry), and each section lies on its glass with its own known deformation — a
rotation, a shift, sometimes a flip (mounted the other way up), a smooth elastic stretch, sometimes a torn-off
piece.

A section pixel ``q`` shows the block point ``p = A q + b + d(q)`` (``A`` rotation x flip, ``d`` a smooth
displacement). Landmarks are block points inside the tissue; their place in each section is found by inverting
that map, and ``slices/case7/he/slice0_landmarks.csv`` lists them (``id, x, y`` in slice pixels; landmarks on a
torn-off piece are left out). Two sections of a case then share landmark ids: where the IHC landmark lands on
the H&E section after registration, against where the H&E landmark is, is the registration error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass
class SectionWarp:
    """Section pixel -> block point: ``p = matrix @ q + offset + field(q)`` (x, y order; field (2, H, W))."""

    matrix: np.ndarray   # (2, 2) rotation, with a flip when det < 0
    offset: np.ndarray   # (2,)
    field: np.ndarray    # (2, H, W) smooth displacement in block pixels, sampled on the section grid (x, y)

    def to_block(self, q: np.ndarray) -> np.ndarray:
        """(N, 2) section points (x, y) -> block points."""
        d = np.stack([ndimage.map_coordinates(self.field[k], [q[:, 1], q[:, 0]], order=1, mode="nearest")
                      for k in (0, 1)], axis=1)
        return q @ self.matrix.T + self.offset + d

    def to_section(self, p: np.ndarray, iterations: int = 30) -> np.ndarray:
        """(N, 2) block points -> section points (the smooth field inverted by fixed-point iteration)."""
        inverse = np.linalg.inv(self.matrix)
        q = (p - self.offset) @ inverse.T
        for _ in range(iterations):
            d = np.stack([ndimage.map_coordinates(self.field[k], [q[:, 1], q[:, 0]], order=1, mode="nearest")
                          for k in (0, 1)], axis=1)
            q = (p - self.offset - d) @ inverse.T
        return q


def random_warp(rng: np.random.Generator, size: int, flip: bool, elastic: float = 0.025) -> SectionWarp:
    """A section's deformation about the canvas centre: any rotation, a shift of up to 6% of the side, a flip,
    and an elastic displacement of about ``elastic`` x side, smooth over a third of the side."""
    angle = rng.uniform(-np.pi, np.pi)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = rotation @ (np.diag([-1.0, 1.0]) if flip else np.eye(2))
    centre = np.array([size / 2, size / 2])
    offset = centre - matrix @ centre + rng.uniform(-0.06, 0.06, 2) * size
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal((size, size)), size / 6) for _ in range(2)])
    field *= elastic * size / (np.abs(field).max() + 1e-9)
    return SectionWarp(matrix, offset, field)


def warp_to_section(block: np.ndarray, warp: SectionWarp, order: int, fill: float) -> np.ndarray:
    """Resample a block image (H, W) or (H, W, C) onto the section's grid."""
    h, w = block.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(float)
    p = warp.to_block(np.stack([xs.ravel(), ys.ravel()], axis=1))
    channels = [block] if block.ndim == 2 else [block[..., c] for c in range(block.shape[2])]
    out = [ndimage.map_coordinates(c.astype(float), [p[:, 1], p[:, 0]], order=order, mode="constant", cval=fill)
           .reshape(h, w) for c in channels]
    return out[0] if block.ndim == 2 else np.stack(out, axis=-1)


def torn_piece(rng: np.random.Generator, tissue: np.ndarray) -> np.ndarray:
    """A bite out of the tissue's edge (bool mask of what is lost): a disk centred on a boundary pixel."""
    edge = np.argwhere(tissue & ~ndimage.binary_erosion(tissue))
    if len(edge) == 0:
        return np.zeros_like(tissue)
    cy, cx = edge[rng.integers(len(edge))]
    radius = rng.uniform(0.08, 0.14) * tissue.shape[0]
    yy, xx = np.mgrid[0:tissue.shape[0], 0:tissue.shape[1]]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2) & tissue


def block_landmarks(rng: np.random.Generator, tissue: np.ndarray, n: int = 40) -> np.ndarray:
    """(n, 2) block points (x, y) spread over the tissue, away from its edge."""
    inner = ndimage.binary_erosion(tissue, iterations=max(2, tissue.shape[0] // 40))
    candidates = np.argwhere(inner if inner.sum() > n else tissue)
    chosen = candidates[rng.choice(len(candidates), size=min(n, len(candidates)), replace=False)]
    return chosen[:, ::-1].astype(float) + rng.uniform(-0.5, 0.5, (len(chosen), 2))
