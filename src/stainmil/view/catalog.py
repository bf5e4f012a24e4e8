"""The viewer's model of a folder: its sources (:class:`~stainmil.view.source_state.SourceState`), the slides it
may serve, numbered, with their tiles, and the registration transforms, numbered (see :mod:`stainmil.view.folder`).

Everything the browser asks for goes through a :class:`Catalog`: a slide by its number, a case by its id within a
source; the JSON of the pages is built by :mod:`stainmil.view.pages`. Case ids are kept as text (``007`` stays
``007``).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from stainmil.errors import ConfigError, DataError
from stainmil.run_files import RunFiles
from stainmil.slides.annotations import BadAnnotations, read_region
from stainmil.slides.reader import Slide, SlideHandles, UnreadableSlide
from stainmil.view import pages
from stainmil.view.folder import (
    SlideEntry,
    SlideFinder,
    Source,
    build_mosaic,
    find_sources,
    require_folder,
    unanalysed_runs,
)
from stainmil.view.shapes import MAX_REGION_VERTICES, rings
from stainmil.view.source_state import SourceState
from stainmil.view.tiles import FORMATS, DeepZoom, TileCache, encode, read_tile
from stainmil.view.transforms import transform_json


class NotServed(LookupError):
    """A request for something this folder does not hold (unknown slide number, case or source)."""


class Catalog:
    def __init__(self, folder: str | Path, slides_dir: str | Path | None = None, tile_cache_mb: int = 64,
                 open_slides: int = 16) -> None:
        self.folder = require_folder(folder)
        self.sources = find_sources(self.folder)
        self.states = [SourceState(source) for source in self.sources]
        self.finder = SlideFinder(slides_dir)
        self.slides: list[SlideEntry] = []      # by slide number: the only way a URL names a slide
        self.transforms: list[Path] = []        # by transform number
        self._numbers: dict[tuple | Path, int] = {}   # (source, case, stain, slice) -> slide; path -> transform
        self._case_lists: dict[int, dict] = {}
        self._zooms: dict[int, DeepZoom] = {}
        self.outlines: dict[int, dict] = {}     # slide -> its analysis.truth outline answer (view.outlines), made once
        self.handles = SlideHandles(limit=open_slides)
        self.tiles = TileCache(tile_cache_mb * 2**20)
        self._lock = threading.RLock()
        left = unanalysed_runs(self.folder)
        self.folder_notes = [f"{len(left)} trained run(s) here are not analysed and not shown (e.g. "
                             f"{left[0].relative_to(self.folder)}); start `stainmil view {self.folder} --analyze` "
                             "to add them."] if left else []

    def warm(self) -> None:
        """Read the first source's tables and settings (and import what its pages need) before the browser asks."""
        if self.sources:
            try:
                self.case_list(0)
            except (ConfigError, DataError, OSError, ValueError, KeyError):
                pass  # said again, to the browser, when the page asks for it

    def source(self, index: int) -> Source:
        if not 0 <= index < len(self.sources):
            raise NotServed(f"no source {index} in {self.folder}")
        return self.sources[index]

    def state(self, source: Source | int) -> SourceState:
        """What the viewer knows of a source (its config, classes, registrations, outline files)."""
        return self.states[self.source(source if isinstance(source, int) else source.index).index]

    # ---- pages ---------------------------------------------------------------------------------------------
    def case_list(self, source_index: int) -> dict:
        """Every case of a source (made once: the folder's tables do not change while it is served)."""
        state = self.state(source_index)
        with self._lock:
            if source_index not in self._case_lists:
                self._case_lists[source_index] = pages.case_list(state, [s.name for s in self.sources],
                                                                 self.folder_notes)
            return self._case_lists[source_index]

    def case_page(self, source_index: int, case: str) -> dict:
        state = self.state(source_index)
        page = pages.case_page(state, case, self.case_list(source_index),
                               lambda key, rows: self._entry(state, key, rows), self._transform_number)
        if page is None:
            raise NotServed(f"case {case!r} is not in {RunFiles.of(state.source.folder).patches}")
        return page

    def _number(self, key: tuple | Path, items: list, make) -> int:
        """The number of ``key`` in ``items`` (slides or transforms), given once: ``make(number)`` makes the item
        (a ``make`` that raises numbers nothing: the next key still gets the next free number)."""
        with self._lock:
            if key not in self._numbers:
                items.append(make(len(items)))
                self._numbers[key] = len(items) - 1
            return self._numbers[key]

    def _transform_number(self, path: Path) -> int:
        return self._number(path, self.transforms, lambda _: path)

    def transform(self, index: int) -> dict:
        """A pair's transform for the browser (:func:`stainmil.view.transforms.transform_json`)."""
        if not 0 <= index < len(self.transforms):
            raise NotServed(f"no transform {index}")
        found = transform_json(self.transforms[index])
        if found is None:
            raise NotServed(f"{self.transforms[index]} holds no transform")
        return found

    # ---- slides and tiles ----------------------------------------------------------------------------------
    def _entry(self, state: SourceState, key: tuple[str, str, str], rows: pd.DataFrame) -> SlideEntry:
        number = self._number((state.source.index, *key), self.slides,
                              lambda n: state.slide_entry(n, key, rows, self.finder))
        return self.slides[number]

    def entry(self, slide_id: int) -> SlideEntry:
        if not 0 <= slide_id < len(self.slides):
            raise NotServed(f"no slide {slide_id} in this viewer")
        return self.slides[slide_id]

    @contextmanager
    def _slide(self, slide_id: int) -> Iterator[Slide]:
        """The open slide of ``slide_id``, kept open until the ``with`` block ends (see SlideHandles.reading)."""
        entry = self.entry(slide_id)
        if entry.problem:
            raise DataError(entry.problem)
        if entry.kind == "mosaic" and (entry.path is None or not entry.path.is_file()):
            build_mosaic(self.sources[entry.source], entry)
        if entry.path is None:
            raise DataError(f"slide {slide_id} has no pixels to show")
        with ExitStack() as stack:
            try:
                slide = stack.enter_context(self.handles.reading(str(entry.path)))
            except UnreadableSlide as exc:  # opening it failed (a read failing later does not mark the slide)
                entry.problem = str(exc)
                raise
            yield slide

    def zoom(self, slide_id: int) -> DeepZoom:
        with self._lock:
            if slide_id not in self._zooms:
                with self._slide(slide_id) as slide:
                    self._zooms[slide_id] = DeepZoom(*slide.dimensions)
            return self._zooms[slide_id]

    def tile(self, slide_id: int, level: int, col: int, row: int, image_format: str) -> bytes:
        if image_format not in FORMATS:
            raise NotServed(f"tiles come as {sorted(FORMATS)}")
        image_format = "jpeg" if image_format == "jpg" else image_format
        key = (slide_id, level, col, row, image_format)
        data = self.tiles.get(key)
        if data is None:
            zoom = self.zoom(slide_id)
            with self._slide(slide_id) as slide:
                rgb = read_tile(slide, zoom, level, col, row)
            data = encode(rgb, image_format)
            self.tiles.put(key, data)
        return data

    def mask_png(self, slide_id: int) -> bytes:
        """The tissue mask as a translucent RGBA PNG (tissue clear, background shaded)."""
        entry = self.entry(slide_id)
        if entry.mask is None or not entry.mask.is_file():
            raise NotServed(f"slide {slide_id} has no tissue mask")
        with Image.open(entry.mask) as image:
            tissue = np.asarray(image.convert("L")) > 127
        rgba = np.zeros((*tissue.shape, 4), np.uint8)
        rgba[tissue] = (0, 200, 120, 40)
        rgba[~tissue] = (40, 40, 160, 80)
        buffer = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
        return buffer.getvalue()

    def regions(self, slide_id: int) -> dict:
        """The QuPath include/exclude regions used for tiling, as polygons in level-0 px (simplified to at most
        MAX_REGION_VERTICES vertices per slide)."""
        entry = self.entry(slide_id)
        config = self.state(entry.source).config
        out: dict = {"include": [], "exclude": [], "problems": []}
        for which, path, classes in (("include", entry.annotations[0], config.tile.include_classes if config else []),
                                     ("exclude", entry.annotations[1], config.tile.exclude_classes if config else [])):
            if path is None:
                continue
            try:
                region = read_region(Path(path), classes, config.tile.max_annotation_vertices)
            except (BadAnnotations, OSError) as exc:
                out["problems"].append(f"{which}: {exc}")
                continue
            out[which] = rings(region.geometry, MAX_REGION_VERTICES)
        return out
