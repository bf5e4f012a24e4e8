"""Feature store: one HDF5 file per slice, plus ``store.json`` with the settings that made it.

Per slice file (dataset names as in CLAM/TRIDENT, so their files read too)::

    features   (N, D) float16 | float32   backbone features, one row per patch (the plain image)
    augmented_features (V-1, N, D)        only with ``features.views: V > 1``: views 1..V-1 (flips/rotations,
                                          then HED jitter; see ``stainmil.features.augment``)
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

from stainmil.config import Config, FeaturesConfig
from stainmil.errors import StoreError
from stainmil.features.encoders import ENCODERS, preprocessing
from stainmil.io import array_digest, atomic_path, atomic_write_json, safe_name

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
    views: int = 1           # feature views per patch (1 = plain store)
    view_jitter: float = 0.0  # HED jitter strength of views beyond 8 (0 when there are none)
    view_seed: int = 0        # seed of that jitter
    imported_from: str = ""   # folder of features made by another tool (``stainmil import-features``); "" = extracted
    import_format: str = ""   # trident | clam
    magnification: float = 0.0  # objective power of the patches when known (imported stores)
    patch_size_level0: int = 0  # side of a patch in level-0 pixels when known (imported stores)
    precision: str = ""       # the encoder's arithmetic when extracted (fp32 | fp16 | bf16; "" = before it was kept)

    @classmethod
    def read(cls, store_dir: Path) -> StoreMeta:
        path = Path(store_dir) / STORE_META
        if not path.is_file():
            raise StoreError(f"no feature store at {store_dir} (missing {STORE_META}); run `stainmil extract "
                             "--config …` first.")
        return cls(**json.loads(path.read_text()))

    def write(self, store_dir: Path) -> None:
        atomic_write_json(Path(store_dir) / STORE_META, asdict(self))


def imported_store(store_dir: Path) -> bool:
    """Whether ``store_dir`` holds features another tool made (``stainmil import-features``)."""
    return (Path(store_dir) / STORE_META).is_file() and bool(StoreMeta.read(store_dir).imported_from)


def weights_label(f: FeaturesConfig) -> str:
    """How the store names its weights: 'imagenet' (torchvision's published weights), 'pretrained' (a Hugging
    Face encoder's), 'random(seed=N)' or the weights file path."""
    if f.weights == "random":
        return f"random(seed={f.seed})"
    if f.weights in ("pretrained", "imagenet"):
        spec = ENCODERS.get(f.backbone)
        return "imagenet" if spec is None or spec.weights_source == "torchvision" else "pretrained"
    return f.weights


def expected_settings(f: FeaturesConfig) -> dict:
    """What the config asks of a store: encoder, weights and preprocessing."""
    mean, std = preprocessing(f.backbone, f.mean, f.std)
    return {"backbone": f.backbone, "weights": weights_label(f), "image_size": f.image_size,
            "mean": mean, "std": std}


def view_settings(f: FeaturesConfig) -> dict:
    """What the config asks of a store's views (jitter settings only matter beyond the 8 symmetries)."""
    jittered = f.views > 8
    return {"views": f.views, "view_jitter": f.view_jitter if jittered else 0.0, "view_seed": f.seed if jittered else 0}


def check_store(store_dir: Path, config: Config, extracting: bool = False) -> StoreMeta:
    """Refuse a store made with other settings than ``config`` asks for, naming the setting.

    Training may use the first ``features.views`` views of a store that holds more; extraction into an
    existing store needs the very same views.
    """
    meta = StoreMeta.read(store_dir)
    if meta.imported_from:  # the encoder settings are the other tool's: the config's features.* do not apply
        if extracting:
            raise StoreError(f"feature store {store_dir} was imported from {meta.imported_from}; `stainmil extract` "
                             "does not add to it — import the new slides' features with `stainmil import-features` "
                             "(or point features.store_dir at another folder).")
        settings: dict = {}
    else:
        settings = expected_settings(config.features)
    for key, value in settings.items():
        if getattr(meta, key) != value:
            raise StoreError(f"feature store {store_dir} was made with {key}={getattr(meta, key)!r} but the config "
                             f"asks for {value!r}; re-run `stainmil extract` or point features.store_dir at a "
                             "matching store.")
    wanted = view_settings(config.features)
    held = {key: getattr(meta, key) for key in wanted}
    same_jitter = wanted["views"] <= 8 or all(held[k] == wanted[k] for k in ("view_jitter", "view_seed"))
    usable = held == wanted if extracting else (wanted["views"] <= held["views"] and same_jitter)
    if not usable:
        raise StoreError(f"feature store {store_dir} holds views {held} but the config asks for {wanted}; extract "
                         "into a new features.store_dir (or set features.views to what the store holds).")
    return meta


def slice_file(store_dir: Path, case: str, stain: str, slice_id: str) -> Path:
    """File of one slice: ``<store>/<case>/<case>__<stain>__<slice>.h5`` (unsafe characters -> '_')."""
    safe = [safe_name(s) for s in (case, stain, slice_id)]
    return Path(store_dir) / safe[0] / f"{safe[0]}__{safe[1]}__{safe[2]}.h5"


MISSING = "missing"


def slice_status(path: Path, n_patches: int, meta: StoreMeta, verify: bool = False) -> str:
    """"" when the slice file is whole, else why not ("missing", or what is wrong with it), checked cheaply: it
    opens, its features are (n_patches, feature_dim) of the store's dtype and carry a checksum attribute; with
    ``verify`` the features are also read and compared with that checksum."""
    if not path.is_file():
        return MISSING
    try:
        with h5py.File(path, "r") as h5:
            features = h5["features"]
            expected = (n_patches, meta.feature_dim)
            if features.shape != expected:
                return f"features {features.shape}, expected {expected}"
            if features.dtype != np.dtype(meta.dtype):
                return f"features of dtype {features.dtype}, the store's is {meta.dtype}"
            recorded = h5.attrs.get("checksum")
            if not recorded:
                return "no checksum attribute (written half-way or by another tool)"
            if verify and features_digest(features[()]) != recorded:
                return "its features do not match the checksum written with them"
    except (OSError, KeyError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def features_digest(features: np.ndarray) -> str:
    """BLAKE2b (128 bits) of a slice's plain-view features (N, D), as written in its file's ``checksum`` attribute:
    a flipped byte or a truncated copy of the file is found when the features are read."""
    return array_digest(features)


def damaged(path: Path, exc: BaseException) -> StoreError:
    """The one sentence for a store file that does not read or does not match its checksum (``.detail``: why)."""
    error = StoreError(f"{path} is damaged ({type(exc).__name__}: {exc}); run `stainmil check {path.parent.parent} "
                      "--repair` (or delete the file and re-run `stainmil extract`, which extracts only what is "
                      "missing).")
    error.detail = f"{type(exc).__name__}: {exc}"
    return error


def verify_features(path: Path, features: np.ndarray, recorded: str | None) -> None:
    """Raise :func:`damaged` when ``features`` (the plain view read from ``path``) differ from the checksum written
    with them (files without one — older stores, linked TRIDENT/CLAM files — are not checked)."""
    if recorded and features_digest(features) != recorded:
        raise damaged(path, ValueError("its features do not match the checksum written with them"))


def write_slice(path: Path, features: np.ndarray, coords: np.ndarray, patch_ids: list[str], attrs: dict) -> None:
    """Write one slice file atomically. features: (N, D) or (V, N, D) with views; coords: (N, 2)."""
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as h5:
            if features.ndim == 3:
                if len(features) > 1:
                    h5.create_dataset("augmented_features", data=features[1:])
                features = features[0]
            h5.attrs["checksum"] = features_digest(features)
            h5.create_dataset("features", data=features)
            h5.create_dataset("coords", data=coords.astype(np.int64))
            h5.create_dataset("patch_ids", data=np.array(patch_ids, dtype=object), dtype=h5py.string_dtype())
            for key, value in attrs.items():
                h5.attrs[key] = value


def read_slice(path: Path, views: int = 1) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read (features, coords (N, 2), patch ids) of one slice file (CLAM/TRIDENT files too).

    features: (N, D) with ``views=1``, else the first ``views`` views (views, N, D). A file that does not read,
    or whose features differ from their checksum, raises one StoreError sentence naming it.
    """
    try:
        with h5py.File(path, "r") as h5:
            plain = h5["features"][()]
            verify_features(path, plain, h5.attrs.get("checksum"))
            features = np.concatenate([plain[None], h5["augmented_features"][:views - 1]]) if views > 1 else plain
            coords = h5["coords"][()] if "coords" in h5 else np.full((len(plain), 2), -1)
            ids = [i.decode() if isinstance(i, bytes) else str(i) for i in h5["patch_ids"][()]] \
                if "patch_ids" in h5 else [str(i) for i in range(h5["features"].shape[0])]
    except (OSError, KeyError, ValueError) as exc:
        raise damaged(path, exc) from exc
    return features, coords, ids


def slice_groups(manifest: pd.DataFrame) -> list[tuple[tuple[str, str, str], pd.DataFrame]]:
    """(case, stain, slice) -> rows, in manifest order."""
    return list(manifest.groupby(["case", "stain", "slice"], sort=False))


def load_features(store_dir: Path, manifest: pd.DataFrame, views: int = 1) -> np.ndarray:
    """Features for every manifest row in manifest order, read once into memory.

    Returns (N, D), or (views, N, D) with ``views > 1``. Raises if a slice is missing or its patches
    do not match the manifest.
    """
    store_dir = Path(store_dir)
    meta = StoreMeta.read(store_dir)
    if views > meta.views:
        raise StoreError(f"feature store {store_dir} holds {meta.views} view(s) per patch, not {views}; extract "
                         "with features.views set, into a new features.store_dir.")
    shape = (len(manifest), meta.feature_dim) if views == 1 else (views, len(manifest), meta.feature_dim)
    out = np.empty(shape, dtype=np.dtype(meta.dtype))
    positions = pd.Series(np.arange(len(manifest)), index=manifest.index)
    for (case, stain, slice_id), rows in slice_groups(manifest):
        path = slice_file(store_dir, case, stain, slice_id)
        if not path.is_file():
            raise StoreError(f"feature store {store_dir} has no file for case {case} {stain} slice {slice_id}; run "
                             "`stainmil extract` (it resumes where it stopped).")
        features, _, ids = read_slice(path, views)
        if ids != list(rows["patch"]):
            raise StoreError(f"{path} holds {len(ids)} patches that differ from the manifest's {len(rows)} for this "
                             "slice; the patch folder changed since extraction — delete the file and re-run "
                             "`stainmil extract`.")
        out[..., positions.loc[rows.index].to_numpy(), :] = features
    return out
