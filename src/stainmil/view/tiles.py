"""Deep-zoom tiles of a slide for the viewer: the Deep Zoom Image (DZI) pyramid OpenSeadragon reads, cut from any
slide :class:`stainmil.slides.reader.Slide` opens (OpenSlide, tiffslide, DICOM folders, plain images).

Deep-zoom level ``l`` of a ``W x H`` slide is the slide shrunk ``2 ** (L - l)`` times (``L = ceil(log2 max(W,
H))``: the top level is level 0 of the slide, pixel for pixel). A tile is read at the coarsest slide level that is
no coarser than needed and shrunk with Pillow (never enlarged), as OpenSlide's own ``DeepZoomGenerator`` does;
tiles have no overlap. Encoded tiles are kept in a small least-recently-used cache (bounded in bytes); the slides
they are read from stay open in the catalog's :class:`stainmil.slides.reader.SlideHandles`, which never closes a slide
another request is reading.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from PIL import Image

from stainmil.slides.reader import Slide, best_level

TILE = 256
FORMATS = {"jpeg": "image/jpeg", "jpg": "image/jpeg", "png": "image/png"}


class TileOutside(LookupError):
    """A tile address (level, column, row) outside the slide's pyramid."""


@dataclass(frozen=True)
class DeepZoom:
    """The DZI geometry of one slide (level-0 ``width`` x ``height``)."""

    width: int
    height: int
    tile: int = TILE

    @property
    def max_level(self) -> int:
        return max(0, math.ceil(math.log2(max(self.width, self.height, 1))))

    def scale(self, level: int) -> int:
        """Level-0 pixels per pixel of deep-zoom ``level``."""
        return 2 ** (self.max_level - level)

    def level_size(self, level: int) -> tuple[int, int]:
        scale = self.scale(level)
        return max(1, math.ceil(self.width / scale)), max(1, math.ceil(self.height / scale))

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """(left, top, width, height) of a tile in pixels of deep-zoom ``level``; TileOutside when it has none."""
        if not 0 <= level <= self.max_level:
            raise TileOutside(f"level {level} is outside 0..{self.max_level}")
        width, height = self.level_size(level)
        left, top = col * self.tile, row * self.tile
        if col < 0 or row < 0 or left >= width or top >= height:
            raise TileOutside(f"tile ({col}, {row}) is outside level {level} ({width} x {height} px)")
        return left, top, min(self.tile, width - left), min(self.tile, height - top)

    def dzi(self, image_format: str = "jpeg") -> str:
        """The ``.dzi`` descriptor OpenSeadragon opens."""
        return ('<?xml version="1.0" encoding="UTF-8"?>\n'
                f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{image_format}" '
                f'Overlap="0" TileSize="{self.tile}"><Size Width="{self.width}" Height="{self.height}"/></Image>\n')


def read_tile(slide: Slide, zoom: DeepZoom, level: int, col: int, row: int) -> np.ndarray:
    """RGB uint8 (h, w, 3) of one deep-zoom tile (white outside the slide)."""
    left, top, width, height = zoom.tile_box(level, col, row)
    scale = zoom.scale(level)
    source = best_level(slide.level_downsamples, scale)
    downsample = slide.level_downsamples[source]
    x0, y0 = left * scale, top * scale                       # level-0 top-left
    read_w = max(1, math.ceil(width * scale / downsample))   # the same box at the level read
    read_h = max(1, math.ceil(height * scale / downsample))
    region = slide.read_box(x0, y0, source, read_w, read_h)
    if region.shape[:2] == (height, width):
        return region
    return np.asarray(Image.fromarray(region).resize((width, height), Image.LANCZOS))


def encode(rgb: np.ndarray, image_format: str, quality: int = 85) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    else:
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


class TileCache:
    """Encoded tiles by key, least recently used dropped first once ``limit_bytes`` is passed; thread-safe."""

    def __init__(self, limit_bytes: int = 64 * 2**20) -> None:
        self.limit = limit_bytes
        self.size = 0
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            data = self._items.pop(key, None)
            if data is None:
                self.misses += 1
                return None
            self._items[key] = data
            self.hits += 1
            return data

    def put(self, key: tuple, data: bytes) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            self.size -= len(old) if old is not None else 0
            self._items[key] = data
            self.size += len(data)
            while self.size > self.limit and self._items:
                self.size -= len(self._items.popitem(last=False)[1])
