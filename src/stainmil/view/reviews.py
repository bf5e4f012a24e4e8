"""A reviewer's work in ``stainmil view --review NAME``: polygons drawn on the slides, marks on the top-k patches, a
note and the reviewer's own grade of each case, saved under ``<output_dir>/reviews/NAME/`` of the viewed run's
cohort (``<viewed folder>/reviews/NAME/`` when the run has no config)::

    case<id>_<stain>_slice<id>.geojson   one slide's polygons: a QuPath FeatureCollection in level-0 px
    patch_marks.csv                      run, case, stain, slice, patch, rank_in_case, mark, saved (UTC)
    cases.csv                            run, case, grade, note, saved

Every write is atomic and made only if what is on disk is still the ``version`` the page read (another tab may have
saved since): a stale save is refused (:class:`StaleReview`), never merged. Case ids stay text (``007``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import shapely
from shapely.geometry import Polygon

from stainmil.config import AnalysisConfig
from stainmil.errors import ConfigError, OutputError
from stainmil.io import atomic_write_text
from stainmil.slides.annotations import annotation_feature, classification, slide_key_name, write_annotations

MARKS = ("agree", "disagree", "unsure")
MARK_COLUMNS = ["run", "case", "stain", "slice", "patch", "rank_in_case", "mark", "saved"]
CASE_COLUMNS = ["run", "case", "grade", "note", "saved"]
PALETTE = [(214, 39, 40), (44, 160, 44), (127, 127, 127), (255, 127, 14), (148, 103, 189), (31, 119, 180),
           (227, 119, 194), (188, 189, 34)]
MAX_NOTE = 20_000            # characters of a case note
MAX_VERTICES = 100_000       # per slide, in one save
_NAME = re.compile(r"[A-Za-z0-9._-]+")
_LOCKS: dict[Path, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()


class BadReview(ValueError):
    """A save refused as it is: not JSON, not a polygon, an unknown class, mark or patch, outside the slide."""


class StaleReview(Exception):
    """A save based on a version that another tab or window has replaced since."""


def check_review_name(name: str) -> str:
    """``name`` when it is a safe folder name (letters, digits, ``-``, ``_``, ``.``), else ConfigError."""
    if not _NAME.fullmatch(name or "") or set(name) == {"."}:
        raise ConfigError(f"--review {name!r} is not a usable folder name; use letters, digits, '-', '_' or '.' "
                          "only (e.g. --review ana or --review j.smith).")
    return name


def default_review_classes() -> list[str]:
    return list(AnalysisConfig().review_classes)


def class_colours(classes: list[str]) -> dict[str, tuple[int, int, int]]:
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(classes)}


def version_of(data: bytes | None) -> str:
    """What a page sends back to save over what it read: sha256 of the bytes ('' for nothing)."""
    return hashlib.sha256(data).hexdigest() if data else ""


def stale_sentence(what: str) -> str:
    return (f"{what} was saved from another tab or window since you opened it, so this save was refused; your drawing "
            "stays in this tab until you reload — note what you need, then reload to see the saved version.")


class Reviews:
    """One reviewer's folder: a slide's polygons, a case's marks, note and grade; loaded with their version and
    saved only over that version."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        with _LOCKS_LOCK:  # one lock per folder, shared by every Reviews of it in this process
            self._lock = _LOCKS.setdefault(self.folder.resolve(), threading.Lock())

    @property
    def marks_file(self) -> Path:
        return self.folder / "patch_marks.csv"

    @property
    def cases_file(self) -> Path:
        return self.folder / "cases.csv"

    def slide_file(self, key: tuple[str, str, str]) -> Path:
        return self.folder / f"{slide_key_name(key)}.geojson"

    # ---- slide polygons ------------------------------------------------------------------------------------
    def load_slide(self, key: tuple[str, str, str]) -> dict:
        """{"polygons": [{"id", "class", "rings"}], "version"} of one slide (nothing saved: none and '')."""
        path = self.slide_file(key)
        with self._lock:
            data = _read_bytes(path)
        return {"polygons": _polygons(path, data) if data else [], "version": version_of(data)}

    def save_slide(self, key: tuple[str, str, str], polygons: list[tuple[str, str, Polygon]], base_version: str,
                   colours: dict[str, tuple[int, int, int]]) -> dict:
        """Replace one slide's polygons [(id, class, polygon)] if its file is still ``base_version`` (StaleReview
        otherwise); the slide as :meth:`load_slide` reads it back. No polygon left: the file is removed."""
        path = self.slide_file(key)
        features = [annotation_feature(shape, name, colours.get(name), ident) for ident, name, shape in polygons]
        with self._lock:
            if version_of(_read_bytes(path)) != (base_version or ""):
                raise StaleReview(stale_sentence(f"The review of {path.stem}"))
            _writing(path, lambda: write_annotations(path, features) if features else path.unlink(missing_ok=True))
            data = _read_bytes(path)
        return {"polygons": _polygons(path, data) if data else [], "version": version_of(data)}

    # ---- case marks, note and grade ----------------------------------------------------------------------
    def load_case(self, run: str, case: str) -> dict:
        """{"marks": [{stain, slice, patch, rank_in_case, mark}], "grade", "note", "version"} of one run's case
        (its version: of its own rows, so saving another case leaves this one's page current)."""
        with self._lock:
            return _case(run, case, *self._tables())

    def save_case(self, run: str, case: str, marks: list[dict], grade: str, note: str, base_version: str) -> dict:
        """Replace this run's rows of ``case`` in patch_marks.csv and cases.csv (every other row kept) if they are
        still ``base_version``; the case as :meth:`load_case` reads it back. ``marks``: checked by the caller."""
        saved = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        new_marks = pd.DataFrame([{"run": run, "case": case, **{k: str(m[k]) for k in MARK_COLUMNS[2:-1]},
                                   "saved": saved} for m in marks], columns=MARK_COLUMNS, dtype=str)
        new_case = pd.DataFrame([{"run": run, "case": case, "grade": grade, "note": note, "saved": saved}]
                                if grade or note else [], columns=CASE_COLUMNS, dtype=str)
        with self._lock:
            old_marks, old_cases = self._tables()
            if _case(run, case, old_marks, old_cases)["version"] != (base_version or ""):
                raise StaleReview(stale_sentence(f"Case {case} of {run}"))
            for path, old, new in ((self.marks_file, old_marks, new_marks), (self.cases_file, old_cases, new_case)):
                mine = (old["run"] == run) & (old["case"] == case)
                if mine.any() or len(new):
                    text = pd.concat([old[~mine], new], ignore_index=True).to_csv(index=False, lineterminator="\n")
                    _writing(path, lambda p=path, t=text: atomic_write_text(p, t))
            return _case(run, case, *self._tables())

    def _tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        return _read_table(self.marks_file, MARK_COLUMNS), _read_table(self.cases_file, CASE_COLUMNS)


def _case(run: str, case: str, marks: pd.DataFrame, cases: pd.DataFrame) -> dict:
    mine = marks[(marks["run"] == run) & (marks["case"] == case)]
    row = cases[(cases["run"] == run) & (cases["case"] == case)]
    rows = (mine.to_csv(index=False) + row.to_csv(index=False)).encode() if len(mine) or len(row) else None
    return {"marks": mine[MARK_COLUMNS[2:-1]].to_dict("records"),
            "grade": row["grade"].iloc[0] if len(row) else "", "note": row["note"].iloc[0] if len(row) else "",
            "version": version_of(rows)}


def _writing(path: Path, write) -> None:
    """Run one atomic write; an error that is not already one sentence becomes one (the old file stays)."""
    try:
        write()
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"saving {path} failed ({exc.strerror or exc}); nothing there changed — try Save again, "
                          "or check that folder.") from exc


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _read_table(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame(columns=columns, dtype=str)
    return pd.read_csv(path, dtype=str, keep_default_na=False).reindex(columns=columns, fill_value="")


def _polygons(path: Path, data: bytes) -> list[dict]:
    try:
        features = json.loads(data).get("features", [])
        out = []
        for number, feature in enumerate(features):
            geometry = shapely.geometry.shape(feature["geometry"])
            for part, polygon in enumerate(getattr(geometry, "geoms", [geometry])):
                ident = str(feature.get("id") or f"feature-{number}") + (f".{part}" if part else "")
                out.append({"id": ident, "class": classification(feature), "rings": rings_of(polygon)})
        return out
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise BadReview(f"review file {path} is not readable GeoJSON polygons ({exc}); move it away to start "
                        "afresh.") from exc


def rings_of(polygon: Polygon) -> list[list[list[float]]]:
    """A polygon's exterior then holes, as [[x, y], …] lists (closed rings)."""
    return [[[float(x), float(y)] for x, y, *_ in ring.coords] for ring in (polygon.exterior, *polygon.interiors)]


def parse_polygons(polygons: object, classes: list[str], bounds: tuple[float, float],
                   where: str) -> tuple[list[tuple[str, str, Polygon]], int]:
    """[(id, class, polygon)] from the page's [{"id", "class", "geometry": GeoJSON Polygon}] in level-0 px (rounded
    to 0.01 px), and how many were self-intersecting and repaired (with shapely.make_valid; one in several parts
    keeps its id on the first, ``<id>.1`` … on the others). BadReview for anything else."""
    if not isinstance(polygons, list):
        raise BadReview(f"the save of {where} holds no list of polygons; reload the page and draw again.")
    width, height = bounds
    out: list[tuple[str, str, Polygon]] = []
    repaired = vertices = 0
    for number, item in enumerate(polygons, 1):
        item = item if isinstance(item, dict) else {}
        ident, name, geometry = str(item.get("id") or ""), item.get("class"), item.get("geometry")
        label = f"polygon {number} of {where}"
        if not _NAME.fullmatch(ident) or len(ident) > 100:
            raise BadReview(f"{label} has no usable id ({ident!r}); reload the page and draw it again.")
        if name not in classes:
            raise BadReview(f"{label} has class {name!r}, not one of the review classes {classes} "
                            "(analysis.review_classes).")
        kind = geometry.get("type") if isinstance(geometry, dict) else type(geometry).__name__
        if kind != "Polygon":
            raise BadReview(f"{label} is a {kind}, not a Polygon; only polygons are saved.")
        try:
            rings = [[(round(float(x), 2), round(float(y), 2)) for x, y in ring] for ring in geometry["coordinates"]]
        except (TypeError, ValueError, KeyError) as exc:
            raise BadReview(f"{label} has coordinates that are not rings of [x, y] numbers; reload the page.") \
                from exc
        if not rings or any(len(set(ring)) < 3 for ring in rings):
            raise BadReview(f"{label} has a ring with fewer than 3 distinct vertices; draw at least 3.")
        points = [point for ring in rings for point in ring]
        if not all(math.isfinite(x) and math.isfinite(y) for x, y in points):
            raise BadReview(f"{label} has a coordinate that is not a finite number; reload the page.")
        if any(not (0 <= x <= width and 0 <= y <= height) for x, y in points):
            raise BadReview(f"{label} has vertices outside the slide (0–{width:g} x 0–{height:g} level-0 px); draw "
                            "it on the tissue.")
        vertices += len(points)
        if vertices > MAX_VERTICES:
            raise BadReview(f"{where} holds more than {MAX_VERTICES:,} vertices in one save; simplify the outlines.")
        shape = Polygon(rings[0], rings[1:])
        if shape.is_valid:
            out.append((ident, name, shape))
            continue
        fixed = shapely.make_valid(shape)
        parts = [p for g in getattr(fixed, "geoms", [fixed]) if g.geom_type in ("Polygon", "MultiPolygon")
                 for p in getattr(g, "geoms", [g]) if p.area > 0]
        if not parts:
            raise BadReview(f"{label} encloses no area (its edges fold onto each other); draw it again.")
        repaired += 1
        out.extend((ident if k == 0 else f"{ident}.{k}", name, part) for k, part in enumerate(parts))
    return out, repaired


def parse_marks(marks: object, known: dict[tuple[str, str, str], str], case: str) -> list[dict]:
    """The page's [{"stain", "slice", "patch", "mark"}] checked against the case's patches (``known``: (stain,
    slice, patch) -> rank_in_case); BadReview for an unknown patch or mark word."""
    if not isinstance(marks, list):
        raise BadReview(f"the save of case {case} holds no list of marks; reload the page.")
    out: dict[tuple[str, str, str], dict] = {}
    for item in marks:
        item = item if isinstance(item, dict) else {}
        key = (str(item.get("stain", "")), str(item.get("slice", "")), str(item.get("patch", "")))
        if item.get("mark") not in MARKS:
            raise BadReview(f"mark {item.get('mark')!r} of patch {key[2]} (case {case}) is not one of "
                            f"{', '.join(MARKS)}.")
        if key not in known:
            raise BadReview(f"patch {key[2]} of {key[0]} slice {key[1]} is not a patch of case {case}; reload the "
                            "page.")
        out[key] = {"stain": key[0], "slice": key[1], "patch": key[2], "rank_in_case": known[key],
                    "mark": item["mark"]}
    return list(out.values())
