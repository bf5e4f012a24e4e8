"""Extract backbone features once per patch into the feature store (resumable, atomic per slice).

Patches are decoded by DataLoader workers in parallel with the forward pass; the frozen backbone
runs in ``inference_mode`` with channels_last (and autocast on GPU); finished slices are handed
to a writer thread so HDF5 writes stay off the critical path. Re-running skips finished slices.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from stainmil.config import Config, dump_config
from stainmil.features.backbones import Backbone, build_backbone
from stainmil.features.store import (
    STORE_META,
    StoreMeta,
    check_store,
    slice_file,
    slice_groups,
    weights_label,
    write_slice,
)
from stainmil.progress import progress_bar


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_patch(path: str, image_size: int) -> np.ndarray:
    """Decode one patch as RGB uint8 (image_size, image_size, 3), resized if needed."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.BILINEAR)
        return np.array(image)  # a writable copy


class PatchImages(Dataset):
    """Patch files -> normalised float tensors (3, S, S)."""

    def __init__(self, paths: list[str], image_size: int, mean: list[float], std: list[float]) -> None:
        self.paths = paths
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        array = load_patch(self.paths[index], self.image_size)
        tensor = torch.from_numpy(array).permute(2, 0, 1).float().div_(255)  # (3, S, S)
        return (tensor - self.mean) / self.std


@dataclass
class ExtractSummary:
    store_dir: Path
    slices_total: int
    slices_done_before: int
    slices_written: int
    patches_written: int
    seconds: float

    @property
    def patches_per_second(self) -> float:
        return self.patches_written / self.seconds if self.seconds > 0 else float("nan")


def _prepare_store(config: Config, backbone: Backbone, store_dir: Path) -> StoreMeta:
    meta = StoreMeta(backbone=config.features.backbone, weights=weights_label(config),
                     weights_hash=backbone.weights_hash, image_size=config.features.image_size,
                     mean=list(config.features.mean), std=list(config.features.std),
                     feature_dim=backbone.out_dim, dtype=config.features.dtype)
    if (store_dir / STORE_META).is_file():
        existing = check_store(store_dir, config)
        if existing.weights_hash != meta.weights_hash:
            from stainmil.errors import StoreError

            raise StoreError(f"feature store {store_dir} was made with weights hash {existing.weights_hash} but the "
                             f"loaded weights hash to {meta.weights_hash}; use a new features.store_dir.")
    else:
        store_dir.mkdir(parents=True, exist_ok=True)
        meta.write(store_dir)
    dump_config(config, store_dir / "config.yaml")
    return meta


def extract_features(config: Config, manifest: pd.DataFrame, backbone: Backbone | None = None,
                     shard: tuple[int, int] | None = None) -> ExtractSummary:
    """Extract features for every slice of ``manifest`` not yet in the store.

    ``shard=(i, n)`` processes only slices ``i, i+n, i+2n, …`` (for array jobs).
    """
    import time

    start = time.perf_counter()
    backbone = backbone or build_backbone(config.features)
    store_dir = config.store_dir
    meta = _prepare_store(config, backbone, store_dir)
    groups = slice_groups(manifest)
    if shard is not None:
        groups = groups[shard[0]::shard[1]]
    pending = [(key, rows) for key, rows in groups if not slice_file(store_dir, *key).is_file()]
    paths = [p for _, rows in pending for p in rows["path"]]
    summary = ExtractSummary(store_dir, len(groups), len(groups) - len(pending), 0, 0, 0.0)
    if not pending:
        summary.seconds = time.perf_counter() - start
        return summary

    device = resolve_device(config.features.device)
    model = backbone.module.to(device).to(memory_format=torch.channels_last)
    f = config.features
    loader = DataLoader(PatchImages(paths, f.image_size, f.mean, f.std), batch_size=f.batch_size, shuffle=False,
                        num_workers=f.num_workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if f.num_workers > 0 else None, persistent_workers=False)
    dtype = np.dtype(meta.dtype)
    writer = ThreadPoolExecutor(max_workers=1)
    writes: list[Future] = []
    buffered: list[np.ndarray] = []
    n_buffered = 0
    next_slice = 0

    def flush_finished_slices() -> None:
        nonlocal buffered, n_buffered, next_slice
        while next_slice < len(pending) and n_buffered >= len(pending[next_slice][1]):
            (case, stain, slice_id), rows = pending[next_slice]
            block = np.concatenate(buffered) if len(buffered) > 1 else buffered[0]
            n = len(rows)
            features, rest = block[:n], block[n:]
            buffered, n_buffered = ([rest] if len(rest) else []), len(rest)
            coords = rows[["x", "y"]].to_numpy()
            attrs = {"case": case, "stain": stain, "slice": slice_id, "backbone": meta.backbone,
                     "weights": meta.weights, "weights_hash": meta.weights_hash, "image_size": meta.image_size,
                     "mean": meta.mean, "std": meta.std}
            writes.append(writer.submit(write_slice, slice_file(store_dir, case, stain, slice_id), features,
                                        coords, list(rows["patch"]), attrs))
            summary.slices_written += 1
            next_slice += 1

    use_autocast = device.type == "cuda"
    try:
        with torch.inference_mode(), progress_bar("extract: patches", total=len(paths)) as advance:
            for images in loader:
                images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                    features = model(images)                       # (B, D)
                buffered.append(features.float().cpu().numpy().astype(dtype, copy=False))
                n_buffered += len(images)
                summary.patches_written += len(images)
                flush_finished_slices()
                advance(len(images))
    finally:
        writer.shutdown(wait=True)
    for future in writes:
        future.result()  # re-raise a failed write
    summary.seconds = time.perf_counter() - start
    return summary


class ExtractShardJob:
    """Extract one shard of slices; picklable, and requeued by submitit near a time limit (it resumes)."""

    def __call__(self, config_values: dict, shard: int, shards: int) -> ExtractSummary:
        from stainmil.config import config_from_dict
        from stainmil.data.cohort import load_manifest

        config = config_from_dict(config_values)
        return extract_features(config, load_manifest(config), shard=(shard, shards))

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(ExtractShardJob(), *args, **kwargs)


def extract_sharded(config: Config, shards: int = 1, launcher: str = "local", shard: int | None = None,
                    log=print) -> list[ExtractSummary]:
    """Extract the whole store, in ``shards`` jobs (local or a SLURM array), or only shard ``shard``.

    The store's settings file is written here first, so parallel shards never race on it; each slice
    file is written atomically, so two workers on the same slice cannot corrupt it.
    """
    from stainmil.config import config_to_dict
    from stainmil.data.cohort import load_manifest
    from stainmil.errors import ConfigError
    from stainmil.experiments.launch import run_jobs

    if shards < 1 or (shard is not None and not 0 <= shard < shards):
        raise ConfigError(f"--shard {shard} must be in 0..{shards - 1} (--shards {shards}).")
    manifest = load_manifest(config)
    if shard is not None:
        return [extract_features(config, manifest, shard=(shard, shards))]
    if shards == 1 and launcher == "local":
        return [extract_features(config, manifest)]
    _prepare_store(config, build_backbone(config.features), config.store_dir)
    values = config_to_dict(config)
    return run_jobs(ExtractShardJob(), [(values, i, shards) for i in range(shards)], launcher, config.store_dir,
                    config.slurm, name="stainmil-extract", log=log)
