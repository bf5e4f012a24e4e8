"""Extract backbone features once per patch into the feature store (resumable, atomic per slice).

Patches are decoded by DataLoader workers in parallel with the forward pass and cross to the main
process as uint8 (4x less than float); scaling, normalising and the feature views happen on the
backbone's device. The frozen backbone runs in ``inference_mode`` with channels_last (and bf16
autocast on GPU); finished slices are handed to a writer thread so HDF5 writes stay off the
critical path. Re-running skips finished slices.

With ``features.views: V > 1`` every patch is forwarded V times (see ``stainmil.features.augment``):
the plain image, its flips/rotations, then HED-jittered ones; the store keeps all V.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from stainmil.config import Config, config_from_dict, config_to_dict, dump_config
from stainmil.data.cohort import load_manifest
from stainmil.device import resolve_device
from stainmil.errors import ConfigError, StoreError
from stainmil.features.augment import forward_images, make_view, view_jitter
from stainmil.features.backbones import Backbone, build_backbone
from stainmil.features.plan import ExtractionPlan, extraction_plan
from stainmil.features.store import (
    MISSING,
    STORE_META,
    StoreMeta,
    check_store,
    expected_settings,
    slice_file,
    slice_groups,
    slice_status,
    view_settings,
    write_slice,
)
from stainmil.launch import Launch, run_jobs
from stainmil.locks import folder_lock
from stainmil.progress import progress_bar
from stainmil.slides.reader import SlideHandles, patch_refs, read_patch


class PatchImages(Dataset):
    """Patches -> uint8 tensors (3, S, S); with ``views > 1`` also each view's HED jitter (views, 2, 3).

    ``paths``: patch files or :class:`~stainmil.slides.reader.PatchRef` regions of slides (each worker
    opens its own slide handles). ``keys`` (one stable id per patch) seed the jitter, so a patch's views
    never depend on batching.
    """

    def __init__(self, paths: list, image_size: int, keys: list[str] | None = None, views: int = 1,
                 jitter: float = 0.0, seed: int = 0) -> None:
        self.paths, self.image_size = paths, image_size
        self.keys, self.views, self.jitter, self.seed = keys, views, jitter, seed
        self.slides = SlideHandles()  # this reader's open slides (a worker gets its own: fresh_slide_handles)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = torch.from_numpy(read_patch(self.paths[index], self.image_size, self.slides))
        image = image.permute(2, 0, 1)                                                      # (3, S, S)
        if self.views == 1:
            return image
        return image, torch.from_numpy(view_jitter(self.keys[index], self.views, self.jitter, self.seed))


def fresh_slide_handles(worker_id: int) -> None:
    """Each DataLoader worker opens its own slide handles (never one inherited from the parent by fork)."""
    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "slides"):
        info.dataset.slides.forget()


def patch_keys(rows: pd.DataFrame) -> list[str]:
    """Stable id of each patch: ``case/stain/slice/patch`` (independent of where the files live)."""
    return [f"{c}/{s}/{sl}/{p}" for c, s, sl, p in zip(rows["case"], rows["stain"], rows["slice"], rows["patch"])]


def encode_views(model: torch.nn.Module, images: torch.Tensor, jitter: torch.Tensor | None, views: int,
                 mean: list[float], std: list[float], autocast: torch.dtype | None = None) -> torch.Tensor:
    """uint8 images (B, 3, S, S) on the model's device -> features (B, D), or (views, B, D) with views > 1.

    jitter: (B, views, 2, 3) from :func:`~stainmil.features.augment.view_jitter` (None with one view);
    autocast: the encoder's precision on a GPU (None = fp32).
    """
    x = images.float().div_(255)
    out = []
    for view in range(views):
        out.append(forward_images(model, x if view == 0 else make_view(x, view, jitter[:, view]), mean, std,
                                  autocast))
    return out[0] if views == 1 else torch.stack(out)


class DeviceToHost:
    """Features leave the GPU without stalling it: each batch is copied into pinned host memory asynchronously
    and handed over one batch later, when the next batch's forward has been queued (on a CPU: at once)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.pending = device, None

    def push(self, features: torch.Tensor) -> torch.Tensor | None:
        """Queue ``features`` (on the device); return the previous batch's, on the host (None for the first)."""
        if self.device.type != "cuda":
            return features
        host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
        host.copy_(features, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        previous, self.pending = self.pending, (host, done)
        return self._wait(previous)

    def flush(self) -> torch.Tensor | None:
        previous, self.pending = self.pending, None
        return self._wait(previous)

    @staticmethod
    def _wait(entry) -> torch.Tensor | None:
        if entry is None:
            return None
        host, done = entry
        done.synchronize()
        return host


@dataclass
class ExtractSummary:
    store_dir: Path
    slices_total: int
    slices_done_before: int
    slices_written: int
    patches_written: int
    seconds: float
    plan: ExtractionPlan | None = None  # batch size, workers and precision used (None: nothing to extract)
    reextracted: list[str] = field(default_factory=list)  # "<file> (why)": damaged files found on resume, redone

    @property
    def patches_per_second(self) -> float:
        return self.patches_written / self.seconds if self.seconds > 0 else float("nan")


def _prepare_store(config: Config, backbone: Backbone, store_dir: Path, precision: str) -> StoreMeta:
    settings = expected_settings(config.features)
    meta = StoreMeta(**settings, weights_hash=backbone.weights_hash, feature_dim=backbone.out_dim,
                     dtype=config.features.dtype, **view_settings(config.features), precision=precision)
    if (store_dir / STORE_META).is_file():
        existing = check_store(store_dir, config, extracting=True)
        if existing.precision and existing.precision != precision:
            raise StoreError(f"feature store {store_dir} was extracted in {existing.precision} but this machine would "
                             f"compute in {precision}; set features.precision={existing.precision} (on a GPU) or "
                             "extract into a new features.store_dir, so one store never mixes both.")
        if existing.weights_hash != meta.weights_hash:

            raise StoreError(f"feature store {store_dir} was made with weights hash {existing.weights_hash} but the "
                             f"loaded weights hash to {meta.weights_hash}; use a new features.store_dir.")
    else:
        store_dir.mkdir(parents=True, exist_ok=True)
        meta.write(store_dir)
    dump_config(config, store_dir / "config.yaml")
    return meta


def extract_features(config: Config, manifest: pd.DataFrame, backbone: Backbone | None = None,
                     shard: tuple[int, int] | None = None, verify: bool = False) -> ExtractSummary:
    """Extract features for every slice of ``manifest`` not yet whole in the store.

    A slice file already there is trusted only once checked (:func:`slice_status`: it opens, shape, dtype and
    checksum attribute; ``verify``: the full checksum too); a damaged one is extracted again and named in
    ``reextracted``. ``shard=(i, n)`` processes only slices ``i, i+n, i+2n, …`` (for array jobs; shards run in
    parallel, each holding its own part of the store's writer lock).
    """
    with folder_lock(config.paths.store, "extract", part=f"shard{shard[0]}of{shard[1]}" if shard else None):
        return _extract_features(config, manifest, backbone, shard, verify)


def _extract_features(config: Config, manifest: pd.DataFrame, backbone: Backbone | None,
                      shard: tuple[int, int] | None, verify: bool = False) -> ExtractSummary:
    import time

    start = time.perf_counter()
    backbone = backbone or build_backbone(config.features)
    store_dir = config.paths.store
    device = resolve_device(config.features.device)
    plan = extraction_plan(config.features, device)
    meta = _prepare_store(config, backbone, store_dir, plan.precision)
    groups = slice_groups(manifest)
    if shard is not None:
        groups = groups[shard[0]::shard[1]]
    status = {key: slice_status(slice_file(store_dir, *key), len(rows), meta, verify) for key, rows in groups}
    pending = [(key, rows) for key, rows in groups if status[key]]
    paths = [p for _, rows in pending for p in patch_refs(rows)]
    keys = [k for _, rows in pending for k in patch_keys(rows)]
    summary = ExtractSummary(store_dir, len(groups), len(groups) - len(pending), 0, 0, 0.0)
    summary.reextracted = [f"{slice_file(store_dir, *key)} ({why})" for key, why in status.items()
                           if why and why != MISSING]
    if not pending:
        summary.seconds = time.perf_counter() - start
        return summary

    model = backbone.module.to(device).to(memory_format=torch.channels_last)
    f = config.features
    summary.plan = plan
    dataset = PatchImages(paths, f.image_size, keys, meta.views, meta.view_jitter, meta.view_seed)
    loader = DataLoader(dataset, batch_size=plan.batch_size, shuffle=False, num_workers=plan.workers,
                        pin_memory=device.type == "cuda",
                        prefetch_factor=(4 if plan.workers <= 4 else 2) if plan.workers > 0 else None,
                        persistent_workers=False, worker_init_fn=fresh_slide_handles)
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
            block = np.concatenate(buffered, axis=-2) if len(buffered) > 1 else buffered[0]
            n = len(rows)
            features, rest = block[..., :n, :], block[..., n:, :]     # (N, D) or (V, N, D)
            n_buffered = rest.shape[-2]
            buffered = [rest] if n_buffered else []
            coords = rows[["x", "y"]].to_numpy()
            attrs = {"case": case, "stain": stain, "slice": slice_id, "backbone": meta.backbone,
                     "weights": meta.weights, "weights_hash": meta.weights_hash, "image_size": meta.image_size,
                     "mean": meta.mean, "std": meta.std}
            writes.append(writer.submit(write_slice, slice_file(store_dir, case, stain, slice_id), features,
                                        coords, list(rows["patch"]), attrs))
            summary.slices_written += 1
            next_slice += 1

    def take(host: torch.Tensor) -> None:
        nonlocal n_buffered
        buffered.append(host.numpy().astype(dtype, copy=True))  # pageable: the pinned buffer goes back to torch
        n = host.shape[-2]
        n_buffered += n
        summary.patches_written += n
        flush_finished_slices()
        advance(n)

    copies = DeviceToHost(device)
    try:
        with torch.inference_mode(), progress_bar("extract: patches", total=len(paths)) as advance:
            for item in loader:
                images, jitter = item if meta.views > 1 else (item, None)
                images = images.to(device, non_blocking=True)
                jitter = jitter.to(device, non_blocking=True) if jitter is not None else None
                features = encode_views(model, images, jitter, meta.views, meta.mean, meta.std, plan.autocast)
                ready = copies.push(features.to(torch.float16 if dtype == np.float16 else torch.float32))
                if ready is not None:  # the previous batch's features, copied while this batch ran
                    take(ready)
            last = copies.flush()
            if last is not None:
                take(last)
    finally:
        writer.shutdown(wait=True)
    for future in writes:
        future.result()  # re-raise a failed write
    summary.seconds = time.perf_counter() - start
    return summary


class ExtractShardJob:
    """Extract one shard of slices; picklable, and requeued by submitit near a time limit (it resumes)."""

    def __call__(self, config_values: dict, shard: int, shards: int, verify: bool = False) -> ExtractSummary:
        config = config_from_dict(config_values)
        return extract_features(config, load_manifest(config), shard=(shard, shards), verify=verify)

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(ExtractShardJob(), *args, **kwargs)


def extract_sharded(config: Config, *, shards: int = 1, shard: int | None = None, verify: bool = False,
                    launch: Launch = Launch()) -> list[ExtractSummary]:
    """Extract the whole store, in ``shards`` jobs (local or a SLURM array), or only shard ``shard``.

    The store's settings file is written here first, so parallel shards never race on it; each slice
    file is written atomically, so two workers on the same slice cannot corrupt it.
    """

    if shards < 1 or (shard is not None and not 0 <= shard < shards):
        raise ConfigError(f"--shard-index {shard} must be in 0..{shards - 1} (--shards {shards}).")
    manifest = load_manifest(config)
    if shard is not None:
        return [extract_features(config, manifest, shard=(shard, shards), verify=verify)]
    if shards == 1 and launch.launcher == "local":
        return [extract_features(config, manifest, verify=verify)]
    # the jobs' machines decide the precision (the submitting node may have no GPU): not recorded for shards
    _prepare_store(config, build_backbone(config.features), config.paths.store, "")
    values = config_to_dict(config)
    return run_jobs(ExtractShardJob(), [(values, i, shards, verify) for i in range(shards)], launch,
                    config.paths.store, config.slurm, name="stainmil-extract")
