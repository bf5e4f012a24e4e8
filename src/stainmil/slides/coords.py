"""Patch coordinates per slide in CLAM/TRIDENT's HDF5 layout, so either tool reads stainmil's tiling.

``<tile.out_dir>/coords/<slide stem>.h5``::

    coords   (N, 2) int64   level-0 top-left (x, y) of each patch
    attrs on coords (as CLAM and TRIDENT write them):
        patch_size            side of a patch at the target scale (the encoder input before resizing)
        patch_level           pyramid level read
        patch_size_level0     side of a patch in level-0 pixels
        downsample            level-0 pixels per target pixel (as a pair, CLAM-style)
        level_dim             (width, height) of the level read
        level0_magnification  objective power of level 0 (-1 when unknown)
        target_magnification  magnification of the patches (-1 when unknown)
        level0_mpp, target_mpp   µm per pixel (-1 when unknown)
        overlap               level-0 pixels shared by neighbouring patches
        name                  the slide's file stem
    plus stainmil's: read_size, case, stain, slice, slide_path, scale_source

Files are written atomically; a file that exists is finished (``tile`` resumes by skipping it). stainmil's
files also carry ``checksum`` (a file attribute: BLAKE2b of coords and tissue_fraction), verified on reading.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from stainmil.errors import DataError
from stainmil.io import array_digest, atomic_path
from stainmil.slides.grid import ReadPlan


def write_coords(path: Path, coords: np.ndarray, tissue: np.ndarray, plan: ReadPlan, level_dim: tuple[int, int],
                 extra: dict) -> Path:
    """Write one slide's coordinates (N, 2) and tissue fractions (N,) atomically."""
    unknown = -1.0
    attrs = {
        "patch_size": plan.patch_size, "patch_level": plan.level, "patch_size_level0": plan.size0,
        "downsample": np.array([plan.size0 / plan.patch_size] * 2), "level_dim": np.array(level_dim),
        "level0_magnification": plan.level0_magnification or unknown,
        "target_magnification": plan.target_magnification or unknown,
        "level0_mpp": plan.level0_mpp or unknown, "target_mpp": plan.target_mpp or unknown,
        "overlap": max(0, plan.size0 - plan.stride0), "read_size": plan.read_size,
        "scale_source": plan.scale_source, **extra,
    }
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as h5:
            coords, tissue = coords.astype(np.int64).reshape(-1, 2), tissue.astype(np.float32)
            h5.attrs["checksum"] = array_digest(coords, tissue)
            dataset = h5.create_dataset("coords", data=coords)
            for key, value in attrs.items():
                dataset.attrs[key] = value
            h5.create_dataset("tissue_fraction", data=tissue)
    return path


def _attrs(dataset: h5py.Dataset) -> dict:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in dataset.attrs.items()}


def read_coords(path: Path) -> tuple[np.ndarray, dict, np.ndarray]:
    """(coords (N, 2) level 0, attrs, tissue fractions (N,)) of a coordinates file — stainmil's, CLAM's or
    TRIDENT's (which carry no tissue fractions: ones). stainmil's own are checked against the checksum written
    with them (a :class:`DataError` naming the file when they differ)."""
    with h5py.File(path, "r") as h5:
        dataset = h5["coords"]
        raw = dataset[()]
        recorded = h5.attrs.get("checksum")
        tissue = h5["tissue_fraction"][()] if "tissue_fraction" in h5 else np.ones(len(raw), np.float32)
        attrs = _attrs(dataset)
    if recorded and array_digest(raw, tissue) != recorded:
        raise DataError(f"{path} is damaged (its coordinates do not match the checksum written with them); run "
                        f"`stainmil check {Path(path).parent.parent} --repair --config <cohort config>`, or delete the "
                        "file and run `stainmil tile` again (it tiles only what is missing).")
    return raw.astype(np.int64).reshape(-1, 2), attrs, tissue


def coords_attrs(path: Path) -> dict:
    """The attrs of a file's ``coords`` dataset without reading the coordinates ({} when it has none)."""
    with h5py.File(path, "r") as h5:
        return _attrs(h5["coords"]) if "coords" in h5 else {}


def coords_damage(path: Path) -> str:
    """"" when a coordinates file reads whole (and matches its checksum), else what is wrong with it."""
    try:
        read_coords(path)
    except (DataError, OSError, KeyError, ValueError) as exc:
        return f"{type(exc).__name__}: {str(exc).split(';')[0]}"
    return ""


def grid_step(coords: np.ndarray) -> int:
    """The patch grid's step in level-0 px: the most common positive distance between neighbouring patches of a
    row or a column (CLAM lays a grid per tissue contour, so distances between grids are no step); 0 when no
    two patches share a row or column."""
    steps = []
    for along, other in ((0, 1), (1, 0)):
        order = np.lexsort((coords[:, along], coords[:, other]))
        ordered = coords[order]
        same_line = ordered[1:, other] == ordered[:-1, other]
        steps.append(np.diff(ordered[:, along])[same_line])
    positive = np.concatenate(steps)
    positive = positive[positive > 0]
    if not len(positive):
        return 0
    values, counts = np.unique(positive, return_counts=True)
    return int(values[np.argmax(counts)])
