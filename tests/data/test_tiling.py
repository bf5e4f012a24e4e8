"""`stainmil tile`: the slide route (coordinates + index, no PNG), the patch route (PNG export), bad slides
named and skipped, resume after a kill, CLAM/TRIDENT-readable coordinates."""

import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stainmil.config import load_config
from stainmil.data import tiling
from stainmil.data.cohort import build_index
from stainmil.data.tiling import tile_folder
from stainmil.errors import ConfigError, DataError
from stainmil.pipeline import tile_cohort
from stainmil.slides.write import write_pyramidal_tiff
from tests.conftest import slide_config


def test_slide_route_tiles_and_indexes_without_pngs(slide_cohort, tmp_path):
    config = slide_config(slide_cohort, tmp_path)
    result, index_dir = tile_cohort(config)
    assert len(result.slides) == 24 and not result.skipped
    assert not [p for p in (tmp_path / "tiles").rglob("*.png") if "masks" not in p.parts]  # no patch written
    manifest = pd.read_parquet(index_dir / "manifest.parquet")
    assert len(manifest) == len(result.table) > 200
    assert set(manifest["path"].map(lambda p: p.rsplit(".", 1)[-1])) == {"tiff"}
    assert (manifest["level"] == 1).all() and (manifest["read_size"] == 32).all() and (manifest["size0"] == 64).all()
    assert manifest["case"].nunique() == 8 and set(manifest["stain"]) == {"he", "melan", "sox10"}
    # CLAM / TRIDENT layout
    with h5py.File(next((tmp_path / "tiles" / "coords").glob("*.h5"))) as h5:
        coords = h5["coords"]
        assert coords.shape[1] == 2 and coords.dtype == np.int64
        assert coords.attrs["patch_size"] == 32 and coords.attrs["patch_level"] == 1
        assert coords.attrs["patch_size_level0"] == 64 and coords.attrs["level0_mpp"] == pytest.approx(0.25)
        assert coords.attrs["target_magnification"] == pytest.approx(20)
    # every level-0 coordinate is the 20x PNG route's corner times 2
    truth = pd.read_csv(slide_cohort / "patch_truth.csv", dtype=str)
    png = set(zip(truth["case"], truth["stain"], truth["slice"], truth["x"].astype(int) * 2,
                  truth["y"].astype(int) * 2))
    ours = set(zip(manifest["case"], manifest["stain"], manifest["slice"], manifest["x"], manifest["y"]))
    assert len(ours & png) / len(ours | png) >= 0.85  # tissue from pixels vs the renderer's own mask


def test_patch_route_exports_pngs_named_with_x_y(tiny_cohort, tmp_path):
    config = load_config(None, [f"tile.slices_dir={tiny_cohort / 'slices'}", f"tile.out_dir={tmp_path / 'tiles'}",
                                "tile.patch_size=32", "tile.mask_downsample=1", f"output_dir={tmp_path / 'work'}"])
    result, index_dir = tile_cohort(config)
    assert index_dir is None and len(result.table) > 0
    assert result.skipped[tiling.NO_MATCH]  # the *_tissue.png / *_lesion.png masks
    row = result.table.iloc[0]
    patch = np.asarray(Image.open(tmp_path / "tiles" / row["file"]))
    source = np.asarray(Image.open(tiny_cohort / "slices" / f"case{row['case']}" / row["stain"]
                                   / f"slice{row['slice']}.png"))
    assert np.array_equal(patch, source[row["y"]:row["y"] + 32, row["x"]:row["x"] + 32])
    index_config = load_config(None, [f"data.patches_dir={tmp_path / 'tiles'}",
                                      f"data.labels_csv={tiny_cohort / 'labels.csv'}", f"output_dir={tmp_path / 'w'}"])
    index = build_index(index_config)
    assert index.report["files_used"] == len(result.table) and index.report["cases_used"] == 8


def test_bad_slides_are_named_and_skipped_and_the_others_finish(slide_cohort, tmp_path):
    slides = tmp_path / "slides"
    shutil.copytree(slide_cohort / "slides" / "case1", slides / "case1")
    (slides / "case2" / "he").mkdir(parents=True)
    (slides / "case2" / "he" / "slice0.svs").write_bytes(b"garbage")                           # unreadable
    good = (slides / "case1" / "he" / "slice0.tiff").read_bytes()
    (slides / "case2" / "melan").mkdir()
    (slides / "case2" / "melan" / "slice0.tiff").write_bytes(good[: len(good) // 2])            # truncated
    (slides / "case3" / "he").mkdir(parents=True)
    glass = np.full((256, 256, 3), 243, np.uint8)
    write_pyramidal_tiff(slides / "case3" / "he" / "slice0.tiff", glass, mpp=0.25, tile=64)      # no tissue
    rgb = np.asarray(Image.open(slide_cohort / "slices" / "case1" / "he" / "slice0.png"))
    write_pyramidal_tiff(slides / "case3" / "melan" / "slice0.tiff", rgb, tile=64)               # no scale
    (slides / "notes.txt").write_text("not a slide")                                             # no match
    config = slide_config(slide_cohort, tmp_path, f"tile.slices_dir={slides}")
    result = tile_folder(config)
    assert len(result.slides) == 3  # case1's three stains finished
    names = {reason: [n.split(":")[0] for n in v] for reason, v in result.skipped.items()}
    assert names[tiling.UNREADABLE] == ["case2/he/slice0.svs", "case2/melan/slice0.tiff"]
    assert names[tiling.NO_TISSUE] == ["case3/he/slice0.tiff"]
    assert names[tiling.NO_SCALE] == ["case3/melan/slice0.tiff"]
    assert names[tiling.NO_MATCH] == ["notes.txt"]
    report = (tmp_path / "tiles" / "tile_report.txt").read_text()
    assert "case2/melan/slice0.tiff" in report and "no scale metadata" in report
    index = build_index(config)
    assert "tiling: unreadable or truncated slide" in index.report["skipped"]


def test_killed_tile_resumes_to_the_same_files(slide_cohort, tmp_path, monkeypatch):
    full = tile_folder(slide_config(slide_cohort, tmp_path / "full"))
    calls = {"n": 0}
    original = tiling._tile_one

    def dies_after_five(*args, **kwargs):
        if calls["n"] == 5:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(tiling, "_tile_one", dies_after_five)
    config = slide_config(slide_cohort, tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        tile_folder(config)
    assert len(list((tmp_path / "resumed" / "tiles" / "coords").glob("*.h5"))) == 5
    assert not (tmp_path / "resumed" / "tiles" / "tiles.csv").exists()  # a partial run never looks finished
    monkeypatch.setattr(tiling, "_tile_one", original)
    resumed = tile_folder(config)
    assert calls["n"] == 5
    pd.testing.assert_frame_equal(full.table.drop(columns=["thumbnail"]), resumed.table.drop(columns=["thumbnail"]))
    for h5 in (tmp_path / "full" / "tiles" / "coords").glob("*.h5"):
        with h5py.File(h5) as a, h5py.File(tmp_path / "resumed" / "tiles" / "coords" / h5.name) as b:
            assert np.array_equal(a["coords"][()], b["coords"][()])


def test_tile_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        tile_folder(load_config(None, [f"tile.slices_dir={tmp_path / 'none'}", f"tile.out_dir={tmp_path / 'o'}"]))
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="matches"):
        tile_folder(load_config(None, [f"tile.slices_dir={tmp_path / 's'}", f"tile.out_dir={tmp_path / 'o'}"]))
    with pytest.raises(ConfigError, match="one of tile.mpp and tile.magnification"):
        tile_folder(load_config(None, [f"tile.slices_dir={tmp_path / 's'}", f"tile.out_dir={tmp_path / 'o'}",
                                       "tile.mpp=0.5", "tile.magnification=20"]))
