"""The pathologist's lesion outlines, patch by patch: the one ground truth every attention measure is scored against.

``analysis.truth`` says where it is:

* a folder of QuPath GeoJSON, one file per slide (found as for ``tile.include_annotations``: ``<slide stem>.geojson``,
  stainmil's ``case<id>_<stain>_slice<id>[__<stem>].geojson`` — the names of ``export qupath`` and of a review saved
  in ``stainmil view --review``), or a template with ``{stem}``, ``{case}``, ``{stain}``, ``{slice}`` (``{stain}``
  is tried as the cohort names it and as each of its aliases: ``he``, ``HE``, ``H&E``). A patch's lesion fraction is
  the share of its square inside the union of the ``analysis.lesion_classes`` polygons (holes outside); a patch
  with at least ``analysis.ignore_min_fraction`` of its square in ``analysis.ignore_classes`` polygons is left out.
  Coordinates: level-0 px of the slide (patch-folder cohorts: px of the slice image the patches were cut from).
* a CSV with columns ``case, stain, slice, patch, lesion_fraction`` (optional ``ignored``): patch-folder cohorts
  whose truth is a table.

With ``analysis.truth_from_reference``, a slide of another stain without its own outline is scored against its
reference (H&E) slide's outline carried through the pair's registration (``aligned`` pairs only; the others are
named and left out).
"""

from __future__ import annotations

import glob
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import shapely
from PIL import Image

from stainmil.config import Config
from stainmil.data.registration import carry_geometry, read_registrations, reference_stain
from stainmil.errors import ConfigError, DataError
from stainmil.slides.annotations import (
    SUFFIXES,
    AnnotationFile,
    BadAnnotations,
    find_annotation_file,
    read_polygons,
    slide_key_name,
    square_fractions,
)
from stainmil.slides.reader import Slide, UnreadableSlide

TRUTH_COLUMNS = ["case", "stain", "slice", "patch", "lesion_fraction", "ignored", "truth_source"]
BOUNDS_SLACK = 1.02  # outlines may graze the slide's edge


@dataclass
class PatchTruth:
    """Per patch of the analysed table: ``lesion_fraction`` (0..1), ``ignored`` and where its truth came from."""

    table: pd.DataFrame                                   # TRUTH_COLUMNS, one row per patch with truth
    source: str                                           # analysis.truth as set
    notes: list[str] = field(default_factory=list)        # every slide left out or mended, one sentence each
    slides: int = 0                                       # slides scored
    carried: int = 0                                      # of them, scored through the reference's outline
    repaired: int = 0                                     # invalid polygons mended (make_valid)


@dataclass
class SlideOutline:
    """One slide's pathologist outline in its level-0 px: the lesion and the ignored regions (None: none drawn)."""

    lesion: shapely.Geometry | None
    ignore: shapely.Geometry | None
    file: Path
    repaired: int = 0
    classes: list[str] = field(default_factory=list)


def _on_slide(rows: pd.DataFrame) -> bool:
    """Patches read from a whole-slide file (the slide route), not PNGs cut from a slice image."""
    return "level" in rows.columns and pd.notna(rows["level"].iloc[0]) and int(rows["level"].iloc[0]) >= 0


def patch_truth(config: Config, patches: pd.DataFrame, cohort: pd.DataFrame | None = None) -> PatchTruth | None:
    """The truth of every patch of ``patches`` (a patch table: case, stain, slice, patch, x, y, path[, size0]), or
    None when ``analysis.truth`` is empty. ``cohort``: the whole manifest, to name outline files of no slide."""
    where = config.analysis.truth
    if not where:
        return None
    if where.lower().endswith(".csv"):
        return _from_table(config, patches, Path(where))
    return _from_outlines(config, patches, cohort)


def _from_table(config: Config, patches: pd.DataFrame, path: Path) -> PatchTruth:
    if not path.is_file():
        raise ConfigError(f"analysis.truth '{path}' does not exist; point it at a CSV of case, stain, slice, patch, "
                          "lesion_fraction, or at a folder of QuPath GeoJSON.")
    table = pd.read_csv(path, dtype={"case": str, "stain": str, "slice": str, "patch": str})
    missing = [c for c in ("case", "stain", "slice", "patch", "lesion_fraction") if c not in table.columns]
    if missing:
        raise DataError(f"truth table {path} lacks the columns {missing}; it needs case, stain, slice, patch, "
                        "lesion_fraction (one row per patch).")
    stains = table["stain"].map(lambda s: config.data.canonical_stain(s) or s)
    fractions = pd.to_numeric(table["lesion_fraction"], errors="coerce")
    if fractions.isna().any() or not fractions.between(0, 1).all():
        bad = table.loc[fractions.isna() | ~fractions.between(0, 1), "lesion_fraction"].iloc[0]
        raise DataError(f"truth table {path} has a lesion_fraction that is not a number in [0, 1] ({bad!r}); write "
                        "each patch's share of lesion area, 0 to 1.")
    ignored = table["ignored"].fillna(False).astype(str).str.lower().isin(["true", "1", "yes"]) \
        if "ignored" in table else False
    table = table.assign(stain=stains, lesion_fraction=fractions, ignored=ignored, truth_source="table")
    keys = ["case", "stain", "slice", "patch"]
    wanted = patches[keys].astype(str)
    merged = wanted.merge(table[TRUTH_COLUMNS], on=keys, how="inner")
    notes = []
    if merged.empty:
        raise DataError(f"truth table {path} names none of the {len(wanted)} analysed patches (first row there: "
                        f"{table[keys].iloc[0].tolist() if len(table) else 'none'}; here: {wanted.iloc[0].tolist()}); "
                        "check its case ids, stain names and patch numbers.")
    if len(merged) < len(wanted):
        notes.append(f"{len(wanted) - len(merged)} of {len(wanted)} analysed patches have no row in {path}; they are "
                     "left out of the lesion measures.")
    return PatchTruth(merged, str(path), notes, slides=merged.groupby(["case", "stain", "slice"]).ngroups)


def _stain_spellings(config: Config, stain: str) -> list[str]:
    """The canonical stain first, then every alias of it (a template's ``{stain}`` as the user's files spell it)."""
    spellings = [stain] + [alias for alias, canonical in config.data.stain_aliases.items() if canonical == stain]
    return list(dict.fromkeys(spellings + [s.upper() for s in spellings]))


def outline_file(config: Config, stem: str, key: tuple[str, str, str], stem_unique: bool = True) -> Path | None:
    """The ``analysis.truth`` outline file of one slide (case, stain, slice; its file stem), or None."""
    return _find(config, stem, key, stem_unique)


def read_outline(config: Config, path: Path) -> SlideOutline:
    """The lesion and ignored regions of one outline file (``analysis.lesion_classes`` / ``ignore_classes``);
    BadAnnotations when it cannot be read. No bounds check: see :func:`patch_truth` for that."""
    return _outline(config, path, None, str(path))


def _find(config: Config, stem: str, key: tuple[str, str, str], stem_unique: bool) -> Path | None:
    where = config.analysis.truth
    for stain in _stain_spellings(config, key[1]) if "{stain}" in where else [key[1]]:
        found = find_annotation_file(where, stem, (key[0], stain, key[2]), stem_unique)
        if found is not None:
            return found
    return None


def _slide_size(rows: pd.DataFrame, config: Config, key: tuple[str, str, str]) -> tuple[float, float] | None:
    """Level-0 (width, height) of a slide (slide route) or slice image (patch folders with analysis.slice_images)."""
    try:
        if _on_slide(rows):
            slide = Slide(rows["path"].iloc[0])
            try:
                return tuple(map(float, slide.dimensions))
            finally:
                slide.close()
        if config.analysis.slice_images:
            image = Path(config.analysis.slice_images.format(case=key[0], stain=key[1], slice=key[2]))
            if image.is_file():
                with Image.open(image) as opened:
                    return tuple(map(float, opened.size))
    except (UnreadableSlide, OSError, KeyError, ValueError):
        return None
    return None


def _patch_sides(rows: pd.DataFrame) -> np.ndarray | None:
    """(N,) level-0 side of each patch: ``size0`` on the slide route, the image's side in a patch folder."""
    if "size0" in rows.columns and rows["size0"].notna().all():
        return rows["size0"].to_numpy(float)
    try:
        with Image.open(rows["path"].iloc[0]) as image:
            return np.full(len(rows), float(max(image.size)))
    except OSError:
        return None


def _outline(config: Config, path: Path, size: tuple[float, float] | None, slide_name: str) -> SlideOutline:
    found: AnnotationFile = read_polygons(path, config.tile.max_annotation_vertices)
    outline = SlideOutline(found.union(config.analysis.lesion_classes), found.union(config.analysis.ignore_classes)
                            if config.analysis.ignore_classes else None, path, found.repaired, found.classes)
    if size is not None and found.polygons:
        minx, miny, maxx, maxy = shapely.union_all([g for _, g in found.polygons]).bounds
        width, height = size
        if maxx > width * BOUNDS_SLACK or maxy > height * BOUNDS_SLACK or minx < -0.02 * width \
                or miny < -0.02 * height:
            factor = max(maxx / width, maxy / height)
            likely = f"about {factor:.1f}x too large: drawn on an image of another scale?" if factor > 1.2 else \
                "outside the slide"
            raise BadAnnotations(f"annotation file {path} reaches ({maxx:.0f}, {maxy:.0f}) px, beyond {slide_name}'s "
                                 f"level-0 size {width:.0f} x {height:.0f} ({likely}); export the outlines in the "
                                 "slide's full-resolution pixels")
    return outline


def _from_outlines(config: Config, patches: pd.DataFrame, cohort: pd.DataFrame | None) -> PatchTruth:
    analysis = config.analysis
    where = analysis.truth
    if "{" not in where and not Path(where).is_dir():
        raise ConfigError(f"analysis.truth '{where}' is neither a folder, a template with {{stem}}/{{case}}/"
                          "{stain}/{slice}, nor a CSV; point it at the folder of QuPath GeoJSON exports.")
    groups = dict(tuple(patches.groupby(["case", "stain", "slice"], sort=False)))
    stems = Counter(Path(str(p)).stem for p in (cohort if cohort is not None else patches)["path"].unique())
    outlines: dict[tuple, SlideOutline] = {}
    notes: list[str] = []
    used_files: set[Path] = set()
    classes_found: set[str] = set()
    repaired = 0
    for key, rows in groups.items():
        stem = Path(str(rows["path"].iloc[0])).stem if _on_slide(rows) else slide_key_name(key)
        path = _find(config, stem, key, stems[stem] <= 1)
        if path is None:
            continue
        used_files.add(path.resolve())
        try:
            outlines[key] = _outline(config, path, _slide_size(rows, config, key),
                                     f"case {key[0]} {key[1]} slice {key[2]}")
        except BadAnnotations as exc:
            notes.append(f"{exc}; case {key[0]} {key[1]} slice {key[2]} is left out of the lesion measures.")
            continue
        repaired += outlines[key].repaired
        classes_found |= set(outlines[key].classes)
    if outlines and all(o.lesion is None for o in outlines.values()):
        raise ConfigError(f"analysis.lesion_classes {analysis.lesion_classes} match no polygon in the "
                          f"{len(outlines)} outline files of {where}; the classes found are "
                          f"{sorted(c or '(unclassified)' for c in classes_found)} — set analysis.lesion_classes to "
                          "the lesion's class (['*'] takes every polygon, unclassified ones too).")
    carried_from: dict[tuple, str] = {}
    if analysis.truth_from_reference:
        notes += _carry(config, groups, outlines, carried_from)
    frames = []
    for key, outline in outlines.items():
        rows = groups[key]
        sides = _patch_sides(rows)
        if sides is None or (rows["x"] < 0).any():
            notes.append(f"the patches of case {key[0]} {key[1]} slice {key[2]} have no place on their slide (no x, "
                         "y or unreadable patch files); the slice is left out of the lesion measures.")
            continue
        xs, ys = rows["x"].to_numpy(float), rows["y"].to_numpy(float)
        ignored = square_fractions(outline.ignore, xs, ys, sides) >= analysis.ignore_min_fraction \
            if outline.ignore is not None else np.zeros(len(rows), bool)
        frames.append(pd.DataFrame({
            "case": key[0], "stain": key[1], "slice": key[2], "patch": rows["patch"].astype(str).to_numpy(),
            "lesion_fraction": square_fractions(outline.lesion, xs, ys, sides), "ignored": ignored,
            "truth_source": carried_from.get(key, "outline")}))
    if not frames:
        raise DataError(f"analysis.truth '{where}' holds no outline for any of the {len(groups)} analysed slides "
                        f"(e.g. case {next(iter(groups))[0]}); name the files <slide stem>.geojson or "
                        "case<id>_<stain>_slice<id>.geojson, or use a template.")
    if repaired:
        notes.append(f"{repaired} self-intersecting or badly nested polygons were repaired (shapely make_valid).")
    without = [key for key in groups if key not in outlines]
    if without:
        notes.append(f"{len(without)} of {len(groups)} analysed slides have no outline (e.g. case {without[0][0]} "
                     f"{without[0][1]} slice {without[0][2]}); their patches are left out, so a case's top-k and "
                     "pointing game rank only its outlined slides' patches.")
    if cohort is not None and "{" not in where:
        notes += _unmatched(config, Path(where), cohort, used_files)
    return PatchTruth(pd.concat(frames, ignore_index=True), where, notes, slides=len(frames),
                      carried=len(carried_from), repaired=repaired)


def _carry(config: Config, groups: dict, outlines: dict[tuple, SlideOutline], carried_from: dict) -> list[str]:
    """Outlines of the reference stain carried onto the aligned slides of other stains that have none of their own."""
    notes = []
    registrations = read_registrations(config)
    reference = reference_stain(config)
    wanting = [key for key in groups if key[1] != reference and (key not in outlines or outlines[key].lesion is None)]
    if registrations is None:
        return [f"analysis.truth_from_reference is set but this cohort is not registered; {len(wanting)} slides of "
                "other stains have no outline — run `stainmil register`."] if wanting else []
    for key in wanting:
        found = registrations[(registrations["case"] == key[0]) & (registrations["stain"] == key[1])
                              & (registrations["slice"] == key[2])]
        if found.empty:
            notes.append(f"case {key[0]} {key[1]} slice {key[2]} has no registration; not scored.")
            continue
        row = found.iloc[0]
        source = outlines.get((key[0], str(row["fixed_stain"]), str(row["fixed_slice"])))
        if source is None:
            continue  # its H&E slice has no outline either
        if row["verdict"] != "aligned":
            notes.append(f"case {key[0]} {key[1]} slice {key[2]}: the {reference} outline is not carried (registration "
                         f"{row['verdict']}: {row.get('reason', '')}).")
            continue
        drawn = [g for g in (source.lesion, source.ignore) if g is not None]
        mapped = iter(carry_geometry(drawn, row["transform"]) if drawn else [])  # the transform read once
        carried = [next(mapped) if g is not None else None for g in (source.lesion, source.ignore)]
        own = outlines.get(key)  # its own artefacts stay ignored; its lesion comes from the reference
        if own is not None and own.ignore is not None:
            carried[1] = own.ignore if carried[1] is None else shapely.union(own.ignore, carried[1])
        for geometry in carried:
            if geometry is not None:
                shapely.prepare(geometry)
        outlines[key] = SlideOutline(carried[0], carried[1], source.file)
        carried_from[key] = f"carried from {row['fixed_stain']} slice {row['fixed_slice']}"
    return notes


def _unmatched(config: Config, folder: Path, cohort: pd.DataFrame, used: set[Path]) -> list[str]:
    """Outline files in the truth folder that belong to no slide of the cohort (named, not read)."""
    known = {slide_key_name((str(c), str(s), str(sl))) for c, s, sl in
             cohort[["case", "stain", "slice"]].drop_duplicates().itertuples(index=False)}
    known |= {Path(str(p)).stem for p in cohort["path"].unique()}
    stray = []
    for path in sorted(p for suffix in SUFFIXES for p in folder.glob(f"*{glob.escape(suffix)}")):
        name = path.stem
        if path.resolve() in used or name in known or name.split("__")[0] in known or name.split("__")[-1] in known:
            continue
        stray.append(path.name)
    if not stray:
        return []
    return [f"{len(stray)} outline files in {folder} belong to no slide of this cohort and were skipped "
            f"(e.g. {', '.join(stray[:3])})."]
