"""The patch index on disk: a cohort's manifest as a memory-mapped Arrow file beside a small table of its slices,
so a process reading a huge cohort holds in memory what grows with its slices, not with its patches.

Built once from ``manifest.parquet`` (streamed a batch of rows at a time, so building it needs no more memory at
10^8 patches than at 10^5) into ``<index folder>/patch_index/``::

    patches.arrow   the manifest's rows, unchanged and in its order, as an uncompressed Arrow IPC file (Feather v2):
                    memory-mapped; a row's pages are read through the OS page cache only when it is asked for
    slices.parquet  one row per slice, in manifest order: case, stain, slice, label, start, count (its rows are
                    start .. start + count - 1) and ids (BLAKE2b of its patch ids, checked against its store file)
    index.json      written last: the manifest it was built from (bytes, modification time), rows and slices

A manifest whose slices are not each one run of rows (``stainmil index`` always writes them so) gets no disk index:
``index.json`` then says so, and its readers keep the manifest in memory as before.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stainmil.errors import DataError, OutputError
from stainmil.io import atomic_path, atomic_write, atomic_write_json

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent first builds then each write the same files
    fcntl = None

FORMAT = 1
KEYS = ["case", "stain", "slice"]
BATCH_ROWS = 1 << 18  # manifest rows read at a time while building (~30 MB of text in flight)
PLACES = ["x", "y", "size0"]


def index_folder(manifest: str | Path) -> Path:
    """Where the disk index of ``manifest`` lives: ``patch_index/`` beside it."""
    return Path(manifest).parent / "patch_index"


def ids_digest(ids: Iterable[str]) -> str:
    """BLAKE2b (128 bits) of a slice's patch ids in order: what its store file's ids must hash to."""
    return _hash_ids(hashlib.blake2b(digest_size=16), ids).hexdigest()


def _hash_ids(digest, ids: Iterable[str]):
    """``digest`` updated with ``ids``, one line each (so a slice read in several batches hashes the same)."""
    for patch in ids:
        digest.update(str(patch).encode())
        digest.update(b"\n")
    return digest


@dataclass
class PatchIndex:
    """A manifest on disk. ``slices`` (S rows): case, stain, slice, label, start, count, ids — in manifest order.

    Rows are numbered as in the manifest file; only the rows of ``slices`` are part of the cohort (a stain subset
    drops slices, never renumbers rows).
    """

    folder: Path
    slices: pd.DataFrame
    rows: int
    columns: list[str]
    places: bool = True  # batches read x, y, size0 (a model that reads patch places); False: never asked for
    _table: pa.Table | None = field(default=None, repr=False)

    def with_slices(self, slices: pd.DataFrame, places: bool = True) -> PatchIndex:
        """The same file, with only ``slices`` (rows of this one's ``slices``) in the cohort; ``places``: whether
        batches read the patches' places."""
        return replace(self, slices=slices.reset_index(drop=True), places=places)

    def table(self) -> pa.Table:
        """Every manifest row, memory-mapped (nothing is read until a column's values are)."""
        if self._table is None:
            source = pa.memory_map(str(self.folder / "patches.arrow"), "r")
            self._table = pa.ipc.open_file(source).read_all()
        return self._table

    def values(self, column: str, rows: np.ndarray) -> np.ndarray:
        """``column`` of manifest ``rows`` (P,): only the pages holding them are read."""
        return self.table().column(column).take(pa.array(np.asarray(rows, dtype=np.int64))).to_numpy(
            zero_copy_only=False)

    def frame(self) -> pd.DataFrame:
        """The whole manifest in memory (what reports and analyses read; training never asks for it)."""
        return self.table().to_pandas()


def open_patch_index(manifest: str | Path) -> PatchIndex | None:
    """The disk index of ``manifest``, built first when missing or older than the manifest (one process builds it,
    the others wait for it); None when there is no manifest (its reader names it), when the manifest's slices are
    not each one run of rows, or when the index cannot be written (said in one line): it then stays in memory."""
    manifest = Path(manifest)
    if not manifest.is_file():
        return None
    folder = index_folder(manifest)
    try:
        made = _current(folder, manifest)
        if made is None:
            with _building(folder):
                made = _current(folder, manifest) or build_patch_index(manifest, folder)
        if not made["grouped"]:
            return None
        index = PatchIndex(folder, pd.read_parquet(folder / "slices.parquet"), int(made["rows"]),
                           list(made["columns"]))
        if index.table().num_rows != index.rows:  # mapped now: a rebuild later cannot mix two versions
            return None
    except (OSError, OutputError, pa.ArrowInvalid) as exc:
        warnings.warn(f"the patch index of {manifest} could not be written or read in {folder} "
                      f"({type(exc).__name__}: {exc}); the manifest is read into memory instead.", stacklevel=2)
        return None
    return index


def _current(folder: Path, manifest: Path) -> dict | None:
    """What ``index.json`` says when it was made from this very manifest in this format, else None."""
    made = _read_marker(folder)
    fresh = made is not None and made.get("manifest") == _identity(manifest) and made.get("format") == FORMAT
    return made if fresh else None


@contextmanager
def _building(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s build lock (a blocking ``flock``; none where there is no ``fcntl``)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".build.lock", "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def build_patch_index(manifest: Path, folder: Path) -> dict:
    """Write ``folder``'s files from ``manifest`` (streamed); return what ``index.json`` says."""
    marker = folder / "index.json"
    marker.unlink(missing_ok=True)  # from here on, what the folder holds does not look finished
    identity = _identity(manifest)
    parquet = pq.ParquetFile(manifest)
    schema = parquet.schema_arrow
    missing = [c for c in KEYS + ["patch", "label"] if c not in schema.names]
    if missing:
        raise DataError(f"the manifest {manifest} has no column(s) {missing}; re-run `stainmil index`.")
    runs = _Runs()
    with atomic_path(folder / "patches.arrow", suffix=".arrow") as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS):
                writer.write_batch(batch)
                runs.add(batch)
    made = {"format": FORMAT, "manifest": identity, "rows": runs.rows, "slices": len(runs.table),
            "grouped": runs.grouped, "columns": schema.names}
    if runs.grouped:
        slices = pd.DataFrame(runs.table, columns=KEYS + ["label", "start", "count", "ids"])
        atomic_write(folder / "slices.parquet", lambda tmp: slices.to_parquet(tmp, index=False), suffix=".parquet")
    else:
        (folder / "patches.arrow").unlink(missing_ok=True)
    atomic_write_json(marker, made)
    return made


class _Runs:
    """The slices of a manifest read batch by batch: one (case, stain, slice, label, start, count, ids) per run of
    rows; ``grouped`` turns False when a slice's rows come back after another slice's."""

    def __init__(self) -> None:
        self.table: list[list] = []
        self.rows = 0
        self.grouped = True
        self._seen: set[tuple] = set()
        self._digest = None

    def add(self, batch: pa.RecordBatch) -> None:
        n = batch.num_rows
        keys = [batch.column(k).to_numpy(zero_copy_only=False) for k in KEYS]
        ids = batch.column("patch").to_numpy(zero_copy_only=False)
        labels = batch.column("label").to_numpy(zero_copy_only=False)
        starts = np.zeros(n, dtype=bool)
        for column in keys:
            starts[1:] |= column[1:] != column[:-1]
        starts[0] = not self.table or tuple(str(c[0]) for c in keys) != tuple(self.table[-1][:3])
        bounds = np.r_[np.flatnonzero(starts), n]
        if not starts[0]:  # the batch goes on with the slice the previous one ended in
            self._extend(ids[:bounds[0]])
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            key = tuple(str(c[lo]) for c in keys)
            if key in self._seen:
                self.grouped = False
            self._seen.add(key)
            self.table.append([*key, labels[lo], self.rows + int(lo), 0, ""])
            self._digest = hashlib.blake2b(digest_size=16)
            self._extend(ids[lo:hi])
        self.rows += n

    def _extend(self, ids: np.ndarray) -> None:
        self.table[-1][5] += len(ids)
        self.table[-1][6] = _hash_ids(self._digest, ids).hexdigest()  # so far: a slice may go on in the next batch


def _identity(manifest: Path) -> dict:
    stat = manifest.stat()
    return {"path": str(manifest.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "index.json").read_text())
    except (OSError, ValueError):
        return None
