"""Extraction straight from slides: the same features as the PNG patches of the same pixels, resumable."""

import numpy as np
import pandas as pd

from stainmil.data.cohort import load_manifest
from stainmil.features.extract import extract_features
from stainmil.features.store import load_features, read_slice, slice_file
from stainmil.pipeline import tile_cohort
from stainmil.slides.reader import patch_refs, read_patch
from tests.conftest import slide_config


def test_features_from_the_slide_equal_features_of_the_png_patches(slide_cohort, prepared, tmp_path):
    """A 40x slide read at its 2x level (= the 20x slice, lossless) gives the PNG patches' features exactly."""
    config = slide_config(slide_cohort, tmp_path, "features.num_workers=1")
    tile_cohort(config)
    slides = load_manifest(config)
    summary = extract_features(config, slides)
    assert summary.patches_written == len(slides)
    from_slides = load_features(config.paths.store, slides)
    patches = load_manifest(prepared)
    from_pngs = load_features(prepared.paths.store, patches)
    key = ["case", "stain", "slice", "x", "y"]
    halved = slides.assign(x=slides["x"] // 2, y=slides["y"] // 2)  # level-0 (40x) corners -> 20x corners
    joined = halved.reset_index().merge(patches.reset_index(), on=key, suffixes=("_slide", "_png"))
    assert len(joined) > 0.85 * len(slides)
    a = from_slides[joined["index_slide"].to_numpy()].astype(np.float32)
    b = from_pngs[joined["index_png"].to_numpy()].astype(np.float32)
    assert np.abs(a - b).max() <= 2e-3  # fp16 store; batches of other composition round differently
    for _, row in joined.head(20).iterrows():  # the pixels themselves are identical
        ref = patch_refs(slides.iloc[[row["index_slide"]]])[0]
        assert np.array_equal(read_patch(ref, 32), read_patch(row["path_png"], 32))
    features, coords, _ = read_slice(slice_file(config.paths.store, *slides.iloc[0][["case", "stain", "slice"]]))
    first = slides[(slides[["case", "stain", "slice"]] == slides.iloc[0][["case", "stain", "slice"]]).all(axis=1)]
    assert np.array_equal(coords, first[["x", "y"]].to_numpy())  # the store keeps level-0 coordinates
    assert extract_features(config, slides).slices_written == 0  # finished slices are skipped on re-run
    pd.testing.assert_frame_equal(load_manifest(config), slides)
