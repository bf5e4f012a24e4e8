import numpy as np
import pytest
from PIL import Image

from stainmil.config import TileConfig, load_config
from stainmil.data.cohort import build_index
from stainmil.data.synth import _style, render_slice
from stainmil.data.tiling import dice, tile_folder, tissue_mask
from stainmil.errors import DataError


@pytest.mark.parametrize("stain", ["he", "melan", "sox10"])
def test_tissue_detection_on_every_stain_dice_at_least_0_9(stain):
    scores = []
    for seed in range(3):
        for label in (0, 1):  # high-grade slices have dark, DAB-rich lesions that fool linear thresholds
            rgb, tissue, _ = render_slice(np.random.default_rng(seed), stain, 192, _style(label, 1.0))
            scores.append(dice(tissue_mask(rgb), tissue))
    assert min(scores) >= 0.9, scores


def test_blank_glass_has_no_tissue():
    glass = np.clip(np.random.default_rng(0).normal(242, 2, (64, 64, 3)), 0, 255).astype(np.uint8)
    assert tissue_mask(glass).mean() < 0.01


def test_tile_folder_then_index(tiny_cohort, tmp_path):
    config = TileConfig(slices_dir=str(tiny_cohort / "slices"), out_dir=str(tmp_path / "tiles"), patch_size=32,
                        mask_downsample=1)
    out, table, skipped = tile_folder(config)
    assert len(table) > 0 and (out / "tiles.csv").is_file()
    assert skipped["name does not match tile.filename_pattern"]  # the *_tissue.png / *_lesion.png masks
    row = table.iloc[0]
    patch = np.asarray(Image.open(out / row["file"]))
    source = np.asarray(Image.open(tiny_cohort / "slices" / f"case{row['case']}" / row["stain"]
                                   / f"slice{row['slice']}.png"))
    assert np.array_equal(patch, source[row["y"]:row["y"] + 32, row["x"]:row["x"] + 32])
    index_config = load_config(None, [f"data.patches_dir={out}", f"data.labels_csv={tiny_cohort / 'labels.csv'}",
                                      f"output_dir={tmp_path / 'work'}"])
    result = build_index(index_config)
    assert result.report["files_used"] == len(table)
    assert result.report["cases_used"] == 8


def test_tile_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        tile_folder(TileConfig(slices_dir=str(tmp_path / "none"), out_dir=str(tmp_path / "o")))
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="matches"):
        tile_folder(TileConfig(slices_dir=str(tmp_path / "s"), out_dir=str(tmp_path / "o")))
