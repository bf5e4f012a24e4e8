"""Nested CV: no outer test case is ever seen by the inner tuning; the non-nested estimate beside it; resume."""

import json

import numpy as np
import pandas as pd
import pytest

from stainmil.data.splits import load_split
from stainmil.experiments.nested import run_nested_cv
from stainmil.launch import Launch

QUIET = Launch(log=lambda *_: None)  # no progress lines in the test output

SPACE = {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}


@pytest.mark.slow
def test_nested_cv_never_shows_outer_test_cases_to_the_tuning(prepared, tmp_path):
    config = prepared.with_overrides({"train.max_epochs": 2, "tune.inner_folds": 2, "tune.space": SPACE})
    result = run_nested_cv(config, trials=2, folds=3, out_dir=tmp_path / "nested", launch=QUIET)
    out = tmp_path / "nested"
    seen_runs = 0
    for fold in sorted((out / "nested" / "folds").glob("fold_*")):
        outer = load_split(out / "splits" / f"data_splits_{fold.name}.npz")
        inner_runs = list((fold / "tune" / "trials").rglob("data_splits.npz"))
        assert len(inner_runs) == 2 * 2  # trials x inner folds, each recording the cases it trained/validated on
        for record in inner_runs:
            inner = load_split(record)
            assert not set(inner.train + inner.val) & set(outer.test), (fold.name, record)
        seen_runs += len(inner_runs)
        # the fold itself is trained with its chosen parameters and scored on its outer test cases
        trained = load_split(fold / "data_splits.npz")
        assert sorted(trained.test) == sorted(outer.test)
        chosen = json.loads((fold / "tune" / "best_params.json").read_text())["params"]
        assert json.loads((fold / "metrics.json").read_text())["evaluated_split"] == "test"
        import yaml

        assert yaml.safe_load((fold / "config.yaml").read_text())["train"]["lr"] == pytest.approx(chosen["train.lr"])
    assert seen_runs == 12
    chosen = pd.read_csv(out / "chosen_params.csv")
    assert list(chosen["fold"]) == ["fold_01", "fold_02", "fold_03"] and "train.lr" in chosen
    assert {"auc", "balanced_accuracy"} <= set(result["nested"]["over_folds"])
    assert "mean_val_auc" in result["non_nested"] and result["non_nested"]["trials"] == 2
    report = (out / "nested_report.txt").read_text()
    assert "nested (honest)" in report and "non-nested" in report
    # the non-nested study scores on the outer test cases: that is what makes it optimistic
    record = load_split(next((out / "non_nested" / "trials").rglob("data_splits.npz")))
    outer_tests = [set(load_split(f).test) for f in sorted((out / "splits").glob("*.npz"))]
    assert set(record.val) in outer_tests

    # resume: nothing is re-tuned or retrained when everything finished
    before = {p: p.stat().st_mtime_ns for p in (out / "nested" / "folds").rglob("metrics.json")}
    from stainmil.config import Config

    again = run_nested_cv(Config(), trials=2, folds=3, out_dir=out, launch=QUIET)  # config from the folder
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert again["non_nested"]["trials"] == 2
    assert np.isclose(again["nested"]["pooled_out_of_fold"]["auc"], result["nested"]["pooled_out_of_fold"]["auc"],
                      equal_nan=True)
