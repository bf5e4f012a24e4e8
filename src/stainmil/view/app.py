"""The viewer's web app (Starlette): two pages, a small JSON API and the deep-zoom tiles of a :class:`Catalog`.

::

    /                                         the case list            /case?source=S&case=ID   one case
    /api/cases?source=S                       case list data           /api/case?source=S&case=ID
    /api/transform/T                          a registration pair's transform (affine + displacement grids)
    /api/regions/N                            QuPath include/exclude polygons of slide N (level-0 px)
    /api/outline/N                            its pathologist's lesion outline (analysis.truth), or its H&E's carried
    /slides/N.dzi  /slides/N_files/L/C_R.jpeg the Deep Zoom pyramid of slide N (also .png: lossless)
    /slides/N/mask.png                        its tissue mask
    /api/review/N        GET, PUT             the reviewer's polygons of slide N (--review only; PUT with base_version)
    /api/marks?source=S&case=ID  GET, PUT     the reviewer's top-k marks, note and grade of a case (--review only)
    /api/carried/N                            the reference slide's review polygons carried onto IHC slide N
    /static/…  /osd/…                         the app's own files and OpenSeadragon's (installed by `make setup`)

Slides are addressed by number only (the catalog's list of the run's own slides): no URL carries a path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from stainmil.errors import ConfigError, DataError, OutputError
from stainmil.view.carried import carried_outlines
from stainmil.view.catalog import Catalog, NotServed
from stainmil.view.desk import ReviewDesk
from stainmil.view.outlines import slide_outline
from stainmil.view.reviews import BadReview, StaleReview
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


def create_app(catalog: Catalog, osd: Path | None = None, review: str | None = None) -> Starlette:
    """The app of ``catalog``; with ``review`` (a reviewer's name) its pages also draw, mark and save reviews."""
    osd = osd or openseadragon_dir()
    desk = ReviewDesk(catalog, review) if review else None

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
        source = source_of(request)
        data = catalog.case_page(source, request.query_params.get("case", ""))
        return JSONResponse({**data, "review": desk.describe(catalog.source(source)) if desk else None})

    def reviewing() -> ReviewDesk:
        if desk is None:
            raise NotServed("this viewer is read-only; start it with `stainmil view FOLDER --review NAME` to review")
        return desk

    async def review(request: Request) -> Response:
        n = request.path_params["n"]
        if request.method == "PUT":
            body = await request.body()
            return JSONResponse(await run_in_threadpool(reviewing().save_slide, n, body))
        return JSONResponse(await run_in_threadpool(reviewing().slide, n))

    async def marks(request: Request) -> Response:
        source, case_id = source_of(request), request.query_params.get("case", "")
        if request.method == "PUT":
            body = await request.body()
            return JSONResponse(await run_in_threadpool(reviewing().save_case, source, case_id, body))
        return JSONResponse(await run_in_threadpool(reviewing().case, source, case_id))

    def carried(request: Request) -> Response:
        return JSONResponse(carried_outlines(reviewing(), request.path_params["n"]))

    def transform(request: Request) -> Response:
        return JSONResponse(catalog.transform(request.path_params["n"]))

    def regions(request: Request) -> Response:
        return JSONResponse(catalog.regions(request.path_params["n"]))

    def outline(request: Request) -> Response:
        return JSONResponse(slide_outline(catalog, request.path_params["n"]))

    def dzi(request: Request) -> Response:
        return Response(catalog.zoom(request.path_params["n"]).dzi(), media_type="application/xml")

    def tile(request: Request) -> Response:
        p = request.path_params
        data = catalog.tile(p["n"], p["level"], p["col"], p["row"], p["fmt"])
        return Response(data, media_type=FORMATS[p["fmt"]], headers={"Cache-Control": "private, max-age=3600"})

    def mask(request: Request) -> Response:
        return Response(catalog.mask_png(request.path_params["n"]), media_type="image/png")

    def answer(status: int):  # an error's one sentence, as JSON
        async def handler(request: Request, exc: Exception) -> Response:
            return JSONResponse({"error": str(exc)}, status_code=status)
        return handler

    routes = [
        Route("/", page("index.html")),
        Route("/case", page("case.html")),
        Route("/api/cases", cases),
        Route("/api/case", case),
        Route("/api/transform/{n:int}", transform),
        Route("/api/regions/{n:int}", regions),
        Route("/api/outline/{n:int}", outline),
        Route("/api/review/{n:int}", review, methods=["GET", "PUT"]),
        Route("/api/marks", marks, methods=["GET", "PUT"]),
        Route("/api/carried/{n:int}", carried),
        Route("/slides/{n:int}.dzi", dzi),
        Route("/slides/{n:int}_files/{level:int}/{col:int}_{row:int}.{fmt:str}", tile),
        Route("/slides/{n:int}/mask.png", mask),
        Mount("/static", StaticFiles(directory=STATIC, follow_symlink=False)),
        Mount("/osd", StaticFiles(directory=osd, follow_symlink=False)),
    ]
    handlers = {NotServed: answer(404), TileOutside: answer(404), DataError: answer(410), ConfigError: answer(410),
                BadReview: answer(400), StaleReview: answer(409), OutputError: answer(500)}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.catalog, app.state.review = catalog, desk
    return app
