"""Predictions for new, unlabelled cases: explained like a run (tables, heatmaps, report), no metrics."""

import copy
import json

import numpy as np
import pandas as pd
import pytest

from stainmil.analysis.new_cases import predict_unlabelled
from stainmil.analysis.qupath import export_folder
from stainmil.data.splits import load_split
from tests.conftest import trained_run


@pytest.fixture(scope="module")
def predicted(prepared, tmp_path_factory):
    """A run's test cases predicted as new cases: labels withheld, only those cases indexed."""
    work = tmp_path_factory.mktemp("predict")
    run = trained_run(prepared, work / "runs", 4)
    test_cases = load_split(run / "data_splits.npz").test
    new = prepared.with_overrides({"data.labels_csv": "",
                                   "data.include_cases": list(test_cases),
                                   "output_dir": str(work / "new"),
                                   "features.store_dir": str(work / "new" / "store")})
    before = copy.deepcopy(new)
    out = predict_unlabelled(run / "checkpoints" / "best.pth", new, work / "predictions")
    assert new == before, "predict_unlabelled changed the config it was given"
    return run, test_cases, out


def test_predictions_equal_the_runs_on_the_same_cases(predicted):
    run, test_cases, out = predicted
    mine = pd.read_csv(out / "predictions.csv", dtype={"case": str}).set_index("case")
    theirs = pd.read_csv(run / "predictions.csv", dtype={"case": str}).set_index("case").loc[test_cases]
    assert sorted(mine.index) == sorted(test_cases) and "label" not in mine.columns
    assert np.allclose(mine.loc[test_cases, "prob_1"], theirs["prob_1"], atol=1e-4)
    threshold = json.loads((run / "metrics.json").read_text())["threshold"]
    assert (mine["threshold"] == threshold).all()
    assert ((mine["prob_1"] >= threshold).astype(int) == mine["pred"]).all()


def test_prediction_set_is_explained_without_metrics(predicted):
    _, test_cases, out = predicted
    attention = out / "attention"
    for name in ("patches.csv", "slices.csv", "cases.csv", "stain_contribution.csv", "stain_summary.csv",
                 "summary.txt"):
        assert (attention / name).is_file(), name
    cases = pd.read_csv(attention / "cases.csv", dtype={"case": str})
    assert sorted(cases["case"]) == sorted(test_cases) and (cases["label"] == -1).all()
    assert list(attention.glob("heatmaps/*_attention.jpg")) and list(attention.glob("heatmaps/*_slice.jpg"))
    assert len(list(attention.glob("patches/*.jpg"))) == len(test_cases)
    assert not (attention / "concentration_vs_error.png").exists()  # |p - y| needs labels
    summary = pd.read_csv(attention / "stain_summary.csv")
    assert set(summary["class_is"]) == {"predicted"} and summary["auc_without_stain"].isna().all()
    html = (out / "report.html").read_text()
    assert "stainmil predictions" in html and "unlabelled cases" in html and "threshold" in html
    assert "id=\"metrics-" not in html and "balanced accuracy" not in html and "true benign" not in html
    assert html.count('class="viewer"') >= len(test_cases)  # a viewer per mapped slice, every case a section
    assert "What each stain contributes" in html


def test_prediction_folder_exports_to_qupath(predicted):
    _, test_cases, out = predicted
    result = export_folder(out)
    index = pd.read_csv(result.out_dir / "index.csv", dtype={"case": str})
    assert set(index["case"]) == set(test_cases) and result.out_dir == out / "qupath"
