"""``stainmil tile``: slides (or slice images) -> tissue mask -> patch coordinates at a physical scale.

For each file under ``tile.slices_dir`` whose path matches ``tile.filename_pattern`` (groups case,
stain, slice): open it (OpenSlide for whole-slide files, Pillow for PNG/JPEG), work out the level and
read size for ``tile.mpp`` / ``tile.magnification``, detect tissue on a low-resolution view, lay the
grid and keep squares with at least ``tile.min_tissue`` tissue. Output in ``tile.out_dir``::

    coords/<stem>.h5        coordinates in CLAM/TRIDENT's layout (see stainmil.slides.coords)
    masks/<stem>_tissue.png thumbnails/<stem>.jpg
    tiles.csv               one row per patch (case, stain, slice, patch, x, y at level 0, tissue_fraction,
                            slide, level, read_size, size0, thumbnail, thumb_scale[, file])
    tile_report.txt/.json   every slide used or skipped, with the reason and the scale it was read at

``data.source: slides`` (the slide route) then writes the index straight from the coordinates, so
``extract`` reads patches from the slides; ``data.source: patches`` also writes each patch as a PNG
named with its x, y (the patch route: then ``stainmil index`` on ``tile.out_dir``).

Bad slides (unreadable or truncated, no tissue, no scale metadata when one is asked for) are named in the
report with their reason and skipped; the others finish. A slide whose coordinates file exists is done:
re-running resumes.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from stainmil.config import Config, TileConfig
from stainmil.data.labels import normalize_case_id
from stainmil.errors import ConfigError, DataError
from stainmil.io import atomic_write, atomic_write_json, atomic_write_text, safe_name, save_image, walk_files
from stainmil.progress import progress_bar
from stainmil.slides.annotations import BadAnnotations, Region, find_annotation_file, read_region, region_mask
from stainmil.slides.coords import coords_attrs, coords_damage, read_coords, write_coords
from stainmil.slides.grid import NoScale, mask_downsample, patch_grid, read_plan
from stainmil.slides.reader import PatchRef, Slide, SlideHandles, UnreadableSlide, read_patch, slide_paths
from stainmil.slides.tissue import tissue_mask

NO_MATCH = "name does not match tile.filename_pattern"
UNREADABLE = "unreadable or truncated slide"
NO_SCALE = "no scale metadata (set tile.slide_mpp)"
NO_TISSUE = "no tissue found"
BAD_REQUEST = "scale request does not fit the slide"
BAD_ANNOTATIONS = "annotation file unusable (fix or remove it)"
NO_ANNOTATIONS = "no include annotation file: tiled on the tissue mask"
REDONE = "coordinates file damaged on resume: tiled again"
TILE_COLUMNS = ["case", "stain", "slice", "patch", "x", "y", "tissue_fraction", "slide", "level", "read_size",
                "size0", "thumbnail", "thumb_scale", "file"]


@dataclass
class TileResult:
    out_dir: Path
    table: pd.DataFrame
    skipped: dict[str, list[str]] = field(default_factory=dict)
    slides: list[dict] = field(default_factory=list)  # one entry per tiled slide: scale, level, patches
    notes: dict[str, list[str]] = field(default_factory=dict)  # slides used with a remark (no annotations)


@dataclass
class Regions:
    """Annotated regions of one slide: tile inside ``include`` (None: the whole tissue), outside ``exclude``."""

    include: Region | None = None
    exclude: Region | None = None

    def describe(self) -> str:
        parts = [f"{name} {r.file.name} ({r.polygons} polygon(s){''.join(', ' + c for c in r.classes if c)})"
                 for name, r in (("inside", self.include), ("outside", self.exclude)) if r is not None]
        return "tissue mask " + "; ".join(parts) if parts else "tissue mask"

    def mask(self, shape_hw: tuple[int, int], scale0: float) -> np.ndarray:
        """(H, W) bool: where tiling may go, at the tissue mask's resolution."""
        keep = region_mask(self.include, shape_hw, scale0) if self.include else np.ones(shape_hw, bool)
        if self.exclude:
            keep &= ~region_mask(self.exclude, shape_hw, scale0)
        return keep

    def centres_inside(self, coords: np.ndarray, size0: int) -> np.ndarray:
        """(N,) bool: patches (level-0 top-left corners) whose centre is inside include and outside exclude."""
        cx, cy = coords[:, 0] + size0 / 2, coords[:, 1] + size0 / 2
        keep = self.include.contains(cx, cy) if self.include else np.ones(len(coords), bool)
        if self.exclude:
            keep &= ~self.exclude.contains(cx, cy)
        return keep


def annotation_files(tile: TileConfig, stem: str, key: tuple[str, str, str], stem_unique: bool
                     ) -> tuple[Path | None, Path | None]:
    """(include, exclude) GeoJSON files of one slide, None where there is none."""
    return (find_annotation_file(tile.include_annotations, stem, key, stem_unique),
            find_annotation_file(tile.exclude_annotations, stem, key, stem_unique))


def region_key(tile: TileConfig, files: tuple[Path | None, Path | None]) -> str:
    """What a slide's tiling region depends on (files, their modification times, class filters): a coordinates
    file made under another key is tiled again."""
    parts = [f"{p}@{p.stat().st_mtime_ns}" if p else "-" for p in files]
    return "|".join(parts + [",".join(tile.include_classes), ",".join(tile.exclude_classes)])


def slide_regions(tile: TileConfig, files: tuple[Path | None, Path | None]) -> Regions:
    """The annotated regions of one slide (raises :class:`BadAnnotations`); a slide without an include file
    is tiled on the whole tissue mask."""
    include, exclude = files
    regions = Regions(read_region(include, tile.include_classes, tile.max_annotation_vertices) if include else None,
                      None)
    if exclude:
        try:
            regions.exclude = read_region(exclude, tile.exclude_classes, tile.max_annotation_vertices)
        except BadAnnotations:
            if exclude != include:  # a shared file may hold no polygon of the excluded classes
                raise
    return regions


def compile_slide_pattern(pattern: str) -> re.Pattern:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"tile.filename_pattern is not a valid regex ({exc}); fix it in your config.") from exc
    missing = [g for g in ("case", "stain", "slice") if g not in compiled.groupindex]
    if missing:
        raise ConfigError(f"tile.filename_pattern lacks the named group(s) {missing}; it needs (?P<case>…), "
                          "(?P<stain>…) and (?P<slice>…).")
    return compiled


class _NoTissue(DataError):
    pass


def tissue_mask_path(out_dir: Path, stem: str) -> Path:
    """Where tiling writes a slide's tissue mask: ``<tile.out_dir>/masks/<stem>_tissue.png`` (0/255)."""
    return Path(out_dir) / "masks" / f"{stem}_tissue.png"


def thumbnail_path(out_dir: Path, stem: str) -> Path:
    """Where tiling writes a slide's thumbnail: ``<tile.out_dir>/thumbnails/<stem>.jpg``."""
    return Path(out_dir) / "thumbnails" / f"{stem}.jpg"


def tissue_mask_of(thumbnail: Path) -> Path:
    """The tissue mask written beside a thumbnail (the patch table records the thumbnail's path)."""
    return tissue_mask_path(Path(thumbnail).parent.parent, Path(thumbnail).stem)


def _tile_one(path: Path, stem: str, key: tuple[str, str, str], config: TileConfig, out: Path,
              regions: Regions, key_text: str) -> None:
    """Tile one slide into ``coords/<stem>.h5`` (+ mask and thumbnail), inside its annotated ``regions``."""
    slide = Slide(path)
    try:
        plan = read_plan(slide, config)
        down = mask_downsample(slide, config)
        view = slide.thumbnail(down)
        mask = tissue_mask(view)
        scale0 = slide.dimensions[0] / mask.shape[1]  # level-0 px per mask px
        mask &= regions.mask(mask.shape, scale0)
        coords, fractions = patch_grid(slide, plan, mask, scale0, config.min_tissue)
        inside = regions.centres_inside(coords, plan.size0)  # exact: the mask is coarse at polygon edges
        coords, fractions = coords[inside], fractions[inside]
        save_image(mask.astype(np.uint8) * 255, tissue_mask_path(out, stem))
        if len(coords) == 0:
            where = "" if regions.include is None and regions.exclude is None else " inside the annotations"
            raise _NoTissue(f"{path.name}: no {config.patch_size}-px square has {config.min_tissue:.0%} tissue{where}")
        for index in sorted({0, len(coords) // 2, len(coords) - 1}):  # a truncated file fails here, not later
            slide.read_region(*coords[index], plan.level, plan.read_size)
        thumb_scale = min(1.0, config.thumbnail_px / max(slide.dimensions))
        thumb = view if abs(thumb_scale - 1 / down) < 1e-9 else slide.thumbnail(1 / thumb_scale)
        save_image(thumb, thumbnail_path(out, stem), quality=90)
        write_coords(out / "coords" / f"{stem}.h5", coords, fractions, plan, slide.level_dimensions[plan.level],
                     {"name": path.stem, "slide_path": str(path), "case": key[0], "stain": key[1], "slice": key[2],
                      "thumbnail": str(thumbnail_path(out, stem)),
                      "thumb_scale": thumb.shape[1] / slide.dimensions[0], "region": regions.describe(),
                      "region_key": key_text})
    finally:
        slide.close()


def _rows_from_coords(coords: np.ndarray, attrs: dict, fractions: np.ndarray, key: tuple[str, str, str], out: Path,
                      export: bool) -> list[dict]:
    case, stain, slice_id = key
    folder = out / f"case{case}" / stain / f"slice{slice_id}"
    rows = []
    for index, ((x, y), fraction) in enumerate(zip(coords, fractions)):
        file = ""
        if export:
            name = f"case{case}_{stain}_slice{slice_id}_patch{index}_x{x}_y{y}.png"
            file = os.path.relpath(folder / name, out)
        rows.append({"case": case, "stain": stain, "slice": slice_id, "patch": index, "x": int(x), "y": int(y),
                     "tissue_fraction": float(fraction), "slide": attrs["slide_path"],
                     "level": int(attrs["patch_level"]),
                     "read_size": int(attrs["read_size"]), "size0": int(attrs["patch_size_level0"]),
                     "thumbnail": attrs["thumbnail"], "thumb_scale": float(attrs["thumb_scale"]), "file": file})
    return rows


def _export_patches(rows: list[dict], out: Path, patch_size: int) -> None:
    """Write each patch as a PNG (the patch route); files that exist are done."""
    slides = SlideHandles()
    try:
        for row in rows:
            target = out / row["file"]
            if target.is_file():
                continue
            ref = PatchRef(row["slide"], row["x"], row["y"], row["level"], row["read_size"])
            save_image(read_patch(ref, patch_size, slides), target)
    finally:
        slides.close()


def _slide_summary(attrs: dict, n: int) -> dict:
    keys = ("name", "case", "stain", "slice", "patch_level", "read_size", "patch_size_level0", "level0_mpp",
            "target_mpp", "level0_magnification", "target_magnification", "scale_source")
    summary = {"patches": n, **{k: (attrs[k].item() if hasattr(attrs[k], "item") else attrs[k]) for k in keys}}
    return {**summary, "region": str(attrs.get("region", "tissue mask"))}


def tile_folder(config: Config) -> TileResult:
    """Tile every slide under ``config.tile.slices_dir`` (resuming), write tiles.csv and the tiling report."""
    tile = config.tile
    root, out = Path(tile.slices_dir), Path(tile.out_dir)
    if not tile.slices_dir or not root.is_dir():
        raise DataError(f"slide folder '{tile.slices_dir}' does not exist; set tile.slices_dir to the folder holding "
                        "your slides.")
    if not tile.out_dir:
        raise ConfigError("tile.out_dir is empty; set it to the folder where coordinates (and patches) should go.")
    if tile.mpp < 0 or tile.magnification < 0 or (tile.mpp > 0 and tile.magnification > 0):
        raise ConfigError("set one of tile.mpp and tile.magnification (or neither, for pixels of tile.level), "
                          "both non-negative.")
    pattern = compile_slide_pattern(tile.filename_pattern)
    export = config.data.source == "patches"
    files = slide_paths(walk_files(root))  # a DICOM slide (folder of .dcm instances) is one entry
    skipped: dict[str, list[str]] = {}
    notes: dict[str, list[str]] = {}
    jobs = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        match = pattern.search(rel)
        if not match:
            skipped.setdefault(NO_MATCH, []).append(rel)
            continue
        key = (normalize_case_id(match["case"]), match["stain"], match["slice"])
        jobs.append((path, rel, key, "_".join(safe_name(k) for k in (f"case{key[0]}", key[1], f"slice{key[2]}"))))
    if not jobs:
        raise DataError(f"no slide in {root} matches tile.filename_pattern ({len(files)} files looked at); "
                        "set tile.filename_pattern to a regex with groups case, stain and slice.")
    rows, slides = [], []
    stems = Counter(path.stem for path, _, _, _ in jobs)
    with progress_bar("tile: slides", total=len(jobs)) as advance:
        for path, rel, key, stem in jobs:
            h5 = out / "coords" / f"{stem}.h5"
            files = annotation_files(tile, path.stem, key, stems[path.stem] == 1)  # ConfigError: stops the run
            damage = coords_damage(h5) if h5.is_file() else ""
            if damage:  # a crash or a bad copy: trusted only once read whole
                notes.setdefault(REDONE, []).append(f"{rel}: {damage}")
                h5.unlink()
            if tile.include_annotations and files[0] is None:
                notes.setdefault(NO_ANNOTATIONS, []).append(rel)
            key_text = region_key(tile, files)
            if h5.is_file() and coords_attrs(h5).get("region_key", region_key(tile, (None, None))) != key_text:
                h5.unlink()  # annotations or filters changed since this slide was tiled: tile it again
            try:
                if not h5.is_file():
                    _tile_one(path, stem, key, tile, out, slide_regions(tile, files), key_text)
            except BadAnnotations as exc:
                skipped.setdefault(BAD_ANNOTATIONS, []).append(f"{rel}: {exc}")
            except UnreadableSlide as exc:
                skipped.setdefault(UNREADABLE, []).append(f"{rel}: {exc}")
            except NoScale:
                skipped.setdefault(NO_SCALE, []).append(rel)
            except _NoTissue as exc:
                skipped.setdefault(NO_TISSUE, []).append(f"{rel}: {exc}")
            except DataError as exc:
                skipped.setdefault(BAD_REQUEST, []).append(f"{rel}: {exc}")
            else:
                coords, attrs, fractions = read_coords(h5)  # one read per slide, fresh or resumed
                slide_rows = _rows_from_coords(coords, attrs, fractions, key, out, export)
                if export:
                    _export_patches(slide_rows, out, tile.patch_size)
                rows.extend(slide_rows)
                slides.append({"file": rel, **_slide_summary(attrs, len(slide_rows))})
            advance()
    table = pd.DataFrame(rows, columns=TILE_COLUMNS)
    atomic_write(out / "tiles.csv", lambda tmp: table.to_csv(tmp, index=False))
    result = TileResult(out, table, skipped, slides, notes)
    atomic_write_json(out / "tile_report.json", {"slices_dir": str(root), "slides_found": len(jobs),
                                                 "slides_tiled": len(slides), "patches": len(table),
                                                 "skipped": skipped, "notes": notes, "slides": slides})
    atomic_write_text(out / "tile_report.txt", tile_report_text(result, len(jobs)))
    return result


def tile_report_text(result: TileResult, found: int) -> str:
    lines = ["stainmil tiling report", f"slides matched : {found}", f"slides tiled   : {len(result.slides)}",
             f"patches        : {len(result.table)}"]
    for reason, names in result.skipped.items():
        lines.append(f"skipped ({reason}): {len(names)}")
        lines += [f"  {name}" for name in names[:50]]
        if len(names) > 50:
            lines.append(f"  … and {len(names) - 50} more (all in tile_report.json)")
    for note, names in result.notes.items():
        lines.append(f"{note}: {len(names)}")
        lines += [f"  {name}" for name in names[:50]]
    lines += ["", "per slide (file, patches, level read, read px, µm/px level 0 -> target, scale from, region):"]
    for s in result.slides:
        mpp0 = f"{s['level0_mpp']:.3g}" if s["level0_mpp"] > 0 else "?"
        mpp = f"{s['target_mpp']:.3g}" if s["target_mpp"] > 0 else "?"
        lines.append(f"  {s['file']}  {s['patches']}  level {s['patch_level']}  {s['read_size']} px  "
                     f"{mpp0} -> {mpp}  ({s['scale_source']})  {s['region']}")
    return "\n".join(lines) + "\n"


def load_tiles(tile: TileConfig) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """tiles.csv and the tiling skips of ``tile.out_dir`` (for the slide route's index)."""
    import json

    out = Path(tile.out_dir)
    if not (out / "tiles.csv").is_file():
        raise DataError(f"no tiles.csv in tile.out_dir '{tile.out_dir}'; run `stainmil tile --config …` "
                        "first (data.source=slides reads its coordinates).")
    table = pd.read_csv(out / "tiles.csv", dtype={"case": str, "stain": str, "slice": str}, keep_default_na=False)
    report = json.loads((out / "tile_report.json").read_text()) if (out / "tile_report.json").is_file() else {}
    return table, report.get("skipped", {})
