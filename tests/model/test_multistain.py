"""The multi-stain models: late fusion is the (weighted) mean of its per-stain models over the stains a case has;
cross-stain attention pools stain tokens that see each other, and a missing stain is masked, not zero-filled."""

import pytest
import torch

from stainmil.errors import ConfigError
from stainmil.model.registry import build_model
from tests.model.test_baselines import STAINS, small_config
from tests.model.test_hierarchical import random_bags


def test_late_fusion_is_the_mean_of_its_per_stain_models_over_the_stains_a_case_has():
    bags = random_bags(n_cases=5)  # case 2 has no Melan-A: its mean runs over H&E and SOX10 only
    torch.manual_seed(0)
    model = build_model(bags.feature_dim, small_config("late_fusion"), STAINS).eval()
    batch = bags.batch(bags.case_ids)
    with torch.no_grad():
        fused = model(batch).logits                                                   # (B, C)
        total, count = torch.zeros_like(fused), torch.zeros(batch.n_cases)
        for k, member in enumerate(model.members):
            part, cases = batch.stain_batch(k)
            total[cases] += member(part).logits
            count[cases] += 1
    assert count.tolist() == [3, 2, 3, 3, 3]
    assert torch.allclose(fused, total / count[:, None], atol=1e-6)


def test_learned_late_fusion_weighs_each_stain_by_its_softmaxed_score():
    bags = random_bags(n_cases=4, drop_stain_of=())  # every case has every stain
    config = small_config("late_fusion", {"late_fusion": {"combine": "learned"}})
    torch.manual_seed(0)
    model = build_model(bags.feature_dim, config, STAINS).eval()
    with torch.no_grad():
        model.stain_score.copy_(torch.tensor([2.0, 0.0, -1.0]))
        batch = bags.batch(bags.case_ids)
        out = model(batch)
        weights = torch.softmax(torch.tensor([2.0, 0.0, -1.0]), 0)
        expected = sum(weights[k] * member(batch.stain_batch(k)[0]).logits for k, member in enumerate(model.members))
    assert torch.allclose(out.logits, expected, atol=1e-6)
    assert torch.allclose(out.stain_weights.view(-1, 3), weights.expand(4, 3), atol=1e-6)


def test_late_fusion_attends_over_patches_exactly_when_its_members_do():
    """A capability computed from the options: late fusion over TransMIL has no patch attention, so analyze never
    scores lesion measures or deletion on its uniform weights."""
    from stainmil.config import ModelConfig
    from stainmil.model.registry import has_patch_attention

    assert has_patch_attention(ModelConfig(architecture="late_fusion"))  # over abmil, the default base
    over_transmil = small_config("late_fusion", {"late_fusion": {"base": "transmil"}})
    assert not has_patch_attention(over_transmil)
    bags = random_bags(n_cases=3)
    out = build_model(bags.feature_dim, over_transmil, STAINS).eval()(bags.batch(bags.case_ids))
    assert torch.allclose(out.patch_attention_logits, torch.zeros_like(out.patch_attention_logits))


def test_late_fusion_needs_a_flat_base():
    config = small_config("late_fusion", {"late_fusion": {"base": "hierarchical"}})
    with pytest.raises(ConfigError, match="flat"):
        build_model(16, config, STAINS)


def test_cross_attention_masks_a_missing_stain_instead_of_zero_filling_it():
    """A case without Melan-A gives the same prediction alone as with a Melan-A token of zeros masked out; the
    other stains' tokens change when a stain's patches change (they attend to each other)."""
    bags = random_bags(n_cases=5)
    torch.manual_seed(0)
    model = build_model(bags.feature_dim, small_config("cross_attention"), STAINS).eval()
    with torch.no_grad():
        batch = bags.batch(["2"])  # no Melan-A
        alone = model(batch).logits
        assert model(bags.batch(["2", "1"])).logits[0].allclose(alone[0], atol=1e-6)
        full = bags.batch(["1"])
        changed = bags.batch(["1"])
        sox10 = changed.group_stain[changed.slice_group[changed.patch_slice]] == 2
        changed.features[sox10] += 1.0
        out, out_changed = model(full), model(changed)
        he = full.group_stain == 0
        assert not torch.allclose(out.stain_weights[he], out_changed.stain_weights[he])
    config = small_config("cross_attention", {"cross_attention": {"heads": 3}})  # 32 is not a multiple of 3
    with pytest.raises(ConfigError, match="divisible"):
        build_model(16, config, STAINS)
