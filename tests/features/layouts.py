"""Feature folders in exactly the layouts TRIDENT and CLAM write (read from their sources: TRIDENT's
Processor.py / WSI.py / IO.py save_h5, CLAM's create_patches_fp.py / extract_features_fp.py), for import tests."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch


def write_trident(job: Path, slides: dict[str, tuple[np.ndarray, np.ndarray]], encoder: str, mag: float = 20,
                  patch_px: int = 256, overlap: int = 0, level0_mag: int = 40, size0: int | None = None) -> Path:
    """``<job>/<mag>x_<px>px_<overlap>px_overlap/{patches/<slide>_patches.h5, features_<encoder>/<slide>.h5}``.

    ``slides``: slide name -> (features (N, D) as the encoder returned them, level-0 corners (N, 2)).
    """
    coords_dir = job / f"{mag:g}x_{patch_px}px_{overlap}px_overlap"
    size0 = size0 or int(patch_px * level0_mag // mag)
    for name, (features, coords) in slides.items():
        attrs = {"patch_size": patch_px, "patch_size_level0": size0, "level0_magnification": level0_mag,
                 "target_magnification": float(mag), "overlap": overlap, "name": name,
                 "savetodir": str(coords_dir / "patches"), "level0_width": 4096, "level0_height": 4096}
        patches = coords_dir / "patches" / f"{name}_patches.h5"
        patches.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(patches, "w") as h5:
            ds = h5.create_dataset("coords", data=coords.astype(np.int64), chunks=(1, 2) if len(coords) else None,
                                   maxshape=(None, 2))
            ds.attrs.update(attrs)
        path = coords_dir / f"features_{encoder}" / f"{name}.h5"
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as h5:
            f = h5.create_dataset("features", data=features)
            f.attrs.update({"name": name, "savetodir": str(path.parent), "encoder": encoder})
            c = h5.create_dataset("coords", data=coords.astype(np.int64))
            c.attrs.update(attrs)
    return coords_dir


def write_clam(save_dir: Path, feat_dir: Path, slides: dict[str, tuple[np.ndarray, np.ndarray]], patch_size: int = 256,
               patch_level: int = 0, downsample: float = 1.0, h5: bool = True, pt: bool = True) -> Path:
    """create_patches_fp: ``<save_dir>/patches/<slide>.h5``; extract_features_fp: ``<feat_dir>/h5_files/<slide>.h5``
    (features float32, coords int32, no attrs) and ``<feat_dir>/pt_files/<slide>.pt`` (tensor (N, D))."""
    for name, (features, coords) in slides.items():
        patches = save_dir / "patches" / f"{name}.h5"
        patches.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(patches, "w") as f:
            ds = f.create_dataset("coords", data=coords.astype(np.int64), maxshape=(None, 2), chunks=(1, 2))
            ds.attrs.update({"patch_size": patch_size, "patch_level": patch_level,
                             "downsample": np.array([downsample, downsample]),
                             "downsampled_level_dim": np.array([4096, 4096]), "level_dim": np.array([4096, 4096]),
                             "name": name, "save_path": str(patches.parent)})
        if h5:
            (feat_dir / "h5_files").mkdir(parents=True, exist_ok=True)
            with h5py.File(feat_dir / "h5_files" / f"{name}.h5", "w") as f:
                f.create_dataset("features", data=features.astype(np.float32), chunks=(min(32, len(features)),
                                                                                       features.shape[1]))
                f.create_dataset("coords", data=coords.astype(np.int32))
        if pt:
            (feat_dir / "pt_files").mkdir(parents=True, exist_ok=True)
            torch.save(torch.from_numpy(features.astype(np.float32)), feat_dir / "pt_files" / f"{name}.pt")
    return feat_dir
