"""Stain contribution (each stain removed in turn) and stain dropout in training batches."""

import numpy as np
import pandas as pd
import pytest
import torch

from stainmil.analysis.stains import stain_contribution, stain_sentences, stain_summary
from stainmil.classes import ClassScheme
from tests.model.test_hierarchical import model_for, random_bags


def test_prob_without_a_stain_is_the_model_on_the_other_stains():
    bags = random_bags()
    model = model_for(bags).eval()
    cases = bags.case_ids
    table = stain_contribution(model, bags, cases, torch.device("cpu"), threshold=0.5,
                               classes=ClassScheme.of(["benign", "high_grade"]))
    assert list(table["case"]) == cases
    for case in cases:
        row = table[table["case"] == case].iloc[0]
        slices = bags.case_slices[case]
        present = sorted({int(bags.slice_stain[s]) for s in slices})
        with torch.no_grad():
            full = float(model(bags.batch([case])).probabilities[0, 1])
        assert row["prob"] == pytest.approx(full, abs=1e-6)
        for index, stain in enumerate(bags.stains):
            if index not in present or len(present) == 1:
                assert np.isnan(row[f"prob_without_{stain}"]) and not row[f"flips_{stain}"]
                continue
            others = [s for s in slices if bags.slice_stain[s] != index]
            with torch.no_grad():
                expected = float(model(bags.batch([case], slices={case: others})).probabilities[0, 1])
            assert row[f"prob_without_{stain}"] == pytest.approx(expected, abs=1e-6)
            assert row[f"delta_{stain}"] == pytest.approx(expected - full, abs=1e-6)
            assert row[f"flips_{stain}"] == ((expected >= 0.5) != (full >= 0.5))


def test_summary_counts_cases_on_the_other_side_by_hand():
    contribution = pd.DataFrame({
        "case": list("abcd"), "label": [1, 1, 0, 0], "prob": [0.9, 0.7, 0.2, 0.6],
        "prob_without_sox10": [0.3, 0.8, 0.1, np.nan], "delta_sox10": [-0.6, 0.1, -0.1, np.nan],
        "flips_sox10": [True, False, False, False]})
    summary = stain_summary(contribution, ["sox10"], ClassScheme.of(["benign", "high_grade"]), threshold=0.5)
    high = summary[summary["class"] == "high_grade"].iloc[0]
    benign = summary[summary["class"] == "benign"].iloc[0]
    assert (high["cases_with_stain"], high["flipped"], high["other_side_with"], high["other_side_without"]) == \
        (2, 1, 0, 1)
    assert high["mean_delta"] == pytest.approx(-0.25)
    assert (benign["cases_with_stain"], benign["other_side_without"]) == (1, 0)  # d lacks sox10: not counted
    # AUC with all stains: 0.9, 0.7 vs 0.2, 0.6 -> 1.0; without sox10 (d as it is): 0.3, 0.8 vs 0.1, 0.6 -> 0.75
    assert high["auc_all_stains"] == pytest.approx(1.0) and high["auc_without_stain"] == pytest.approx(0.75)
    line = stain_sentences(summary, ClassScheme.of(["benign", "high_grade"]))[0]
    assert line.startswith("without sox10: ") and "1 of 2 true high_grade cases are below the threshold" in line


def test_stain_dropout_drops_whole_stains_never_all():
    bags = random_bags()
    rng = np.random.default_rng(0)
    multi = [c for c in bags.case_ids if len({int(bags.slice_stain[s]) for s in bags.case_slices[c]}) > 1]
    assert multi
    seen_fewer = False
    for _ in range(50):
        batch = bags.batch(multi, rng=rng, stain_dropout=0.5)
        for b, case in enumerate(multi):
            stains_in_batch = set(batch.group_stain[batch.group_case == b].tolist())
            assert stains_in_batch  # never every stain
            all_of_case = {int(bags.slice_stain[s]) for s in bags.case_slices[case]}
            seen_fewer |= stains_in_batch < all_of_case
            # a kept stain keeps all its slices
            kept = {int(s) for s in batch.slice_rows[np.isin(batch.group_stain[batch.slice_group].numpy(),
                                                            list(stains_in_batch)) & (batch.group_case[
                                                                batch.slice_group].numpy() == b)]}
            assert kept == {s for s in bags.case_slices[case] if bags.slice_stain[s] in stains_in_batch}
    assert seen_fewer
    # chance 1: exactly one stain stays; chance 0: the batch (and the random stream) are untouched
    one = bags.batch(multi, rng=np.random.default_rng(1), stain_dropout=1.0)
    assert all(len(set(one.group_stain[one.group_case == b].tolist())) == 1 for b in range(len(multi)))
    a, b = np.random.default_rng(2), np.random.default_rng(2)
    plain = bags.batch(multi, rng=a, stain_dropout=0.0)
    assert torch.equal(plain.features, bags.batch(multi).features) and a.random() == b.random()
