"""Seed spread: K training seeds on the very same folds, spread over seeds beside spread over folds."""


import pytest

from stainmil.data.splits import load_split
from stainmil.experiments.seeds import run_cv_seeds
from stainmil.launch import Launch

QUIET = Launch(log=lambda *_: None)  # no progress lines in the test output


@pytest.mark.slow
def test_cv_with_two_seeds_on_the_same_folds(prepared, tmp_path):
    config = prepared.with_overrides({"train.max_epochs": 2})
    seeds = [config.train.seed, config.train.seed + 1]
    table, out = run_cv_seeds(config, seeds=seeds, folds=3, out_dir=tmp_path / "seeds", launch=QUIET)
    assert list(table["seed"]) == seeds
    for fold in ("fold_01", "fold_02", "fold_03"):
        a = load_split(out / "seed_1" / "splits" / f"{fold}.npz")
        b = load_split(out / "seed_2" / "splits" / f"{fold}.npz")
        assert sorted(a.test) == sorted(b.test) and sorted(a.train) == sorted(b.train)
    assert {"auc", "brier", "ece", "auc_sd_over_folds"} <= set(table.columns)
    report = (out / "seeds_report.txt").read_text()
    assert "mean ± SD over seeds" in report and "mean SD over folds" in report
    assert (out / "seeds.json").is_file()
