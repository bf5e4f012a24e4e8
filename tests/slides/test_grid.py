"""Scale requests: level choice and resizing (40x asked for 20x), mpp vs magnification, missing metadata;
the grid's tissue fractions; the slide route's coordinates equal the PNG route's on the same pixels."""

import numpy as np
import pytest
from PIL import Image

from stainmil.config import TileConfig
from stainmil.errors import DataError
from stainmil.slides.grid import NoScale, patch_grid, read_plan, tissue_fractions
from stainmil.slides.reader import Slide
from stainmil.slides.tissue import tissue_mask
from stainmil.slides.write import write_pyramidal_tiff


def _slide(tmp_path, name="s.tiff", size=1024, **kwargs):
    rgb = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Slide(write_pyramidal_tiff(tmp_path / name, rgb, tile=128, **kwargs)), rgb


def test_40x_asked_for_20x_reads_level_1(tmp_path):
    slide, rgb = _slide(tmp_path, "s.svs", mpp=0.25, magnification=40, aperio=True)
    for request in (TileConfig(patch_size=224, magnification=20), TileConfig(patch_size=224, mpp=0.5)):
        plan = read_plan(slide, request)
        assert (plan.level, plan.read_size, plan.size0) == (1, 224, 448)
        assert plan.target_mpp == pytest.approx(0.5) and plan.target_magnification == pytest.approx(20)
    plan = read_plan(slide, TileConfig(patch_size=224, magnification=10))  # 4x: level 2 of a 1024-px slide
    assert (plan.level, plan.read_size, plan.size0) == (2, 224, 896)


def test_without_a_2x_level_it_reads_level_0_and_shrinks(tmp_path):
    slide, rgb = _slide(tmp_path, size=200, mpp=0.25)  # 200 px < 2 tiles: a single level
    assert slide.level_downsamples == (1.0,)
    plan = read_plan(slide, TileConfig(patch_size=32, mpp=0.5, stride=16))
    assert (plan.level, plan.read_size, plan.size0, plan.stride0) == (0, 64, 64, 32)


def test_missing_scale_stops_unless_the_user_states_it(tmp_path):
    slide, _ = _slide(tmp_path)  # no mpp, no magnification
    with pytest.raises(NoScale, match="tile.slide_mpp"):
        read_plan(slide, TileConfig(magnification=20))
    plan = read_plan(slide, TileConfig(patch_size=100, magnification=20, slide_mpp=0.25))
    assert plan.size0 == 200 and plan.scale_source == "tile.slide_mpp"
    plan = read_plan(slide, TileConfig(patch_size=100))  # no request: pixels of level 0 as they are
    assert (plan.level, plan.size0, plan.target_mpp) == (0, 100, None)
    with pytest.raises(DataError, match="finer than the scan"):
        read_plan(Slide(write_pyramidal_tiff(tmp_path / "m.tiff", np.zeros((64, 64, 3), np.uint8), mpp=0.5)),
                  TileConfig(mpp=0.25))


def test_tissue_fractions_count_the_mask_under_each_square():
    mask = np.zeros((10, 10), bool)
    mask[:5, :5] = True
    fractions = tissue_fractions(mask, 4.0, np.array([0, 0, 20]), np.array([0, 8, 20]), 20)  # level-0 squares
    assert fractions.tolist() == [1.0, pytest.approx(0.6), 0.0]


def test_slide_route_coordinates_equal_the_png_route(rendered, tmp_path):
    """The same lossless pixels as a PNG slice and as a pyramidal TIFF give the same grid."""
    rgb, _ = rendered["sox10", 1]
    Image.fromarray(rgb).save(tmp_path / "slice.png")
    config = TileConfig(patch_size=32, min_tissue=0.5, mask_downsample=1)
    grids = []
    for path in (tmp_path / "slice.png", write_pyramidal_tiff(tmp_path / "slice.tiff", rgb, mpp=0.5, tile=64)):
        slide = Slide(path)
        plan = read_plan(slide, config)
        mask = tissue_mask(slide.thumbnail(1))
        grids.append(patch_grid(slide, plan, mask, 1.0, config.min_tissue))
    assert len(grids[0][0]) > 10
    assert np.array_equal(grids[0][0], grids[1][0]) and np.array_equal(grids[0][1], grids[1][1])
