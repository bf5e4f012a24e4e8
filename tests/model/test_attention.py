"""Every registered attention pool: shapes, masking, no NaN, every parameter gets a gradient."""

import pytest
import torch

from stainmil.model.attention import ATTENTION_POOLS, build_attention
from stainmil.model.hierarchical import topk_drop
from tests.model.gradients import assert_every_parameter_learns


def _groups():
    return torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 2, 2]), 3


@pytest.mark.parametrize("name", sorted(ATTENTION_POOLS))
def test_shapes_weights_and_gradients(name):
    torch.manual_seed(0)
    pool = build_attention(name, 16, 8, 0.0, heads=2, max_group=4)
    h = torch.randn(10, 16, requires_grad=True)
    groups, n = _groups()
    out = pool(h, groups, n)
    assert out.pooled.shape == (3, 16) and out.logits.shape == (10,) and out.weights.shape == (10,)
    assert torch.isfinite(out.pooled).all() and torch.isfinite(out.weights).all()
    sums = torch.zeros(3).index_add(0, groups, out.weights)
    assert torch.allclose(sums, torch.ones(3), atol=1e-5)
    out.pooled.pow(2).sum().backward()
    assert_every_parameter_learns(pool)


@pytest.mark.parametrize("name", sorted(ATTENTION_POOLS))
def test_masked_rows_get_no_weight(name):
    torch.manual_seed(0)
    pool = build_attention(name, 16, 8, 0.0, heads=2, max_group=4).eval()
    h = torch.randn(10, 16)
    groups, n = _groups()
    drop = torch.zeros(10, dtype=torch.bool)
    drop[[0, 5, 6]] = True
    out = pool(h, groups, n, drop)
    assert (out.weights[drop] == 0).all()
    assert torch.allclose(torch.zeros(3).index_add(0, groups, out.weights), torch.ones(3), atol=1e-5)


def test_transformer_is_order_free_within_the_cap():
    torch.manual_seed(0)
    pool = build_attention("transformer", 16, 8, 0.0, heads=2, max_group=8).eval()
    h = torch.randn(10, 16)
    groups, n = _groups()
    perm = torch.randperm(10)
    with torch.no_grad():
        a = pool(h, groups, n)
        b = pool(h[perm], groups[perm], n)
    assert torch.allclose(a.weights[perm], b.weights, atol=1e-5)


def test_transformer_cap_confines_self_attention_to_chunks():
    """Group 2 has 6 rows; with a cap of 4 its first 4 rows never see the last 2."""
    torch.manual_seed(0)
    pool = build_attention("transformer", 16, 8, 0.0, heads=2, max_group=4).eval()
    h = torch.randn(10, 16)
    groups, n = _groups()
    changed = h.clone()
    changed[9] += 5.0  # last row of group 2: in the second chunk
    with torch.no_grad():
        a, b = pool.transform(h, groups, n), pool.transform(changed, groups, n)
    assert torch.allclose(a[:8], b[:8], atol=1e-6)   # group 0, 1 and group 2's first chunk untouched
    assert not torch.allclose(a[8], b[8])


def test_topk_drop_masks_only_top_rows_and_keeps_one():
    torch.manual_seed(0)
    logits = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 9.0, 8.0])
    groups = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    drops = torch.stack([topk_drop(logits, groups, 2, k=2, ratio=0.5) for _ in range(400)])
    assert not drops[:, [2, 3, 4]].any()          # only the 2 highest of group 0 are eligible
    assert not drops[:, 6].any()                  # group 1 has 2 rows: its last row always stays
    rate = drops[:, [0, 1, 5]].float().mean(0)
    assert ((rate > 0.4) & (rate < 0.6)).all()
    assert not torch.all(drops[:, 5:7], dim=1).any()
