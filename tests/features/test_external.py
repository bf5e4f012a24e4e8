"""`stainmil import-features`: TRIDENT and CLAM folders (in their real layouts) -> store + index -> train,
analyze, report, QuPath, predict; bad slides named and skipped; links not copies; resumable; identical features
back from stainmil's own tiling + extraction written as a TRIDENT folder."""

import copy
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stainmil.config import load_config
from stainmil.data.cohort import load_manifest, write_index
from stainmil.errors import ConfigError, DataError, StoreError
from stainmil.features import external
from stainmil.features.external import find_source, import_features
from stainmil.features.store import StoreMeta, check_store, load_features, slice_groups
from stainmil.pipeline import split_cohort, tile_cohort
from tests.conftest import slide_config, tiny_config
from tests.features.layouts import write_clam, write_trident

PATTERN = r"case(?P<case>[^_]+)_(?P<stain>[^_]+)_slice(?P<slice>[^_.]+)"


def store_slides(config, manifest=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A stainmil store as TRIDENT/CLAM would hold it: slide name -> (features (N, D), corners (N, 2))."""
    manifest = load_manifest(config) if manifest is None else manifest
    features = load_features(config.paths.store, manifest)
    return {f"case{case}_{stain}_slice{slice_id}": (features[rows.index.to_numpy()], rows[["x", "y"]].to_numpy())
            for (case, stain, slice_id), rows in slice_groups(manifest)}


def import_config(prepared, work, *overrides):
    cohort = os.path.dirname(prepared.data.labels_csv)
    return tiny_config(Path(cohort), work, f"tile.filename_pattern={PATTERN}", *overrides)


def same_features(original_config, imported_manifest, imported_store):
    """Features of the imported index equal the original store's, patch by patch (matched on case/stain/slice/x/y)."""
    original = load_manifest(original_config)
    key = ["case", "stain", "slice", "x", "y"]
    joined = imported_manifest.reset_index().merge(original.reset_index(), on=key, suffixes=("_new", "_old"))
    assert len(joined) == len(imported_manifest) == len(original)
    new = load_features(imported_store, imported_manifest)[joined["index_new"].to_numpy()]
    old = load_features(original_config.paths.store, original)[joined["index_old"].to_numpy()]
    return np.array_equal(new.astype(np.float32), old.astype(np.float32))


@pytest.fixture(scope="module")
def trident_import(prepared, tmp_path_factory):
    """The tiny cohort's store as a TRIDENT job with every kind of bad slide beside the good ones; imported."""
    root = tmp_path_factory.mktemp("trident")
    slides = store_slides(prepared)
    write_trident(root / "job", slides, "uni_v1", patch_px=32, level0_mag=20)
    features, coords = slides["case1_he_slice0"]
    write_trident(root / "job", {"mystery_slide": (features, coords),                   # name matches nothing
                                 "case1_he_slice9": (features, coords[:-1]),            # N features != N coords
                                 "case2_he_slice9": (np.ones((3, 7), np.float16), coords[:3]),  # other D
                                 "case4_he_slice9": (features, coords),                 # still being written
                                 "case5_he_slice9": (np.zeros(0, np.float32), coords[:0]),  # TRIDENT's empty slide
                                 "case6_he_slice9": (features, coords),                 # unreadable (below)
                                 "case7_he_slice9": (np.where(np.arange(features.size).reshape(features.shape) == 5,
                                                              np.nan, features), coords),  # NaN in features
                                 "case8_he_slice9": (features, coords)},                # float coords (below)
                  "uni_v1", patch_px=32, level0_mag=20)
    feat_dir = root / "job" / "20x_32px_0px_overlap" / "features_uni_v1"
    (feat_dir / "case4_he_slice9.h5.lock").touch()
    (feat_dir / "case6_he_slice9.h5").write_bytes(b"not an HDF5 file")
    for path in (feat_dir / "case8_he_slice9.h5", feat_dir.parent / "patches" / "case8_he_slice9_patches.h5"):
        with h5py.File(path, "r+") as h5:  # coordinates of the wrong dtype, not whole pixels
            attrs = dict(h5["coords"].attrs)
            del h5["coords"]
            h5.create_dataset("coords", data=coords.astype(np.float64) + 0.5).attrs.update(attrs)
    work = tmp_path_factory.mktemp("work")
    before = import_config(prepared, work)
    result = import_features(before, root / "job")
    write_index(result.index, before)
    assert before.paths.store != result.store_dir  # a loaded config never changes its mind ...
    return root, import_config(prepared, work), result  # ... the next command's load records the imported store


def test_trident_import_links_every_good_slide_and_names_the_bad(trident_import, prepared):
    root, config, result = trident_import
    skipped = result.skipped
    assert skipped[external.NO_MATCH] == ["mystery_slide"]
    assert [s.split(" ")[0] for s in skipped[external.COUNT]] == ["case1_he_slice9"]
    assert [s.split(" ")[0] for s in skipped[external.DIMENSION]] == ["case2_he_slice9"]
    assert skipped[external.LOCKED] == ["case4_he_slice9"]
    assert skipped[external.EMPTY] == ["case5_he_slice9"]
    assert skipped[external.UNREADABLE][0].startswith("case6_he_slice9:")
    assert skipped[external.NOT_FINITE] == ["case7_he_slice9"]
    assert skipped[external.BAD_COORDS] == ["case8_he_slice9"]
    report = (result.store_dir / "import_report.txt").read_text()
    for name in ("mystery_slide", "case1_he_slice9", "case2_he_slice9", "case4_he_slice9", "case6_he_slice9"):
        assert name in report
    assert "no patches" in (config.paths.index_dir / "index_report.txt").read_text()  # the index report lists them too
    manifest = load_manifest(config)
    assert config.paths.store == result.store_dir == config.paths.imported_store  # recorded by every later load
    assert config.features.store_dir == str(result.store_dir)  # and so written into every run's config.yaml
    assert same_features(prepared, manifest, config.paths.store)
    store_files = [p for p in result.store_dir.rglob("*.h5")]
    assert len(store_files) == 24 and all(p.is_symlink() for p in store_files)  # linked, nothing copied
    meta = StoreMeta.read(result.store_dir)
    assert (meta.backbone, meta.weights, meta.import_format, meta.magnification) == ("uni_v1", "imported", "trident",
                                                                                    20)
    assert meta.patch_size_level0 == 32 and meta.feature_dim == 1024 and meta.imported_from == str(
        (root / "job" / "20x_32px_0px_overlap" / "features_uni_v1").resolve())
    assert (manifest["level"] == -1).all()  # no slides: heatmaps on a canvas, no patch pixels
    canvas = Image.open(manifest["thumbnail"].iloc[0])
    assert canvas.size[0] > 0 and np.asarray(canvas).min() < 255  # the patch squares are drawn
    check_store(result.store_dir, config)  # the config's encoder settings do not apply to an imported store
    with pytest.raises(StoreError, match="import-features"):
        check_store(result.store_dir, config, extracting=True)


def test_import_resumes_without_rewriting(trident_import, tmp_path):
    root, config, result = trident_import
    before = {p: os.lstat(p).st_ino for p in result.store_dir.rglob("*.h5")}
    again = import_features(config, root / "job")
    assert {p: os.lstat(p).st_ino for p in again.store_dir.rglob("*.h5")} == before
    pd.testing.assert_frame_equal(again.index.manifest, result.index.manifest)
    assert {s["store"] for s in again.slides} == {"kept"}
    other = copy.deepcopy(config)  # another source folder never resumes this store
    shutil.copytree(root / "job", tmp_path / "other", symlinks=True)
    with pytest.raises(DataError, match="imported from"):
        import_features(other, tmp_path / "other")


@pytest.mark.slow
def test_imported_features_train_analyze_report_qupath_and_predict(trident_import, tmp_path):
    from stainmil.analysis.analyze import write_analysis
    from stainmil.analysis.new_cases import predict_unlabelled
    from stainmil.analysis.qupath import export_folder
    from stainmil.analysis.report import build_report
    from stainmil.evaluate.evaluation import evaluate_run
    from stainmil.train.trainer import train

    root, config, _ = trident_import
    config = config.with_overrides({"train.runs_dir": str(tmp_path / "runs"), "data.per_slice_cap": 0})
    split_cohort(config)
    run = train(config).run_dir
    metrics = evaluate_run(run)
    assert len(metrics.predictions) > 0 and metrics.predictions["prob_1"].between(0, 1).all()
    analysis = write_analysis(run, "test")
    assert analysis.heatmaps and all(p.is_file() for maps in analysis.heatmaps.values() for p in maps.values())
    assert build_report(run).is_file()
    exported = export_folder(run, "test")
    assert exported.files and not exported.skipped
    # new cases: the same encoder's features of other slides, imported unlabelled into another output folder
    new_root = tmp_path / "new"
    shutil.copytree(root / "job", new_root / "job", symlinks=True)
    new_config = config.with_overrides({"output_dir": str(tmp_path / "new_work"), "data.labels_csv": "",
                                        "features.store_dir": ""})  # the new output folder's own store
    imported = import_features(new_config, new_root / "job", require_labels=False)
    assert imported.store_dir == new_config.paths.imported_store
    write_index(imported.index, new_config)
    new_config = new_config.with_overrides({"features.store_dir": str(imported.store_dir)})  # as a load records it
    folder = predict_unlabelled(run / "checkpoints" / "best.pth", new_config)
    predictions = pd.read_csv(folder / "predictions.csv", dtype={"case": str})
    assert len(predictions) == 8 and predictions["prob_1"].between(0, 1).all()


def test_clam_h5_and_pt_files_import_with_coordinates_from_patches(prepared, tmp_path):
    slides = store_slides(prepared)
    names = sorted(slides)
    # 12 slides as CLAM writes them (h5 + pt), 11 with only pt_files kept (coordinates from create_patches'
    # patches/), 1 whose .pt is missing (extraction still running or killed: incomplete)
    kw = {"patch_size": 16, "patch_level": 1, "downsample": 2.0}
    write_clam(tmp_path / "clam", tmp_path / "clam" / "feats", {n: slides[n] for n in names[:12]}, **kw)
    write_clam(tmp_path / "clam", tmp_path / "clam" / "feats", {n: slides[n] for n in names[12:23]}, h5=False, **kw)
    write_clam(tmp_path / "clam", tmp_path / "clam" / "feats", {names[23]: slides[names[23]]}, pt=False, **kw)
    config = import_config(prepared, tmp_path / "work")
    source = find_source(tmp_path / "clam" / "feats", encoder="resnet50_trunc")
    assert source.format == "clam" and len(source.slides) == 23 and source.incomplete == [names[23]]
    result = import_features(config, tmp_path / "clam" / "feats" / "pt_files", encoder="resnet50_trunc")
    assert result.skipped == {external.INCOMPLETE: [names[23]]} and result.meta.backbone == "resnet50_trunc"
    assert {s["store"] for s in result.slides} == {"linked", "copied"}
    assert all(s["patch_size_level0"] == 32 for s in result.slides)  # patch_size x downsample
    manifest = result.index.manifest
    kept = load_manifest(prepared)
    kept = kept[~(kept["case"] + kept["stain"] + kept["slice"]).isin(
        ["".join(names[23].replace("case", "").replace("slice", "").split("_"))])]
    assert len(manifest) == len(kept)
    original = load_features(prepared.paths.store, kept)
    key = ["case", "stain", "slice", "x", "y"]
    joined = manifest.reset_index().merge(kept.reset_index(drop=True).reset_index(), on=key)
    assert np.array_equal(load_features(result.store_dir, manifest)[joined["index_x"]].astype(np.float32),
                          original[joined["index_y"]].astype(np.float32))  # float32 copies of fp16 features


def test_folder_errors_are_named(prepared, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no TRIDENT or CLAM features"):
        find_source(tmp_path / "empty")
    slides = dict(list(store_slides(prepared).items())[:2])
    write_trident(tmp_path / "job", slides, "uni_v1", patch_px=32)
    write_trident(tmp_path / "job", slides, "conch_v15", patch_px=32)
    with pytest.raises(ConfigError, match="--encoder"):
        find_source(tmp_path / "job")
    assert find_source(tmp_path / "job", encoder="conch_v15").encoder == "conch_v15"
    with pytest.raises(DataError, match="extracted"):  # never mixes with a store stainmil extracted
        import_features(load_config(None, [f"features.store_dir={prepared.paths.store}",
                                           f"data.labels_csv={prepared.data.labels_csv}"]),
                        tmp_path / "job", encoder="uni_v1")


def test_stainmils_own_tiling_and_extraction_as_a_trident_folder_imports_back_identical(slide_cohort, tmp_path):
    from stainmil.features.extract import extract_features
    from stainmil.slides.reader import PatchRef, read_patch

    config = slide_config(slide_cohort, tmp_path / "own", "features.num_workers=0")
    tile_cohort(config)
    manifest = load_manifest(config)
    extract_features(config, manifest)
    # the TRIDENT job: stainmil's coordinate files are TRIDENT's patches files; features + coords per slide
    job = tmp_path / "trident" / "20x_32px_0px_overlap"
    flat = tmp_path / "flat_slides"  # TRIDENT names slides by file name: give them unique ones
    flat.mkdir()
    for (case, stain, slice_id), rows in slice_groups(manifest):
        name = f"case{case}_{stain}_slice{slice_id}"
        (job / "patches").mkdir(parents=True, exist_ok=True)
        coords_file = next((tmp_path / "own" / "tiles" / "coords").glob(f"case{case}_{stain}_slice{slice_id}.h5"))
        shutil.copy(coords_file, job / "patches" / f"{name}_patches.h5")
        os.symlink(rows["path"].iloc[0], flat / f"{name}.tiff")
    write_trident(tmp_path / "trident", store_slides(config, manifest), "densenet121", mag=20, patch_px=32,
                  level0_mag=40)
    imported = tiny_config(slide_cohort, tmp_path / "imp", f"tile.filename_pattern={PATTERN}",
                           f"tile.slices_dir={flat}")
    result = import_features(imported, tmp_path / "trident")
    assert not result.skipped
    new = result.index.manifest
    assert same_features(config, new, result.store_dir)
    assert {s["drawn_on"] for s in result.slides} == {"slide thumbnail"}
    assert (new["level"] == 1).all() and (new["read_size"] == 32).all() and (new["size0"] == 64).all()
    row = new.iloc[5]
    old = manifest[(manifest[["case", "stain", "slice", "x", "y"]] == row[["case", "stain", "slice", "x", "y"]]
                    ).all(axis=1)].iloc[0]
    assert np.array_equal(read_patch(PatchRef(row["path"], row["x"], row["y"], 1, 32), 32),
                          read_patch(PatchRef(old["path"], old["x"], old["y"], 1, 32), 32))
