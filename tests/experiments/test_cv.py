import copy
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from stainmil.data.splits import load_split, save_split
from stainmil.errors import DataError
from stainmil.experiments.cv import run_cv, summarise_cv
from stainmil.launch import Launch

QUIET = Launch(log=lambda *_: None)  # no progress lines in the test output


def _config(prepared, tmp_path):
    config = prepared.with_overrides({"train.runs_dir": str(tmp_path / "runs"), "train.max_epochs": 3})
    return config


@pytest.fixture(scope="module")
def serial_cv(prepared, tmp_path_factory):
    """A 3-fold CV of the tiny cohort, folds one after another, the whole store in memory: (config, result)."""
    config = _config(prepared, tmp_path_factory.mktemp("cv"))
    before = copy.deepcopy(config)
    result = run_cv(config, folds=3, launch=QUIET)
    assert config == before, "run_cv changed the config it was given"
    return config, result


def test_cv_end_to_end_and_resume(serial_cv):
    config, result = serial_cv
    logs = []
    out = result.out_dir
    assert out.name.startswith("cv_")
    summary = pd.read_csv(out / "cv_summary.csv")
    assert list(summary["fold"]) == ["fold_01", "fold_02", "fold_03"]
    for column in ("recall_benign", "recall_high_grade", "balanced_accuracy", "auc", "threshold", "epochs"):
        assert column in summary
    oof = pd.read_csv(out / "oof_predictions.csv", dtype={"case": str})
    assert sorted(oof["case"]) == sorted(set(oof["case"])) and len(oof) == 8  # every case tested exactly once
    for fold in ("fold_01", "fold_02", "fold_03"):  # validation comes from the fold's training part
        split = load_split(out / "splits" / f"{fold}.npz")
        assert not set(split.val) & set(split.test) and not set(split.train) & set(split.test)
        assert (out / "folds" / fold / "checkpoints" / "best.pth").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["over_folds"]) >= {"recall_benign", "auc"}
    assert "ci95" in metrics["pooled_out_of_fold"]
    assert "pooled out-of-fold" in (out / "cv_report.txt").read_text()

    # a killed CV: fold 2 unfinished (metrics gone, checkpoint kept) -> only fold 2 runs again
    (out / "folds" / "fold_02" / "metrics.json").unlink()
    finished = (out / "folds" / "fold_01" / "metrics.json").stat().st_mtime_ns
    again = run_cv(config, out_dir=out, launch=Launch(log=logs.append))
    assert any("2 already finished" in line for line in logs)
    assert (out / "folds" / "fold_01" / "metrics.json").stat().st_mtime_ns == finished
    assert (out / "folds" / "fold_02" / "metrics.json").is_file()
    assert len(again.summary) == 3

    # summaries only from every fold: one without its metrics (a time limit, a failed array task) stops them
    (out / "folds" / "fold_03" / "metrics.json").rename(out / "fold_03_metrics.json")
    written = (out / "cv_summary.csv").stat().st_mtime_ns
    with pytest.raises(DataError, match=r"1 of the 3 folds .* \(fold_03\); run `stainmil cv --resume"):
        summarise_cv(out, config, [str(out / "folds" / f) for f in ("fold_01", "fold_02", "fold_03")])
    assert (out / "cv_summary.csv").stat().st_mtime_ns == written
    (out / "fold_03_metrics.json").rename(out / "folds" / "fold_03" / "metrics.json")


def test_cv_on_the_teams_split_files(prepared, tmp_path):
    config = _config(prepared, tmp_path)
    split = load_split(prepared.paths.split_file)
    splits_dir = tmp_path / "team_splits"
    save_split(split, splits_dir / "data_splits_01.npz")
    shutil.copy(splits_dir / "data_splits_01.npz", splits_dir / "data_splits_02.npz")
    result = run_cv(config, splits_dir=splits_dir, launch=QUIET)
    assert len(result.summary) == 2
    assert np.isfinite(result.summary["epochs"]).all()


def test_cv_folds_in_parallel_processes_with_a_bounded_store(prepared, tmp_path, serial_cv):
    """--workers 2: folds trained in two spawned processes, each reading the store through a bounded cache,
    give the same folds as one after another in memory."""
    serial = serial_cv[1]
    config = _config(prepared, tmp_path / "parallel")
    config = config.with_overrides({"features.cache_mb": 0.25})
    logs = []
    parallel = run_cv(config, folds=3, launch=Launch(workers=2, log=logs.append))
    assert any("in 2 processes" in line for line in logs)
    a, b = (pd.read_csv(r.out_dir / "oof_predictions.csv", dtype={"case": str}).sort_values("case")
            for r in (serial, parallel))
    assert list(a["case"]) == list(b["case"])
    assert np.allclose(a["prob_1"], b["prob_1"], atol=1e-6)
