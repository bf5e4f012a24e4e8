"""Feature store: one HDF5 file per slice, plus ``store.json`` with the settings that made it.

Per slice file (dataset names as in CLAM/TRIDENT, so their files read too)::

    features   (N, D) float16 | float32   backbone features, one row per patch
    coords     (N, 2) int64               x, y of each patch in the slice (-1 when unknown)
    patch_ids  (N,)   utf-8 text          patch id from the file name
    attrs: case, stain, slice, backbone, weights, weights_hash, image_size, mean, std

Files are written atomically; a file that exists is finished.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from stainmil.config import Config
from stainmil.errors import StoreError
from stainmil.io import atomic_path, atomic_write_json, safe_name

STORE_META = "store.json"


@dataclass
class StoreMeta:
    backbone: str
    weights: str
    weights_hash: str
    image_size: int
    mean: list[float]
    std: list[float]
    feature_dim: int
    dtype: str

    @classmethod
    def read(cls, store_dir: Path) -> StoreMeta:
        path = Path(store_dir) / STORE_META
        if not path.is_file():
            raise StoreError(f"no feature store at {store_dir} (missing {STORE_META}); run `stainmil extract "
                             "--config …` first.")
        return cls(**json.loads(path.read_text()))

    def write(self, store_dir: Path) -> None:
        atomic_write_json(Path(store_dir) / STORE_META, asdict(self))


def weights_label(config: Config) -> str:
    """How the store names its weights: 'imagenet', 'random(seed=N)' or the weights file path."""
    f = config.features
    return f"random(seed={f.seed})" if f.weights == "random" else f.weights


def expected_settings(config: Config) -> dict:
    """What the config asks of a store."""
    f = config.features
    return {"backbone": f.backbone, "weights": weights_label(config), "image_size": f.image_size,
            "mean": list(f.mean), "std": list(f.std)}


def check_store(store_dir: Path, config: Config) -> StoreMeta:
    """Refuse a store made with other settings than ``config`` asks for, naming the setting."""
    meta = StoreMeta.read(store_dir)
    for key, value in expected_settings(config).items():
        if getattr(meta, key) != value:
            raise StoreError(f"feature store {store_dir} was made with {key}={getattr(meta, key)!r} but the config "
                             f"asks for {value!r}; re-run `stainmil extract` or point features.store_dir at a "
                             "matching store.")
    return meta


def slice_file(store_dir: Path, case: str, stain: str, slice_id: str) -> Path:
    """File of one slice: ``<store>/<case>/<case>__<stain>__<slice>.h5`` (unsafe characters -> '_')."""
    safe = [safe_name(s) for s in (case, stain, slice_id)]
    return Path(store_dir) / safe[0] / f"{safe[0]}__{safe[1]}__{safe[2]}.h5"


def write_slice(path: Path, features: np.ndarray, coords: np.ndarray, patch_ids: list[str], attrs: dict) -> None:
    """Write one slice file atomically. features: (N, D); coords: (N, 2)."""
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.create_dataset("features", data=features)
            h5.create_dataset("coords", data=coords.astype(np.int64))
            h5.create_dataset("patch_ids", data=np.array(patch_ids, dtype=object), dtype=h5py.string_dtype())
            for key, value in attrs.items():
                h5.attrs[key] = value


def read_slice(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read (features (N, D), coords (N, 2), patch ids) of one slice file (CLAM/TRIDENT files too)."""
    with h5py.File(path, "r") as h5:
        features = h5["features"][()]
        coords = h5["coords"][()] if "coords" in h5 else np.full((len(features), 2), -1)
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in h5["patch_ids"][()]] \
            if "patch_ids" in h5 else [str(i) for i in range(len(features))]
    return features, coords, ids


def slice_groups(manifest: pd.DataFrame) -> list[tuple[tuple[str, str, str], pd.DataFrame]]:
    """(case, stain, slice) -> rows, in manifest order."""
    return list(manifest.groupby(["case", "stain", "slice"], sort=False))


def load_features(store_dir: Path, manifest: pd.DataFrame) -> np.ndarray:
    """Features for every manifest row, (N, D) in manifest order, read once into memory.

    Raises if a slice is missing or its patches do not match the manifest.
    """
    store_dir = Path(store_dir)
    meta = StoreMeta.read(store_dir)
    out = np.empty((len(manifest), meta.feature_dim), dtype=np.dtype(meta.dtype))
    positions = pd.Series(np.arange(len(manifest)), index=manifest.index)
    for (case, stain, slice_id), rows in slice_groups(manifest):
        path = slice_file(store_dir, case, stain, slice_id)
        if not path.is_file():
            raise StoreError(f"feature store {store_dir} has no file for case {case} {stain} slice {slice_id}; run "
                             "`stainmil extract` (it resumes where it stopped).")
        features, _, ids = read_slice(path)
        if ids != list(rows["patch"]):
            raise StoreError(f"{path} holds {len(ids)} patches that differ from the manifest's {len(rows)} for this "
                             "slice; the patch folder changed since extraction — delete the file and re-run "
                             "`stainmil extract`.")
        out[positions.loc[rows.index].to_numpy()] = features
    return out
