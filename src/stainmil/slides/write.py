"""Write pyramidal TIFF slides (tiled, lossless) that OpenSlide reads — for synthetic cohorts and tests.

Two flavours: a generic tiled TIFF whose resolution tags carry the µm per pixel (OpenSlide's
``generic-tiff``), and an Aperio-style file whose ImageDescription carries ``MPP`` and ``AppMag``
(OpenSlide's ``aperio``). Levels halve the previous one (Pillow, box filter) down to the tile size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from stainmil.io import atomic_path


def pyramid(rgb: np.ndarray, tile: int, max_levels: int = 4) -> list[np.ndarray]:
    """Level 0 and its halvings, (H, W, 3) uint8 each, while the level is larger than one tile."""
    levels = [rgb]
    while len(levels) < max_levels and min(levels[-1].shape[:2]) >= 2 * tile:
        h, w = levels[-1].shape[:2]
        levels.append(np.asarray(Image.fromarray(levels[-1]).resize((w // 2, h // 2), Image.BOX)))
    return levels


def write_pyramidal_tiff(path: str | Path, rgb: np.ndarray, mpp: float | None = None,
                         magnification: float | None = None, aperio: bool = False, tile: int = 256,
                         max_levels: int = 4) -> Path:
    """Write ``rgb`` (H, W, 3) uint8 as a tiled pyramidal TIFF (zlib, lossless) atomically.

    ``mpp`` goes into the resolution tags (generic) or the Aperio description with ``magnification``
    (AppMag); with neither the slide records no scale.
    """
    import tifffile

    path = Path(path)
    levels = pyramid(rgb, tile, max_levels)
    with atomic_path(path, suffix=path.suffix) as tmp, tifffile.TiffWriter(tmp) as tiff:
        for index, level in enumerate(levels):
            downsample = rgb.shape[1] / level.shape[1]
            kwargs: dict = {"tile": (tile, tile), "photometric": "rgb", "compression": "zlib", "metadata": None,
                            "subfiletype": 0 if index == 0 else 1}
            if aperio:
                h, w = level.shape[:2]
                scale = "".join(f"|{k} = {v}" for k, v in (("AppMag", magnification), ("MPP", mpp)) if v)
                kwargs["description"] = (f"Aperio Image Library v12.0.15 stainmil\r\n{w}x{h} [0,0 {w}x{h}] "
                                         f"({tile}x{tile}) RAW/RGB{scale if index == 0 else ''}")
            elif mpp:
                per_cm = 1e4 / (mpp * downsample)
                kwargs.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
            tiff.write(level, **kwargs)
    return path
