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
from tests.conftest import slide_config, synth_patches


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
    truth = synth_patches(slide_cohort)
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
    # a coordinates file damaged since (a crash, a bad copy) is found on the next resume, named and tiled again
    damaged = sorted((tmp_path / "resumed" / "tiles" / "coords").glob("*.h5"))[2]
    damaged.write_bytes(damaged.read_bytes()[:100])
    again = tile_folder(config)
    assert len(again.notes[tiling.REDONE]) == 1 and again.notes[tiling.REDONE][0].startswith("case")
    pd.testing.assert_frame_equal(full.table.drop(columns=["thumbnail"]), again.table.drop(columns=["thumbnail"]))


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


def _polygon_file(path, rings, name="Tumor"):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": rings},
         "properties": {"objectType": "annotation", "classification": {"name": name, "color": [200, 0, 0]}}}]}))


def test_annotations_restrict_tiling_to_inside_the_polygons_and_outside_their_holes(slide_cohort, tmp_path):
    import shapely

    plain = tile_folder(slide_config(slide_cohort, tmp_path / "plain")).table
    ann = tmp_path / "ann"
    template = str(ann / "case{case}_{stain}.geojson")
    outer = [[10, 10], [310, 15], [305, 310], [12, 300], [10, 10]]  # level-0 px; the slides are 320 x 320
    hole = [[100, 100], [230, 100], [230, 230], [100, 230], [100, 100]]  # holds the four central patch centres
    for case in ("1", "2", "3"):
        _polygon_file(ann / f"case{case}_he.geojson", [outer, hole])
    _polygon_file(ann / "case1_melan.geojson", [outer], name="Stroma")  # not of the included class
    (ann / "case2_melan.geojson").write_text("{broken")
    _polygon_file(tmp_path / "ex" / "case3_he.geojson", [[[10, 10], [310, 10], [310, 70], [10, 70], [10, 10]]],
                  name="Pen")
    config = slide_config(slide_cohort, tmp_path / "a", f"tile.include_annotations={template}",
                          "tile.include_classes=[tum*]", "tile.exclude_classes=[Pen]")
    config = config.with_overrides({"tile.exclude_annotations": str(tmp_path / "ex" / "case{case}_{stain}.geojson")})
    result = tile_folder(config)
    table = result.table
    region = shapely.Polygon(outer, [hole])
    pen = shapely.box(10, 10, 310, 70)
    inside_hole = shapely.Polygon(hole)
    for case in ("1", "2", "3"):
        part = table[(table["case"] == case) & (table["stain"] == "he")]
        centres = part[["x", "y"]].to_numpy() + part["size0"].to_numpy()[:, None] / 2
        assert len(part) >= 3
        assert shapely.contains_xy(region, centres[:, 0], centres[:, 1]).all()  # inside, never in the hole
        whole = plain[(plain["case"] == case) & (plain["stain"] == "he")]
        plain_centres = whole[["x", "y"]].to_numpy() + 32
        assert shapely.contains_xy(inside_hole, plain_centres[:, 0], plain_centres[:, 1]).any()  # the hole bites
        if case == "3":
            assert not shapely.contains_xy(pen, centres[:, 0], centres[:, 1]).any()
        assert len(part) < len(plain[(plain["case"] == case) & (plain["stain"] == "he")])
    # no file: the tissue mask, named in the report; another class only: skipped; a broken file: skipped
    untouched = table[(table["case"] == "4") & (table["stain"] == "he")]
    assert untouched[["x", "y"]].to_numpy().tolist() == plain[(plain["case"] == "4") & (plain["stain"] == "he")][
        ["x", "y"]].to_numpy().tolist()
    assert "case4/he/slice0.tiff" in result.notes[tiling.NO_ANNOTATIONS]
    bad = result.skipped[tiling.BAD_ANNOTATIONS]
    assert any(b.startswith("case1/melan/") and "no polygon of class" in b for b in bad)
    assert any(b.startswith("case2/melan/") and "not readable GeoJSON" in b for b in bad)
    text = (tmp_path / "a" / "tiles" / "tile_report.txt").read_text()
    assert "no include annotation file" in text and "inside case1_he.geojson (1 polygon(s), Tumor)" in text
    # the pathologist redraws case 1's outline: re-running tiles that slide again (the others resume)
    small = [[10, 10], [170, 10], [170, 170], [10, 170], [10, 10]]
    _polygon_file(ann / "case1_he.geojson", [small])
    again = tile_folder(config).table
    part = again[(again["case"] == "1") & (again["stain"] == "he")]
    centres = part[["x", "y"]].to_numpy() + 32
    assert len(part) and shapely.contains_xy(shapely.Polygon(small), centres[:, 0], centres[:, 1]).all()
    unchanged = again[(again["case"] == "2")][["stain", "x", "y"]].to_numpy().tolist()
    assert unchanged == table[(table["case"] == "2")][["stain", "x", "y"]].to_numpy().tolist()


def test_stainmils_qupath_export_reads_back_as_the_same_patches(slide_cohort, tmp_path):
    from stainmil.analysis.qupath import MEASUREMENTS, export_qupath

    table = tile_folder(slide_config(slide_cohort, tmp_path / "first")).table
    patches = table.rename(columns={"slide": "path"}).assign(**{c: 1.0 for c in MEASUREMENTS},
                                                             patch=table["patch"].astype(str))
    export_qupath(patches, tmp_path / "qupath")
    again = tile_folder(slide_config(slide_cohort, tmp_path / "second",
                                     f"tile.include_annotations={tmp_path / 'qupath'}")).table
    key = ["case", "stain", "slice", "x", "y"]
    pd.testing.assert_frame_equal(again[key], table[key])


def test_dicom_slides_are_found_tiled_and_extracted_and_broken_ones_named(tiny_cohort, slide_cohort, tmp_path):
    from stainmil.data.cohort import load_manifest
    from stainmil.data.synth import write_slides
    from stainmil.features.extract import extract_features
    from stainmil.features.store import load_features

    cohort = tmp_path / "tiny"
    for name in ("slices", "labels.csv", "synth.yaml"):
        (shutil.copytree if (tiny_cohort / name).is_dir() else shutil.copy)(tiny_cohort / name, cohort / name)
    write_slides(cohort, mpp=0.5, upsample=2, tile=64, dicom=True)  # a folder of .dcm instances per slide
    broken = cohort / "slides" / "case1" / "he" / "slice5"
    broken.mkdir()
    (broken / "level0.dcm").write_bytes(b"DICM" * 10)
    incomplete = cohort / "slides" / "case1" / "he" / "slice6"  # a copy that lost its full-resolution level
    shutil.copytree(cohort / "slides" / "case1" / "he" / "slice0", incomplete)
    (incomplete / "level0.dcm").unlink()
    assert sum(1 for _ in (cohort / "slides").rglob("*.dcm")) > 24
    config = slide_config(cohort, tmp_path / "dicom", "features.num_workers=0")
    result, _ = tile_cohort(config)
    assert len(result.slides) == 24 and list(result.skipped) == [tiling.UNREADABLE]
    named = sorted(result.skipped[tiling.UNREADABLE])
    assert named[0].startswith("case1/he/slice5:")
    assert named[1].startswith("case1/he/slice6:") and "full-resolution level is missing" in named[1], named
    assert [s["level0_mpp"] for s in result.slides] == pytest.approx([0.25] * 24)  # the DICOM pixel spacing
    assert {s["patch_level"] for s in result.slides} == {1}
    tiff = slide_config(slide_cohort, tmp_path / "tiff", "features.num_workers=0")
    tile_cohort(tiff)
    key = ["case", "stain", "slice", "x", "y"]
    ours, theirs = load_manifest(config), load_manifest(tiff)
    a, b = set(map(tuple, ours[key].to_numpy())), set(map(tuple, theirs[key].to_numpy()))
    assert len(a & b) / len(a | b) >= 0.9  # the same tissue found through JPEG tiles
    assert extract_features(config, ours).patches_written == len(ours)
    joined = ours.reset_index().merge(theirs.reset_index(), on=key, suffixes=("_dcm", "_tif"))
    f = load_features(config.paths.store, ours)[joined["index_dcm"]].astype(np.float32)
    extract_features(tiff, theirs)
    g = load_features(tiff.paths.store, theirs)[joined["index_tif"]].astype(np.float32)
    cosine = (f * g).sum(1) / np.linalg.norm(f, axis=1) / np.linalg.norm(g, axis=1)
    assert np.median(cosine) > 0.95  # the same pixels up to JPEG loss
