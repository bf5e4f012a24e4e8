"""Every registered architecture on ragged synthetic cases: the interface, the levels, the papers' losses."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stainmil.bags.cohort import CohortBags
from stainmil.config import ModelConfig
from stainmil.data.registration import PatchAlignment
from stainmil.errors import ConfigError, DataError
from stainmil.model.baselines.clam import smooth_top1_svm
from stainmil.model.registry import ARCHITECTURES, build_model, has_patch_attention
from stainmil.model.segment import segment_sum
from tests.model.test_hierarchical import random_bags

STAINS = ["he", "melan", "sox10"]


def placed_bags(n_cases=5, seed=0) -> CohortBags:
    """Ragged cases (tests/model/test_hierarchical.py) whose IHC slices were registered onto their case's first H&E
    slice at random: half of the slices aligned (a patch on a random H&E patch, or one in four on none), the rest
    not — every architecture sees the places; only ``aligned`` reads them."""
    bags = random_bags(n_cases=n_cases, seed=seed)
    rng = np.random.default_rng(seed + 100)
    m = bags.manifest
    anchor = np.where(m["stain"] == "he", np.arange(len(m)), -1)
    for (case, stain, _), rows in m.groupby(["case", "stain", "slice"]).indices.items():
        he = np.flatnonzero((m["case"] == case) & (m["stain"] == "he") & (m["slice"] == "0"))
        if stain == "he" or rng.random() < 0.5:
            continue
        anchor[rows] = np.where(rng.random(len(rows)) < 0.75, rng.choice(he, len(rows)), -1)
    features = bags.source.gather(np.arange(len(m)), None).numpy()
    return CohortBags(m, features, bags.stains, alignment=PatchAlignment(anchor))


SMALL_OPTIONS = {"clam_sb": {"k_sample": 3, "attention_dim": 8}, "clam_mb": {"k_sample": 3, "attention_dim": 8},
                 "transmil": {"heads": 4}}


def small_config(architecture, options: dict | None = None, **kwargs) -> ModelConfig:
    """A small model config; ``options`` ({architecture: {key: value}}) sets ``model.options`` over small ones."""
    kwargs.setdefault("stain_identity", "none")  # the plain models; the identities are tested by name
    merged = {name: {**SMALL_OPTIONS.get(name, {}), **(options or {}).get(name, {})}
              for name in {*SMALL_OPTIONS, *(options or {})}}
    return ModelConfig(architecture=architecture, embed_dim=32, attention_hidden_dim=8, dropout=0.0, options=merged,
                       **kwargs)


def build(architecture, bags, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = build_model(bags.feature_dim, small_config(architecture, **kwargs), STAINS)
    if architecture == "aligned":  # open the place gate (0 at the start: the hierarchy) so the places count here
        with torch.no_grad():
            model.place_gate.fill_(1.0)
    return model


def case_of_patch(batch):
    return batch.group_case[batch.slice_group[batch.patch_slice]]


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_forward_backward_on_ragged_cases(architecture):
    bags = placed_bags(n_cases=6)
    model = build(architecture, bags).train()
    batch = bags.batch(bags.case_ids)
    out = model(batch)
    assert out.logits.shape == (6, 2) and torch.isfinite(out.logits).all()
    loss = F.cross_entropy(out.logits, batch.labels) + sum(out.auxiliary_losses.values())
    loss.backward()
    without_grad = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not without_grad, without_grad
    # the levels multiply to the effective attention, which sums to 1 within each case
    group = batch.slice_group[batch.patch_slice]
    product = out.stain_weights[group] * out.slice_weights[batch.patch_slice] * out.patch_weights
    assert torch.allclose(product, out.effective_attention, atol=1e-5)
    sums = segment_sum(out.effective_attention[:, None], case_of_patch(batch), 6).squeeze(1)
    assert torch.allclose(sums, torch.ones(6), atol=1e-5)
    if not has_patch_attention(small_config(architecture)):  # what the registry says is what the model does
        sizes = torch.bincount(case_of_patch(batch), minlength=6).to(out.effective_attention.dtype)
        assert torch.allclose(out.effective_attention, 1 / sizes[case_of_patch(batch)])


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_case_alone_equals_case_in_batch_and_eval_is_deterministic(architecture):
    bags = placed_bags(n_cases=5, seed=3)
    model = build(architecture, bags).eval()
    with torch.no_grad():
        together = model(bags.batch(bags.case_ids))
        again = model(bags.batch(bags.case_ids))
        assert torch.equal(together.logits, again.logits)
        for b, case in enumerate(bags.case_ids):
            alone = model(bags.batch([case]))
            assert torch.allclose(alone.logits[0], together.logits[b], atol=1e-5), case


@pytest.mark.parametrize("architecture", [*sorted(ARCHITECTURES), "hierarchical:embedding", "hierarchical:specific",
                                          "abmil:embedding"])
def test_patch_alone_logits_are_the_model_on_a_one_patch_case(architecture):
    bags = placed_bags(n_cases=3, seed=1)
    name, _, identity = architecture.partition(":")
    model = build(name, bags, stain_identity=identity or "none").eval()
    batch = bags.batch([bags.case_ids[0]])
    with torch.no_grad():
        out = model(batch)
        alone = model.patch_alone_logits(out.patch_embeddings)                   # (P, C)
        # aligned: an H&E patch alone is its place (with what lies on it), which a subset cannot cut out: the last
    # patch (SOX10) is checked for it
    for i in ((0, len(batch.patch_slice) - 1) if name != "aligned" else (len(batch.patch_slice) - 1,)):
            keep = np.zeros(len(batch.patch_slice), dtype=bool)
            keep[i] = True
            single = model(batch.subset(keep))
            assert torch.allclose(torch.softmax(single.logits[0], -1), torch.softmax(alone[i], -1), atol=1e-5)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_same_seed_same_model_and_training_step(architecture):
    bags = placed_bags(n_cases=4)
    batch = bags.batch(bags.case_ids)
    logits = []
    for _ in range(2):
        model = build(architecture, bags, seed=7).train()
        torch.manual_seed(11)
        logits.append(model(batch).logits)
    assert torch.equal(logits[0], logits[1])


def test_three_classes_for_every_architecture():
    bags = placed_bags(n_cases=6)
    batch = bags.batch(bags.case_ids)
    batch.labels = torch.tensor([0, 1, 2, 0, 1, 2])
    for architecture in ARCHITECTURES:
        model = build(architecture, bags, n_classes=3).train()
        out = model(batch)
        assert out.logits.shape == (6, 3), architecture
        (F.cross_entropy(out.logits, batch.labels) + sum(out.auxiliary_losses.values())).backward()


def test_smooth_top1_svm_is_the_margin_rescaled_log_sum_exp():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.7]])
    targets = torch.tensor([0, 0])
    expected = torch.stack([torch.log(torch.exp(torch.tensor(2.0)) + torch.exp(torch.tensor(-1.0 + 1.0))) - 2.0,
                            torch.log(torch.exp(torch.tensor(0.5)) + torch.exp(torch.tensor(0.7 + 1.0))) - 0.5])
    assert torch.allclose(smooth_top1_svm(logits, targets), expected)


def test_clam_instance_loss_is_the_papers_on_the_top_and_bottom_k():
    bags = random_bags(n_cases=1, seed=4, drop_stain_of=())
    model = build("clam_sb", bags).train()
    batch = bags.batch(bags.case_ids)
    out = model(batch)
    h = model.projector(model.standardise(batch.features))
    scores = model.attention.score(h)
    k = 3
    order = torch.argsort(scores, descending=True)
    rows = torch.cat([order[:k], order[-k:]])
    targets = torch.tensor([1] * k + [0] * k)
    label = int(batch.labels[0])
    expected = smooth_top1_svm(model.instance_classifiers[label](h[rows]), targets).mean() * (0.3 / 0.7)
    assert torch.allclose(out.auxiliary_losses["clam_instance_loss"], expected, atol=1e-5)
    model.eval()
    assert model(batch).auxiliary_losses == {}                                   # no instance loss outside training


def test_dsmil_max_instance_stream_and_averaged_prediction():
    bags = random_bags(n_cases=3, seed=2)
    model = build("dsmil", bags).train()
    batch = bags.batch(bags.case_ids)
    out = model(batch)
    x = model.standardise(batch.features)
    scores = model.instance_classifier(x)
    case = case_of_patch(batch)
    max_logits = torch.stack([scores[case == b].max(0).values for b in range(3)])
    assert torch.allclose(out.auxiliary_losses["dsmil_max_instance_loss"], F.cross_entropy(max_logits, batch.labels))
    model.eval()
    with torch.no_grad():
        mean_probs = 0.5 * torch.softmax(model(batch).logits, -1).sum(0)
        bag_logits = model._streams(x, case, 3)[0]
        expected = 0.5 * (torch.softmax(bag_logits, -1) + torch.softmax(max_logits, -1)).sum(0)
    assert torch.allclose(mean_probs, 0.5 * expected, atol=1e-5)


def test_dtfd_tier1_loss_over_pseudo_bags_and_random_split_in_training():
    bags = random_bags(n_cases=2, seed=5)
    model = build("dtfd_mil", bags).train()
    batch = bags.batch(bags.case_ids)
    case = case_of_patch(batch)
    torch.manual_seed(0)
    first, bag_case = model.pseudo_bag_of(case, 2)
    torch.manual_seed(1)
    second, _ = model.pseudo_bag_of(case, 2)
    assert not torch.equal(first, second)                                       # random pseudo-bags per step
    assert torch.equal(bag_case[first], case)                                   # never across cases
    sizes = torch.bincount(case)
    assert torch.equal(torch.bincount(bag_case), torch.clamp(sizes, max=4))
    assert "dtfd_tier1_loss" in model(batch).auxiliary_losses


def test_stain_embedding_changes_flat_input_and_specific_is_refused_for_flat():
    bags = random_bags(n_cases=3)
    with pytest.raises(ConfigError, match="specific"):
        build("abmil", bags, stain_identity="specific")
    model = build("abmil", bags, stain_identity="embedding")
    assert model.stain_embedding.shape == (3, bags.feature_dim)


@pytest.mark.parametrize("architecture", ["hierarchical", "abmil"])
def test_a_stain_no_training_case_had_is_refused(architecture):
    bags = random_bags(n_cases=3)
    identity = "specific" if architecture == "hierarchical" else "embedding"
    model = build(architecture, bags, stain_identity=identity).eval()
    model.set_seen_stains(torch.tensor([0, 2]))                                  # no melan in training
    with pytest.raises(DataError, match="melan"):
        model(bags.batch(bags.case_ids))


@pytest.mark.parametrize("identity", ["embedding", "specific"])
def test_hierarchical_stain_identity_trains_every_part_and_keeps_cases_independent(identity):
    bags = random_bags(n_cases=5)
    model = build("hierarchical", bags, stain_identity=identity).train()
    batch = bags.batch(bags.case_ids)
    out = model(batch)
    F.cross_entropy(out.logits, batch.labels).backward()
    without_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert not without_grad, without_grad
    model.eval()
    with torch.no_grad():
        together = model(batch)
        for b, case in enumerate(bags.case_ids):
            assert torch.allclose(model(bags.batch([case])).logits[0], together.logits[b], atol=1e-5)


def test_stain_embedding_tells_identical_groups_of_different_stains_apart():
    bags = random_bags(n_cases=1, drop_stain_of=())
    batch = bags.batch(bags.case_ids)
    batch.features = torch.ones_like(batch.features)                             # every patch alike
    for identity, differs in (("none", False), ("embedding", True)):
        model = build("hierarchical", bags, stain_identity=identity).eval()
        with torch.no_grad():
            weights = model(batch).stain_weights
        assert (not torch.allclose(weights, weights[0].expand_as(weights))) == differs, identity


def test_dsmil_prediction_stays_finite_when_its_streams_disagree_completely():
    from stainmil.model.baselines.dsmil import combined_logits

    logits = combined_logits(torch.tensor([[120.0, -120.0]]), torch.tensor([[-120.0, 120.0]]))
    assert torch.isfinite(logits).all() and torch.allclose(torch.softmax(logits, -1), torch.tensor([[0.5, 0.5]]))


def test_flat_patch_weights_sum_to_one_per_slice_even_with_sharp_attention():
    bags = random_bags(n_cases=2, seed=6)
    model = build("abmil", bags).eval()
    with torch.no_grad():
        model.attention.out.weight.mul_(1e4)                                   # attention logits ~1e4 apart
        batch = bags.batch(bags.case_ids)
        out = model(batch)
    sums = segment_sum(out.patch_weights[:, None], batch.patch_slice, len(batch.slice_group)).squeeze(1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
