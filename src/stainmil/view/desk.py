"""The review side of a served folder (``stainmil view --review NAME``): which folder each source's reviews go to,
the classes and grades a reviewer chooses from, and the page's saves checked against the catalog's slides and
patches before :class:`stainmil.view.reviews.Reviews` writes them."""

from __future__ import annotations

import json
from pathlib import Path

from stainmil.view.catalog import Catalog
from stainmil.view.folder import Source
from stainmil.view.reviews import (
    MAX_NOTE,
    BadReview,
    Reviews,
    check_review_name,
    class_colours,
    default_review_classes,
    parse_marks,
    parse_polygons,
)


def parse_body(data: bytes, what: str) -> dict:
    """A PUT's JSON object; BadReview when it is not one."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadReview(f"the save of {what} is not JSON ({exc.__class__.__name__}); reload the page.") from exc
    if not isinstance(body, dict):
        raise BadReview(f"the save of {what} is not a JSON object; reload the page.")
    return body


class ReviewDesk:
    """One reviewer (``name``) working on a :class:`Catalog`'s sources."""

    def __init__(self, catalog: Catalog, name: str) -> None:
        self.catalog, self.name = catalog, check_review_name(name)

    def folder(self, source: Source) -> Path:
        """``<output_dir>/reviews/<name>`` of the source's config, else ``<viewed folder>/reviews/<name>``."""
        config = self.catalog.state(source).config
        return (config.paths.reviews_dir if config is not None else self.catalog.folder / "reviews") / self.name

    def run_name(self, source: Source) -> str:
        """The ``run`` of a source's rows in patch_marks.csv and cases.csv: its folder relative to the folder that
        holds ``reviews/`` (``runs/run_…``, ``cv/…/folds/fold_00``), else its absolute path."""
        top = self.folder(source).parent.parent
        return source.folder.relative_to(top).as_posix() if source.folder.is_relative_to(top) else str(source.folder)

    def reviews(self, source: Source) -> Reviews:
        return Reviews(self.folder(source))

    def classes(self, source: Source) -> list[str]:
        config = self.catalog.state(source).config
        return list(config.analysis.review_classes) if config is not None else default_review_classes()

    def describe(self, source: Source) -> dict:
        """What the case page needs to offer review tools: reviewer, folder, classes with colours, grades."""
        colours = class_colours(self.classes(source))
        return {"name": self.name, "folder": str(self.folder(source)), "run": self.run_name(source),
                "classes": [{"name": n, "colour": "#{:02x}{:02x}{:02x}".format(*c)} for n, c in colours.items()],
                "grades": self.catalog.state(source).class_names}

    # ---- slides --------------------------------------------------------------------------------------------
    def _slide(self, slide_id: int):
        entry = self.catalog.entry(slide_id)
        return entry, self.catalog.sources[entry.source], (entry.case, entry.stain, entry.slice)

    def slide(self, slide_id: int) -> dict:
        entry, source, key = self._slide(slide_id)
        return self.reviews(source).load_slide(key)

    def save_slide(self, slide_id: int, data: bytes) -> dict:
        """Save the page's polygons of one slide: {"polygons", "version", "repaired"} (polygons as saved)."""
        entry, source, key = self._slide(slide_id)
        where = f"case {entry.case}, {entry.stain} slice {entry.slice}"
        body = parse_body(data, where)
        zoom = self.catalog.zoom(slide_id)
        classes = self.classes(source)
        polygons, repaired = parse_polygons(body.get("polygons"), classes, (zoom.width, zoom.height), where)
        saved = self.reviews(source).save_slide(key, polygons, str(body.get("base_version") or ""),
                                                class_colours(classes))
        return {**saved, "repaired": repaired}

    # ---- cases ---------------------------------------------------------------------------------------------
    def case(self, source_index: int, case: str) -> dict:
        source = self.catalog.source(source_index)
        return self.reviews(source).load_case(self.run_name(source), case)

    def save_case(self, source_index: int, case: str, data: bytes) -> dict:
        """Save the page's marks, grade and note of one case (the run's rows of that case replaced)."""
        source = self.catalog.source(source_index)
        body = parse_body(data, f"case {case}")
        patches = source.table("patches")
        part = patches[patches["case"] == case]
        if part.empty:
            raise BadReview(f"case {case!r} is not in {source.folder / 'attention' / 'patches.csv'}; reload the list.")
        ranks = part["rank_in_case"].astype("Int64").astype(str).replace("<NA>", "") \
            if "rank_in_case" in part.columns else [""] * len(part)
        patch = part["patch"] if "patch" in part.columns else part["patch_index"]
        known = {(str(st), str(sl), str(p)): r for st, sl, p, r in zip(part["stain"], part["slice"], patch, ranks)}
        marks = parse_marks(body.get("marks", []), known, case)
        grade, note = body.get("grade") or "", body.get("note") or ""
        grades = self.catalog.state(source).class_names
        if grade not in ["", *grades]:
            raise BadReview(f"grade {grade!r} of case {case} is not one of this run's classes {grades}.")
        if not isinstance(note, str) or len(note) > MAX_NOTE:
            raise BadReview(f"the note of case {case} is not text of at most {MAX_NOTE:,} characters; shorten it.")
        return self.reviews(source).save_case(self.run_name(source), case, marks, grade, note,
                                              str(body.get("base_version") or ""))
