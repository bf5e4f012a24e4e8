"""Real-size serial sections: streamed into pyramidal TIFFs in bounded memory, read back as drawn; neighbouring
sections (their own cells on the block's architecture) registered to the cell at 1 mm and 4 mm, a pair with nothing
inside in common doubtful, a pair from two blocks failed."""

import dataclasses
import tracemalloc

import numpy as np
import openslide
import pytest

from stainmil.config import load_config
from stainmil.data.register_cohort import register_slides
from stainmil.data.serial_wsi import make_block, make_section, pair_errors, section_landmarks, write_section_tiff


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
    assert peaks[3600] < 3600**2 * 3, peaks  # less than the slide's own pixels (a tile sees 4 lattice cells a point)
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


def test_neighbouring_sections_share_the_chosen_share_of_their_nuclei():
    """Two sections of one block show the same cells only in the ``overlap`` share of the lattice cells; the
    block's architecture (cell density, fibres) is shared whatever the overlap."""
    block = make_block(9, 1, 2000.0)
    rng = np.random.default_rng(0)
    points = rng.uniform(300, 1700, (60_000, 2))  # block µm
    lesion = np.zeros(len(points))

    def nuclei(overlap, seed):
        section = make_section(block, "he", 0.5, seed=seed, flip=False, overlap=overlap)
        return section._stain(points, lesion)[0]

    same = [np.corrcoef(nuclei(share, 1), nuclei(share, 2))[0, 1] for share in (1.0, 0.35, 0.0)]
    assert same[0] > 0.99 and same[2] + 0.05 < same[1] < 0.6, same
    # where cells crowd is the block's: shared even with no cell in common
    density = np.corrcoef(_density(nuclei(0.0, 2), points), _density(nuclei(0.0, 3), points))[0, 1]
    assert density > 0.3, density


def _density(values: np.ndarray, points: np.ndarray, cell: float = 100.0) -> np.ndarray:
    """Mean of ``values`` over 100 µm squares (the cell density's scale)."""
    keys = np.floor(points / cell).astype(int)
    flat = keys[:, 0] * 1000 + keys[:, 1]
    _, index = np.unique(flat, return_inverse=True)
    return np.bincount(index, values) / np.bincount(index)


def _pair(tmp_path, side_mm, mpp, moving_block=None, name="melan"):
    """(H&E path, IHC path) of two neighbouring sections of one block (the IHC one flipped), landmarks beside."""
    block = make_block(3, 1, side_mm * 1000)
    paths = []
    for stain, section in (("he", make_section(block, "he", mpp, seed=1, flip=False)),
                           (name, make_section(moving_block or block, "melan", mpp, seed=2, flip=True))):
        path = write_section_tiff(section, tmp_path / f"{side_mm}_{stain}.tiff", workers=2)
        section_landmarks(section).to_csv(tmp_path / f"{side_mm}_{stain}_landmarks.csv", index=False)
        paths.append(path)
    return paths


def _register(paths, side_mm, mpp, windows=300):
    register = dataclasses.replace(load_config(None).register, refine_windows=windows)
    return register_slides(*paths, (mpp, mpp), (side_mm * 1000, side_mm * 1000), register)


@pytest.mark.parametrize("side_mm, mpp, p90", [(1.0, 0.5, 10.0), (4.0, 1.0, 8.0)])
def test_neighbouring_sections_register_to_the_cell(tmp_path, side_mm, mpp, p90):
    """Neighbouring sections (their own nuclei but a third, a stronger or weaker stain, the IHC one face down) at
    1 mm (2,000 px) and 4 mm (4,000 px): the landmarks within 4 µm (median) and 8 µm (p90; 10 µm at 1 mm, where
    the synthetic stretch varies over a third of a millimetre, about one refinement window), and the verdict says
    what the cell-scale refinement found."""
    paths = _pair(tmp_path, side_mm, mpp)
    result, refinement = _register(paths, side_mm, mpp)
    assert refinement is not None and refinement.transform is not None, refinement
    # at 1 mm a quarter of the windows agree: applied, but the verdict stays doubtful (< 50 %)
    assert result.quality.verdict == ("aligned" if side_mm > 1 else "doubtful"), result.quality
    assert "windows agree" in result.quality.reason
    error = pair_errors(result.transform, *paths)
    assert len(error) >= 20 and np.median(error) <= 4.0 and np.percentile(error, 90) <= p90, (
        side_mm, np.median(error), np.percentile(error, 90), refinement.attrs())


def test_a_pair_the_refinement_cannot_support_is_doubtful_and_another_block_fails(tmp_path):
    """The same outline with nothing inside in common (another block's lesion, cells, density and fibres in this
    block's tissue): the coarse stages align the outlines, the cell-scale windows inside find no support —
    ``doubtful``, with the reason, and the coarse transform kept. A section of another block fails before any
    refinement."""
    block = make_block(3, 1, 2000.0)
    stranger = make_block(8, 1, 2000.0)
    stranger.tissue, stranger.landmarks = block.tissue, block.landmarks
    paths = _pair(tmp_path, 2.0, 1.0, moving_block=stranger)
    result, refinement = _register(paths, 2.0, 1.0, windows=100)
    assert refinement is not None and refinement.transform is None
    assert result.quality.verdict == "doubtful" and "cell-scale refinement found support in" in result.quality.reason
    assert result.transform is not None
    other = make_section(make_block(4, 0, 2000.0), "sox10", 1.0, seed=3, flip=False)
    cross, skipped = _register((paths[0], write_section_tiff(other, tmp_path / "other.tiff", workers=2)), 2.0, 1.0)
    assert cross.quality.verdict == "failed" and skipped is None, cross.quality
