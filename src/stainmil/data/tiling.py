"""``stainmil tile``: slice images -> tissue mask -> grid patches named with their x, y.

Tissue detection works on the **optical density** of the image, OD = -log10(I / I_background),
summed over RGB, so pale IHC sections (light hematoxylin counterstain, a little DAB) separate from
the glass as well as saturated H&E does. The OD image is smoothed and thresholded by Otsu's method
on **log** OD (on linear OD, a dark lesion or a DAB-rich region pulls the threshold above the pale
tissue around it), with a floor against empty slides, then closed, hole-filled and cleaned of specks.
This avoids the saturation-only masks of popular tools, which miss pale IHC tissue.

Output (ready for ``stainmil index`` with the default ``data.filename_pattern``)::

    OUT/case<id>/<stain>/slice<id>/case<id>_<stain>_slice<id>_patch<i>_x<x>_y<y>.png
    OUT/masks/case<id>_<stain>_slice<id>_tissue.png
    OUT/tiles.csv    one row per patch (case, stain, slice, patch, x, y, tissue_fraction, file)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_objects

from stainmil.config import TileConfig
from stainmil.data.cohort import _walk
from stainmil.data.labels import normalize_case_id
from stainmil.errors import ConfigError, DataError
from stainmil.io import atomic_write, atomic_write_text
from stainmil.progress import progress_bar

WSI_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".bif"}
MIN_OD = 0.02  # floor of the threshold on summed optical density: glass never counts as tissue


def optical_density(rgb: np.ndarray, smooth: float = 2.0) -> np.ndarray:
    """Summed optical density (H, W) of an RGB uint8 image (smoothed), relative to its bright background."""
    rgb = ndimage.gaussian_filter(rgb.astype(np.float64), (smooth, smooth, 0))  # denoise before the background
    background = np.percentile(rgb.reshape(-1, 3), 99, axis=0).clip(200, 255)  # the glass
    return -np.log10(np.clip(rgb / background, 1e-3, 1.0)).sum(-1)


def tissue_mask(rgb: np.ndarray, min_object_fraction: float = 0.001) -> np.ndarray:
    """Tissue (True) vs background for H&E and IHC alike. rgb: (H, W, 3) uint8 -> (H, W) bool."""
    od = optical_density(rgb)
    log_od = np.log(od + 1e-3)
    if np.ptp(log_od) < 1e-6:  # a constant image
        return np.zeros(od.shape, bool)
    threshold = max(float(np.exp(threshold_otsu(log_od)) - 1e-3), MIN_OD)
    mask = od > threshold
    mask = ndimage.binary_closing(mask, iterations=3)
    mask = ndimage.binary_fill_holes(mask)
    return remove_small_objects(mask, max_size=max(16, int(min_object_fraction * mask.size)))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


@dataclass
class SlideReader:
    """A slice image: plain (Pillow) or whole-slide (OpenSlide / tiffslide when installed)."""

    path: Path
    level: int = 0

    def __post_init__(self) -> None:
        self.slide = None
        if self.path.suffix.lower() in WSI_SUFFIXES:
            self.slide = _open_wsi(self.path)
            self.size = self.slide.level_dimensions[self.level]
            self.scale = self.slide.level_downsamples[self.level]
        else:
            with Image.open(self.path) as image:
                self.image = np.asarray(image.convert("RGB"))
            self.size = (self.image.shape[1], self.image.shape[0])

    def thumbnail(self, downsample: int) -> np.ndarray:
        width, height = (max(1, s // downsample) for s in self.size)
        if self.slide is not None:
            return np.asarray(self.slide.get_thumbnail((width, height)).convert("RGB").resize((width, height)))
        return np.asarray(Image.fromarray(self.image).resize((width, height), Image.BILINEAR))

    def region(self, x: int, y: int, size: int) -> np.ndarray:
        if self.slide is not None:
            location = (int(x * self.scale), int(y * self.scale))  # level-0 coordinates
            return np.asarray(self.slide.read_region(location, self.level, (size, size)).convert("RGB"))
        return self.image[y:y + size, x:x + size]


def _open_wsi(path: Path):
    for module in ("openslide", "tiffslide"):
        try:
            lib = __import__(module)
        except ImportError:
            continue
        return lib.OpenSlide(str(path)) if module == "openslide" else lib.TiffSlide(str(path))
    raise DataError(f"{path} is a whole-slide file but neither openslide-python nor tiffslide is installed; "
                    "`pip install tiffslide` (or openslide-python) and re-run.")


def tile_slice(reader: SlideReader, config: TileConfig) -> tuple[np.ndarray, list[tuple[int, int, float]]]:
    """Tissue mask (thumbnail scale) and (x, y, tissue fraction) of the patches to keep."""
    down = max(1, config.mask_downsample)
    mask = tissue_mask(reader.thumbnail(down))
    full = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(reader.size, Image.NEAREST)) > 0
    size, stride = config.patch_size, config.stride or config.patch_size
    keep = []
    for y in range(0, reader.size[1] - size + 1, stride):
        for x in range(0, reader.size[0] - size + 1, stride):
            fraction = float(full[y:y + size, x:x + size].mean())
            if fraction >= config.min_tissue:
                keep.append((x, y, fraction))
    return mask, keep


def tile_folder(config: TileConfig) -> tuple[Path, pd.DataFrame, dict[str, list[str]]]:
    """Tile every slice image under ``config.slices_dir``; returns (out dir, tiles table, skipped files)."""
    root, out = Path(config.slices_dir), Path(config.out_dir)
    if not config.slices_dir or not root.is_dir():
        raise DataError(f"slice folder '{config.slices_dir}' does not exist; set tile.slices_dir.")
    if not config.out_dir:
        raise ConfigError("tile.out_dir is empty; set it to the folder where patches should go.")
    try:
        pattern = re.compile(config.filename_pattern)
    except re.error as exc:
        raise ConfigError(f"tile.filename_pattern is not a valid regex ({exc}).") from exc
    missing = [g for g in ("case", "stain", "slice") if g not in pattern.groupindex]
    if missing:
        raise ConfigError(f"tile.filename_pattern lacks the named group(s) {missing}.")
    files = _walk(root)
    jobs, skipped = [], {"name does not match tile.filename_pattern": []}
    for path in files:
        match = pattern.search(path.relative_to(root).as_posix())
        if match:
            jobs.append((path, normalize_case_id(match["case"]), match["stain"], match["slice"]))
        else:
            skipped["name does not match tile.filename_pattern"].append(path.relative_to(root).as_posix())
    if not jobs:
        raise DataError(f"no slice image in {root} matches tile.filename_pattern ({len(files)} files looked at).")
    rows = []
    skipped["unreadable image"] = []
    with progress_bar("tile: slices", total=len(jobs)) as advance:
        for path, case, stain, slice_id in jobs:
            try:
                reader = SlideReader(path, config.level)
            except (OSError, SyntaxError, ValueError):
                skipped["unreadable image"].append(path.relative_to(root).as_posix())
                advance()
                continue
            mask, keep = tile_slice(reader, config)
            stem = f"case{case}_{stain}_slice{slice_id}"
            atomic_write(out / "masks" / f"{stem}_tissue.png",
                         lambda tmp, m=mask: Image.fromarray(m.astype(np.uint8) * 255).save(tmp, format="PNG"))
            folder = out / f"case{case}" / stain / f"slice{slice_id}"
            for index, (x, y, fraction) in enumerate(keep):
                name = f"{stem}_patch{index}_x{x}_y{y}.png"
                patch = reader.region(x, y, config.patch_size)
                atomic_write(folder / name, lambda tmp, p=patch: Image.fromarray(p).save(tmp, format="PNG"))
                rows.append({"case": case, "stain": stain, "slice": slice_id, "patch": index, "x": x, "y": y,
                             "tissue_fraction": fraction, "file": os.path.relpath(folder / name, out)})
            advance()
    table = pd.DataFrame(rows, columns=["case", "stain", "slice", "patch", "x", "y", "tissue_fraction", "file"])
    atomic_write(out / "tiles.csv", lambda tmp: table.to_csv(tmp, index=False))
    skipped = {k: v for k, v in skipped.items() if v}
    atomic_write_text(out / "tile_report.txt", f"{len(jobs)} slice images, {len(table)} patches\n" + "".join(
        f"skipped ({reason}): {len(v)}\n" + "".join(f"  {f}\n" for f in v[:20]) for reason, v in skipped.items()))
    return out, table, skipped
