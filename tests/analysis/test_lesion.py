"""Attention against the lesion outline: every measure by hand, per level, for a model with and without patch
attention, and the bootstrap summary."""

import math

import numpy as np
import pandas as pd
import pytest

from stainmil.analysis.lesion import lesion_measures, summary_table, with_truth
from stainmil.stats.metrics import bootstrap_mean


def scored_case(ignored=(False,) * 5) -> pd.DataFrame:
    patches = pd.DataFrame({"case": ["007"] * 5, "stain": ["he", "he", "he", "sox10", "sox10"],
                            "slice": ["0"] * 5, "patch": list("01201"),
                            "effective_attention": [0.4, 0.3, 0.2, 0.06, 0.04],
                            "patch_prob": [0.1, 0.9, 0.8, 0.2, 0.3]})
    truth = pd.DataFrame({"case": ["007"] * 5, "stain": ["he", "he", "he", "sox10", "sox10"], "slice": ["0"] * 5,
                          "patch": list("01201"), "lesion_fraction": [0.5, 0.0, 0.3, 0.0, 0.02],
                          "ignored": list(ignored), "truth_source": "outline"})
    return with_truth(patches, truth, 0.0)


def test_every_measure_by_hand():
    case = lesion_measures(scored_case(), k=2, level="case", patch_attention=True).iloc[0]
    assert case["case"] == "007" and case["lesion_patches"] == 3 and case["n_patches"] == 5
    # attention ranks: 0.4 (lesion), 0.3 (no), 0.2 (lesion), 0.06 (no), 0.04 (lesion): 3 of 6 pairs... by hand
    lesion_scores, other = [0.4, 0.2, 0.04], [0.3, 0.06]
    auc = np.mean([a > b for a in lesion_scores for b in other])
    assert case["attention_lesion_auc"] == pytest.approx(auc)
    assert case["attention_topk_precision"] == pytest.approx(0.5)     # top 2: lesion, not
    assert case["attention_recall_at_k"] == pytest.approx(1 / 3)      # 1 of 3 lesion patches in the top 2
    assert case["attention_pointing"] == 1.0                          # the most attended is lesion
    assert case["patch_prob_pointing"] == 0.0                         # the highest patch-alone P is not
    assert case["patch_prob_topk_precision"] == pytest.approx(0.5)    # 0.9 (no), 0.8 (lesion)


def test_per_stain_and_slice_and_a_min_fraction():
    stains = lesion_measures(scored_case(), k=1, level="stain", patch_attention=True).set_index("stain")
    assert stains.loc["he", "lesion_patches"] == 2 and stains.loc["sox10", "lesion_patches"] == 1
    assert stains.loc["sox10", "attention_pointing"] == 0.0           # 0.06 is not lesion, 0.04 is
    strict = with_truth(scored_case().drop(columns=["lesion_fraction", "lesion", "ignored", "truth_source"]),
                        scored_case()[["case", "stain", "slice", "patch", "lesion_fraction", "ignored",
                                       "truth_source"]], 0.1)
    assert strict["lesion"].sum() == 2                                # 0.02 no longer counts


def test_ignored_patches_are_left_out_and_counted():
    case = lesion_measures(scored_case(ignored=(True, False, False, False, False)), k=1, level="case",
                           patch_attention=True).iloc[0]
    assert case["n_patches"] == 4 and case["ignored_patches"] == 1
    assert case["attention_pointing"] == 0.0                          # 0.4 gone: 0.3 leads, not lesion


def test_a_model_without_patch_attention_is_not_scored_on_uniform_weights():
    case = lesion_measures(scored_case(), k=2, level="case", patch_attention=False).iloc[0]
    assert all(math.isnan(case[c]) for c in case.index if c.startswith("attention_"))
    assert not math.isnan(case["patch_prob_lesion_auc"])


def test_a_case_without_lesion_has_no_auc_or_recall_but_a_precision():
    frame = scored_case()
    frame["lesion"] = False
    case = lesion_measures(frame, k=2, level="case", patch_attention=True).iloc[0]
    assert math.isnan(case["attention_lesion_auc"]) and math.isnan(case["attention_recall_at_k"])
    assert case["attention_topk_precision"] == 0.0


def test_bootstrap_summary_over_cases():
    mean, low, high, n = bootstrap_mean(np.array([0.2, 0.4, np.nan, 0.9]), n_boot=500, seed=1)
    assert n == 3 and mean == pytest.approx(0.5) and low <= mean <= high and low >= 0.2 and high <= 0.9
    per_case = pd.DataFrame({"case": ["1", "2"], "attention_lesion_auc": [0.6, 0.8],
                             "attention_pointing": [1.0, np.nan]})
    table = summary_table(per_case, 200, 0.95, 0).set_index("measure")
    assert table.loc["attention_lesion_auc", "cases"] == 2 and table.loc["attention_pointing", "cases"] == 1
