"""Feature views in the store (features.views): layout, content, refusal of mismatched stores, seeded sampling."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from stainmil.bags.cohort import CohortBags
from stainmil.data.cohort import load_manifest
from stainmil.errors import ConfigError, StoreError
from stainmil.features.extract import extract_features
from stainmil.features.store import check_store, load_features, slice_file
from stainmil.train.run import load_cohort

VIEWS = 10  # the 8 symmetries and 2 HED-jittered views


@pytest.fixture(scope="module")
def viewed(prepared, tmp_path_factory):
    config = prepared.with_overrides({"features.views": VIEWS,
                                      "features.store_dir": str(tmp_path_factory.mktemp("views") / "store")})
    extract_features(config, load_manifest(config))
    return config


def test_store_keeps_the_plain_features_plus_each_augmented_view(prepared, viewed):
    manifest = load_manifest(viewed)
    case, stain, slice_id = manifest.iloc[0][["case", "stain", "slice"]]
    n = int(((manifest.case == case) & (manifest.stain == stain) & (manifest.slice == slice_id)).sum())
    with h5py.File(slice_file(viewed.paths.store, case, stain, slice_id)) as h5:
        assert h5["features"].shape == (n, 1024)                       # what CLAM/TRIDENT readers see
        assert h5["augmented_features"].shape == (VIEWS - 1, n, 1024)
    bank = load_features(viewed.paths.store, manifest, VIEWS).astype(np.float32)  # (V, N, D)
    plain = load_features(prepared.paths.store, manifest).astype(np.float32)
    assert bank.shape == (VIEWS, len(manifest), 1024)
    assert np.allclose(bank[0], plain, rtol=1e-2, atol=1e-3)          # view 0 is the plain store
    for v in range(1, VIEWS):                                           # every other view differs from it
        assert np.abs(bank[v] - bank[0]).mean() > 1e-3 * np.abs(bank[0]).mean()
    again = extract_features(viewed, manifest)                          # resumable as ever
    assert again.slices_written == 0


def test_stores_with_other_views_are_refused_and_fewer_views_are_usable(prepared, viewed):
    more = prepared.with_overrides({"features.views": 4})
    with pytest.raises(StoreError, match="views"):                      # the plain store has 1 view
        check_store(prepared.paths.store, more)
    with pytest.raises(StoreError, match="views"):                      # extraction never mixes view counts
        extract_features(more, load_manifest(more))
    fewer = viewed.with_overrides({"features.views": 3})  # the first 3 views of a 10-view store
    bags, _ = load_cohort(fewer, training=True)
    assert bags.n_views == 3
    jitter = viewed.with_overrides({"features.view_jitter": 0.2})
    with pytest.raises(StoreError, match="view_jitter"):
        check_store(viewed.paths.store, jitter)


def test_training_batches_sample_one_view_per_patch_seeded_and_evaluation_uses_the_plain_view(viewed):
    bags, split = load_cohort(viewed, training=True)
    assert bags.n_views == VIEWS
    cases = split.train[:2]

    def features(seed, augment=True):
        return bags.batch(cases, rng=np.random.default_rng(seed), augment=augment).features

    assert np.array_equal(features(1), features(1))
    assert not np.array_equal(features(1), features(2))
    plain = bags.batch(cases).features
    assert np.array_equal(features(1, augment=False), plain)
    rows = bags.batch(cases).patch_rows
    sampled = features(3).numpy()
    bank = bags.source.all_views(rows).float().numpy()                   # (V, P, D)
    chosen = [[v for v in range(VIEWS) if np.array_equal(bank[v, p], sampled[p])] for p in range(len(rows))]
    assert all(chosen)                                                   # each row is one of its patch's views
    assert len({c[0] for c in chosen}) > 3                               # and the views vary across patches
    eval_bags, _ = load_cohort(viewed)
    assert eval_bags.n_views == 1


def test_plain_store_batches_are_unchanged_by_augment(prepared):
    bags, split = load_cohort(prepared, training=True)
    rng_a, rng_b = np.random.default_rng(0), np.random.default_rng(0)
    a = bags.batch(split.train[:2], per_slice_cap=4, rng=rng_a, augment=True)
    b = bags.batch(split.train[:2], per_slice_cap=4, rng=rng_b, augment=False)
    assert np.array_equal(a.features, b.features) and np.array_equal(a.patch_rows, b.patch_rows)
    assert rng_a.bit_generator.state == rng_b.bit_generator.state       # no draw spent on views


def test_bad_view_settings_are_refused_by_the_config():
    from stainmil.config import load_config

    with pytest.raises(ConfigError, match="features.views"):
        load_config(None, ["features.views=0"])
    with pytest.raises(ConfigError, match="online"):
        load_config(None, ["features.views=8", "features.mode=online"])
    with pytest.raises(ConfigError, match="trainable_blocks"):
        load_config(None, ["features.trainable_blocks=-1"])


def test_bags_refuse_features_of_another_length(prepared):
    manifest = load_manifest(prepared)
    with pytest.raises(Exception, match="re-run extract"):
        CohortBags(manifest, np.zeros((2, len(manifest) - 1, 8), np.float32), prepared.data.stains)


def test_bounded_store_reads_the_same_views_as_the_in_memory_bank(viewed):
    """features.cache_mb > 0 with a view store: every sampled view and the feature statistics are identical."""
    bounded = viewed.with_overrides({"features.cache_mb": 0.3})
    memory, split = load_cohort(viewed, training=True)
    lazy, _ = load_cohort(bounded, training=True)
    assert lazy.source.n_views == memory.source.n_views == VIEWS
    cases = split.train
    for seed in range(3):
        a = memory.batch(cases, per_slice_cap=5, rng=np.random.default_rng(seed), augment=True)
        b = lazy.batch(cases, per_slice_cap=5, rng=np.random.default_rng(seed), augment=True)
        assert torch.equal(a.features, b.features) and np.array_equal(a.patch_rows, b.patch_rows)
    rows = memory.batch(cases).patch_rows
    assert torch.equal(memory.source.all_views(rows), lazy.source.all_views(rows))
    for got, want in zip(lazy.feature_statistics(cases), memory.feature_statistics(cases)):
        assert torch.equal(got, want)
