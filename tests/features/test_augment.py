"""Augmentations: exact symmetries, HED jitter round trip, seeded per-patch view jitter, seeded training augment."""

from __future__ import annotations

import numpy as np
import torch

from stainmil.features.augment import (
    N_DIHEDRAL,
    dihedral,
    hed_jitter,
    make_view,
    train_augment,
    view_jitter,
)


def _images(n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1


def test_the_eight_dihedral_views_are_distinct_exact_pixel_permutations():
    x = _images(1)
    views = [dihedral(x, k) for k in range(N_DIHEDRAL)]
    flat = torch.stack([v.flatten() for v in views])
    assert len({tuple(v.tolist()) for v in flat}) == N_DIHEDRAL          # all 8 differ
    for v in flat:                                                     # no resampling: same pixel values
        assert torch.equal(v.sort().values, x.flatten().sort().values)
    assert torch.equal(dihedral(dihedral(x, 1), 3), x)                 # quarter turns compose
    assert torch.equal(dihedral(dihedral(x, 4), 4), x)                 # a flip undoes itself


def test_hed_jitter_is_the_identity_at_alpha_1_beta_0_and_changes_colour_otherwise():
    x = _images()
    ones, zeros = torch.ones(2, 3), torch.zeros(2, 3)
    assert torch.allclose(hed_jitter(x, ones, zeros), x, atol=1e-4)
    darker_h = hed_jitter(x, torch.tensor([[1.3, 1.0, 1.0]] * 2), zeros)
    assert (darker_h - x).abs().mean() > 1e-3
    assert darker_h.mean() < x.mean()                                  # more haematoxylin absorbs more light
    assert darker_h.min() >= 0 and darker_h.max() <= 1


def test_view_jitter_is_seeded_per_patch_and_views_below_eight_are_exact():
    a = view_jitter("c1/he/1/7", 12, 0.05, seed=0)
    assert a.shape == (12, 2, 3)
    assert np.array_equal(a, view_jitter("c1/he/1/7", 12, 0.05, seed=0))
    assert not np.array_equal(a, view_jitter("c1/he/1/8", 12, 0.05, seed=0))
    assert not np.array_equal(a, view_jitter("c1/he/1/7", 12, 0.05, seed=1))
    assert np.all(a[:N_DIHEDRAL, 0] == 1) and np.all(a[:N_DIHEDRAL, 1] == 0)
    assert np.all(np.abs(a[N_DIHEDRAL:, 0] - 1) <= 0.05) and np.any(a[N_DIHEDRAL:, 0] != 1)
    x = _images(1)
    jitter = torch.from_numpy(a)[None]                                  # (1, 12, 2, 3)
    assert torch.equal(make_view(x, 3, jitter[:, 3]), dihedral(x, 3))
    assert not torch.allclose(make_view(x, 9, jitter[:, 9]), dihedral(x, 1), atol=1e-3)


def test_training_augmentation_is_seeded_and_stays_an_image():
    x = _images(4, 24)
    a = train_augment(x, torch.Generator().manual_seed(5))
    b = train_augment(x, torch.Generator().manual_seed(5))
    c = train_augment(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, x)
