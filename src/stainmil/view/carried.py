"""The reference (H&E) slide's review polygons carried onto a registered IHC slide, for the IHC viewer to draw:
through :func:`stainmil.data.registration.carry_geometry` (fixed level-0 px -> moving level-0 px, edges densified so
the outline follows the non-rigid field). Only aligned pairs are carried; otherwise the answer says why not."""

from __future__ import annotations

from shapely.geometry import Polygon

from stainmil.data.registration import carry_geometry
from stainmil.errors import DataError
from stainmil.view.desk import ReviewDesk
from stainmil.view.reviews import rings_of


def carried_outlines(desk: ReviewDesk, slide_id: int) -> dict:
    """{"outlines": [{"id", "class", "rings"}] in this slide's level-0 px, "from": "<stain> slice <id>", "stain":
    the reference stain as shown, "fixed": its slide number, "version": its review's version, "why": why nothing
    is carried ('' when it is)}."""
    catalog = desk.catalog
    entry = catalog.entry(slide_id)
    page = catalog.case_page(entry.source, entry.case)
    me = next(s for s in page["slices"] if s["id"] == slide_id)
    out = {"outlines": [], "from": "", "stain": "", "fixed": None, "version": "", "why": ""}
    link = me["link"]
    if me["reference"]:
        out["why"] = "this is the reference slide: its own polygons are drawn"
        return out
    if not link or not link.get("linked"):
        out["why"] = (link or {}).get("why") or "not registered to a reference slide"
        return out
    fixed = next(s for s in page["slices"] if s["id"] == link["fixed"])
    saved = desk.slide(fixed["id"])
    out.update({"from": f"{fixed['stain']} slice {fixed['slice']}", "stain": fixed["stain"], "fixed": fixed["id"],
                "version": saved["version"]})
    transform = catalog.transforms[link["transform"]]
    try:
        for polygon in saved["polygons"]:
            drawn = polygon["rings"]
            carried = carry_geometry(Polygon(drawn[0], drawn[1:]), transform)
            parts = [p for g in getattr(carried, "geoms", [carried]) for p in getattr(g, "geoms", [g])]
            for part in parts:
                if part.geom_type == "Polygon" and not part.is_empty:
                    rings = [[[round(x, 2), round(y, 2)] for x, y in ring] for ring in rings_of(part)]
                    out["outlines"].append({"id": polygon["id"], "class": polygon["class"], "rings": rings})
    except DataError as exc:
        out.update(outlines=[], why=str(exc))
    return out
