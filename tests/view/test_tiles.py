"""Deep-zoom tiles: the pyramid's geometry, and tile pixels equal to the same region read by OpenSlide."""

import io

import numpy as np
import openslide
import pytest
from PIL import Image

from stainmil.slides.reader import Slide
from stainmil.view.tiles import DeepZoom, TileCache, TileOutside, encode, read_tile


def test_deep_zoom_geometry():
    zoom = DeepZoom(1000, 300, tile=256)
    assert zoom.max_level == 10 and zoom.level_size(10) == (1000, 300) and zoom.level_size(9) == (500, 150)
    assert zoom.level_size(0) == (1, 1)
    assert zoom.tile_box(10, 3, 1) == (768, 256, 232, 44)       # the last column and row are cut to the image
    for bad in [(11, 0, 0), (-1, 0, 0), (10, 4, 0), (10, 0, 2), (10, -1, 0)]:
        with pytest.raises(TileOutside):
            zoom.tile_box(*bad)
    assert 'Width="1000"' in zoom.dzi() and 'TileSize="256"' in zoom.dzi() and 'Overlap="0"' in zoom.dzi()


def test_tiles_equal_openslide_regions(slide_cohort):
    path = sorted((slide_cohort / "slides").rglob("*.tif*"))[0]
    slide, reference = Slide(path), openslide.OpenSlide(str(path))
    try:
        zoom = DeepZoom(*slide.dimensions)
        assert reference.level_downsamples[1] == pytest.approx(2)
        for level, source in ((zoom.max_level, 0), (zoom.max_level - 1, 1)):  # full resolution, and the 2x level
            width, height = zoom.level_size(level)
            for col, row in {(0, 0), ((width - 1) // 256, (height - 1) // 256)}:
                left, top, w, h = zoom.tile_box(level, col, row)
                scale = 2 ** (zoom.max_level - level)
                expected = np.asarray(reference.read_region((left * scale, top * scale), source, (w, h)).convert("RGB"))
                tile = read_tile(slide, zoom, level, col, row)
                assert np.array_equal(tile, expected), (level, col, row)
                png = np.asarray(Image.open(io.BytesIO(encode(tile, "png"))).convert("RGB"))
                assert np.array_equal(png, expected)                   # PNG tiles are lossless
                jpeg = np.asarray(Image.open(io.BytesIO(encode(tile, "jpeg"))).convert("RGB"), float)
                assert np.abs(jpeg - expected).mean() < 4              # JPEG tiles: the same picture
        coarse = read_tile(slide, zoom, zoom.max_level - 4, 0, 0)       # shrunk from the coarsest level that fits
        assert coarse.shape[:2] == zoom.level_size(zoom.max_level - 4)[::-1]
    finally:
        slide.close()
        reference.close()


def test_tile_cache_is_bounded_in_bytes():
    cache = TileCache(limit_bytes=100)
    for k in range(5):
        cache.put((k,), bytes(30))
    assert cache.size <= 100 and cache.get((0,)) is None and cache.get((4,)) == bytes(30)
    cache.get((2,))                          # used: kept over the older (3,)
    cache.put((5,), bytes(30))
    assert cache.get((2,)) is not None and cache.get((3,)) is None
