"""A registered pair of serial sections as stored and read back: the transform between them in level-0 µm
(:class:`PairTransform`), how well it worked (:class:`PairQuality`) and the two together (:class:`PairResult`).
NumPy and SciPy only: reading a transform file (training, analysis, the viewer) needs none of the registration
stack (SimpleITK, scikit-image) that :mod:`stainmil.slides.register` fits it with.

    fixed -> moving:  p_m = A (p_f + u(p_f))        moving -> fixed:  p_f = q + v(q),  q = A^-1 p_m

``A`` (3, 3) affine (with the flip), ``u`` and ``v`` (2, H, W) displacement fields (µm) on a grid over the fixed
section, ``v`` the inverse of ``u`` (:func:`invert_field`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage


@dataclass
class PairTransform:
    """Moving <-> fixed in level-0 µm (see the module doc)."""

    affine: np.ndarray       # (3, 3) fixed µm -> moving µm (before u)
    u: np.ndarray            # (2, H, W) µm on the fixed grid: fixed -> moving non-rigid part
    v: np.ndarray            # (2, H, W) µm on the fixed grid: its inverse
    spacing: float           # µm per grid pixel
    flipped: bool

    def _sample(self, grid: np.ndarray, points: np.ndarray) -> np.ndarray:
        ij = points[:, ::-1].T / self.spacing - 0.5  # (row, col) in grid pixels (pixel centres at (i + ½) s)
        return np.stack([ndimage.map_coordinates(grid[k], ij, order=1, mode="nearest") for k in (0, 1)], axis=1)

    def fixed_to_moving(self, points_um: np.ndarray) -> np.ndarray:
        """(N, 2) x, y µm on the fixed slide -> µm on the moving slide."""
        p = np.asarray(points_um, float)
        q = p + self._sample(self.u, p)
        return q @ self.affine[:2, :2].T + self.affine[:2, 2]

    def moving_to_fixed(self, points_um: np.ndarray) -> np.ndarray:
        """(N, 2) x, y µm on the moving slide -> µm on the fixed slide."""
        inverse = np.linalg.inv(self.affine)
        q = np.asarray(points_um, float) @ inverse[:2, :2].T + inverse[:2, 2]
        return q + self._sample(self.v, q)


@dataclass
class PairQuality:
    dice: float              # tissue overlap after alignment
    outline: float           # median outline distance after the rigid fit, as a fraction of the tissue diameter
    scale: float             # sqrt |det| of the affine: sections of one block keep their size (1.0)
    h_correlation: float     # nuclear-stain correlation (informative: the optimiser maximised it)
    feature_error_um: float  # nan when too few features matched
    matched_features: int
    verdict: str             # aligned | doubtful | failed
    reason: str


@dataclass
class PairResult:
    transform: PairTransform | None
    quality: PairQuality
    seconds: float = 0.0
    stages: dict = field(default_factory=dict)  # score after each stage


def quality_dict(quality: PairQuality) -> dict:
    out = asdict(quality)
    out["feature_error_um"] = None if not np.isfinite(quality.feature_error_um) else round(quality.feature_error_um, 1)
    return out


def invert_field(u: np.ndarray, spacing: float, iterations: int = 25) -> np.ndarray:
    """v with v(q) = -u(q + v(q)): the inverse of a smooth displacement field (fixed-point iteration)."""
    h, w = u.shape[1:]
    rows, cols = np.mgrid[0:h, 0:w].astype(float)
    v = -u.copy()
    for _ in range(iterations):
        at = [rows + v[1] / spacing, cols + v[0] / spacing]
        v = -np.stack([ndimage.map_coordinates(u[k], at, order=1, mode="nearest") for k in (0, 1)])
    return v
