"""Slides through real OpenSlide: generic pyramidal TIFF and Aperio-style files written by tifffile."""

import numpy as np
import openslide
import pytest
from PIL import Image

from stainmil.slides.reader import PatchRef, Slide, UnreadableSlide, best_level, read_patch
from stainmil.slides.write import write_pyramidal_tiff


def _image(h=600, w=900):
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_generic_tiff_reads_with_mpp_and_exact_pixels(tmp_path):
    rgb = _image()
    path = write_pyramidal_tiff(tmp_path / "s.tiff", rgb, mpp=0.25, tile=128)
    assert openslide.OpenSlide(str(path)).properties["openslide.vendor"] == "generic-tiff"
    slide = Slide(path)
    assert slide.dimensions == (900, 600) and slide.level_downsamples == (1.0, 2.0, 4.0)
    assert slide.mpp == pytest.approx(0.25) and slide.magnification is None
    assert np.array_equal(slide.read_region(100, 50, 0, 64), rgb[50:114, 100:164])
    assert np.array_equal(read_patch(PatchRef(str(path), 100, 50, 0, 64), 64), rgb[50:114, 100:164])
    level1 = np.asarray(Image.fromarray(rgb).resize((450, 300), Image.BOX))
    assert np.array_equal(slide.read_region(200, 100, 1, 32), level1[50:82, 100:132])


def test_aperio_description_gives_mpp_and_magnification(tmp_path):
    path = write_pyramidal_tiff(tmp_path / "s.svs", _image(), mpp=0.2525, magnification=40, aperio=True, tile=128)
    assert openslide.OpenSlide(str(path)).properties["openslide.vendor"] == "aperio"
    slide = Slide(path)
    assert slide.mpp == pytest.approx(0.2525) and slide.magnification == 40


def test_region_outside_the_slide_is_white_and_plain_images_read_too(tmp_path):
    rgb = _image(100, 120)
    Image.fromarray(rgb).save(tmp_path / "s.png")
    slide = Slide(tmp_path / "s.png")
    assert slide.dimensions == (120, 100) and slide.mpp is None
    region = slide.read_region(100, 90, 0, 32)
    assert np.array_equal(region[:10, :20], rgb[90:, 100:]) and (region[10:] == 255).all()
    tiff = Slide(write_pyramidal_tiff(tmp_path / "t.tiff", rgb, mpp=0.5, tile=64))
    assert (tiff.read_region(100, 90, 0, 32)[10:] == 255).all()


def test_unreadable_and_truncated_files_are_named(tmp_path):
    (tmp_path / "junk.svs").write_bytes(b"not a slide at all")
    with pytest.raises(UnreadableSlide, match="junk.svs"):
        Slide(tmp_path / "junk.svs")
    path = write_pyramidal_tiff(tmp_path / "cut.tiff", _image(1024, 1024), mpp=0.5, tile=128)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # tiles at the end are gone, the directory may be too
    with pytest.raises(UnreadableSlide, match="cut.tiff"):
        slide = Slide(path)
        slide.read_region(896, 896, 0, 128)
        slide.thumbnail(1)


def test_best_level_reads_at_or_finer_than_asked():
    downsamples = (1.0, 4.0, 16.0)
    assert best_level(downsamples, 2.0) == 0
    assert best_level(downsamples, 4.0) == 1
    assert best_level(downsamples, 3.99) == 1  # within 1%
    assert best_level(downsamples, 100.0) == 2


def test_thumbnail_of_a_slide_without_pyramid_is_read_in_bands(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    slide = Slide(write_pyramidal_tiff(tmp_path / "flat.tiff", rgb, mpp=0.5, tile=128, max_levels=1))
    whole = slide.thumbnail(1)
    assert np.array_equal(whole, rgb)
    banded = slide.thumbnail(4, band_pixels=300 * 16)  # 16 rows per band
    reference = np.asarray(Image.fromarray(rgb).resize((75, 50), Image.BILINEAR)).astype(int)
    assert banded.shape == (50, 75, 3)
    assert np.abs(banded.astype(int) - reference).mean() < 3  # seams between bands are the only difference


def test_a_reader_keeps_its_own_bounded_handles_and_a_copy_starts_empty(tmp_path):
    """No process-wide cache of open slides: each reader owns a SlideHandles, closes the least recently used past
    its limit, and a pickled copy (a DataLoader worker) opens its own."""
    import pickle

    from stainmil.slides.reader import SlideHandles

    paths = []
    for i in range(3):
        rgb = np.full((64, 64, 3), 40 * (i + 1), dtype=np.uint8)
        paths.append(str(tmp_path / f"s{i}.png"))
        Image.fromarray(rgb).save(paths[-1])
    slides = SlideHandles(limit=2)

    def touch(path):
        with slides.reading(path) as slide:
            return slide

    first = touch(paths[0])
    assert touch(paths[0]) is first and len(slides) == 1
    touch(paths[1])
    touch(paths[2])                            # past the limit: s0, least recently used, is closed
    assert len(slides) == 2 and touch(paths[0]) is not first
    # never closed while another thread reads it: past the limit, idle slides go first, busy ones wait
    with slides.reading(paths[1]) as busy, slides.reading(paths[2]):
        touch(paths[0])                        # s0 is the only idle one: it is closed, s1 and s2 stay
        assert len(slides) == 2 and busy.read_region(0, 0, 0, 8).shape == (8, 8, 3)
        with slides.reading(paths[0]):         # three read at once: three stay open
            assert len(slides) == 3
    assert len(slides) == 2                    # their reads over: back to the limit
    ref = PatchRef(paths[1], 0, 0, 0, 64)
    assert np.array_equal(read_patch(ref, 64, slides), read_patch(ref, 64))  # through handles = opened once
    copy = pickle.loads(pickle.dumps(slides))
    assert len(copy) == 0 and copy.limit == 2
    slides.close()
    assert len(slides) == 0
