"""The viewer's web app (Starlette): two pages, a small JSON API and the deep-zoom tiles of a :class:`Catalog`.

::

    /                                         the case list            /case?source=S&case=ID   one case
    /api/cases?source=S                       case list data           /api/case?source=S&case=ID
    /api/transform/T                          a registration pair's transform (affine + displacement grids)
    /api/regions/N                            QuPath include/exclude polygons of slide N (level-0 px)
    /slides/N.dzi  /slides/N_files/L/C_R.jpeg the Deep Zoom pyramid of slide N (also .png: lossless)
    /slides/N/mask.png                        its tissue mask
    /static/…  /osd/…                         the app's own files and OpenSeadragon's (installed by `make setup`)

Slides are addressed by number only (the catalog's list of the run's own slides): no URL carries a path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from stainmil.errors import ConfigError, DataError
from stainmil.view.catalog import Catalog, NotServed
from stainmil.view.tiles import FORMATS, TileOutside

OPENSEADRAGON_VERSION = "6.1.1"   # the Makefile installs this version from npm
STATIC = Path(__file__).parent / "static"


def openseadragon_dir() -> Path:
    """OpenSeadragon's build folder: $STAINMIL_OPENSEADRAGON, else where `make setup` installs it (npm, pinned)."""
    candidates = [Path(os.environ["STAINMIL_OPENSEADRAGON"])] if os.environ.get("STAINMIL_OPENSEADRAGON") else []
    candidates.append(Path(sys.prefix) / "share" / "stainmil" / "node_modules" / "openseadragon" / "build"
                      / "openseadragon")
    for folder in candidates:
        if (folder / "openseadragon.min.js").is_file():
            return folder
    prefix = Path(sys.prefix) / "share" / "stainmil"
    raise ConfigError(f"OpenSeadragon (the viewer's deep-zoom client) is not installed in {candidates[-1]}; run "
                      f"`make setup`, or `npm install --prefix {prefix} openseadragon@{OPENSEADRAGON_VERSION}`, or "
                      "set STAINMIL_OPENSEADRAGON to its build/openseadragon folder.")


def create_app(catalog: Catalog, osd: Path | None = None) -> Starlette:
    osd = osd or openseadragon_dir()

    def page(name: str):
        def endpoint(request: Request) -> Response:
            return FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})
        return endpoint

    def source_of(request: Request) -> int:
        try:
            return int(request.query_params.get("source", "0"))
        except ValueError as exc:
            raise NotServed("source must be a number") from exc

    def cases(request: Request) -> Response:
        return JSONResponse(catalog.case_list(source_of(request)))

    def case(request: Request) -> Response:
        return JSONResponse(catalog.case_page(source_of(request), request.query_params.get("case", "")))

    def transform(request: Request) -> Response:
        return JSONResponse(catalog.transform(request.path_params["n"]))

    def regions(request: Request) -> Response:
        return JSONResponse(catalog.regions(request.path_params["n"]))

    def dzi(request: Request) -> Response:
        return Response(catalog.zoom(request.path_params["n"]).dzi(), media_type="application/xml")

    def tile(request: Request) -> Response:
        p = request.path_params
        data = catalog.tile(p["n"], p["level"], p["col"], p["row"], p["fmt"])
        return Response(data, media_type=FORMATS[p["fmt"]], headers={"Cache-Control": "private, max-age=3600"})

    def mask(request: Request) -> Response:
        return Response(catalog.mask_png(request.path_params["n"]), media_type="image/png")

    async def not_served(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=404)

    async def unavailable(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=410)

    routes = [
        Route("/", page("index.html")),
        Route("/case", page("case.html")),
        Route("/api/cases", cases),
        Route("/api/case", case),
        Route("/api/transform/{n:int}", transform),
        Route("/api/regions/{n:int}", regions),
        Route("/slides/{n:int}.dzi", dzi),
        Route("/slides/{n:int}_files/{level:int}/{col:int}_{row:int}.{fmt:str}", tile),
        Route("/slides/{n:int}/mask.png", mask),
        Mount("/static", StaticFiles(directory=STATIC, follow_symlink=False)),
        Mount("/osd", StaticFiles(directory=osd, follow_symlink=False)),
    ]
    handlers = {NotServed: not_served, TileOutside: not_served, DataError: unavailable, ConfigError: unavailable}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.catalog = catalog
    return app
