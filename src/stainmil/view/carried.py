"""Outlines of the reference (H&E) slide carried onto a registered IHC slide, for the IHC viewer to draw: through
:func:`stainmil.data.registration.carry_geometry` (fixed level-0 px -> moving level-0 px, edges densified so the
outline follows the non-rigid field). Only aligned pairs are carried; otherwise the answer says why not.

Two kinds of outline go through here — the reviewer's polygons (:func:`carried_outlines`, review mode) and the
pathologist's ``analysis.truth`` outline (:mod:`stainmil.view.outlines`) — by one link lookup
(:func:`reference_link`) and one carrying function (:func:`carry`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import shapely
from shapely.geometry import Polygon

from stainmil.data.registration import carry_geometry
from stainmil.errors import DataError
from stainmil.view.catalog import Catalog
from stainmil.view.desk import ReviewDesk
from stainmil.view.shapes import polygon_rings

Shape = tuple[str, str, shapely.Geometry]   # (id, class, geometry in the reference slide's level-0 px)


def reference_link(catalog: Catalog, slide_id: int) -> dict:
    """Where a slide's carried outlines would come from: {"fixed": the reference slide's number (None when there is
    none to name), "from": "<stain> slice <id>", "stain": the reference stain as shown, "reference": whether this
    slide is itself the reference, "transform": the pair's transform file (None unless the link is aligned),
    "why": why nothing can be carried ('' when it can)} — read from the case page's registration links."""
    entry = catalog.entry(slide_id)
    page = catalog.case_page(entry.source, entry.case)
    me = next(s for s in page["slices"] if s["id"] == slide_id)
    out = {"fixed": None, "from": "", "stain": "", "reference": bool(me["reference"]), "transform": None, "why": ""}
    link = me["link"]
    if me["reference"]:
        out["why"] = "this is the reference slide: its own outlines are drawn"
        return out
    fixed = next((s for s in page["slices"] if link and s["id"] == link.get("fixed")), None)
    if fixed is not None:
        out.update(fixed=fixed["id"], **{"from": f"{fixed['stain']} slice {fixed['slice']}"}, stain=fixed["stain"])
    if not link or not link.get("linked"):
        out["why"] = (link or {}).get("why") or "not registered to a reference slide"
        return out
    out["transform"] = catalog.transforms[link["transform"]]
    return out


def carry(link: dict, shapes_of: Callable[[int], tuple[list[Shape], dict]]) -> dict:
    """{"outlines": [{"id", "class", "rings"}] in the moving slide's level-0 px (one per polygon carried: rings as
    :func:`stainmil.view.shapes.polygon_rings`), "from", "stain", "fixed", "why"} for a :func:`reference_link`.
    ``shapes_of(reference slide number)`` gives the shapes to carry and fields to add to the answer; it is asked
    only when the link is aligned. A transform that does not read leaves no outline and says why."""
    out = {"outlines": [], "from": link["from"], "stain": link["stain"], "fixed": link["fixed"], "why": link["why"]}
    if link["transform"] is None:
        return out
    shapes, extra = shapes_of(link["fixed"])
    out.update(extra)
    try:
        carried = carry_geometry([geometry for _, _, geometry in shapes], Path(link["transform"])) if shapes else []
        for (ident, cls, _), geometry in zip(shapes, carried):
            for rings in polygon_rings(geometry):
                out["outlines"].append({"id": ident, "class": cls, "rings": rings})
    except DataError as exc:
        out.update(outlines=[], why=str(exc))
    return out


def carried_outlines(desk: ReviewDesk, slide_id: int) -> dict:
    """The reference slide's review polygons carried onto this slide: :func:`carry`'s answer and "version", the
    reference review's version (so the page knows what it shows)."""

    def review_polygons(fixed: int) -> tuple[list[Shape], dict]:
        saved = desk.slide(fixed)
        shapes = [(p["id"], p["class"], Polygon(p["rings"][0], p["rings"][1:])) for p in saved["polygons"]]
        return shapes, {"version": saved["version"]}

    return {"version": "", **carry(reference_link(desk.catalog, slide_id), review_polygons)}
