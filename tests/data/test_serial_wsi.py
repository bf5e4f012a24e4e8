"""Real-size serial sections: streamed into pyramidal TIFFs in bounded memory, read back as drawn, and registered
within a few registration pixels at two physical sizes (the same motions), a pair from two blocks failed."""

import tracemalloc

import numpy as np
import openslide
import pytest

from stainmil.config import load_config
from stainmil.data.registration import registration_scale
from stainmil.data.serial_wsi import landmarks_of, make_block, make_section, section_landmarks, write_section_tiff
from stainmil.slides.register import read_section, register_sections


def test_a_section_is_streamed_in_bounded_memory_and_reads_back_as_drawn(tmp_path):
    (tmp_path / "1800").mkdir()
    (tmp_path / "3600").mkdir()
    peaks = {}
    for side in (1800, 3600):  # 4x the pixels: the same peak (a few tiles' worth), not 4x
        section = make_section(make_block(7, 1, float(side)), "sox10", mpp=1.0, seed=2, flip=True)
        assert section.size == side
        tracemalloc.start()
        path = write_section_tiff(section, tmp_path / f"{side}" / "C007_SOX10_S0.tiff", workers=1)
        peaks[side] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[3600] < 1.25 * peaks[1800] + 2e6, peaks
    assert peaks[3600] < 3600**2 * 3 / 1.5, peaks  # less than the slide's own pixels
    slide = openslide.OpenSlide(str(path))
    assert slide.level_dimensions[:3] == ((3600, 3600), (1800, 1800), (900, 900))
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(1.0)
    x, y = 1700, 1650  # a window across tile borders, read back equal to drawing it at once
    region = np.asarray(slide.read_region((x, y), 0, (300, 300)))[..., :3].astype(float)
    drawn = section.render(x, y, 300, 300).astype(float)
    assert drawn.std() > 10  # tissue with nuclei, not glass
    # the same picture; only the pixel noise differs (it is seeded per drawn window, here 4 tiles vs 1 window)
    assert np.abs(region - drawn).mean() < 2.5 and np.corrcoef(region.ravel(), drawn.ravel())[0, 1] > 0.95
    level1 = np.asarray(slide.read_region((0, 0), 1, (1800, 1800)))[..., :3].astype(float)
    assert 100 < level1.mean() < 245 and level1.std() > 10  # tissue shows at the downsampled levels too
    slide.close()


def test_the_same_motions_register_alike_at_two_physical_sizes(tmp_path):
    """The same block and motions cut at 1 mm and at 4 mm (registered at 2.6 and 8 µm/px): neither fails, the
    landmark error is under 0.6% of the section's side (median; 1.2% at p90) at both, and a section of another
    block fails. (Measured: about 0.4%: the error follows the motion's size, not the pixel size — see
    docs/performance.md.)"""
    register = load_config(None).register
    for side_mm, mpp in ((1.0, 1.0), (4.0, 4.0)):  # 1,000 px slides, registered at 2.6 and 8 µm/px
        block, other = make_block(3, 1, side_mm * 1000), make_block(4, 0, side_mm * 1000)
        spacing, mesh = registration_scale(register, mpp, side_mm * 1000)
        he = make_section(block, "he", mpp, seed=1, flip=False)
        paths = {}
        sections = [("he", he), ("melan", make_section(block, "melan", mpp, seed=2, flip=True))]
        if side_mm > 1:  # (pairs from two blocks at small sizes: tests/slides/test_register.py)
            sections.append(("other", make_section(other, "sox10", mpp, seed=3, flip=False)))
        for name, section in sections:
            paths[name] = write_section_tiff(section, tmp_path / f"{side_mm}_{name}.tiff", workers=1)
            section_landmarks(section).to_csv(tmp_path / f"{side_mm}_{name}_landmarks.csv", index=False)
        fixed = read_section(paths["he"], spacing)
        result = register_sections(fixed, read_section(paths["melan"], spacing), mesh_nodes=mesh)
        assert result.quality.verdict != "failed", (side_mm, result.quality)
        lf, lm = landmarks_of(paths["he"]), landmarks_of(paths["melan"])
        ids = lf.index.intersection(lm.index)
        error = np.linalg.norm(result.transform.moving_to_fixed(lm.loc[ids].to_numpy()) - lf.loc[ids].to_numpy(),
                               axis=1)
        side_um = side_mm * 1000
        assert len(ids) >= 20 and np.median(error) < 0.006 * side_um and np.percentile(error, 90) < 0.012 * side_um, (
            side_mm, spacing, np.median(error), np.percentile(error, 90))
    cross = register_sections(fixed, read_section(paths["other"], spacing), mesh_nodes=mesh)
    assert cross.quality.verdict == "failed", cross.quality
