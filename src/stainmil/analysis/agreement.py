"""How far reviewers agree (``stainmil review-summary``): Cohen's kappa on the top-k patches two reviewers both
marked (agree | disagree | unsure) and the Dice overlap of their lesion outlines on each slide both outlined.

Reads what ``stainmil view --review NAME`` saves under ``<output_dir>/reviews/<NAME>/``: one QuPath GeoJSON per
slide (``case<id>_<stain>_slice<id>.geojson``), ``patch_marks.csv`` and ``cases.csv``. Two reviewers are compared
only where both said something: a slide one of them never outlined is counted, not scored.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import shapely
from sklearn.metrics import cohen_kappa_score

from stainmil.errors import DataError
from stainmil.slides.annotations import BadAnnotations, read_polygons

MARK_KEYS = ["run", "case", "stain", "slice", "patch"]


@dataclass
class Agreement:
    pairs: pd.DataFrame       # one row per pair of reviewers: kappa on shared marks, mean Dice, counts
    slides: pd.DataFrame      # one row per pair x slide both outlined: Dice of the lesion outlines
    problems: list[str]       # files that could not be read, one sentence each


def dice(a: shapely.Geometry | None, b: shapely.Geometry | None) -> float:
    """2 |A ∩ B| / (|A| + |B|); NaN when neither outlined any lesion (nothing to agree on), 0 when only one did."""
    area_a = 0.0 if a is None else a.area
    area_b = 0.0 if b is None else b.area
    if area_a + area_b == 0:
        return math.nan
    if a is None or b is None:
        return 0.0
    return 2 * shapely.intersection(a, b).area / (area_a + area_b)


def _reviewers(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"no reviews in {folder}; review cases with `stainmil view <run> --review <your name>` first.")
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _marks(reviewer: Path) -> pd.DataFrame:
    path = reviewer / "patch_marks.csv"
    if not path.is_file():
        return pd.DataFrame(columns=[*MARK_KEYS, "mark"])
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _outlines(reviewer: Path, lesion_classes: list[str], problems: list[str]) -> dict[str, shapely.Geometry | None]:
    found = {}
    for path in sorted(reviewer.glob("*.geojson")):
        try:
            found[path.stem] = read_polygons(path).union(lesion_classes)
        except BadAnnotations as exc:
            problems.append(f"{exc}; left out of the agreement.")
    return found


def review_agreement(folder: str | Path, lesion_classes: list[str]) -> Agreement:
    """Every pair of reviewers under ``folder`` (``<output_dir>/reviews``)."""
    reviewers = _reviewers(Path(folder))
    if len(reviewers) < 2:
        raise DataError(f"{folder} holds {len(reviewers)} reviewer folder(s); agreement needs two or more (each "
                        "reviewer opens the viewer with their own --review NAME).")
    problems: list[str] = []
    marks = {r.name: _marks(r) for r in reviewers}
    outlines = {r.name: _outlines(r, lesion_classes, problems) for r in reviewers}
    pairs, slides = [], []
    for first, second in itertools.combinations([r.name for r in reviewers], 2):
        shared = marks[first].merge(marks[second], on=MARK_KEYS, suffixes=("_1", "_2"))
        kappa = math.nan
        if len(shared) and len(set(shared["mark_1"]) | set(shared["mark_2"])) > 1:
            kappa = float(cohen_kappa_score(shared["mark_1"], shared["mark_2"]))
        elif len(shared):
            kappa = 1.0  # every shared patch got the same single mark from both
        both = sorted(set(outlines[first]) & set(outlines[second]))
        for slide in both:
            slides.append({"reviewer_1": first, "reviewer_2": second, "slide": slide,
                           "dice": dice(outlines[first][slide], outlines[second][slide])})
        scores = [s["dice"] for s in slides[len(slides) - len(both):] if not math.isnan(s["dice"])]
        pairs.append({"reviewer_1": first, "reviewer_2": second, "shared_marks": len(shared),
                      "marks_agreeing": int((shared["mark_1"] == shared["mark_2"]).sum()) if len(shared) else 0,
                      "kappa": kappa, "shared_slides": len(both),
                      "only_one_outlined": len(set(outlines[first]) ^ set(outlines[second])),
                      "mean_dice": float(sum(scores) / len(scores)) if scores else math.nan})
    return Agreement(pd.DataFrame(pairs), pd.DataFrame(slides), problems)
