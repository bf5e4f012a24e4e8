"""The cell-scale refinement's parts: sub-pixel peaks, windows read through a transform, a known shift found and
composed back into a transform file's form, and the verdict it feeds (end to end on neighbouring sections:
tests/data/test_serial_wsi.py)."""

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from stainmil.data.serial_wsi import make_block, make_section, write_section_tiff
from stainmil.slides.reader import Slide
from stainmil.slides.refine import (
    MIN_EXTENT_UM,
    Refinement,
    _compose,
    _peak,
    _Reader,
    _Shifted,
    cover_radius,
    coverage,
    judge,
    normalised_correlation,
    reach_um,
    refine_spacing,
    refine_transform,
    window_centres,
)
from stainmil.slides.register import FULL, START, STRETCH_UM, coarse_effort, read_section
from stainmil.slides.transform import PairQuality, PairTransform


def test_a_peak_is_found_to_a_tenth_of_a_pixel():
    rows, cols = np.mgrid[0:41, 0:41].astype(float)
    for true in ((20.3, 17.6), (5.8, 30.25)):
        score = np.exp(-((rows - true[0]) ** 2 + (cols - true[1]) ** 2) / 8.0)
        score += np.random.default_rng(0).normal(0, 0.01, score.shape)
        place, value, z = _peak(score)
        assert np.abs(place - true).max() < 0.1 and value > 0.9 and z > 10


def test_the_correlation_is_skimage_s_match_template():
    from skimage.feature import match_template

    rng = np.random.default_rng(3)
    search = rng.normal(size=(112, 112))
    template = search[30:94, 7:71] + rng.normal(0, 0.5, (64, 64))
    search[:, 100:] = 0.0  # a flat strip: no division by zero
    ours = normalised_correlation(search, template)
    assert np.allclose(ours, match_template(search, template), atol=1e-9)
    assert np.unravel_index(ours.argmax(), ours.shape) == (30, 7)


def test_a_flat_map_has_no_standout_peak():
    score = np.random.default_rng(1).normal(0.1, 0.02, (49, 49))
    assert _peak(score)[2] < 5


@pytest.fixture(scope="module")
def section_slide(tmp_path_factory):
    """A 1.2 mm H&E section at 1 µm/px, and its thumbnail at 8 µm/px."""
    folder = tmp_path_factory.mktemp("refine")
    section = make_section(make_block(21, 1, 1200.0), "he", 1.0, seed=1, flip=False)
    path = write_section_tiff(section, folder / "C021_HE_S0.tiff", workers=1)
    return path, read_section(path, 8.0)


def _translation(shift_um, grid=(8, 8), spacing=200.0):
    affine = np.eye(3)
    affine[:2, 2] = shift_um
    zero = np.zeros((2, *grid))
    return PairTransform(affine, zero, zero.copy(), spacing, False)


def test_a_known_shift_is_measured_and_composed_away(section_slide):
    """The slide against itself through a transform 9 µm and -6 µm off: the refinement measures the shift at its
    windows and the composed transform (same affine/u/v form) maps the slide back onto itself within half a
    refinement pixel (0.65 µm at 1.3 µm/px), 0.2 µm at the median."""
    path, thumbnail = section_slide
    slide = Slide(path)
    off = np.array([9.0, -6.0])
    result = refine_transform(slide, slide, 1.0, 1.0, _translation(off), thumbnail.tissue, thumbnail.spacing,
                              spacing_um=refine_spacing(1200.0, 1.0, 2.0), windows=60)
    assert result.transform is not None, result.reason
    assert result.share > 0.8 and result.scatter_um < 0.3
    points = np.array([[400.0, 500.0], [600.0, 650.0], [700.0, 450.0]])
    for mapped in (result.transform.fixed_to_moving(points), result.transform.moving_to_fixed(points)):
        error = np.linalg.norm(mapped - points, axis=1)
        assert np.median(error) < 0.2 and error.max() < 0.65, error
    # the windows read and matched in three threads, on one slide handle: the very same refinement
    threaded = refine_transform(slide, slide, 1.0, 1.0, _translation(off), thumbnail.tissue, thumbnail.spacing,
                                spacing_um=refine_spacing(1200.0, 1.0, 2.0), windows=60, threads=3)
    assert (threaded.accepted, threaded.peak, threaded.scatter_um) == (result.accepted, result.peak, result.scatter_um)
    for name in ("affine", "u", "v"):
        assert np.array_equal(getattr(threaded.transform, name), getattr(result.transform, name)), name
    slide.close()


def test_windows_read_through_a_flip_and_a_rotation_show_the_same_tissue(section_slide):
    """A window read through a mirrored, rotated affine map and read back through its inverse map is the window
    read directly: the reader's geometry (row/column order, pixel centres, the level chosen) is right."""
    path, _ = section_slide
    reader = _Reader(Slide(path), 1.0)
    angle = 0.6
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.diag([-1.0, 1.0])
    centre = np.array([600.0, 600.0])
    side, spacing = 64, 2.0
    direct = reader.window(np.eye(2) * spacing, centre - side * spacing / 2, side, spacing)
    matrix = turn * spacing  # output px -> µm, mirrored and rotated about the window's centre
    turned = reader.window(matrix, centre - matrix @ np.full(2, side / 2), side, spacing)
    # undo the turn: the direct window's pixel at offset rel from the centre is the turned window's at turn^-1 rel
    rows, cols = np.mgrid[0:side, 0:side].astype(float) + 0.5
    xy = np.stack([cols.ravel(), rows.ravel()]) - side / 2
    inverse = np.linalg.inv(turn) @ xy + side / 2 - 0.5  # (x, y) in turned's pixels
    back = ndimage.map_coordinates(turned, [inverse[1], inverse[0]], order=1).reshape(side, side)
    inner = slice(12, -12)
    assert np.corrcoef(back[inner, inner].ravel(), direct[inner, inner].ravel())[0, 1] > 0.9


def test_a_chain_of_corrections_composes_into_one_transform():
    root = _translation(np.array([3.0, 0.0]), grid=(40, 40), spacing=25.0)

    class Constant:
        def __init__(self, d):
            self.d = np.asarray(d, float)

        def __call__(self, points_mm):
            return np.broadcast_to(self.d, points_mm.shape).copy()

    chain = _Shifted(root).then(Constant([1.0, 2.0])).then(Constant([-0.5, 0.5]))
    points = np.array([[300.0, 400.0], [700.0, 200.0]])
    expected = points + [1.0 - 0.5 + 3.0, 2.0 + 0.5]
    assert np.allclose(chain.fixed_to_moving(points), expected)
    composed = _compose(chain)
    assert np.allclose(composed.fixed_to_moving(points), expected, atol=1e-6)
    assert np.allclose(composed.moving_to_fixed(expected), points, atol=1e-3)


def _quality(verdict="aligned", reason="outlines, overlap and scale agree"):
    return PairQuality(0.95, 0.01, 1.0, 0.8, float("nan"), 0, verdict, reason)


def _refinement(applied=True, accepted=200, windows=300, scatter=0.4, coverage=0.98):
    transform = _translation(np.zeros(2)) if applied else None
    return Refinement(transform, windows, accepted, 0.3, scatter, 5.0, 1.0, "" if applied else "no support",
                      coverage)


def test_the_refinement_s_evidence_decides_the_verdict():
    assert judge(_quality(), _refinement(applied=False), 2.0).verdict == "doubtful"
    assert "no support" in judge(_quality(), _refinement(applied=False), 2.0).reason
    assert judge(_quality(), _refinement(scatter=6.0), 2.0).verdict == "doubtful"  # > 2 px at 2 µm/px
    assert judge(_quality(), _refinement(accepted=60), 2.0).verdict == "doubtful"  # a fifth of the windows
    # a third of the windows agree, the rest of the field interpolated between them: not enough for aligned
    third = judge(_quality(), _refinement(accepted=103, windows=343), 2.0)
    assert third.verdict == "doubtful" and "fewer than 50%" in third.reason
    patchy = judge(_quality(), _refinement(coverage=0.7), 2.0)  # a third of the tissue extrapolated
    assert patchy.verdict == "doubtful" and "cover 70% of the tissue" in patchy.reason
    strong = judge(_quality(), _refinement(), 2.0)
    assert strong.verdict == "aligned" and "200 of 300 windows agree" in strong.reason
    # a doubt the windows answer (a torn outline) becomes aligned; one they cannot (a scale change) stays
    torn = _quality("doubtful", "outlines 0.018 of the diameter apart > 0.015")
    assert judge(torn, _refinement(), 2.0).verdict == "aligned"
    scaled = _quality("doubtful", "scale change 1.10x")
    assert judge(scaled, _refinement(), 2.0).verdict == "doubtful"
    failed = replace(_quality(), verdict="failed", reason="not one block")
    assert judge(failed, _refinement(), 2.0) == failed


def test_a_large_section_whose_every_window_agrees_is_covered_whole():
    """The ~300 windows of a 20 mm section lie ~900 µm apart, more than 2 finest windows (512 µm): the radius follows
    the grid there (and stays 2 windows where the grid is finer), so every window agreeing covers all the tissue."""
    tissue = np.zeros((2500, 2500), bool)
    yy, xx = np.mgrid[:2500, :2500]
    tissue[(yy - 1250) ** 2 + (xx - 1250) ** 2 < 1100**2] = True       # a 17.6 mm disc at 8 µm/px
    centres = window_centres(tissue, 8.0, 300, 256.0)
    radius = cover_radius(centres, 256.0)
    assert radius > 1.4 * 800 and coverage(tissue, 8.0, centres, radius) > 0.97
    assert coverage(tissue, 8.0, centres, 2 * 256.0) < 0.9                # the old radius: doubtful though all agree
    small = window_centres(tissue[:500, :500] | True, 8.0, 300, 64.0)    # a 4 mm square: a fine grid
    assert cover_radius(small, 256.0) == 512.0


def test_coverage_is_the_tissue_near_an_agreeing_window():
    tissue = np.zeros((100, 100), bool)
    tissue[10:90, 10:90] = True  # 80 x 80 px at 10 µm/px
    assert coverage(tissue, 10.0, np.array([[500.0, 500.0]]), 2000.0) == 1.0
    half = coverage(tissue, 10.0, np.array([[150.0, 500.0]]), 400.0)  # the left half only
    assert 0.4 < half < 0.6
    assert coverage(tissue, 10.0, np.zeros((0, 2)), 400.0) == 0.0


def test_small_sections_are_left_to_the_coarse_stages_and_mid_sized_ones_refined_finer():
    assert refine_spacing(MIN_EXTENT_UM - 1, 0.25, 2.0) is None  # the small serial preset's 0.2 mm sections
    assert refine_spacing(8000.0, 0.5, 2.0) == 2.0
    assert 1.0 < refine_spacing(1000.0, 0.5, 2.0) < 2.0
    assert refine_spacing(1000.0, 1.5, 2.0) == 1.5  # never finer than level 0


def test_the_coarse_chain_is_a_lighter_start_before_the_refinement_and_keeps_its_bspline_where_that_reaches_little():
    """No refinement: the full coarse chain. A section large enough for every pass (its first searches +-192 µm):
    fewer samples and iterations, no B-spline (the refinement takes the stretch). A 1 mm section, refined at
    1.3 µm/px with its wide passes left out, searches +-60 µm: its B-spline stage stays."""
    assert coarse_effort(None) == FULL and FULL.nonrigid
    large, small = reach_um(8000.0, 2.0), reach_um(1000.0, refine_spacing(1000.0, 0.5, 2.0))
    assert large == pytest.approx(8.0 * 24) and small < STRETCH_UM <= large
    assert coarse_effort(large) == START and not START.nonrigid
    assert START.samples < FULL.samples and START.iterations < FULL.iterations
    assert coarse_effort(small).nonrigid and coarse_effort(small).samples == START.samples
