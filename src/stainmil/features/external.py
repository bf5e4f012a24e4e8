"""Features another tool made — TRIDENT or CLAM folders — turned into a stainmil store and manifest without
re-extracting (``stainmil import-features``).

Layouts read (as those tools write them)::

    TRIDENT  <job>/<mag>x_<px>px_<overlap>px_overlap/features_<encoder>/<slide>.h5
                 features (N, D) (fp16/bf16/fp32 as the encoder ran), coords (N, 2) level 0 (+ its attrs);
                 features.attrs["encoder"]
             <job>/<mag>x_<px>px_<overlap>px_overlap/patches/<slide>_patches.h5
                 coords (N, 2) int64, attrs patch_size, patch_size_level0, level0/target_magnification, overlap
    CLAM     <feat_dir>/h5_files/<slide>.h5   features (N, D) float32, coords (N, 2) int32, no attrs
             <feat_dir>/pt_files/<slide>.pt   tensor (N, D) float32 (no coordinates)
             <save_dir>/patches/<slide>.h5    coords with attrs patch_size, patch_level, downsample (create_patches)

``DIR`` may be the job folder, the ``<mag>x_…`` folder or the ``features_<encoder>`` folder (TRIDENT), or the
feature folder or its ``h5_files``/``pt_files`` (CLAM). Slide names (file stems) map to case, stain and slice
through ``tile.filename_pattern`` — matched against the slide's path under ``tile.slices_dir`` when the slide is
there, else against the name itself (with each slide extension tried) — and through the same aliases,
exclusions and labels as every other route. Every slide is used or named in ``import_report.txt/.json`` with
its reason.

The store (``features.store_dir``, default ``<output_dir>/features/imported``) links each slide's file when it
already holds ``features`` and ``coords`` (nothing copied), and writes an HDF5 file otherwise (``.pt``, or
coordinates from a patches file). ``store.json`` records the encoder, patch size, magnification and the source
folder. Heatmaps draw on each slide's thumbnail when ``tile.slices_dir`` holds the slide, else on a plain canvas
of the patch squares. Slides whose store file exists are not read again: the import resumes.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from stainmil.config import Config, TileConfig
from stainmil.data.cohort import CaseRules, IndexResult, slide_index
from stainmil.data.labels import normalize_case_id
from stainmil.data.tiling import compile_slide_pattern
from stainmil.errors import ConfigError, DataError
from stainmil.features.store import StoreMeta, read_slice, slice_file, write_slice
from stainmil.io import atomic_path, atomic_write_json, atomic_write_text, safe_name, save_image, walk_files
from stainmil.locks import folder_lock
from stainmil.progress import progress_bar
from stainmil.slides.coords import coords_attrs, grid_step
from stainmil.slides.reader import (
    PLAIN_SUFFIXES,
    WSI_SUFFIXES,
    Slide,
    UnreadableSlide,
    best_level,
    slide_name,
    slide_paths,
)

FORMATS = ("trident", "clam")
JOB_FOLDER = re.compile(r"^(?P<mag>\d+(?:\.\d+)?)x_(?P<px>\d+)px_(?P<overlap>\d+)px_overlap$")

NO_MATCH = "slide name does not match tile.filename_pattern"
LOCKED = "still being written (a .lock file beside it)"
UNREADABLE = "feature file unreadable"
EMPTY = "no patches (zero feature rows)"
NOT_A_TABLE = "features are not an (N, D) table"
INCOMPLETE = "incomplete (CLAM writes pt_files/<slide>.pt last: it is missing)"
NO_COORDS = "no coordinates (none in the file and no patches file)"
COUNT = "feature count differs from its coordinates"
NOT_FINITE = "features hold NaN or infinite values (a failed extraction: re-extract that slide)"
BAD_COORDS = "coordinates are not whole level-0 pixels (x, y) at or above 0"
DIMENSION = "feature dimension differs from the other slides'"
DUPLICATE = "another slide maps to the same case, stain and slice"


@dataclass
class SourceSlide:
    """One slide of the source folder: its features file and, when there is one, its coordinates file."""

    name: str
    features: Path
    coords: Path | None


@dataclass
class SourceFolder:
    """A TRIDENT or CLAM feature folder as found on disk."""

    format: str
    root: Path
    encoder: str
    slides: list[SourceSlide]
    magnification: float = 0.0  # from TRIDENT's folder name, 0 = unknown
    patch_size: int = 0         # px at the target scale, 0 = unknown
    overlap: int = 0
    locked: list[str] = field(default_factory=list)      # TRIDENT: still being written (.lock)
    incomplete: list[str] = field(default_factory=list)  # CLAM: an .h5 without its .pt


@dataclass
class SlideFeatures:
    """What one source slide holds: features (N, D), level-0 corners (N, 2), the coordinates' attrs."""

    features: np.ndarray
    coords: np.ndarray
    attrs: dict


def _subdirs(root: Path, depth: int) -> list[Path]:
    """``root`` and its folders down to ``depth`` levels, sorted."""
    found, level = [root], [root]
    for _ in range(depth):
        level = sorted(d for parent in level for d in parent.iterdir() if d.is_dir())
        found += level
    return found


def find_source(root: str | Path, fmt: str = "auto", encoder: str = "") -> SourceFolder:
    """Detect the layout of ``root`` (``fmt``: auto | trident | clam); ``encoder`` picks TRIDENT's
    ``features_<encoder>`` folder when there are several (and names CLAM's encoder)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"feature folder '{root}' does not exist; pass the TRIDENT job folder or CLAM feature folder.")
    if fmt not in ("auto", *FORMATS):
        raise ConfigError(f"--format {fmt!r} is not one of auto, trident, clam.")
    trident = [d for d in _subdirs(root, 2) if d.name.startswith("features_") and d.name != "features_"]
    if encoder:
        trident = [d for d in trident if d.name == f"features_{encoder}"]
    clam = [d.parent if d.name in ("h5_files", "pt_files") else d for d in _subdirs(root, 1)
            if d.name in ("h5_files", "pt_files") or (d / "h5_files").is_dir() or (d / "pt_files").is_dir()]
    if fmt in ("auto", "trident") and trident:
        if len(trident) > 1:
            names = ", ".join(str(d.relative_to(root)) for d in trident)
            raise ConfigError(f"{root} holds several TRIDENT feature folders ({names}); pass --encoder NAME or "
                              "point at one of them.")
        return _trident(trident[0])
    if fmt in ("auto", "clam") and clam:
        return _clam(clam[0], encoder)
    raise DataError(f"{root} holds no {'TRIDENT or CLAM' if fmt == 'auto' else fmt.upper()} features (looked for "
                    "features_<encoder>/ (TRIDENT) and h5_files/ or pt_files/ (CLAM) up to two levels down); "
                    "pass the folder those tools wrote.")


def _trident(features_dir: Path) -> SourceFolder:
    job = features_dir.parent
    parsed = JOB_FOLDER.match(job.name)
    slides, locked = [], []
    for path in sorted(features_dir.glob("*.h5")):
        if path.with_name(path.name + ".lock").exists():
            locked.append(path.stem)
            continue
        coords = job / "patches" / f"{path.stem}_patches.h5"
        slides.append(SourceSlide(path.stem, path, coords if coords.is_file() else None))
    return SourceFolder("trident", features_dir, features_dir.name.removeprefix("features_"), slides,
                        float(parsed["mag"]) if parsed else 0.0, int(parsed["px"]) if parsed else 0,
                        int(parsed["overlap"]) if parsed else 0, locked)


def _clam(folder: Path, encoder: str) -> SourceFolder:
    h5s = {p.stem: p for p in sorted((folder / "h5_files").glob("*.h5"))}
    pts = {p.stem: p for p in sorted((folder / "pt_files").glob("*.pt"))}
    patches = next((d for d in (folder / "patches", folder.parent / "patches") if d.is_dir()), None)
    slides, incomplete = [], []
    for name in sorted(set(h5s) | set(pts)):
        if pts and name not in pts:  # extract_features_fp writes the .h5 batch by batch and the .pt when done
            incomplete.append(name)
            continue
        coords = patches / f"{name}.h5" if patches is not None and (patches / f"{name}.h5").is_file() else None
        slides.append(SourceSlide(name, h5s.get(name) or pts[name], coords))
    return SourceFolder("clam", folder, encoder or folder.name, slides, incomplete=incomplete)


def source_attrs(slide: SourceSlide) -> dict:
    """The coordinates' attrs of a source slide: the features file's ``coords`` and then the patches file's."""
    attrs: dict = {}
    for path in (slide.features, slide.coords):
        if path is not None and path.suffix == ".h5":
            attrs.update(coords_attrs(path))
    return attrs


def read_source_slide(slide: SourceSlide) -> SlideFeatures:
    """Features (N, D), level-0 corners (N, 2) and coordinate attrs of one source slide (raises OSError,
    KeyError, ValueError or RuntimeError on a bad file)."""
    if slide.features.suffix == ".pt":
        import torch

        tensor = torch.load(slide.features, map_location="cpu", weights_only=True)
        features = np.asarray(tensor if isinstance(tensor, np.ndarray) else tensor.float().numpy())
        coords = None
    else:
        with h5py.File(slide.features, "r") as h5:
            features = h5["features"][()]
            coords = h5["coords"][()] if "coords" in h5 else None
    if coords is None and slide.coords is not None:
        with h5py.File(slide.coords, "r") as h5:
            coords = h5["coords"][()]
    if features.ndim == 3 and features.shape[0] == 1:  # (1, N, D) as some CLAM forks save
        features = features[0]
    # kept as written (the import checks them: float or negative corners are named, never cast silently)
    coords = np.empty((0, 2), np.int64) if coords is None else np.asarray(coords)
    if coords.ndim == 1 and coords.size % 2 == 0:
        coords = coords.reshape(-1, 2)
    return SlideFeatures(features, coords, source_attrs(slide))


def patch_geometry(source: SourceFolder, attrs: dict, coords: np.ndarray, fallback: int) -> tuple[int, int]:
    """(patch side at the target scale, patch side in level-0 px) from the coordinates' attrs, the folder name,
    or (CLAM without a patches file) the grid step."""
    size = int(attrs.get("patch_size", 0) or source.patch_size or 0)
    size0 = attrs.get("patch_size_level0")
    if not size0 and "downsample" in attrs and size:  # CLAM: side at patch_level x that level's downsample
        size0 = size * float(np.ravel(attrs["downsample"])[0])
    size0 = int(round(float(size0 or 0))) or grid_step(coords) or size or fallback
    return size or size0, size0


@dataclass
class ImportResult:
    index: IndexResult
    store_dir: Path
    meta: StoreMeta
    slides: list[dict]
    skipped: dict[str, list[str]]


def _slide_files(tile: TileConfig) -> dict[str, list[Path]]:
    """Slide stem (as TRIDENT/CLAM name slides) -> slide paths under ``tile.slices_dir`` (DICOM: the folder)."""
    root = Path(tile.slices_dir) if tile.slices_dir else None
    if root is None or not root.is_dir():
        return {}
    found: dict[str, list[Path]] = {}
    for path in slide_paths(walk_files(root)):
        if path.is_dir() or path.suffix.lower() in WSI_SUFFIXES | PLAIN_SUFFIXES:
            for name in {slide_name(path), path.stem}:  # 'x.ome.tiff': TRIDENT says 'x', os.path.splitext 'x.ome'
                found.setdefault(name, []).append(path)
    return found


def _match(tile: TileConfig, pattern: re.Pattern, name: str, slide: Path | None) -> re.Match | None:
    candidates = [slide.relative_to(tile.slices_dir).as_posix()] if slide is not None else []
    candidates += [name] + [name + suffix for suffix in sorted(WSI_SUFFIXES)]
    for text in candidates:
        match = pattern.search(text)
        if match:
            return match
    return None


def _canvas(coords: np.ndarray, size0: int, out: Path, thumbnail_px: int) -> float:
    """A plain canvas of the slide's patch squares (light grey on white) for heatmaps without the slide; returns
    canvas px per level-0 px."""
    extent = max(int((coords + size0).max()), 1)
    scale = min(1.0, thumbnail_px / extent)
    width, height = (max(1, int(np.ceil((coords[:, k].max() + size0) * scale))) for k in (0, 1))
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for x, y in coords * scale:
        draw.rectangle([x, y, x + size0 * scale - 1, y + size0 * scale - 1], fill=(225, 225, 225))
    save_image(np.asarray(image), out)
    return scale


def _thumbnail(slide_path: Path, out: Path, thumbnail_px: int, size0: int, size: int) -> tuple[float, int, int]:
    """Save the slide's thumbnail; (thumbnail px per level-0 px, pyramid level to read patches at, px read)."""
    slide = Slide(slide_path)
    try:
        scale = min(1.0, thumbnail_px / max(slide.dimensions))
        if not out.is_file():
            save_image(slide.thumbnail(1 / scale), out, quality=90)
        with Image.open(out) as image:
            scale = image.width / slide.dimensions[0]
        level = best_level(slide.level_downsamples, size0 / max(size, 1))
        return scale, level, max(1, int(round(size0 / slide.level_downsamples[level])))
    finally:
        slide.close()


def _link_or_write(target: Path, slide: SourceSlide, data: SlideFeatures, linkable: bool, attrs: dict) -> str:
    """Put one slide into the store: a link to the source file when it reads as a store file, else a copy."""
    if linkable:
        with atomic_path(target, suffix=".h5") as tmp:
            tmp.unlink()
            os.symlink(slide.features.resolve(), tmp)
        return "linked"
    write_slice(target, data.features, data.coords, [str(i) for i in range(len(data.coords))], attrs)
    return "copied"


def _whole_corners(coords: np.ndarray) -> bool:
    """(N, 2) finite, non-negative, whole numbers (an integer dtype, or floats holding integers)."""
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2 or not np.issubdtype(coords.dtype, np.number):
        return False
    return bool(np.isfinite(coords).all() and (coords >= 0).all() and (np.round(coords) == coords).all())


def import_features(config: Config, root: str | Path, fmt: str = "auto", encoder: str = "",
                    require_labels: bool = True) -> ImportResult:
    """Import the TRIDENT/CLAM folder ``root`` into ``config``'s store and index (see the module doc)."""
    source = find_source(root, fmt, encoder)
    store_dir = Path(config.features.store_dir) if config.features.store_dir else config.paths.imported_store
    with folder_lock(store_dir, "import-features"):
        return _import_into(config, source, store_dir, require_labels)


def _import_into(config: Config, source, store_dir: Path, require_labels: bool) -> ImportResult:
    if (store_dir / "store.json").is_file():
        held = StoreMeta.read(store_dir)
        if not held.imported_from:
            raise DataError(f"{store_dir} holds features stainmil extracted; import into an empty folder (set "
                            "features.store_dir).")
        if Path(held.imported_from) != source.root.resolve():
            raise DataError(f"{store_dir} holds features imported from {held.imported_from}, not {source.root}; "
                            "import into another folder (features.store_dir).")
    marker = store_dir / "import_source.txt"  # written first: a half-done import resumes only from its own folder
    if marker.is_file() and marker.read_text().strip() != str(source.root.resolve()):
        raise DataError(f"{store_dir} holds a partial import from {marker.read_text().strip()}, not {source.root}; "
                        "finish that one or import into another folder (features.store_dir).")
    atomic_write_text(marker, f"{source.root.resolve()}\n")
    rules = CaseRules.from_config(config, require_labels)
    pattern = compile_slide_pattern(config.tile.filename_pattern)  # a bad regex: one ConfigError, not a traceback
    n_found = len(source.slides) + len(source.locked) + len(source.incomplete)
    slides_on_disk = _slide_files(config.tile)
    skipped: dict[str, list[str]] = {reason: names for reason, names in ((LOCKED, list(source.locked)),
                                                                         (INCOMPLETE, list(source.incomplete)))
                                     if names}
    keyed: dict[tuple[str, str, str], SourceSlide] = {}
    for slide in source.slides:
        paths = slides_on_disk.get(slide.name, [])
        match = _match(config.tile, pattern, slide.name, paths[0] if len(paths) == 1 else None)
        if not match:
            skipped.setdefault(NO_MATCH, []).append(slide.name)
            continue
        case, stain, reason = rules.classify(match["case"], match["stain"])
        if reason:
            skipped.setdefault(reason, []).append(slide.name)
            continue
        key = (normalize_case_id(case), stain, str(match["slice"]))
        if key in keyed:
            skipped.setdefault(DUPLICATE, []).append(f"{slide.name} (and {keyed[key].name})")
            continue
        keyed[key] = slide

    rows, summaries, dims = [], [], Counter()
    staged = []
    with progress_bar("import-features: slides", total=len(keyed)) as advance:
        for key, slide in keyed.items():
            target = slice_file(store_dir, *key)
            try:
                if target.is_file() and not _made_from(target, slide.features):
                    target.unlink()  # another slide's features under this case/stain/slice (the mapping changed)
                if target.is_file():  # resumed: the store's own copy or link of this very slide
                    features, coords, _ = read_slice(target)
                    data = SlideFeatures(features, coords, source_attrs(slide))
                else:
                    data = read_source_slide(slide)
            except (OSError, KeyError, ValueError, RuntimeError) as exc:
                skipped.setdefault(UNREADABLE, []).append(f"{slide.name}: {type(exc).__name__}: {exc}")
                advance()
                continue
            reason = (EMPTY if len(data.features) == 0 else NOT_A_TABLE if data.features.ndim != 2
                      else NO_COORDS if len(data.coords) == 0
                      else COUNT if len(data.coords) != len(data.features)
                      else BAD_COORDS if not _whole_corners(data.coords)
                      else NOT_FINITE if not np.isfinite(data.features).all() else None)
            if reason is None:
                data.coords = data.coords.astype(np.int64)
            if reason:
                detail = f" ({len(data.features)} features, {len(data.coords)} coordinates)" if reason == COUNT else ""
                skipped.setdefault(reason, []).append(slide.name + detail)
            else:
                dims[data.features.shape[1]] += 1
                staged.append((key, slide, data, target))
            advance()
    dim = dims.most_common(1)[0][0] if dims else 0
    dtypes = Counter()
    thumbs = store_dir / "thumbnails"
    for key, slide, data, target in staged:
        if data.features.shape[1] != dim:
            skipped.setdefault(DIMENSION, []).append(f"{slide.name} ({data.features.shape[1]} vs {dim})")
            continue
        size, size0 = patch_geometry(source, data.attrs, data.coords, config.tile.patch_size)
        how = "kept"
        if not target.is_file():
            linkable = slide.features.suffix == ".h5" and _h5_reads_as_store(slide.features, len(data.features))
            how = _link_or_write(target, slide, data, linkable,
                                 {"case": key[0], "stain": key[1], "slice": key[2], "source": str(slide.features)})
        dtypes[str(data.features.dtype)] += 1
        paths = slides_on_disk.get(slide.name, [])
        stem = f"case{safe_name(key[0])}_{safe_name(key[1])}_slice{safe_name(key[2])}"
        thumb = thumbs / f"{stem}.jpg"
        on_slide = None
        if len(paths) == 1:
            try:
                on_slide = _thumbnail(paths[0], thumb, config.tile.thumbnail_px, size0, size)
            except UnreadableSlide:
                on_slide = None  # heatmaps on a canvas; the report says so
        if on_slide is None:
            scale, level, read_size = _canvas(data.coords, size0, thumbs / f"{stem}_canvas.png",
                                             config.tile.thumbnail_px), -1, 0
            thumb = thumbs / f"{stem}_canvas.png"
        else:
            scale, level, read_size = on_slide
        n = len(data.coords)
        rows.append(pd.DataFrame({
            "path": str(paths[0] if on_slide is not None else slide.features), "case": key[0], "stain": key[1],
            "slice": key[2], "patch": [str(i) for i in range(n)], "x": data.coords[:, 0], "y": data.coords[:, 1],
            "label": rules.labels.by_case.get(key[0], -1), "width": size, "height": size, "mode": "RGB",
            "level": level, "read_size": read_size, "size0": size0, "thumbnail": str(thumb), "thumb_scale": scale}))
        summaries.append({"slide": slide.name, "case": key[0], "stain": key[1], "slice": key[2], "patches": n,
                          "patch_size": size, "patch_size_level0": size0, "store": how,
                          "drawn_on": "slide thumbnail" if on_slide is not None else "plain canvas (slide not found)",
                          "slide_file": str(paths[0]) if len(paths) == 1 else ""})
    manifest = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["path", "case", "stain", "slice", "patch", "x", "y", "label", "width", "height", "mode", "level",
                 "read_size", "size0", "thumbnail", "thumb_scale"])
    first = summaries[0] if summaries else {}
    meta = StoreMeta(backbone=source.encoder, weights="imported", weights_hash="", image_size=int(first.get(
        "patch_size", 0)), mean=[], std=[], feature_dim=int(dim),
        dtype=dtypes.most_common(1)[0][0] if dtypes else "float32", imported_from=str(source.root.resolve()),
        import_format=source.format, magnification=source.magnification,
        patch_size_level0=int(first.get("patch_size_level0", 0)))
    # the report first: when nothing could be imported, the error below points at it
    atomic_write_json(store_dir / "import_report.json", {"source": str(source.root), "format": source.format,
                                                         "encoder": source.encoder, "feature_dim": dim,
                                                         "slides_found": n_found,
                                                         "slides_imported": len(summaries), "skipped": skipped,
                                                         "slides": summaries})
    atomic_write_text(store_dir / "import_report.txt", import_report_text(store_dir, meta, summaries, skipped, source))
    index = slide_index(config, manifest, rules, skipped, n_found,
                        f"{source.format.upper()} features in {source.root}", str(store_dir / "import_report.txt"))
    meta.write(store_dir)
    return ImportResult(index, store_dir, meta, summaries, skipped)


def _made_from(target: Path, source: Path) -> bool:
    """Whether a store file is the link to, or the copy of, ``source``."""
    if target.is_symlink():
        return Path(os.readlink(target)) == source.resolve()
    with h5py.File(target, "r") as h5:
        return str(h5.attrs.get("source", "")) == str(source)


def _h5_reads_as_store(path: Path, n: int) -> bool:
    """Whether a source .h5 can serve as a store file as it is: 2-D ``features`` and ``coords`` of the same N."""
    with h5py.File(path, "r") as h5:
        return ("features" in h5 and h5["features"].ndim == 2 and "coords" in h5 and len(h5["coords"]) == n
                and "patch_ids" not in h5)


def import_report_text(store_dir: Path, meta: StoreMeta, slides: list[dict], skipped: dict[str, list[str]],
                       source: SourceFolder) -> str:
    lines = ["stainmil import report", f"source   : {source.root} ({source.format})",
             f"encoder  : {source.encoder}  (D = {meta.feature_dim}, {meta.dtype})",
             f"store    : {store_dir}",
             f"slides   : {len(source.slides) + len(source.locked) + len(source.incomplete)} found, "
             f"{len(slides)} imported"]
    for reason, names in skipped.items():
        lines.append(f"skipped ({reason}): {len(names)}")
        lines += [f"  {name}" for name in names[:50]]
    lines += ["", "per slide (slide, case, stain, slice, patches, patch px / level-0 px, store, heatmaps on):"]
    for s in slides:
        lines.append(f"  {s['slide']}  {s['case']} {s['stain']} {s['slice']}  {s['patches']}  {s['patch_size']}/"
                     f"{s['patch_size_level0']}  {s['store']}  {s['drawn_on']}")
    return "\n".join(lines) + "\n"
