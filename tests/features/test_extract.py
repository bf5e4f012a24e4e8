import h5py
import numpy as np
import pytest

from stainmil.data.cohort import load_manifest
from stainmil.errors import StoreError
from stainmil.features.extract import extract_features
from stainmil.features.store import StoreMeta, check_store, load_features, read_slice, slice_file
from stainmil.train.run import load_cohort


def test_store_has_one_file_per_slice_with_clam_names(prepared):
    manifest = load_manifest(prepared)
    keys = manifest.groupby(["case", "stain", "slice"]).size()
    for (case, stain, slice_id), n in keys.items():
        path = slice_file(prepared.paths.store, case, stain, slice_id)
        with h5py.File(path) as h5:
            assert h5["features"].shape == (n, 1024) and h5["features"].dtype == np.float16
            assert h5["coords"].shape == (n, 2)
            assert h5.attrs["backbone"] == "densenet121"
        features, coords, ids = read_slice(path)
        rows = manifest[(manifest.case == case) & (manifest.stain == stain) & (manifest.slice == slice_id)]
        assert ids == list(rows["patch"])
        assert np.array_equal(coords, rows[["x", "y"]].to_numpy())
    assert not list(prepared.paths.store.rglob("*.tmp"))


def test_rerun_skips_finished_slices_and_redoes_deleted_ones(prepared):
    manifest = load_manifest(prepared)
    before = load_features(prepared.paths.store, manifest)
    summary = extract_features(prepared, manifest)
    assert summary.slices_written == 0 and summary.slices_done_before == summary.slices_total
    key = next(iter(manifest.groupby(["case", "stain", "slice"]).groups))
    slice_file(prepared.paths.store, *key).unlink()
    summary = extract_features(prepared, manifest)
    assert summary.slices_written == 1
    # the same up to float16 rounding (the slice is now forwarded in a batch of another size)
    assert np.allclose(load_features(prepared.paths.store, manifest).astype(np.float32), before, rtol=1e-2, atol=1e-3)


def test_a_rerun_finds_damaged_files_and_extracts_them_again(prepared):
    """A rerun (what every user does after a crash) trusts no file it did not check: a truncated file and one
    without its checksum attribute are found cheaply, a flipped feature byte with --verify; each is named and
    extracted again, and nothing else is."""
    manifest = load_manifest(prepared)
    before = load_features(prepared.paths.store, manifest)
    keys = list(manifest.groupby(["case", "stain", "slice"]).groups)[:3]
    truncated, unsigned, flipped = (slice_file(prepared.paths.store, *key) for key in keys)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with h5py.File(unsigned, "a") as h5:
        del h5.attrs["checksum"]
    with h5py.File(flipped, "a") as h5:
        features = h5["features"][()]
        features[0, 0] = features[0, 0] + 1
        h5["features"][...] = features
    summary = extract_features(prepared, manifest)
    assert summary.slices_written == 2 and len(summary.reextracted) == 2
    assert str(truncated) in summary.reextracted[0] or str(truncated) in summary.reextracted[1]
    assert any(str(unsigned) in line and "no checksum attribute" in line for line in summary.reextracted)
    summary = extract_features(prepared, manifest)
    assert summary.slices_written == 0  # the flipped byte passes the cheap check ...
    summary = extract_features(prepared, manifest, verify=True)
    assert summary.slices_written == 1 and "do not match the checksum" in summary.reextracted[0]  # ... not --verify
    assert np.allclose(load_features(prepared.paths.store, manifest).astype(np.float32), before, rtol=1e-2, atol=1e-3)


def test_features_match_a_direct_forward_pass(prepared):
    import torch
    from PIL import Image

    from stainmil.features.backbones import build_backbone
    from stainmil.features.encoders import IMAGENET_MEAN, IMAGENET_STD

    manifest = load_manifest(prepared).iloc[:4]
    f = prepared.features
    assert f.mean == [] and StoreMeta.read(prepared.paths.store).mean == list(IMAGENET_MEAN)  # the encoder's own
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((f.image_size,) * 2, Image.BILINEAR))
                       for p in manifest["path"]]).astype(np.float32) / 255  # (4, S, S, 3)
    normalised = (pixels - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    images = torch.from_numpy(normalised).permute(0, 3, 1, 2)
    with torch.inference_mode():
        direct = build_backbone(f).module(images).numpy()
    stored = load_features(prepared.paths.store, load_manifest(prepared))[:4].astype(np.float32)
    assert np.allclose(stored, direct, rtol=1e-2, atol=1e-3)


def test_store_made_with_other_settings_is_refused(prepared):

    other = prepared.with_overrides({"features.image_size": 64})
    with pytest.raises(StoreError, match="image_size=32"):
        check_store(prepared.paths.store, other)
    other = prepared.with_overrides({"features.weights": "imagenet", "features.store_dir": str(prepared.paths.store)})
    with pytest.raises(StoreError, match="weights"):
        load_cohort(other)
    other = prepared.with_overrides({"features.mean": [0.5, 0.5, 0.5]})
    with pytest.raises(StoreError, match=r"mean=\[0.485.*asks for \[0.5, 0.5, 0.5\]"):
        check_store(prepared.paths.store, other)
    other = prepared.with_overrides({"features.backbone": "resnet50_trunc",
                                     "features.store_dir": str(prepared.paths.store)})
    with pytest.raises(StoreError, match="backbone='densenet121'"):
        check_store(prepared.paths.store, other)


def test_missing_slice_file_is_named(prepared, tmp_path):
    import shutil

    config = prepared.with_overrides({"features.store_dir": str(tmp_path / "store")})
    shutil.copytree(prepared.paths.store, config.paths.store)
    manifest = load_manifest(config)
    case, stain, slice_id = manifest.iloc[0][["case", "stain", "slice"]]
    slice_file(config.paths.store, case, stain, slice_id).unlink()
    with pytest.raises(StoreError, match=f"case {case} {stain} slice {slice_id}"):
        load_features(config.paths.store, manifest)
