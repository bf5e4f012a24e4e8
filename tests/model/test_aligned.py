"""The aligned architecture: each H&E patch fused with the IHC patches lying on it (a learned token where a stain
is missing), the hierarchy at the start and everywhere else, and a task only co-location can solve."""

import numpy as np
import pandas as pd
import pytest
import torch

from stainmil.bags.cohort import CohortBags
from stainmil.config import ModelConfig
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
    rows, anchor = [], []
    for c in range(1, n_cases + 1):
        case = str(c)
        he_rows = list(range(len(rows), len(rows) + int(rng.integers(6, 10))))
        for r in he_rows:
            rows.append({"case": case, "stain": "he", "slice": "0", "patch": str(r), "label": c % 2})
            anchor.append(r)
        for stain in ("melan", "sox10"):
            for p in range(5):
                rows.append({"case": case, "stain": stain, "slice": "0", "patch": str(p), "label": c % 2})
                placed = (case, stain) not in failed and rng.random() > 0.2
                anchor.append(int(rng.choice(he_rows)) if placed else -1)
    manifest = pd.DataFrame(rows)
    x = rng.standard_normal((len(manifest), dim)).astype(np.float32)
    return CohortBags(manifest, x, STAINS, alignment=PatchAlignment(np.array(anchor)))


def model_for(bags, seed=0, cls=AlignedMIL, gate=None, **kw):
    torch.manual_seed(seed)
    config = ModelConfig(embed_dim=16, attention_hidden_dim=8, dropout=0.0, **kw)
    model = cls(bags.feature_dim, config, bags.stains).eval()
    if gate is not None:
        with torch.no_grad():
            model.place_gate.fill_(gate)
    return model


def test_the_aligned_model_starts_as_the_hierarchy():
    """Gate 0 at initialisation: the very output of a hierarchical model with the same weights."""
    bags = aligned_bags()
    aligned = model_for(bags)
    hierarchy = model_for(bags, cls=HierarchicalMIL)
    hierarchy.load_state_dict({k: v for k, v in aligned.state_dict().items() if k in hierarchy.state_dict()})
    batch = bags.batch(bags.case_ids)
    with torch.no_grad():
        a, h = aligned(batch), hierarchy(batch)
    assert torch.equal(a.logits, h.logits) and torch.equal(a.effective_attention, h.effective_attention)


def test_places_keep_every_level_of_the_hierarchy():
    bags = aligned_bags()
    batch = bags.batch(bags.case_ids)
    assert ((batch.patch_anchor >= 0) & (batch.patch_anchor != torch.arange(len(batch.patch_anchor)))).any()
    with torch.no_grad():
        out = model_for(bags, gate=1.0)(batch)
    per_case = segment_sum(out.effective_attention[:, None], batch.group_case[batch.slice_group][batch.patch_slice],
                           batch.n_cases)
    assert torch.allclose(per_case.squeeze(1), torch.ones(batch.n_cases), atol=1e-5)
    assert (out.effective_attention > 0).all()  # IHC slices keep their own attention
    group = batch.slice_group[batch.patch_slice]
    product = out.stain_weights[group] * out.slice_weights[batch.patch_slice] * out.patch_weights
    assert torch.allclose(product, out.effective_attention, atol=1e-6)


def test_a_case_alone_equals_the_case_in_a_batch():
    bags = aligned_bags(n_cases=5)
    model = model_for(bags, gate=1.0, stain_identity="specific")
    with torch.no_grad():
        together = model(bags.batch(bags.case_ids))
        for b, case in enumerate(bags.case_ids):
            assert torch.allclose(model(bags.batch([case])).logits[0], together.logits[b], atol=1e-5)


def test_an_ihc_patch_counts_where_it_lies():
    bags = aligned_bags(n_cases=1, failed=())
    batch = bags.batch(bags.case_ids)
    model = model_for(bags, gate=1.0)
    rows = torch.arange(len(batch.patch_anchor))
    member = int(torch.nonzero((batch.patch_anchor >= 0) & (batch.patch_anchor != rows))[0])
    places = torch.nonzero(batch.patch_anchor == rows).flatten()
    moved = batch.patch_anchor.clone()
    moved[member] = int(places[places != batch.patch_anchor[member]][0])
    unplaced = batch.patch_anchor.clone()
    unplaced[member] = -1
    with torch.no_grad():
        base = model(batch).logits
        for anchor in (moved, unplaced):  # the same patches, the same features: only the place differs
            assert not torch.allclose(base, model(type(batch)(**{**batch.__dict__, "patch_anchor": anchor})).logits)


def test_a_missing_stain_at_a_place_is_its_learned_token():
    """A place where no SOX10 patch lies reads the SOX10 token: training moves it; a place's own slot is itself."""
    bags = aligned_bags(n_cases=2, failed=(("1", "sox10"), ("2", "sox10")))
    model = model_for(bags, gate=1.0).train()
    batch = bags.batch(bags.case_ids)
    torch.nn.functional.cross_entropy(model(batch).logits, batch.labels).backward()
    grad = model.missing_token.grad
    assert grad[STAINS.index("sox10")].abs().sum() > 0      # every place lacks SOX10
    assert grad[STAINS.index("he")].abs().sum() == 0        # H&E is each place's own slot, never a token


def test_batches_and_subsets_renumber_the_places():
    bags = aligned_bags(n_cases=3)
    rng = np.random.default_rng(0)
    batch = bags.batch(["1"], per_slice_cap=3, rng=rng)
    anchor = batch.patch_anchor.numpy()
    stain = bags.manifest["stain"].to_numpy()[batch.patch_rows]
    assert ((anchor == np.arange(len(anchor))) == (stain == "he")).all()
    cohort_anchor = bags.alignment.anchor[batch.patch_rows]
    drawn = np.isin(cohort_anchor, batch.patch_rows[stain == "he"])  # lies on an H&E patch that was drawn
    assert ((anchor >= 0) == drawn | (stain == "he")).all()
    assert (batch.patch_rows[anchor[anchor >= 0]] == cohort_anchor[anchor >= 0]).all()
    # a capped IHC slice brings first the patches lying on the drawn H&E places (here: all of them)
    for ihc in ("melan", "sox10"):
        rows = bags.slice_patches[bags.case_slices["1"][STAINS.index(ihc)]]
        lying = rows[np.isin(bags.alignment.anchor[rows], batch.patch_rows[stain == "he"])]
        assert len(lying) and np.isin(lying, batch.patch_rows).all()
    full = bags.batch(["1"])
    without_he = full.subset(bags.manifest["stain"].to_numpy()[full.patch_rows] != "he")
    assert (without_he.patch_anchor == -1).all()
    keep = np.ones(len(full.patch_rows), dtype=bool)
    keep[0] = False
    sub = full.subset(keep)
    lost = full.patch_anchor[keep] == 0  # lay on the dropped H&E patch
    assert lost.any() and (sub.patch_anchor[lost] == -1).all()
    assert (full.patch_rows[keep][sub.patch_anchor[sub.patch_anchor >= 0]]
            == bags.alignment.anchor[full.patch_rows[keep]][sub.patch_anchor.numpy() >= 0]).all()


def test_sub_cases_never_fuse_across_bags():
    """Sub-cases split a case's slices: an IHC patch lying on an H&E patch of another sub-case has no place."""
    bags = aligned_bags(n_cases=2, failed=())
    manifest = bags.manifest.copy()
    manifest["case"] = [f"{c}::{'a' if s == 'he' else 'b'}" for c, s in zip(manifest["case"], manifest["stain"])]
    split = bags.with_manifest(manifest)
    batch = split.batch(split.case_ids)
    rows = torch.arange(len(batch.patch_anchor))
    assert ((batch.patch_anchor == rows) | (batch.patch_anchor == -1)).all()
    assert (bags.batch(bags.case_ids).patch_anchor != -1).sum() > (batch.patch_anchor != -1).sum()


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
    rows, anchor, x = [], [], []
    for c in range(n_cases):
        label = c % 2
        he_rows = list(range(len(rows), len(rows) + 8))
        for k, r in enumerate(he_rows):
            rows.append({"case": str(c), "stain": "he", "slice": "0", "patch": str(k), "label": label})
            anchor.append(r)
            x.append(codes[0 if k < 4 else 1])
        positives = list(rng.choice(4, 2, replace=False) + (0 if label == 1 else 4))
        places = positives + [k for k in range(8) if k not in positives]  # one Melan-A patch on each H&E patch
        for k, lies_on in enumerate(places):
            positive = k < 2
            rows.append({"case": str(c), "stain": "melan", "slice": "0", "patch": str(k), "label": label})
            anchor.append(he_rows[lies_on])
            x.append(codes[2 if positive else 3])
    x = np.stack(x) + rng.normal(0, 0.3, (len(x), 8)).astype(np.float32)
    return CohortBags(pd.DataFrame(rows), x, STAINS, alignment=PatchAlignment(np.array(anchor)))


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
