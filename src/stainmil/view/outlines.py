"""A slide's pathologist outline (``analysis.truth``: QuPath GeoJSON per slide, see :mod:`stainmil.analysis.truth`) for
its viewer: the lesion and ignored regions of its own file, or — on a slide of another stain without a lesion of its
own — its reference (H&E) slide's, carried through an aligned registration (:func:`stainmil.view.carried.carry`,
as the review's polygons are). Made once per slide, the files do not change while they are served, and kept in
the catalog (``Catalog.outlines``).
"""

from __future__ import annotations

from pathlib import Path

from stainmil.analysis.truth import read_outline
from stainmil.slides.annotations import BadAnnotations
from stainmil.view.carried import Shape, carry, reference_link
from stainmil.view.catalog import Catalog
from stainmil.view.shapes import polygon_rings

KINDS = {"lesion": "lesion", "ignore": "ignored"}   # kind -> its label


def slide_outline(catalog: Catalog, slide_id: int) -> dict:
    """{"outlines": [{"id", "class", "kind": "lesion" | "ignore", "carried": bool, "rings"}] in this slide's
    level-0 px (one per polygon), "file": its own outline file ('' for none), "from": "<stain> slice <id>" of the
    reference slide carried from, "stain": the reference stain as shown, "fixed": its slide number, "why": why no
    (more) outline is shown or carried, "problem": the one sentence of an outline file that does not read}."""
    found = catalog.outlines.get(slide_id)
    if found is None:
        found = catalog.outlines.setdefault(slide_id, _slide_outline(catalog, slide_id))
    return found


def _shapes(outline) -> list[Shape]:
    return [(kind, KINDS[kind], geometry) for kind, geometry in (("lesion", outline.lesion),
                                                                    ("ignore", outline.ignore))
            if geometry is not None]


def _items(shapes: list[Shape], carried: bool) -> list[dict]:
    return [{"id": kind, "class": label, "kind": kind, "carried": carried, "rings": rings}
            for kind, label, geometry in shapes for rings in polygon_rings(geometry)]


def _slide_outline(catalog: Catalog, slide_id: int) -> dict:
    entry = catalog.entry(slide_id)
    source = catalog.sources[entry.source]
    out = {"outlines": [], "file": "", "from": "", "stain": "", "fixed": None, "why": "", "problem": ""}
    if not catalog.state(source).truth_outlines:
        out["why"] = "this run's config names no outline folder in analysis.truth"
        return out
    config = catalog.state(source).config
    where = config.analysis.truth
    if entry.truth is not None:
        out["file"] = str(entry.truth)
        try:
            own = read_outline(config, entry.truth)
        except (BadAnnotations, OSError) as exc:
            out["problem"] = str(exc)
            return out
        out["outlines"] = _items(_shapes(own), carried=False)
        if own.lesion is not None:
            return out
    link = reference_link(catalog, slide_id)
    if link["reference"]:
        out["why"] = ("its outline file holds no polygon of analysis.lesion_classes" if entry.truth is not None
                      else f"no outline file of this slide in {where}")
        return out
    fixed = catalog.entry(link["fixed"]) if link["fixed"] is not None else None
    if fixed is not None and fixed.truth is None:
        out.update({"from": link["from"], "stain": link["stain"], "fixed": link["fixed"],
                    "why": f"neither this slide nor its {link['from']} has an outline file in {where}"})
        return out

    def reference_outline(fixed_id: int) -> tuple[list[Shape], dict]:
        path = Path(catalog.entry(fixed_id).truth)
        try:
            return _shapes(read_outline(config, path)), {}
        except (BadAnnotations, OSError) as exc:
            return [], {"problem": str(exc)}

    carried = carry(link, reference_outline)
    out.update({k: carried[k] for k in ("from", "stain", "fixed")}, problem=carried.get("problem", ""))
    if carried["why"]:
        out["why"] = f"the {carried['from'] or 'reference slide'}'s lesion outline is not carried: {carried['why']}"
    out["outlines"] += [{**o, "kind": o["id"], "carried": True} for o in carried["outlines"]]
    return out
