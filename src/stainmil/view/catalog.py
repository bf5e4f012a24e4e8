"""The viewer's model of a folder: its case list, each case's slices with their overlays and registration links,
and the tiles of every slide it may serve (see :mod:`stainmil.view.folder`).

Everything the browser asks for goes through a :class:`Catalog`: a slide by its number, a case by its id within a
source. Case ids are kept as text (``007`` stays ``007``).
"""

from __future__ import annotations

import base64
import io
import math
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from stainmil.analysis.heatmaps import colour_legends, hex_colour, patch_colours
from stainmil.analysis.truth import outline_file
from stainmil.config import load_config
from stainmil.data.registration import read_pair, read_registrations, reference_stain
from stainmil.data.tiling import annotation_files
from stainmil.errors import ConfigError, DataError
from stainmil.slides.annotations import BadAnnotations, read_region, slide_key_name
from stainmil.slides.reader import Slide, SlideHandles, UnreadableSlide
from stainmil.view.folder import (
    SlideEntry,
    SlideFinder,
    Source,
    build_mosaic,
    find_sources,
    moved_sentence,
    patch_positions_of,
    require_folder,
    unanalysed_runs,
)
from stainmil.view.shapes import MAX_REGION_VERTICES, rings
from stainmil.view.tiles import FORMATS, DeepZoom, TileCache, encode, read_tile

PATCH_FIELDS = ["patch", "x", "y", "effective_attention", "relative_attention", "patch_prob", "rank_in_case",
                "patch_weight"]
LESION_COLUMNS = ["attention_lesion_auc", "attention_topk_precision", "attention_pointing"]  # cases.csv, with a truth
MAX_GRID = 512                 # transform grids larger than this per side are resampled for the browser


class NotServed(LookupError):
    """A request for something this folder does not hold (unknown slide number, case or source)."""


class Catalog:
    def __init__(self, folder: str | Path, slides_dir: str | Path | None = None, tile_cache_mb: int = 64,
                 open_slides: int = 16) -> None:
        self.folder = require_folder(folder)
        self.sources = find_sources(self.folder)
        self.finder = SlideFinder(slides_dir)
        self.slides: list[SlideEntry] = []
        self.transforms: list[Path] = []
        self._slide_ids: dict[tuple, int] = {}
        self._transform_ids: dict[Path, int] = {}
        self._configs: dict[int, object] = {}
        self._notes: dict[int, list[str]] = {}
        self._registrations: dict[int, pd.DataFrame | None] = {}
        self._zooms: dict[int, DeepZoom] = {}
        self._case_lists: dict[int, dict] = {}
        self._stems: dict[int, Counter] = {}    # slide file stem -> slides of the source with it
        self.outlines: dict[int, dict] = {}     # slide -> its analysis.truth outline answer (view.outlines), made once
        self.handles = SlideHandles(limit=open_slides)
        self.tiles = TileCache(tile_cache_mb * 2**20)
        self._lock = threading.RLock()
        left = unanalysed_runs(self.folder)
        self.folder_notes = [f"{len(left)} trained run(s) here are not analysed and not shown (e.g. "
                             f"{left[0].relative_to(self.folder)}); start `stainmil view {self.folder} --analyze` "
                             "to add them."] if left else []

    def warm(self) -> None:
        """Read the first source's tables and settings (and import what its pages need) before the browser asks."""
        if self.sources:
            try:
                self.case_list(0)
            except (ConfigError, DataError, OSError, ValueError, KeyError):
                pass  # said again, to the browser, when the page asks for it

    # ---- sources and their settings ------------------------------------------------------------------------
    def source(self, index: int) -> Source:
        if not 0 <= index < len(self.sources):
            raise NotServed(f"no source {index} in {self.folder}")
        return self.sources[index]

    def config(self, source: Source):
        """The source's Config (None without a config.yaml, or when it no longer loads: noted, not fatal)."""
        with self._lock:
            if source.index not in self._configs:
                config = None
                if source.config_file is not None:
                    try:
                        config = load_config(source.config_file)
                    except (ConfigError, DataError, OSError, ValueError) as exc:
                        self._note(source, f"{source.config_file} does not load ({exc}); tissue masks, annotations "
                                           "and registrations are not shown.")
                self._configs[source.index] = config
            return self._configs[source.index]

    def _note(self, source: Source, text: str) -> None:
        notes = self._notes.setdefault(source.index, [])
        if text not in notes:
            notes.append(text)

    def class_names(self, source: Source) -> list[str]:
        config = self.config(source)
        if config is not None:
            return list(config.data.class_names)
        columns = [c for c in source.table("predictions").columns if c.startswith("prob_")]
        return [c[5:] for c in columns] or ["benign", "high_grade"]

    def registrations(self, source: Source) -> pd.DataFrame | None:
        with self._lock:
            if source.index not in self._registrations:
                table = None
                config = self.config(source)
                if config is not None:
                    try:
                        table = read_registrations(config)
                    except (OSError, ValueError, KeyError) as exc:
                        self._note(source, f"the registrations of this cohort do not read ({exc}); the viewers are "
                                           "not linked — re-run `stainmil register`.")
                self._registrations[source.index] = table
            return self._registrations[source.index]

    # ---- the case list -------------------------------------------------------------------------------------
    def case_list(self, source_index: int) -> dict:
        """Every case of a source (made once: the folder's tables do not change while it is served)."""
        with self._lock:
            if source_index not in self._case_lists:
                self._case_lists[source_index] = self._make_case_list(source_index)
            return self._case_lists[source_index]

    def _make_case_list(self, source_index: int) -> dict:
        source = self.source(source_index)
        names = self.class_names(source)
        readable = [n.replace("_", "-") for n in names]
        cases = source.table("cases")
        predictions = source.table("predictions")
        if cases.empty:
            cases = source.table("patches")[["case"]].drop_duplicates()
        registrations = self.registrations(source)
        verdicts: dict[str, list[str]] = {}
        if registrations is not None:
            for row in registrations.itertuples(index=False):
                verdicts.setdefault(str(row.case), []).append(f"{row.stain} {row.slice}: {row.verdict}")
        prob_columns = [f"prob_{k}" for k in range(len(names))]
        by_case = predictions.set_index("case") if "case" in predictions.columns and len(predictions) else None
        stain_columns = [c for c in cases.columns if c.startswith("stain_weight_")]
        lesion_columns = [c for c in LESION_COLUMNS if c in cases.columns]
        rows = []
        for row in cases.to_dict("records"):
            case = str(row["case"])
            label = _int_or_none(row.get("label"))
            pred = _int_or_none(row.get("pred"))
            probs = None
            if by_case is not None and case in by_case.index and all(c in by_case.columns for c in prob_columns):
                found = by_case.loc[case]
                found = found.iloc[0] if isinstance(found, pd.DataFrame) else found
                probs = [float(found[c]) for c in prob_columns]
            prob = _float_or_none(row.get("prob"))
            rows.append({
                "case": case,
                "label": readable[label] if label is not None and 0 <= label < len(names) else "",
                "pred": readable[pred] if pred is not None and 0 <= pred < len(names) else "",
                "prob": prob if prob is not None else (max(probs) if probs else None),
                "probs": probs,
                "error": _error_kind(label, pred, readable),
                "split": "" if pd.isna(row.get("split", "")) else str(row.get("split", "")),
                "stains": {c[len("stain_weight_"):]: _float_or_none(row[c]) for c in stain_columns},
                "registration": "; ".join(verdicts.get(case, [])),
                **{c: _float_or_none(row.get(c)) for c in lesion_columns},
            })
        positive = readable[-1] if len(readable) == 2 else ""
        return {"source": source.name, "sources": [s.name for s in self.sources], "classes": readable,
                "positive": positive, "prob_label": f"P({positive})" if positive else "P(predicted class)",
                "cases": rows, "lesion_columns": lesion_columns,
                "notes": self.folder_notes + self._notes.get(source.index, [])}

    # ---- one case ------------------------------------------------------------------------------------------
    def case_page(self, source_index: int, case: str) -> dict:
        source = self.source(source_index)
        patches = source.table("patches")
        part = patches[patches["case"] == case]
        if part.empty:
            raise NotServed(f"case {case!r} is not in {source.folder / 'attention' / 'patches.csv'}")
        slices = source.table("slices")
        listing = self.case_list(source_index)
        info = next((r for r in listing["cases"] if r["case"] == case), {"case": case})
        config = self.config(source)
        reference = self._reference_stain(config)
        entries = {}
        for key, rows in part.groupby(["stain", "slice"], sort=False):
            entries[key] = (self._entry(source, (case, *key), rows), rows)
        out_slices = []
        for (stain, slice_id), (entry, rows) in entries.items():
            rows = rows.sort_values("rank_in_case") if "rank_in_case" in rows.columns else rows
            side = rows["size0"].to_numpy(float) if "size0" in rows.columns else np.full(len(rows), entry.side)
            fields = {f: rows[f].to_numpy() for f in PATCH_FIELDS if f in rows.columns}
            if entry.kind == "mosaic":
                xs, ys, _ = patch_positions_of(rows)
                fields["x"], fields["y"] = xs, ys
            weights = slices[(slices["case"] == case) & (slices["stain"] == stain) & (slices["slice"] == slice_id)] \
                if not slices.empty else slices
            colours = {}
            for value in ("relative_attention", "patch_prob"):
                if value in rows.columns:
                    colours[value] = [hex_colour(c) for c in patch_colours(rows[value].to_numpy(float), value)]
            out_slices.append({
                "id": entry.id, "stain": stain, "slice": slice_id, "kind": entry.kind, "problem": entry.problem,
                "name": entry.path.name if entry.path is not None and entry.kind == "slide" else "",
                "reference": self._canonical(source, stain) == reference,
                "slice_weight": _float_or_none(weights["slice_weight"].iloc[0]) if len(weights) else None,
                "stain_weight": _float_or_none(weights["stain_weight"].iloc[0]) if len(weights) else None,
                "patches": {**{k: [_jsonable(v) for v in values] for k, values in fields.items()},
                            "size": [float(s) for s in side], "colour": colours},
                "mask": entry.mask is not None and entry.mask.is_file(),
                "annotations": any(a is not None for a in entry.annotations),
                "outline": "own" if entry.truth is not None else "",
                "link": None,
            })
        self._links(source, case, out_slices)
        self._outline_routes(source, out_slices)
        return {"source": source.name, "case": info, "slices": out_slices,
                "notes": self._notes.get(source.index, []),
                "colour_scales": colour_legends(listing["prob_label"])}

    def _canonical(self, source: Source, stain: str) -> str:
        """A stain as the cohort's config names it (``HE``, ``H&E`` -> ``he``: data.stain_aliases)."""
        config = self.config(source)
        return (config.data.canonical_stain(stain) if config is not None else None) or stain

    def _reference_stain(self, config) -> str:
        if config is None:
            return "he"

        try:
            return reference_stain(config)
        except ConfigError:
            return "he"

    def _links(self, source: Source, case: str, slices: list[dict]) -> None:
        """Each IHC slice's registration onto its H&E slice: the transform's number, or why it is not linked."""
        registrations = self.registrations(source)
        by_key = {(self._canonical(source, s["stain"]), s["slice"]): s for s in slices}
        for s in slices:
            if s["reference"]:
                continue
            if registrations is None:
                s["link"] = {"linked": False, "why": "not registered (run `stainmil register` on the tiled slides)"}
                continue
            found = registrations[(registrations["case"] == case)
                                  & (registrations["stain"] == self._canonical(source, s["stain"]))
                                  & (registrations["slice"] == s["slice"])]
            if found.empty:
                s["link"] = {"linked": False, "why": "no registration for this slice"}
                continue
            row = found.iloc[0]
            fixed = by_key.get((str(row["fixed_stain"]), str(row["fixed_slice"])))
            link = {"linked": False, "verdict": str(row["verdict"]), "fixed": fixed["id"] if fixed else None,
                    "fixed_name": f"{row['fixed_stain']} slice {row['fixed_slice']}",
                    "why": str(row.get("reason", "") or "")}
            if fixed is None:
                link["why"] = f"its {link['fixed_name']} is not in this analysis"
            elif row["verdict"] != "aligned":
                link["why"] = f"registration {row['verdict']}: {link['why']}"
            elif not Path(row["transform"]).is_file():
                link["why"] = f"transform file {row['transform']} is missing; re-run `stainmil register`"
            else:
                link.update(linked=True, transform=self._transform_id(Path(row["transform"])), why="")
            s["link"] = link

    def _outline_routes(self, source: Source, slices: list[dict]) -> None:
        """Each slice's pathologist outline: "own" (its analysis.truth file), "carried" (none of its own; its
        reference slice's, through an aligned link), "not carried" (the reference has one, the link is not aligned:
        /api/outline says why) or "" (none to show)."""
        if not self.truth_outlines(source):
            return
        owners = {s["id"] for s in slices if s["outline"] == "own"}
        outlined_references = [s for s in slices if s["reference"] and s["id"] in owners]
        for s in slices:
            if s["outline"] or s["reference"]:
                continue
            link = s["link"] or {}
            if link.get("fixed") in owners:
                s["outline"] = "carried" if link.get("linked") else "not carried"
            elif link.get("fixed") is None and outlined_references:
                s["outline"] = "not carried"

    def _transform_id(self, path: Path) -> int:
        with self._lock:
            if path not in self._transform_ids:
                self._transform_ids[path] = len(self.transforms)
                self.transforms.append(path)
            return self._transform_ids[path]

    def transform(self, index: int) -> dict:
        """A pair's transform for the browser: affine, the two displacement grids (float32, base64), spacing and
        the slides' µm/px (see :mod:`stainmil.data.registration`)."""

        if not 0 <= index < len(self.transforms):
            raise NotServed(f"no transform {index}")
        transform, attrs = read_pair(self.transforms[index])
        if transform is None:
            raise NotServed(f"{self.transforms[index]} holds no transform")
        u, v, spacing = transform.u, transform.v, transform.spacing
        height, width = u.shape[1:]
        if max(height, width) > MAX_GRID:  # resampled so pixel centres keep their physical places
            factor = max(height, width) / MAX_GRID
            u, v = (_resample(g, factor) for g in (u, v))
            spacing = spacing * width / u.shape[2]
        return {"affine": np.asarray(transform.affine, float).tolist(), "spacing_um": float(spacing),
                "shape": list(u.shape[1:]), "fixed_mpp": float(attrs["fixed_mpp"]),
                "moving_mpp": float(attrs["moving_mpp"]), "flipped": bool(transform.flipped),
                "u": _b64(u), "v": _b64(v)}

    # ---- slides and tiles ----------------------------------------------------------------------------------
    def _entry(self, source: Source, key: tuple[str, str, str], rows: pd.DataFrame) -> SlideEntry:
        with self._lock:
            found = self._slide_ids.get((source.index, *key))
            if found is not None:
                return self.slides[found]
            entry = SlideEntry(len(self.slides), source.index, *key, kind="slide", path=None)
            first = rows.iloc[0]
            on_slides = "level" in rows.columns and pd.notna(first.get("level"))
            if on_slides and int(first["level"]) >= 0:
                recorded = Path(str(first["path"]))
                entry.path = self.finder.find(recorded)
                if entry.path is None:
                    entry.problem = moved_sentence(recorded, key, self.finder)
                if "thumbnail" in rows.columns and isinstance(first["thumbnail"], str) and first["thumbnail"]:
                    thumb = Path(first["thumbnail"])
                    entry.mask = thumb.parent.parent / "masks" / f"{thumb.stem}_tissue.png"
                entry.annotations = self._annotation_files(source, key, entry.path or recorded)
                entry.truth = self._truth_file(source, key, recorded.stem)
            elif on_slides:  # features imported without their slides
                entry.kind, entry.problem = "none", ("features imported without their slide: no pixels to show "
                                                     "(import them with --slides-dir to see the slides)")
            else:
                entry.kind = "mosaic"
                entry.patches = rows[["path", "x", "y", "patch_index"]].reset_index(drop=True)
                missing = [p for p in entry.patches["path"] if not Path(p).is_file()]
                if missing:
                    entry.problem = (f"{len(missing)} patch files of case {key[0]}, {key[1]}, slice {key[2]} are "
                                     f"missing (first: {missing[0]}); put the patch folder back where the run read it.")
                else:
                    xs, ys, entry.side = patch_positions_of(entry.patches)
                    entry.patches = entry.patches.assign(x=xs, y=ys)
                entry.truth = self._truth_file(source, key, slide_key_name(key))
            self.slides.append(entry)
            self._slide_ids[(source.index, *key)] = entry.id
            return entry

    def _annotation_files(self, source: Source, key: tuple[str, str, str], slide: Path) -> tuple:
        config = self.config(source)
        if config is None or not (config.tile.include_annotations or config.tile.exclude_annotations):
            return (None, None)

        try:  # a bare <stem>.geojson only when no other slide has that file name (case3/he/slice0.svs, …)
            return annotation_files(config.tile, slide.stem, key, stem_unique=not self._stem_shared(source, slide.stem))
        except ConfigError as exc:
            self._note(source, str(exc))
            return (None, None)

    def _stem_shared(self, source: Source, stem: str) -> bool:
        """Whether another slide of the source has a file of this stem (case3/he/slice0.svs, case4/he/slice0.svs)."""
        with self._lock:  # counted once per source, not once per slide over the whole patch table
            if source.index not in self._stems:
                self._stems[source.index] = Counter(Path(p).stem for p in source.table("patches")["path"].unique())
            return self._stems[source.index][stem] > 1

    def truth_outlines(self, source: Source) -> bool:
        """Whether the source's analysis.truth is a folder or template of outline files (not a table, not unset)."""
        config = self.config(source)
        where = config.analysis.truth if config is not None else ""
        return bool(where) and not where.lower().endswith(".csv")

    def _truth_file(self, source: Source, key: tuple[str, str, str], stem: str) -> Path | None:
        """The slide's pathologist outline file under analysis.truth (see stainmil.analysis.truth), or None."""
        if not self.truth_outlines(source):
            return None
        try:
            return outline_file(self.config(source), stem, key, stem_unique=not self._stem_shared(source, stem))
        except ConfigError as exc:
            self._note(source, str(exc))
            return None

    def entry(self, slide_id: int) -> SlideEntry:
        if not 0 <= slide_id < len(self.slides):
            raise NotServed(f"no slide {slide_id} in this viewer")
        return self.slides[slide_id]

    @contextmanager
    def _slide(self, slide_id: int) -> Iterator[Slide]:
        """The open slide of ``slide_id``, kept open until the ``with`` block ends (see SlideHandles.reading)."""
        entry = self.entry(slide_id)
        if entry.problem:
            raise DataError(entry.problem)
        if entry.kind == "mosaic" and (entry.path is None or not entry.path.is_file()):
            build_mosaic(self.sources[entry.source], entry)
        if entry.path is None:
            raise DataError(f"slide {slide_id} has no pixels to show")
        with ExitStack() as stack:
            try:
                slide = stack.enter_context(self.handles.reading(str(entry.path)))
            except UnreadableSlide as exc:  # opening it failed (a read failing later does not mark the slide)
                entry.problem = str(exc)
                raise
            yield slide

    def zoom(self, slide_id: int) -> DeepZoom:
        with self._lock:
            if slide_id not in self._zooms:
                with self._slide(slide_id) as slide:
                    self._zooms[slide_id] = DeepZoom(*slide.dimensions)
            return self._zooms[slide_id]

    def tile(self, slide_id: int, level: int, col: int, row: int, image_format: str) -> bytes:
        if image_format not in FORMATS:
            raise NotServed(f"tiles come as {sorted(FORMATS)}")
        image_format = "jpeg" if image_format == "jpg" else image_format
        key = (slide_id, level, col, row, image_format)
        data = self.tiles.get(key)
        if data is None:
            zoom = self.zoom(slide_id)
            with self._slide(slide_id) as slide:
                rgb = read_tile(slide, zoom, level, col, row)
            data = encode(rgb, image_format)
            self.tiles.put(key, data)
        return data

    def mask_png(self, slide_id: int) -> bytes:
        """The tissue mask as a translucent RGBA PNG (tissue clear, background shaded)."""
        entry = self.entry(slide_id)
        if entry.mask is None or not entry.mask.is_file():
            raise NotServed(f"slide {slide_id} has no tissue mask")
        with Image.open(entry.mask) as image:
            tissue = np.asarray(image.convert("L")) > 127
        rgba = np.zeros((*tissue.shape, 4), np.uint8)
        rgba[tissue] = (0, 200, 120, 40)
        rgba[~tissue] = (40, 40, 160, 80)
        buffer = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
        return buffer.getvalue()

    def regions(self, slide_id: int) -> dict:
        """The QuPath include/exclude regions used for tiling, as polygons in level-0 px (simplified to at most
        MAX_REGION_VERTICES vertices per slide)."""

        entry = self.entry(slide_id)
        source = self.sources[entry.source]
        config = self.config(source)
        out: dict = {"include": [], "exclude": [], "problems": []}
        for which, path, classes in (("include", entry.annotations[0], config.tile.include_classes if config else []),
                                     ("exclude", entry.annotations[1], config.tile.exclude_classes if config else [])):
            if path is None:
                continue
            try:
                region = read_region(Path(path), classes, config.tile.max_annotation_vertices)
            except (BadAnnotations, OSError) as exc:
                out["problems"].append(f"{which}: {exc}")
                continue
            out[which] = rings(region.geometry, MAX_REGION_VERTICES)
        return out


def _resample(grid: np.ndarray, factor: float) -> np.ndarray:
    from scipy import ndimage

    return np.stack([ndimage.zoom(g, 1 / factor, order=1, grid_mode=True, mode="nearest") for g in grid])


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode()


def _error_kind(label: int | None, pred: int | None, names: list[str]) -> str:
    if label is None or pred is None or label < 0:
        return ""
    if label == pred:
        return "right"
    if len(names) == 2:
        return "false negative" if label == 1 else "false positive"
    return "wrong"


def _int_or_none(value) -> int | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else int(number)


def _float_or_none(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    return value
