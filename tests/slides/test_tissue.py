"""Tissue masks from slides read through OpenSlide: Dice >= 0.9 on every stain, pen marks and glass excluded."""

import numpy as np
import pytest

from stainmil.slides.reader import Slide
from stainmil.slides.tissue import tissue_mask
from stainmil.slides.write import write_pyramidal_tiff


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks."""
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))

@pytest.mark.parametrize("stain", ["he", "melan", "sox10"])
def test_tissue_dice_at_least_0_9_on_every_stain_through_openslide(stain, rendered, tmp_path):
    for label in (0, 1):  # high-grade slices have dark, DAB-rich lesions that fool linear thresholds
        rgb, truth = rendered[stain, label]
        big = rgb.repeat(4, 0).repeat(4, 1)  # a "40x" slide of the rendered 10x slice
        slide = Slide(write_pyramidal_tiff(tmp_path / f"{stain}{label}.tiff", big, mpp=0.25, tile=128))
        mask = tissue_mask(slide.thumbnail(4))  # read from the 4x level, as tiling does
        assert dice(mask, truth) >= 0.9, (stain, label, dice(mask, truth))


def test_pen_marks_and_glass_are_not_tissue(rendered):
    rgb, truth = rendered["he", 1]
    marked = rgb.copy()
    marked[10:30, 20:200] = (30, 90, 170)  # a blue marker line across tissue and glass
    marked[200:230, 10:40] = (40, 150, 80)  # a green dot
    marked[240:270, 10:40] = (32, 148, 44)  # a pure green marker (the synthetic sections' --artefacts pen)
    mask = tissue_mask(marked)
    assert not mask[12:28, 20:200].any() and not mask[202:228, 12:38].any() and not mask[242:268, 12:38].any()
    assert dice(mask[40:], truth[40:]) >= 0.9
    glass = np.clip(np.random.default_rng(0).normal(242, 2, (64, 64, 3)), 0, 255).astype(np.uint8)
    assert tissue_mask(glass).mean() < 0.01
