"""`stainmil check`: damage by truncating and by flipping bytes is found, named with what to rerun; training refuses
a damaged store file with one sentence; --repair re-extracts only what was damaged."""

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from stainmil.check import check_folder, repair
from stainmil.cli import app
from stainmil.data.cohort import load_manifest
from stainmil.data.registration import read_pair
from stainmil.errors import DataError, StoreError
from stainmil.features.sources import StoreRequest
from stainmil.features.store import load_features, read_slice
from stainmil.slides.coords import read_coords


def flip_a_feature_byte(path: Path, dataset: str = "features", at: int = 100) -> None:
    """Flip one byte inside a dataset stored unchunked (the file still opens: only the checksum can tell)."""
    with h5py.File(path, "r") as h5:
        offset = h5[dataset].id.get_offset()
    with open(path, "r+b") as handle:
        handle.seek(offset + at)
        byte = handle.read(1)
        handle.seek(offset + at)
        handle.write(bytes([byte[0] ^ 0xFF]))


def has_affine(path: Path) -> bool:
    with h5py.File(path, "r") as h5:
        return "affine" in h5


def truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


@pytest.fixture
def store_copy(prepared, tmp_path):
    """A copy of the prepared store (its config pointing at the copy), damaged in two ways."""
    store = tmp_path / "store"
    shutil.copytree(prepared.paths.store, store)
    files = sorted(store.rglob("*.h5"))
    flip_a_feature_byte(files[0])
    truncate(files[1])
    return store, files[0], files[1]


def test_damage_is_found_and_named(store_copy):
    store, flipped, truncated = store_copy
    result = check_folder(store)
    assert not result.ok and result.checked["store"] == len(list(store.rglob("*.h5")))
    found = {f.path: f for f in result.findings}
    assert set(found) == {flipped, truncated}
    assert "checksum" in found[flipped].problem and "--repair" in found[flipped].rerun
    assert "damaged" in found[truncated].problem
    runner = CliRunner().invoke(app, ["check", str(store)])
    assert runner.exit_code == 1 and str(flipped) in runner.output and "2 damaged or missing" in runner.output


def test_training_refuses_a_damaged_store_file_with_one_sentence(store_copy, prepared):
    store, flipped, truncated = store_copy
    manifest = load_manifest(prepared)
    for path in (flipped, truncated):
        with pytest.raises(StoreError) as refused:
            read_slice(path)
        assert str(path) in str(refused.value) and "stainmil check" in str(refused.value)
    with pytest.raises(StoreError, match="is damaged"):
        load_features(store, manifest)                                  # the in-memory route
    from stainmil.bags.cohort import CohortBags

    bags = CohortBags(manifest, StoreRequest(str(store), 1, cache_mb=0.001), list(prepared.data.stains))
    with pytest.raises(StoreError, match="is damaged"):                 # the bounded route: first read of each file
        for case in bags.case_ids:
            bags.batch([case])


def test_repair_reextracts_only_the_damaged_files(store_copy, prepared):
    store, flipped, truncated = store_copy
    untouched = {p: p.stat().st_mtime_ns for p in store.rglob("*.h5") if p not in (flipped, truncated)}
    (store / "case1").mkdir(exist_ok=True)
    (store / "case1" / ".left.h5.abc123.h5.tmp").write_bytes(b"half")   # an interrupted write's litter
    found = check_folder(store)
    assert found.litter == [store / "case1" / ".left.h5.abc123.h5.tmp"] and len(found.findings) == 2
    result = repair(found, log=lambda *_: None)
    assert result.ok, result.text()
    assert all(p.stat().st_mtime_ns == t for p, t in untouched.items())  # nothing else rewritten
    original = Path(prepared.paths.store) / flipped.relative_to(store)
    # the same features as before the damage, up to float16 rounding (a batch of 2 slices, not of the cohort)
    again, before = read_slice(flipped)[0].astype(np.float32), read_slice(original)[0].astype(np.float32)
    assert again.shape == before.shape and np.allclose(again, before, rtol=1e-2, atol=1e-2)


@pytest.mark.slow
def test_tiles_registrations_and_runs_are_checked(serial_demo, tmp_path):
    import json

    demo = json.loads((serial_demo / "demo_result.json").read_text())
    tiles = tmp_path / "tiles"
    shutil.copytree(demo["tiles"], tiles)
    run = tmp_path / "run"
    shutil.copytree(demo["run"], run, ignore=shutil.ignore_patterns("attention", "qupath"))
    assert check_folder(tiles).ok and check_folder(run).ok
    coords, flipped_coords = sorted((tiles / "coords").glob("*.h5"))[:2]
    transform, flipped_transform = [p for p in sorted((tiles / "registration" / "transforms").glob("*.h5"))
                                    if has_affine(p)][:2]
    truncate(coords)
    transform.write_bytes(b"not hdf5")
    flip_a_feature_byte(flipped_coords, "coords", at=3)        # files that still open: only their checksums tell
    flip_a_feature_byte(flipped_transform, "affine", at=7)
    truncate(run / "checkpoints" / "best.pth")
    (run / "metrics.json").write_text("{")
    result = check_folder(tmp_path)
    kinds = {(f.kind, f.path.name) for f in result.findings}
    assert kinds == {("tiles", coords.name), ("tiles", flipped_coords.name), ("registration", transform.name),
                     ("registration", flipped_transform.name), ("run", "best.pth"), ("run", "metrics.json")}
    with pytest.raises(DataError, match="do(es)? not match the checksum"):
        read_coords(flipped_coords)
    with pytest.raises(DataError, match="does not match the checksum"):
        read_pair(flipped_transform)
    assert all("-> " not in f.problem and f.rerun for f in result.findings)
