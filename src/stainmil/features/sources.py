"""Where a cohort's patch features come from during training and evaluation.

* :class:`InMemoryFeatures` — the whole store read once (``features.cache_mb: 0``, the fast default while
  the store fits in memory);
* :class:`StoreFeatures` — slices read from the store's HDF5 files when a batch needs them, the most
  recently used kept in a cache of ``features.cache_mb`` megabytes. Memory then no longer grows with the
  cohort's features, and several processes on one machine share the files through the OS page cache.

Both give bit-identical batches: rows are addressed as (slice, position in the slice) and a slice's rows
are in the store file's order; float16 → float32 is exact. ``slice_block`` is the unit everything that
walks the whole cohort uses (feature statistics), so both sources walk it in the same order.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import h5py
import numpy as np
import pandas as pd
import torch

from stainmil.data.patch_index import ids_digest
from stainmil.errors import StoreError
from stainmil.features.store import StoreMeta, damaged, load_features, slice_file, verify_features

READERS = 4  # threads reading store files ahead of the training step (their reads release the GIL)


def _read_fully(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    """Fill ``buffer`` from ``offset`` of the file (a read may return less than asked: large or network files)."""
    done = 0
    while done < len(buffer):
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [buffer[done:]], offset + done)
        else:  # no preadv (Windows): an ordinary positioned read
            chunk = os.pread(fd, len(buffer) - done, offset + done)
            buffer[done:done + len(chunk)] = chunk
            got = len(chunk)
        if got == 0:
            raise damaged(path, EOFError("the file is shorter than its features: a truncated copy"))
        done += got


@dataclass
class StoreRequest:
    """Read features from the store on demand (bounded memory) instead of loading them all."""

    store_dir: str
    views: int = 1
    cache_mb: float = 512.0


def _malloc_trim():
    """glibc's ``malloc_trim`` (hands freed heap pages back to the system), or None where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def cohort_features(store_dir: str | Path, manifest, views: int, cache_mb: float) -> np.ndarray | StoreRequest:
    """What :class:`~stainmil.bags.cohort.CohortBags` gets: the whole store read now (``cache_mb`` 0), or a request
    to read it on demand through a cache of ``cache_mb`` MB."""
    if cache_mb > 0:
        return StoreRequest(str(store_dir), views, cache_mb)
    return load_features(store_dir, manifest, views)


class FeatureSource(Protocol):
    n_views: int
    feature_dim: int

    def gather(self, rows: np.ndarray, views: np.ndarray | None) -> torch.Tensor:
        """Features (P, D) float32 of manifest ``rows`` (P,); ``views`` (P,) picks a view per patch (None: the
        plain view 0)."""

    def all_views(self, rows: np.ndarray) -> torch.Tensor:
        """Every view of manifest ``rows``, (V, P, D) in the stored dtype."""


class InMemoryFeatures:
    """A feature array (N, D) or view bank (V, N, D) in memory, rows in manifest order."""

    def __init__(self, bank: np.ndarray) -> None:
        bank = torch.from_numpy(np.ascontiguousarray(bank))
        self.bank = bank[None] if bank.ndim == 2 else bank                # (V, N, D)
        self.n_views, self.feature_dim = int(self.bank.shape[0]), int(self.bank.shape[2])

    def gather(self, rows: np.ndarray, views: np.ndarray | None) -> torch.Tensor:
        index = torch.from_numpy(rows)
        if views is None:
            return self.bank[0, index].float()
        return self.bank[torch.from_numpy(views), index].float()

    def all_views(self, rows: np.ndarray) -> torch.Tensor:
        return self.bank[:, torch.from_numpy(rows)]


@dataclass
class RowLayout:
    """Where the rows of a manifest held in memory lie in the store: ``row_file`` / ``row_position`` (N,), each
    row's file (index into ``keys``) and place in it; ``file_rows`` the manifest rows of each file in file order;
    ``patch_ids`` (N,) as the manifest holds them (no per-patch Python object made up front)."""

    keys: list[tuple[str, str, str]]
    patch_ids: pd.Series
    file_rows: list[np.ndarray]
    row_file: np.ndarray
    row_position: np.ndarray

    def places(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(file, position in it) of each of ``rows`` (P,)."""
        return self.row_file[rows], self.row_position[rows]

    def count(self, file_index: int) -> int:
        return len(self.file_rows[file_index])

    def matches(self, file_index: int, ids: list[str]) -> bool:
        """Whether a store file's patch ids are the manifest's for it."""
        return list(ids) == self.patch_ids.array.take(self.file_rows[file_index]).tolist()


@dataclass
class RangeLayout:
    """Where the rows of a disk index (:class:`~stainmil.data.patch_index.PatchIndex`) lie in the store: file f
    holds rows ``start[f] .. start[f] + count[f] - 1`` in order, its patch ids hashed to ``ids[f]``. Nothing
    per patch is held: a row's file is found by bisection."""

    keys: list[tuple[str, str, str]]
    start: np.ndarray
    counts: np.ndarray
    ids: np.ndarray

    def places(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        files = np.searchsorted(self.start, rows, side="right") - 1
        return files, rows - self.start[files]

    def count(self, file_index: int) -> int:
        return int(self.counts[file_index])

    def matches(self, file_index: int, ids: list[str]) -> bool:
        return ids_digest(ids) == self.ids[file_index]


class StoreFeatures:
    """Slices read on demand from the feature store, the most recently used kept up to ``cache_mb``.

    ``layout`` (:class:`RowLayout` or :class:`RangeLayout`): the store file of each manifest row and its place in
    it; a file's patch ids are checked against the layout's when it is first read.
    """

    def __init__(self, store_dir: str | Path, layout: RowLayout | RangeLayout, views: int, cache_mb: float) -> None:
        self.store_dir = Path(store_dir)
        meta = StoreMeta.read(self.store_dir)
        if views > meta.views:
            raise StoreError(f"feature store {store_dir} holds {meta.views} view(s) per patch, not {views}; extract "
                             "with features.views set, into a new features.store_dir.")
        self.n_views, self.feature_dim = views, meta.feature_dim
        self.layout = layout
        missing = [key for key in layout.keys if not slice_file(self.store_dir, *key).is_file()]
        if missing:
            case, stain, slice_id = missing[0]
            raise StoreError(f"feature store {store_dir} has no file for case {case} {stain} slice {slice_id} "
                             f"({len(missing)} slice(s) missing); run `stainmil extract` (it resumes where it "
                             "stopped).")
        n_files = len(layout.keys)
        self.capacity = int(cache_mb * 2 ** 20)
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._reader: ThreadPoolExecutor | None = None
        self._verified = np.zeros(n_files, dtype=bool)  # patch ids checked (once per file)
        self._checked = np.zeros(n_files, dtype=bool)   # features against their checksum (once per file)
        # evicted slices are freed into glibc's heap, which keeps their pages unless trimmed: resident memory
        # would then grow with the store although the cache does not. Trimmed after every half cache of them.
        self._trim, self._evicted = _malloc_trim(), 0
        self.reads = 0  # files read so far (cache misses)

    def gather(self, rows: np.ndarray, views: np.ndarray | None) -> torch.Tensor:
        out = torch.empty((len(rows), self.feature_dim), dtype=torch.float32)
        for lo, hi, block, index in self._blocks(rows):
            out[lo:hi] = block[0, index] if views is None else block[torch.from_numpy(views[lo:hi]), index]
        return out

    def all_views(self, rows: np.ndarray) -> torch.Tensor:
        parts = [block[:, index] for _, _, block, index in self._blocks(rows)]
        return torch.cat(parts, dim=1) if parts else torch.empty((self.n_views, 0, self.feature_dim))

    def _blocks(self, rows: np.ndarray):
        """(lo, hi, file block, positions in it) for each run of ``rows`` in one file (a batch lists a slice's
        patches together)."""
        files, positions = self.layout.places(rows)
        cuts = np.flatnonzero(np.diff(files)) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(rows)]):
            if hi > lo:
                index = torch.from_numpy(positions[lo:hi].astype(np.int64))
                yield int(lo), int(hi), self._block(int(files[lo])), index

    def prefetch(self, rows: np.ndarray) -> None:
        """Start reading, in background threads, the files of manifest ``rows`` that are not cached: the next
        batch's slices arrive while this one trains."""
        wanted = np.unique(self.layout.places(rows)[0])
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="stainmil-prefetch")
        with self._lock:
            todo = [int(f) for f in wanted if int(f) not in self._cache and int(f) not in self._pending]
            for f in todo:
                self._pending[f] = self._reader.submit(self._load, f)

    def _block(self, file_index: int) -> torch.Tensor:
        with self._lock:
            block = self._cache.get(file_index)
            if block is not None:
                self._cache.move_to_end(file_index)
                return block
            pending = self._pending.get(file_index)
        return pending.result() if pending is not None else self._load(file_index)

    def _load(self, file_index: int) -> torch.Tensor:
        """Read one file into the cache (evicting the least recently used) and return its block."""
        try:
            block = torch.from_numpy(self._read(file_index))
        finally:
            with self._lock:
                self._pending.pop(file_index, None)
        size = block.numel() * block.element_size()
        with self._lock:
            if file_index in self._cache:
                return self._cache[file_index]
            while self._cache and self._held + size > self.capacity:
                _, old = self._cache.popitem(last=False)
                self._held -= old.numel() * old.element_size()
                self._evicted += old.numel() * old.element_size()
                del old
            if self._trim is not None and self._evicted > self.capacity // 2:
                self._trim(0)
                self._evicted = 0
            if size <= self.capacity:
                self._cache[file_index] = block
                self._held += size
        return block

    def _read(self, file_index: int) -> np.ndarray:
        """(V, n, D) of one store file, its patch ids checked against the manifest's.

        The file's layout comes from h5py; a contiguous, uncompressed dataset (how stainmil writes its store)
        is then read with ``os.preadv``, which releases the GIL, so several reader threads overlap their
        reads with each other and with the training step. Chunked or compressed datasets (e.g. linked
        TRIDENT files) are read through h5py.
        """
        path = slice_file(self.store_dir, *self.layout.keys[file_index])
        self.reads += 1
        try:
            block, checksum = self._read_file(path, file_index)
        except (OSError, KeyError, ValueError) as exc:
            raise damaged(path, exc) from exc
        if not self._checked[file_index]:  # the first read of each file: its features against their checksum
            verify_features(path, block[0], checksum)
            self._checked[file_index] = True
        return block

    def _read_file(self, path: Path, file_index: int) -> tuple[np.ndarray, str | None]:
        with h5py.File(path, "r") as h5:
            checksum = h5.attrs.get("checksum")
            features = h5["features"]
            block = np.empty((self.n_views, *features.shape), dtype=features.dtype)
            plain = [(features, np.s_[0], 0)] + ([(h5["augmented_features"], np.s_[1:], 1)] if self.n_views > 1
                                                  else [])
            direct = [(ds.id.get_offset(), dest, start) for ds, dest, start in plain
                      if ds.chunks is None and ds.compression is None and ds.dtype == block.dtype]
            if len(direct) != len(plain) or any(offset is None for offset, _, _ in direct):
                direct = []
                features.read_direct(block, dest_sel=np.s_[0])
                if self.n_views > 1:
                    h5["augmented_features"].read_direct(block, np.s_[:self.n_views - 1], np.s_[1:])
            if not self._verified[file_index]:
                ids = h5["patch_ids"].asstr()[()] if "patch_ids" in h5 else np.arange(block.shape[1]).astype(str)
                if not self.layout.matches(file_index, list(ids)):
                    raise StoreError(f"{path} holds {len(ids)} patches that differ from the manifest's "
                                     f"{self.layout.count(file_index)} for this slice; the patch folder changed since "
                                     "extraction — delete the file and re-run `stainmil extract`.")
                self._verified[file_index] = True
        if direct:
            views = memoryview(block.reshape(-1).view(np.uint8))
            per_view = block[0].nbytes
            with open(path, "rb") as handle:
                for offset, _, start in direct:  # view 0, then views 1..V-1 stored together
                    count = per_view * (1 if start == 0 else self.n_views - 1)
                    _read_fully(handle.fileno(), views[start * per_view:start * per_view + count], offset, path)
        return block, checksum
