"""The patch index on disk: built streaming from the manifest, one range of rows per slice, rebuilt when the manifest
changes, refused (the manifest then stays in memory) when a slice's rows are not one run; batches read through it
equal those of the manifest held in memory."""

import json

import numpy as np
import pandas as pd
import pytest

from stainmil.bags.cohort import CohortBags
from stainmil.data import patch_index
from stainmil.data.patch_index import ids_digest, index_folder, open_patch_index
from stainmil.errors import StoreError
from stainmil.features.sources import StoreRequest
from stainmil.features.store import StoreMeta, slice_file, write_slice

STAINS = ["H&E", "Melan-A", "SOX10"]


def _manifest(rng: np.random.Generator) -> pd.DataFrame:
    """Cases with leading zeros, real stain names, slices of 1-9 patches (so they straddle the builder's batches)."""
    frames = []
    for c, case in enumerate(["007", "0012", "12"]):
        for stain in STAINS:
            for s in range(int(rng.integers(1, 3))):
                n = int(rng.integers(1, 10))
                frames.append(pd.DataFrame({"case": case, "stain": stain, "slice": f"S{s}",
                                            "patch": [f"{case}_{stain}_{s}_{i:03d}.png" for i in range(n)],
                                            "patch_index": np.arange(n), "label": c % 2,
                                            "x": rng.integers(0, 9000, n), "y": rng.integers(0, 9000, n),
                                            "size0": 448}))
    return pd.concat(frames, ignore_index=True)


@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(patch_index, "BATCH_ROWS", 4)


def test_the_index_holds_one_range_per_slice_and_the_manifest_as_written(tmp_path, small_batches):
    manifest = _manifest(np.random.default_rng(0))
    path = tmp_path / "index" / "manifest.parquet"
    path.parent.mkdir()
    manifest.to_parquet(path, index=False)
    index = open_patch_index(path)
    assert index is not None and index.rows == len(manifest)
    groups = list(manifest.groupby(["case", "stain", "slice"], sort=False))
    assert len(index.slices) == len(groups)
    for (key, rows), (_, s) in zip(groups, index.slices.iterrows()):
        assert (s["case"], s["stain"], s["slice"]) == key                     # "007" stays "007"
        assert list(range(s["start"], s["start"] + s["count"])) == list(rows.index)
        assert s["ids"] == ids_digest(rows["patch"]) and s["label"] == rows["label"].iloc[0]
    pd.testing.assert_frame_equal(index.frame(), manifest)
    picked = np.array([5, 0, len(manifest) - 1])
    assert np.array_equal(index.values("x", picked), manifest["x"].to_numpy()[picked])
    made = json.loads((index_folder(path) / "index.json").read_text())
    assert made["grouped"] and made["rows"] == len(manifest)


def test_a_changed_manifest_rebuilds_the_index_and_a_scattered_one_gets_none(tmp_path, small_batches):
    manifest = _manifest(np.random.default_rng(1))
    path = tmp_path / "manifest.parquet"
    manifest.to_parquet(path, index=False)
    assert open_patch_index(path).rows == len(manifest)
    shorter = manifest[manifest["case"] != "12"]
    shorter.to_parquet(path, index=False)
    assert open_patch_index(path).rows == len(shorter)                       # not the stale one
    scattered = pd.concat([manifest.iloc[::2], manifest.iloc[1::2]], ignore_index=True)
    scattered.to_parquet(path, index=False)
    assert open_patch_index(path) is None                                     # then read into memory as before
    assert not (index_folder(path) / "patches.arrow").exists()
    assert json.loads((index_folder(path) / "index.json").read_text())["grouped"] is False
    path.unlink()
    assert open_patch_index(path) is None                                     # load_manifest then names it


def _store(tmp_path, manifest: pd.DataFrame) -> None:
    rng = np.random.default_rng(2)
    for (case, stain, slice_id), rows in manifest.groupby(["case", "stain", "slice"], sort=False):
        write_slice(slice_file(tmp_path / "store", case, stain, slice_id),
                    rng.standard_normal((len(rows), 8)).astype(np.float16), np.zeros((len(rows), 2)),
                    list(rows["patch"]), {})
    StoreMeta("x", "random", "", 32, [], [], 8, "float16").write(tmp_path / "store")


def test_batches_read_through_the_disk_index_equal_those_of_the_manifest_in_memory(tmp_path, small_batches):
    manifest = _manifest(np.random.default_rng(3))
    path = tmp_path / "manifest.parquet"
    manifest.to_parquet(path, index=False)
    _store(tmp_path, manifest)
    request = StoreRequest(str(tmp_path / "store"), 1, cache_mb=0.0005)
    memory = CohortBags(manifest, request, STAINS)
    disk = CohortBags(open_patch_index(path), request, STAINS)
    assert disk.case_ids == ["007", "0012", "12"] and disk.case_ids == memory.case_ids
    for seed in range(3):
        a, b = (bags.batch(bags.case_ids, per_slice_cap=3, rng=np.random.default_rng(seed))
                for bags in (memory, disk))
        assert torch_equal(a.features, b.features) and np.array_equal(a.patch_rows, b.patch_rows)
        assert torch_equal(a.patch_position, b.patch_position) and torch_equal(a.patch_slice, b.patch_slice)
    mean_a, std_a = memory.feature_statistics(memory.case_ids)
    mean_b, std_b = disk.feature_statistics(disk.case_ids)
    assert torch_equal(mean_a, mean_b) and torch_equal(std_a, std_b)
    pd.testing.assert_frame_equal(disk.manifest, manifest)                   # reports still read every row


def test_a_store_file_whose_ids_differ_from_the_disk_index_is_named(tmp_path):
    manifest = _manifest(np.random.default_rng(4))
    path = tmp_path / "manifest.parquet"
    manifest.to_parquet(path, index=False)
    _store(tmp_path, manifest)
    first = manifest.iloc[0]
    target = slice_file(tmp_path / "store", first["case"], first["stain"], first["slice"])
    n = int(((manifest["case"] == first["case"]) & (manifest["stain"] == first["stain"])
             & (manifest["slice"] == first["slice"])).sum())
    write_slice(target, np.zeros((n, 8), np.float16), np.zeros((n, 2)), [f"other_{i}" for i in range(n)], {})
    bags = CohortBags(open_patch_index(path), StoreRequest(str(tmp_path / "store"), 1, cache_mb=1), STAINS)
    with pytest.raises(StoreError, match="differ from the manifest"):
        bags.batch(bags.case_ids[:1])


def torch_equal(a, b) -> bool:
    return bool((a == b).all()) and a.shape == b.shape and a.dtype == b.dtype
