"""Shapely geometries as the viewer's pages draw them: polygons as closed rings of ``[x, y]`` in a slide's level-0 px
(exterior first, then its holes), simplified when a slide's share would pass a vertex budget."""

from __future__ import annotations

import numpy as np
import shapely

MAX_REGION_VERTICES = 20_000   # per geometry sent to the browser (simplified beyond that)


def polygon_parts(geometry: shapely.Geometry | None) -> list[shapely.Polygon]:
    """The non-empty polygons of a Polygon, MultiPolygon or GeometryCollection (what make_valid may return); lines
    and points left out."""
    if geometry is None or geometry.is_empty:
        return []
    if geometry.geom_type == "Polygon":
        return [geometry]
    return [p for part in getattr(geometry, "geoms", []) for p in polygon_parts(part)]


def polygon_rings(geometry: shapely.Geometry | None, max_vertices: int = MAX_REGION_VERTICES,
                  decimals: int = 2) -> list[list[list[list[float]]]]:
    """Each polygon of ``geometry`` as its rings (exterior, then holes), rounded to ``decimals``; simplified
    (shapely.simplify, tolerance doubled until it fits) when all of them hold more than ``max_vertices`` vertices."""
    parts = polygon_parts(geometry)
    if not parts:
        return []
    shape = shapely.MultiPolygon(parts) if len(parts) > 1 else parts[0]
    tolerance = 0.0
    while True:
        simpler = polygon_parts(shapely.simplify(shape, tolerance)) if tolerance else parts
        polygons = [[np.asarray(ring.coords)[:, :2].round(decimals).tolist()
                     for ring in (polygon.exterior, *polygon.interiors)] for polygon in simpler]
        if sum(len(ring) for rings in polygons for ring in rings) <= max_vertices:
            return polygons
        minx, miny, maxx, maxy = shape.bounds
        tolerance = max(tolerance * 2, max(maxx - minx, maxy - miny) / 4000)


def rings(geometry: shapely.Geometry | None, max_vertices: int = MAX_REGION_VERTICES,
          decimals: int = 2) -> list[list[list[float]]]:
    """Every ring of every polygon of ``geometry``, in one list (see :func:`polygon_rings`)."""
    return [ring for polygon in polygon_rings(geometry, max_vertices, decimals) for ring in polygon]
