"""The aligned architecture: IHC patches fused into the H&E patch they lie on, unaligned slices pooled by the
hierarchy, and a task only co-location can solve."""

import numpy as np
import pandas as pd
import pytest
import torch

from stainmil.config import ModelConfig
from stainmil.data.bags import CohortBags
from stainmil.data.registration import PatchAlignment
from stainmil.errors import DataError
from stainmil.model.aligned import AlignedMIL
from stainmil.model.hierarchical import HierarchicalMIL
from stainmil.model.segment import segment_sum

STAINS = ["he", "melan", "sox10"]


def aligned_bags(n_cases=4, dim=8, seed=0, failed=(("2", "sox10"),)) -> CohortBags:
    """Per case one H&E slice (6-9 patches), a Melan-A and a SOX10 slice (5 patches each) registered onto it;
    a patch of an aligned slice lies on a random H&E patch or (one in five) on none; the (case, stain) slices in
    ``failed`` were not aligned (unplaced)."""
    rng = np.random.default_rng(seed)
    rows, anchor, target = [], [], []
    for c in range(1, n_cases + 1):
        case = str(c)
        he_rows = list(range(len(rows), len(rows) + int(rng.integers(6, 10))))
        for r in he_rows:
            rows.append({"case": case, "stain": "he", "slice": "0", "patch": str(r), "label": c % 2})
            anchor.append(r)
            target.append(-1)
        for stain in ("melan", "sox10"):
            aligned = (case, stain) not in failed
            for p in range(5):
                rows.append({"case": case, "stain": stain, "slice": "0", "patch": str(p), "label": c % 2})
                placed = aligned and rng.random() > 0.2
                anchor.append(int(rng.choice(he_rows)) if placed else -1)
                target.append(he_rows[0] if aligned else -1)
    manifest = pd.DataFrame(rows)
    x = rng.standard_normal((len(manifest), dim)).astype(np.float32)
    return CohortBags(manifest, x, STAINS, alignment=PatchAlignment(np.array(anchor), np.array(target)))


def model_for(bags, seed=0, cls=AlignedMIL, **kw):
    torch.manual_seed(seed)
    config = ModelConfig(embed_dim=16, attention_hidden_dim=8, dropout=0.0, **kw)
    return cls(bags.feature_dim, config, bags.stains).eval()


def test_places_carry_the_attention_of_the_patches_folded_into_them():
    bags = aligned_bags()
    batch = bags.batch(bags.case_ids)
    anchor = batch.patch_anchor
    member = (anchor >= 0) & (anchor != torch.arange(len(anchor)))
    assert member.any() and (anchor == -1).any()
    with torch.no_grad():
        out = model_for(bags)(batch)
    per_case = segment_sum(out.effective_attention[:, None], batch.group_case[batch.slice_group][batch.patch_slice],
                           batch.n_cases)
    assert torch.allclose(per_case.squeeze(1), torch.ones(batch.n_cases), atol=1e-5)
    assert (out.effective_attention[member] == 0).all() and (out.effective_attention[~member] > 0).all()
    group = batch.slice_group[batch.patch_slice]
    product = out.stain_weights[group] * out.slice_weights[batch.patch_slice] * out.patch_weights
    assert torch.allclose(product, out.effective_attention, atol=1e-6)
    # the failed SOX10 slice of case 2 is pooled on its own, the aligned slices only through the H&E places
    slice_stain = batch.group_stain[batch.slice_group]
    case_of_slice = batch.group_case[batch.slice_group]
    own = (slice_stain == STAINS.index("sox10")) & (case_of_slice == batch.case_ids.index("2"))
    assert out.slice_weights[own].item() > 0
    folded = (slice_stain > 0) & ~own
    assert (out.slice_weights[folded] == 0).all()


def test_a_case_alone_equals_the_case_in_a_batch():
    bags = aligned_bags(n_cases=5)
    model = model_for(bags, stain_identity="specific")
    with torch.no_grad():
        together = model(bags.batch(bags.case_ids))
        for b, case in enumerate(bags.case_ids):
            assert torch.allclose(model(bags.batch([case])).logits[0], together.logits[b], atol=1e-5)


def test_an_ihc_patch_counts_where_it_lies():
    bags = aligned_bags(n_cases=1, failed=())
    batch = bags.batch(bags.case_ids)
    model = model_for(bags)
    rows = torch.arange(len(batch.patch_anchor))
    member = int(torch.nonzero((batch.patch_anchor >= 0) & (batch.patch_anchor != rows))[0])
    with torch.no_grad():
        base = model(batch).logits
        moved = batch.patch_anchor.clone()
        places = torch.nonzero(batch.patch_anchor == rows).flatten()
        moved[member] = int(places[places != batch.patch_anchor[member]][0])
        elsewhere = model(type(batch)(**{**batch.__dict__, "patch_anchor": moved})).logits
        changed = batch.features.clone()
        changed[member] += 3.0
        brighter = model(type(batch)(**{**batch.__dict__, "features": changed})).logits
    assert not torch.allclose(base, elsewhere) and not torch.allclose(base, brighter)


def test_unaligned_slices_pool_exactly_as_in_the_hierarchy():
    """With the place MLP silenced, a cohort whose pairs all failed gives the hierarchy's output, weight for weight."""
    bags = aligned_bags(failed=[(case, stain) for case in ("1", "3") for stain in ("melan", "sox10")])
    aligned = model_for(bags)
    with torch.no_grad():
        aligned.fuse[0].weight.zero_()
        aligned.fuse[0].bias.zero_()
    hierarchy = model_for(bags, cls=HierarchicalMIL)
    hierarchy.load_state_dict({k: v for k, v in aligned.state_dict().items() if k in hierarchy.state_dict()})
    cases = ["1", "3"]
    with torch.no_grad():
        a, h = aligned(bags.batch(cases)), hierarchy(bags.batch(cases))
    assert torch.allclose(a.logits, h.logits, atol=1e-6)
    assert torch.allclose(a.effective_attention, h.effective_attention, atol=1e-6)


def test_batches_fold_aligned_slices_into_the_drawn_reference_patches():
    bags = aligned_bags(n_cases=3)
    rng = np.random.default_rng(0)
    batch = bags.batch(["1"], per_slice_cap=3, rng=rng)
    anchor = batch.patch_anchor.numpy()
    he = bags.manifest["stain"].to_numpy()[batch.patch_rows] == "he"
    assert he.sum() == 3 and (anchor[he] == np.flatnonzero(he)).all()
    ihc = ~he
    assert (anchor[ihc] >= 0).all()  # a folded slice brings only patches lying on a drawn H&E patch
    expected = np.isin(bags.alignment.anchor[bags.slice_patches[1]], batch.patch_rows[he]).sum()
    assert (bags.manifest["stain"].to_numpy()[batch.patch_rows] == "melan").sum() == expected
    # without its H&E slice (chosen slices), a slice is pooled as usual: capped, no place
    lonely = bags.batch(["1"], slices={"1": [1, 2]}, per_slice_cap=4, rng=rng)
    assert len(lonely.patch_rows) == 8 and (lonely.patch_anchor == -1).all()
    # a batch subset renumbers the places; patches whose place left have none
    full = bags.batch(["1"])
    keep = bags.manifest["stain"].to_numpy()[full.patch_rows] != "he"
    assert (full.subset(keep).patch_anchor == -1).all()
    keep = np.ones(len(keep), dtype=bool)
    keep[0] = False
    sub = full.subset(keep)
    assert sub.patch_anchor.max() < len(sub.patch_rows)
    assert (sub.patch_anchor[full.patch_anchor[keep] == 0] == -1).all()


def test_a_batch_without_places_is_refused():
    bags = aligned_bags()
    plain = CohortBags(bags.manifest, np.zeros((len(bags.manifest), 8), np.float32), STAINS)
    with pytest.raises(DataError, match="stainmil register"):
        model_for(bags)(plain.batch(plain.case_ids))


def colocation_bags(n_cases, seed):
    """Label 1 when the two Melan-A-positive patches lie on the tumour H&E patches, 0 when on the normal ones:
    every stain looks the same in both classes; only where the stains meet tells them apart."""
    rng = np.random.default_rng(seed)
    codes = np.eye(4, 8, dtype=np.float32) * 3  # tumour, normal, positive, negative
    rows, anchor, target, x = [], [], [], []
    for c in range(n_cases):
        label = c % 2
        he_rows = list(range(len(rows), len(rows) + 8))
        for k, r in enumerate(he_rows):
            rows.append({"case": str(c), "stain": "he", "slice": "0", "patch": str(k), "label": label})
            anchor.append(r)
            target.append(-1)
            x.append(codes[0 if k < 4 else 1])
        positives = list(rng.choice(4, 2, replace=False) + (0 if label == 1 else 4))
        places = positives + [k for k in range(8) if k not in positives]  # one Melan-A patch on each H&E patch
        for k, lies_on in enumerate(places):
            positive = k < 2
            rows.append({"case": str(c), "stain": "melan", "slice": "0", "patch": str(k), "label": label})
            anchor.append(he_rows[lies_on])
            target.append(he_rows[0])
            x.append(codes[2 if positive else 3])
    x = np.stack(x) + rng.normal(0, 0.3, (len(x), 8)).astype(np.float32)
    return CohortBags(pd.DataFrame(rows), x, STAINS, alignment=PatchAlignment(np.array(anchor), np.array(target)))


@pytest.mark.parametrize("cls,solves", [(AlignedMIL, True), (HierarchicalMIL, False)])
def test_only_the_aligned_model_reads_where_the_stains_meet(cls, solves):
    train, test = colocation_bags(40, 0), colocation_bags(40, 1)
    model = model_for(train, cls=cls)
    model.set_feature_statistics(*train.feature_statistics(train.case_ids))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(120):
        batch = train.batch(train.case_ids)
        loss = torch.nn.functional.cross_entropy(model(batch).logits, batch.labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        batch = test.batch(test.case_ids)
        accuracy = (model.eval()(batch).logits.argmax(1) == batch.labels).float().mean().item()
    assert (accuracy >= 0.9) if solves else (accuracy <= 0.7), accuracy
