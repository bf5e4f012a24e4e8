"""Regions drawn by a pathologist (QuPath GeoJSON) that restrict tiling: inside the included polygons and outside
the excluded ones, in level-0 pixels, holes and multipolygons included.

One GeoJSON file per slide, as QuPath exports it ("Export objects as GeoJSON": a FeatureCollection, a bare list
of features, or a single feature). ``tile.include_annotations`` / ``tile.exclude_annotations`` name where the file
of a slide is: a folder (the file is ``<slide stem>.geojson`` or ``.json`` — or
``case<id>_<stain>_slice<id>__<slide stem>.geojson``, the name ``stainmil export qupath`` gives its files, so its
export reads back, or ``case<id>_<stain>_slice<id>.geojson``, the name a review saved in ``stainmil view`` has)
or a path template with ``{stem}``,
``{case}``, ``{stain}``, ``{slice}``. ``tile.include_classes`` / ``tile.exclude_classes`` keep only the features
whose QuPath classification is one of those names (``*`` wildcards allowed; empty: every feature).

Points and lines are not regions and are ignored, and so are QuPath's detections and cells (``objectType``
detection | cell: an export with thousands of cell outlines is not an outline of the lesion); a feature without
a classification only passes an empty filter.
"""

from __future__ import annotations

import fnmatch
import glob
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
import shapely.geometry
from shapely.geometry import shape

from stainmil.errors import ConfigError, DataError
from stainmil.io import atomic_write_json, safe_name

SUFFIXES = (".geojson", ".json")


class BadAnnotations(DataError):
    """An annotation file that exists but cannot be used (not GeoJSON, or no region of the wanted classes)."""


@dataclass
class Region:
    """The area of one slide's annotations (a shapely geometry in level-0 pixels) and where it came from."""

    geometry: shapely.Geometry
    file: Path
    polygons: int
    classes: list[str]

    def contains(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """(N,) bool: which level-0 points (x, y) lie inside the region (holes are outside)."""
        return shapely.contains_xy(self.geometry, np.asarray(xs, float), np.asarray(ys, float))


def find_annotation_file(where: str, stem: str, key: tuple[str, str, str], stem_unique: bool = True) -> Path | None:
    """The GeoJSON of one slide under ``where`` (folder or template, see the module doc), or None.

    In a folder, stainmil's export name for this case/stain/slice comes first, then its review name; the bare
    ``<stem>.geojson`` only when ``stem_unique`` (no other slide of the cohort has the same file name:
    ``case3/he/slice0.svs`` and ``case4/he/slice0.svs`` would otherwise share one outline). Raises ConfigError for
    a setting that cannot work.
    """
    if not where:
        return None
    if "{" in where:
        try:
            path = Path(where.format(stem=stem, case=key[0], stain=key[1], slice=key[2]))
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"annotation path template '{where}' has an unknown field ({exc}); use {{stem}}, "
                              "{case}, {stain} or {slice}.") from exc
        return path if path.is_file() else None
    folder = Path(where)
    if not folder.is_dir():
        raise ConfigError(f"annotation folder '{where}' does not exist; point tile.include_annotations / "
                          "tile.exclude_annotations at the folder of QuPath GeoJSON exports (or a template with "
                          "{stem}).")
    key_name = slide_key_name(key)
    ours = f"{key_name}__{safe_name(stem)}"
    for name in (ours, key_name, stem) if stem_unique else (ours, key_name):
        for suffix in SUFFIXES:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    if not stem_unique:
        return None
    exported = sorted(p for suffix in SUFFIXES for p in folder.glob(f"*__{glob.escape(stem)}{suffix}"))
    return exported[0] if len(exported) == 1 else None  # several: slides of other cases share the name


def slide_key_name(key: tuple[str, str, str]) -> str:
    """``case<id>_<stain>_slice<id>``: the file name (without suffix) stainmil gives one slide's annotations."""
    return "_".join(safe_name(k) for k in (f"case{key[0]}", key[1], f"slice{key[2]}"))


def annotation_feature(geometry: shapely.Geometry, class_name: str, colour: tuple[int, int, int] | None = None,
                       feature_id: str | None = None, properties: dict | None = None) -> dict:
    """One QuPath annotation (GeoJSON Feature, ``objectType: annotation``) of a polygon in level-0 px."""
    classification: dict = {"name": class_name}
    if colour is not None:
        classification["color"] = [int(c) for c in colour]
    return {"type": "Feature", **({"id": feature_id} if feature_id else {}),
            "geometry": shapely.geometry.mapping(geometry),
            "properties": {"objectType": "annotation", "classification": classification, **(properties or {})}}


def write_annotations(path: str | Path, features: list[dict]) -> Path:
    """A FeatureCollection QuPath imports (File > Import objects), written atomically."""
    return atomic_write_json(path, {"type": "FeatureCollection", "features": features})


def _features(data: object) -> list[dict]:
    if isinstance(data, list):
        return [f for item in data for f in _features(item)]
    if not isinstance(data, dict):
        return []
    if data.get("type") == "FeatureCollection":
        return _features(data.get("features", []))
    if data.get("type") == "Feature":
        return [data]
    if "coordinates" in data or data.get("type") == "GeometryCollection":  # a bare geometry
        return [{"type": "Feature", "geometry": data, "properties": {}}]
    return []


def _count_vertices(coordinates, depth: int = 0) -> int:
    """Points in a GeoJSON coordinates array (nested lists ending in [x, y] pairs); no geometry is built."""
    if not isinstance(coordinates, list) or depth > 6:
        return 0
    if coordinates and not isinstance(coordinates[0], list):
        return 1
    return sum(_count_vertices(c, depth + 1) for c in coordinates)


def classification(feature: dict) -> str:
    """QuPath's class name of a feature ('' when it has none; older exports wrote the name as a string)."""
    props = feature.get("properties") or {}
    value = props.get("classification", props.get("class", ""))
    if isinstance(value, dict):
        value = value.get("name") or (value.get("names") or [""])[0]
    return str(value or "")


def _wanted(name: str, classes: list[str]) -> bool:
    return not classes or any(fnmatch.fnmatchcase(name.lower(), c.lower()) for c in classes)


@dataclass
class AnnotationFile:
    """Every polygon of one GeoJSON file with its QuPath class, in level-0 px (repaired where invalid)."""

    file: Path
    polygons: list[tuple[str, shapely.Geometry]]
    repaired: int                  # self-intersecting or badly nested polygons mended with make_valid

    @property
    def classes(self) -> list[str]:
        return sorted({name for name, _ in self.polygons})

    def union(self, classes: list[str]) -> shapely.Geometry | None:
        """The union of the polygons of ``classes`` (wildcards; empty: all), prepared; None when there are none."""
        chosen = [geom for name, geom in self.polygons if _wanted(name, classes)]
        if not chosen:
            return None
        merged = shapely.union_all(chosen)
        shapely.prepare(merged)
        return merged


def read_polygons(path: str | Path, max_vertices: int = 2_000_000) -> AnnotationFile:
    """The polygons of a QuPath GeoJSON export with their classes (points, lines, detections and cells left out);
    :class:`BadAnnotations` for a file that is not GeoJSON, a malformed geometry or more than ``max_vertices``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadAnnotations(f"annotation file {path} is not readable GeoJSON ({exc}); export it from QuPath with "
                             "File > Export objects as GeoJSON") from exc
    features = _features(data)
    if not features and not (isinstance(data, dict) and data.get("type") == "FeatureCollection"):
        raise BadAnnotations(f"annotation file {path} is JSON but not GeoJSON (no Feature, FeatureCollection or "
                             "geometry in it); export it from QuPath with File > Export objects as GeoJSON")
    vertices = sum(_count_vertices((f.get("geometry") or {}).get("coordinates")) for f in features)
    if vertices > max_vertices:
        raise BadAnnotations(f"annotation file {path} holds {vertices:,} vertices, more than "
                             f"tile.max_annotation_vertices ({max_vertices:,}); simplify the outlines in QuPath, "
                             "export only the annotations (not detections), or raise the setting")
    polygons, repaired = [], 0
    for feature in features:
        geometry = feature.get("geometry")
        kind = str((feature.get("properties") or {}).get("objectType", "annotation")).lower()
        if kind in ("detection", "cell") or not geometry:
            continue  # QuPath's cell/detection objects are not regions drawn by the pathologist
        try:
            geom = shape(geometry)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
            raise BadAnnotations(f"annotation file {path} has a malformed geometry ({exc})") from exc
        for poly in (g for g in getattr(geom, "geoms", [geom]) if g.geom_type in ("Polygon", "MultiPolygon")):
            if not poly.is_valid:  # self-touching rings as QuPath's brush draws them, bow ties
                poly, repaired = shapely.make_valid(poly), repaired + 1
            polygons.append((classification(feature), poly))
    return AnnotationFile(path, polygons, repaired)


def read_region(path: Path, classes: list[str], max_vertices: int = 2_000_000) -> Region:
    """The union of the polygons of ``path`` whose classification is in ``classes`` (empty: all); more than
    ``max_vertices`` vertices in all is refused (:class:`BadAnnotations`) before any geometry is built."""
    found = read_polygons(path, max_vertices)
    merged = found.union(classes)
    if merged is None:
        wanted = f" of class {classes}" if classes else ""
        raise BadAnnotations(f"annotation file {path} holds no polygon{wanted} (its classes: "
                             f"{found.classes or 'none'})")
    names = sorted({name for name, _ in found.polygons if _wanted(name, classes)})
    return Region(merged, Path(path), sum(_wanted(n, classes) for n, _ in found.polygons), names)


def square_fractions(geometry: shapely.Geometry | None, xs: np.ndarray, ys: np.ndarray,
                     side: np.ndarray | float) -> np.ndarray:
    """(N,) share of each square [x, x + side) x [y, y + side) (level-0 px) that lies inside ``geometry`` (holes
    outside); squares wholly inside or outside cost no intersection."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    side = np.broadcast_to(np.asarray(side, float), xs.shape)
    out = np.zeros(len(xs))
    if geometry is None or geometry.is_empty or not len(xs):
        return out
    shapely.prepare(geometry)
    boxes = shapely.box(xs, ys, xs + side, ys + side)
    inside = shapely.contains(geometry, boxes)
    partial = shapely.intersects(geometry, boxes) & ~inside
    out[inside] = 1.0
    if partial.any():
        out[partial] = shapely.area(shapely.intersection(boxes[partial], geometry)) / side[partial] ** 2
    return np.clip(out, 0.0, 1.0)


def mask_polygons(mask: np.ndarray, scale: float = 1.0) -> shapely.Geometry:
    """The exact outline of a boolean (H, W) mask as (multi)polygons with holes, in px x ``scale``: each pixel is
    the square [c, c + 1) x [r, r + 1), so :func:`square_fractions` of a pixel-aligned square is the mask's mean."""
    mask = np.asarray(mask, bool)
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    rows, starts = np.nonzero(np.diff(padded, axis=1) == 1)
    _, ends = np.nonzero(np.diff(padded, axis=1) == -1)   # runs of each row, in the same row-major order
    if not len(rows):
        return shapely.MultiPolygon()
    runs = shapely.box(starts * scale, rows * scale, ends * scale, (rows + 1) * scale)
    return shapely.simplify(shapely.union_all(runs), 0.0)  # one polygon per blob; no vertex left on a straight edge


def region_mask(region: Region, shape_hw: tuple[int, int], scale0: float) -> np.ndarray:
    """(H, W) bool of the mask pixels whose centres lie in ``region`` (``scale0``: level-0 px per mask px)."""
    h, w = shape_hw
    out = np.zeros((h, w), bool)
    x0, y0, x1, y1 = region.geometry.bounds  # only the pixels of its bounding box can be inside
    c0, r0 = max(0, int(x0 / scale0) - 1), max(0, int(y0 / scale0) - 1)
    c1, r1 = min(w, int(np.ceil(x1 / scale0)) + 1), min(h, int(np.ceil(y1 / scale0)) + 1)
    if c1 <= c0 or r1 <= r0:
        return out
    ys, xs = np.mgrid[r0:r1, c0:c1]
    out[r0:r1, c0:c1] = region.contains((xs.ravel() + 0.5) * scale0, (ys.ravel() + 0.5) * scale0).reshape(xs.shape)
    return out
