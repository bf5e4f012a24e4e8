import numpy as np
import pandas as pd
import pytest
import torch

from stainmil.bags.cohort import CohortBags
from stainmil.config import ModelConfig
from stainmil.model.attention import ATTENTION_POOLS
from stainmil.model.hierarchical import HierarchicalMIL
from stainmil.model.segment import segment_softmax
from tests.model.gradients import assert_every_parameter_learns


def random_bags(n_cases=5, dim=16, seed=0, drop_stain_of=("2",)) -> CohortBags:
    """Cases with 1-3 slices per stain and 1-9 patches per slice; some cases lack a stain."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(1, n_cases + 1):
        for stain in ("he", "melan", "sox10"):
            if str(c) in drop_stain_of and stain == "melan":
                continue
            for s in range(rng.integers(1, 4)):
                for p in range(rng.integers(1, 10)):
                    rows.append({"case": str(c), "stain": stain, "slice": str(s), "patch": str(p), "label": c % 2})
    manifest = pd.DataFrame(rows)
    return CohortBags(manifest, rng.standard_normal((len(manifest), dim)).astype(np.float32), ["he", "melan", "sox10"])


def model_for(bags, attention="tanh", seed=0, stain_identity="none"):
    torch.manual_seed(seed)
    config = ModelConfig(embed_dim=32, attention_hidden_dim=8, attention=attention, stain_identity=stain_identity)
    return HierarchicalMIL(bags.feature_dim, config, bags.stains)


def test_segment_softmax_matches_per_group_softmax():
    logits = torch.randn(10, dtype=torch.float64) * 30
    groups = torch.tensor([0, 0, 2, 2, 2, 1, 3, 3, 3, 3])
    weights = segment_softmax(logits, groups, 4)
    for g in range(4):
        assert torch.allclose(weights[groups == g], torch.softmax(logits[groups == g], 0))


@pytest.mark.parametrize("attention", sorted(ATTENTION_POOLS))
def test_case_alone_equals_case_in_batch(attention):
    bags = random_bags()
    model = model_for(bags, attention).eval()
    with torch.no_grad():
        together = model(bags.batch(bags.case_ids))
        for b, case in enumerate(bags.case_ids):
            alone = model(bags.batch([case]))
            assert torch.allclose(alone.logits[0], together.logits[b], atol=1e-5)
            in_batch = torch.from_numpy(np.isin(together_rows := bags.batch(bags.case_ids).patch_rows,
                                                alone_rows := bags.batch([case]).patch_rows))
            assert np.array_equal(together_rows[in_batch.numpy()], alone_rows)
            assert torch.allclose(together.effective_attention[in_batch], alone.effective_attention, atol=1e-6)


@pytest.mark.parametrize("attention", sorted(ATTENTION_POOLS))
def test_attention_sums_to_one_at_every_level(attention):
    bags = random_bags()
    batch = bags.batch(bags.case_ids)
    out = model_for(bags, attention).eval()(batch)
    patch_case = batch.group_case[batch.slice_group[batch.patch_slice]]
    per_case = torch.zeros(batch.n_cases).index_add(0, patch_case, out.effective_attention)
    assert torch.allclose(per_case, torch.ones(batch.n_cases), atol=1e-5)
    per_slice = torch.zeros(len(batch.slice_group)).index_add(0, batch.patch_slice, out.patch_weights)
    assert torch.allclose(per_slice, torch.ones_like(per_slice), atol=1e-5)
    per_group = torch.zeros(len(batch.group_case)).index_add(0, batch.slice_group, out.slice_weights)
    assert torch.allclose(per_group, torch.ones_like(per_group), atol=1e-5)
    per_case_stain = torch.zeros(batch.n_cases).index_add(0, batch.group_case, out.stain_weights)
    assert torch.allclose(per_case_stain, torch.ones(batch.n_cases), atol=1e-5)
    effective = out.stain_weights[batch.slice_group[batch.patch_slice]] * out.slice_weights[batch.patch_slice] \
        * out.patch_weights
    assert torch.allclose(out.effective_attention, effective)
    assert out.logits.shape == (batch.n_cases, 2) and out.case_embeddings.shape == (batch.n_cases, 32)


def test_missing_stain_is_simply_absent():
    bags = random_bags(drop_stain_of=("2",))
    batch = bags.batch(["2"])
    assert sorted(batch.group_stain.tolist()) == [0, 2]
    out = model_for(bags).eval()(batch)
    assert out.stain_weights.shape == (2,) and torch.isclose(out.stain_weights.sum(), torch.tensor(1.0))


def test_patch_order_does_not_matter():
    bags = random_bags()
    model = model_for(bags).eval()
    batch = bags.batch(["1"])
    perm = torch.randperm(len(batch.features))
    shuffled = bags.batch(["1"])
    shuffled.features, shuffled.patch_slice = batch.features[perm], batch.patch_slice[perm]
    with torch.no_grad():
        assert torch.allclose(model(batch).logits, model(shuffled).logits, atol=1e-5)


@pytest.mark.parametrize("attention", sorted(ATTENTION_POOLS))
def test_every_parameter_gets_a_gradient_and_no_nan(attention):
    bags = random_bags()
    model = model_for(bags, attention).train()
    batch = bags.batch(bags.case_ids)
    out = model(batch)
    assert all(torch.isfinite(t).all() for t in (out.logits, out.effective_attention))
    torch.nn.functional.cross_entropy(out.logits, batch.labels).backward()
    assert_every_parameter_learns(model)


def test_patch_alone_logits_equal_a_one_patch_case():
    bags = random_bags()
    model = model_for(bags).eval()
    batch = bags.batch(["1"])
    one = bags.batch(["1"])
    one.features, one.patch_slice = batch.features[:1], batch.patch_slice[:1] * 0
    one.slice_group, one.group_case = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        full = model(batch)
        assert torch.allclose(model(one).logits[0], model.patch_alone_logits(full.patch_embeddings[:1])[0],
                              atol=1e-5)


def test_caps_sample_within_slices_and_keep_every_slice():
    bags = random_bags()
    rng = np.random.default_rng(0)
    full = bags.batch(bags.case_ids)
    capped = bags.batch(bags.case_ids, per_slice_cap=2, rng=rng)
    assert len(capped.slice_group) == len(full.slice_group)
    assert torch.bincount(capped.patch_slice).max() <= 2
    chosen = bags.choose_slices(bags.case_ids, 1, np.random.default_rng(0))
    one_per_stain = bags.batch(bags.case_ids, chosen)
    assert len(one_per_stain.slice_group) == len(one_per_stain.group_case)
