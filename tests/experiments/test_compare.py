"""Encoder comparison: every encoder cross-validated on the same fold files, one table with CIs and img/s."""

import shutil

import numpy as np
import pandas as pd
import pytest

from stainmil.data.splits import load_split
from stainmil.errors import ConfigError
from stainmil.experiments.compare import compare_encoders
from stainmil.launch import Launch

QUIET = Launch(log=lambda *_: None)  # no progress lines in the test output


@pytest.mark.slow
def test_two_encoders_on_the_same_folds(prepared, tmp_path):
    config = prepared.with_overrides({"output_dir": str(tmp_path / "work")})  # fresh stores; the same index
    shutil.copytree(prepared.paths.index_dir, config.paths.index_dir)
    config = config.with_overrides({"train.max_epochs": 2})
    table = compare_encoders(config, backbones=["densenet121", "kaiko_vits16"], folds=3, out_dir=tmp_path / "cmp",
                             launch=QUIET)
    assert list(table["encoder"]) == ["densenet121", "kaiko_vits16"]
    assert list(table["dim"]) == [1024, 384] and (table["extraction_img_s"] > 0).all()
    assert table["auc_ci95"].str.match(r"\[\d\.\d{3}, \d\.\d{3}\]").all()
    for fold in ("fold_01", "fold_02", "fold_03"):  # the very same cases in every encoder's fold
        a = load_split(tmp_path / "cmp" / "densenet121" / "splits" / f"{fold}.npz")
        b = load_split(tmp_path / "cmp" / "kaiko_vits16" / "splits" / f"{fold}.npz")
        assert all(np.array_equal(sorted(a.subset(s)), sorted(b.subset(s))) for s in ("train", "val", "test"))
    assert (tmp_path / "cmp" / "encoders.md").read_text().count("\n") == 4
    again = compare_encoders(config, backbones=["densenet121", "kaiko_vits16"], folds=3, out_dir=tmp_path / "cmp",
                             launch=QUIET)  # resumes: stores and folds reused
    assert again["extraction_img_s"].isna().all()
    pd.testing.assert_series_equal(again["auc"], table["auc"])


def test_unknown_or_misfit_encoders_fail_before_any_work(prepared, tmp_path):
    with pytest.raises(ConfigError, match="not registered"):
        compare_encoders(prepared, backbones=["densenet121", "nope"], out_dir=tmp_path / "x")
    with pytest.raises(ConfigError, match="multiple of h0_mini's 14-px tokens"):
        compare_encoders(prepared, backbones=["h0_mini"], out_dir=tmp_path / "x")  # 32 px input
    assert not (tmp_path / "x").exists()
