"""What ``stainmil view`` shows: the cases, slices, patches and registrations of a run-like folder.

A *source* is a folder holding ``attention/patches.csv`` (written by the analysis of a run, a CV fold, a
``predict`` set): FOLDER itself or any folder below it (a CV or ``compare-models`` folder holds one per fold and
model). Each source's ``config.yaml`` — in the source folder or the nearest folder above it — says where the
slides were tiled (``tile.out_dir``: tissue masks) and registered (``register.out_dir``).

Every slide the viewer may serve is listed here once, by number (:class:`SlideEntry`): tile URLs carry that
number, never a path, so no URL can reach a file the run does not name. Slides on the slide route are the
slide files of the patch table; patch-folder cohorts get a *mosaic* — the slice's patch files pasted at their own
resolution into one pyramidal TIFF, built once under ``<source>/viewer/`` (or the user's cache when the run
folder is read-only).
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from stainmil.analysis.heatmaps import patch_mosaic, patch_positions, patch_side
from stainmil.errors import DataError
from stainmil.run_files import RunFiles, glob_runs
from stainmil.slides.write import write_pyramidal_tiff

KEY = ["case", "stain", "slice"]


@dataclass
class SlideEntry:
    """One slice the viewer can show: a slide file, or a mosaic of its patch files built on first use."""
    id: int
    source: int
    case: str
    stain: str
    slice: str
    kind: str                       # "slide" | "mosaic"
    path: Path | None               # the slide file (found), or the mosaic's TIFF (once built)
    problem: str = ""               # one sentence when the slide cannot be shown (moved, unreadable)
    patches: pd.DataFrame | None = None   # mosaic: path, x, y of each patch file
    side: int = 0                   # mosaic: patch side (px)
    mask: Path | None = None        # tissue mask PNG written by `stainmil tile`
    annotations: tuple = (None, None)     # (include, exclude) GeoJSON files used for tiling
    truth: Path | None = None       # its pathologist's outline file (analysis.truth), if it has one
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass
class Source:
    """One folder with ``attention/patches.csv``; tables read on first use."""
    index: int
    name: str                       # relative to FOLDER ("." for FOLDER itself)
    folder: Path
    config_file: Path | None
    _tables: dict = field(default_factory=dict, repr=False)

    def table(self, name: str) -> pd.DataFrame:
        if name not in self._tables:
            files = RunFiles.of(self.folder)
            path = {"patches": files.patches, "cases": files.table("cases"), "slices": files.table("slices"),
                    "predictions": self.folder / "predictions.csv"}[name]
            if path.is_file():
                table = pd.read_csv(path, dtype={"case": str, "stain": str, "slice": str})
            else:
                table = pd.DataFrame(columns=KEY)
            self._tables[name] = table
        return self._tables[name]


def find_sources(folder: Path) -> list[Source]:
    """Every folder at or under ``folder`` with ``attention/patches.csv``, sorted by path (a run first)."""
    found = sorted(glob_runs(folder, "patches"),
                   key=lambda p: (len(p.relative_to(folder).parts), str(p)))
    sources = []
    for index, path in enumerate(found):
        config = next((d / "config.yaml" for d in (path, *path.parents)
                       if (d / "config.yaml").is_file() and d.is_relative_to(folder.parent)), None)
        name = str(path.relative_to(folder)) if path != folder else "."
        sources.append(Source(index, name, path, config))
    return sources


class SlideFinder:
    """Slides moved since the run, found by name under ``--slides-dir`` (the first file or DICOM folder of that
    name, searched once)."""

    def __init__(self, slides_dir: str | Path | None) -> None:
        self.root = Path(slides_dir).resolve() if slides_dir else None
        self._by_name: dict[str, list[Path]] | None = None

    def _index(self) -> dict[str, list[Path]]:
        if self._by_name is None:
            self._by_name = {}
            if self.root and self.root.is_dir():
                for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
                    for name in (*filenames, *dirnames):
                        self._by_name.setdefault(name, []).append(Path(dirpath) / name)
        return self._by_name

    def find(self, recorded: Path) -> Path | None:
        """``recorded`` where it is now: itself, or under ``slides_dir`` with the longest matching path tail."""
        if recorded.exists():
            return recorded
        candidates = self._index().get(recorded.name, [])
        if not candidates:
            return None

        def shared_tail(path: Path) -> int:
            n = 0
            for a, b in zip(reversed(path.parts), reversed(recorded.parts)):
                if a != b:
                    break
                n += 1
            return n
        return max(candidates, key=shared_tail)


def moved_sentence(recorded: Path, key: tuple[str, str, str], finder: SlideFinder) -> str:
    where = f" nor under --slides-dir {finder.root}" if finder.root else ""
    return (f"slide {recorded} (case {key[0]}, {key[1]}, slice {key[2]}) is not there{where}; if the slides moved "
            f"since the run, start `stainmil view <folder> --slides-dir <the folder they are in now>` "
            "(files are found by name).")


def mosaic_file(source: Source, entry: SlideEntry) -> Path:
    """Where the mosaic of a patch-folder slice lives: under the source folder, else the user's cache."""
    stem = "_".join(str(part) for part in (entry.case, entry.stain, entry.slice))
    digest = hashlib.sha1(("\n".join(map(str, entry.patches["path"])) + f"|{entry.side}").encode()).hexdigest()[:10]
    name = f"{''.join(c if c.isalnum() or c in '-_' else '_' for c in stem)}_{digest}.tif"
    preferred = source.folder / "viewer" / "mosaics"
    if os.access(source.folder, os.W_OK):
        return preferred / name
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stainmil" / "mosaics"
    return cache / hashlib.sha1(str(source.folder).encode()).hexdigest()[:10] / name


def build_mosaic(source: Source, entry: SlideEntry) -> Path:
    """The patch files of a slice pasted at their places into a pyramidal TIFF (once; atomic)."""
    with entry.lock:
        target = mosaic_file(source, entry)
        if not target.is_file():
            table = entry.patches
            canvas = patch_mosaic(table["path"], table["x"].to_numpy(int), table["y"].to_numpy(int), entry.side)
            target.parent.mkdir(parents=True, exist_ok=True)
            write_pyramidal_tiff(target, canvas)
        entry.path = target
        return target


def unanalysed_runs(folder: Path) -> list[Path]:
    """Trained runs at or under ``folder`` (a best checkpoint) whose analysis was never written (CV folds and
    compare-models runs are not analysed by default)."""
    return sorted(r for r in glob_runs(folder) if not RunFiles.of(r).patches.is_file())


def require_folder(folder: str | Path) -> Path:
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"{folder} is not a folder; pass a run folder (runs/run_…), a CV fold, a `predict` folder "
                        "or a `compare-models` folder to `stainmil view`.")
    if not glob_runs(path, "patches"):
        runs = unanalysed_runs(path)
        if runs:
            raise DataError(f"{folder} holds {len(runs)} trained run(s) but no analysis (e.g. {runs[0]}); start "
                            f"`stainmil view {folder} --analyze` to analyse their test cases first.")
        raise DataError(f"{folder} holds no attention/patches.csv; `stainmil view` shows what a run's analysis "
                        "wrote — run `stainmil analyze <run>` (or `stainmil predict --explain`) first.")
    return path


def patch_positions_of(part: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, int]:
    """Mosaic places of a patch-folder slice's patches (their file names' x, y; index order without them)."""
    side = patch_side(str(part["path"].iloc[0]))
    xs, ys, _ = patch_positions(part, side)
    return np.asarray(xs, int), np.asarray(ys, int), side
