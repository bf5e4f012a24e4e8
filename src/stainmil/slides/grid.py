"""Patch grids at a physical scale: which level to read, how much, and where the tissue is.

A request is ``tile.mpp`` (µm per pixel), ``tile.magnification`` (objective power) or neither (pixels
of ``tile.level`` as they are). The slide's own scale comes from its metadata (OpenSlide's ``mpp-x`` /
``objective-power``), one derived from the other by 40x = 0.25 µm/px when only one is recorded, or from
``tile.slide_mpp`` when the user states it. Patches are read at the coarsest level that is not coarser
than the request and resized to ``patch_size`` (so 20x from a 40x scan reads level 1 if the pyramid has a
2x level, else 2x the pixels at level 0, shrunk).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stainmil.config import TileConfig
from stainmil.errors import DataError
from stainmil.slides.reader import MICRONS_X_MAGNIFICATION, Slide, best_level


class NoScale(DataError):
    """The slide records no scale and the request needs one."""


@dataclass(frozen=True)
class ReadPlan:
    """How one slide is patched. Sizes: ``patch_size`` output px; ``read_size`` px at ``level``;
    ``size0`` and ``stride0`` level-0 px."""

    level: int
    read_size: int
    size0: int
    stride0: int
    patch_size: int
    level0_mpp: float | None
    level0_magnification: float | None
    target_mpp: float | None
    target_magnification: float | None
    scale_source: str


def slide_scale(slide: Slide, config: TileConfig) -> tuple[float | None, float | None, str]:
    """(level-0 µm/px, level-0 magnification, where they came from)."""
    if config.slide_mpp > 0:
        return config.slide_mpp, MICRONS_X_MAGNIFICATION / config.slide_mpp, "tile.slide_mpp"
    mpp, magnification = slide.mpp, slide.magnification
    if mpp and magnification:
        return mpp, magnification, "metadata"
    if mpp:
        return mpp, MICRONS_X_MAGNIFICATION / mpp, "metadata mpp (magnification = 10 / mpp)"
    if magnification:
        return MICRONS_X_MAGNIFICATION / magnification, magnification, "metadata magnification (mpp = 10 / mag)"
    return None, None, "none"


def read_plan(slide: Slide, config: TileConfig) -> ReadPlan:
    """Level, read size and level-0 sizes for ``config``'s request on this slide."""
    mpp0, mag0, source = slide_scale(slide, config)
    size, stride = config.patch_size, config.stride or config.patch_size
    if config.mpp > 0 or config.magnification > 0:
        if mpp0 is None:
            raise NoScale(f"{slide.path.name} records neither µm per pixel nor magnification; set tile.slide_mpp "
                          "to its level-0 µm per pixel (e.g. 0.25 for a 40x scan).")
        downsample = config.mpp / mpp0 if config.mpp > 0 else mag0 / config.magnification
        target_mpp = mpp0 * downsample
        target_mag = mag0 / downsample
    else:
        if not 0 <= config.level < len(slide.level_downsamples):
            raise DataError(f"{slide.path.name} has {len(slide.level_downsamples)} level(s); tile.level="
                            f"{config.level} does not exist — choose 0..{len(slide.level_downsamples) - 1}.")
        downsample = slide.level_downsamples[config.level]
        target_mpp = mpp0 * downsample if mpp0 else None
        target_mag = mag0 / downsample if mag0 else None
    if downsample < 0.99:
        raise DataError(f"{slide.path.name}: the request ({config.mpp or config.magnification}) is finer than the "
                        f"scan (level 0: {mpp0:.3g} µm/px); ask for at most the scanned resolution.")
    level = best_level(slide.level_downsamples, downsample)
    level_downsample = slide.level_downsamples[level]
    return ReadPlan(level=level, read_size=max(1, int(round(size * downsample / level_downsample))),
                    size0=max(1, int(round(size * downsample))), stride0=max(1, int(round(stride * downsample))),
                    patch_size=size, level0_mpp=mpp0, level0_magnification=mag0, target_mpp=target_mpp,
                    target_magnification=target_mag, scale_source=source)


def mask_downsample(slide: Slide, config: TileConfig) -> float:
    """Downsample of the tissue-mask view: at least ``tile.mask_downsample``, and coarse enough that its
    longest side is at most ``tile.mask_max_side``."""
    return max(float(config.mask_downsample), max(slide.dimensions) / config.mask_max_side, 1.0)


def tissue_fractions(mask: np.ndarray, mask_scale: float, xs: np.ndarray, ys: np.ndarray, size0: int) -> np.ndarray:
    """Share of tissue in each level-0 square (x, y, size0) from a mask at ``mask_scale`` (level-0 px per mask px).

    Each square covers the mask pixels whose centres fall inside it (at least one pixel), counted with an
    integral image, so the cost does not depend on the patch size.
    """
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = mask.shape

    def edge(v: np.ndarray, limit: int) -> np.ndarray:
        return np.clip(np.floor(v / mask_scale + 0.5).astype(np.int64), 0, limit)

    x0, y0 = edge(xs, w), edge(ys, h)
    x1, y1 = np.maximum(edge(xs + size0, w), x0 + 1).clip(max=w), np.maximum(edge(ys + size0, h), y0 + 1).clip(max=h)
    x0, y0 = np.minimum(x0, x1 - 1), np.minimum(y0, y1 - 1)
    area = (x1 - x0) * (y1 - y0)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / np.maximum(area, 1)


def patch_grid(slide: Slide, plan: ReadPlan, mask: np.ndarray, mask_scale: float,
               min_tissue: float) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 top-left corners (N, 2) int64 of the grid squares with at least ``min_tissue`` tissue, row by
    row, and their tissue fractions (N,)."""
    width, height = slide.dimensions
    xs = np.arange(0, width - plan.size0 + 1, plan.stride0)
    ys = np.arange(0, height - plan.size0 + 1, plan.stride0)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    grid_x, grid_y = grid_x.ravel(), grid_y.ravel()
    fractions = tissue_fractions(mask, mask_scale, grid_x, grid_y, plan.size0)
    keep = fractions >= min_tissue
    return np.stack([grid_x[keep], grid_y[keep]], axis=1).astype(np.int64), fractions[keep]
