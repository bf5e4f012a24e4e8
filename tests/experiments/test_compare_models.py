"""compare-models: the same folds and seeds for every architecture and stain set, one table, paired ΔAUC."""

import copy
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from stainmil.config import Config
from stainmil.errors import ConfigError
from stainmil.experiments.compare_models import compare_models, parse_variants
from stainmil.launch import Launch
from stainmil.stats.metrics import paired_auc_difference

QUIET = Launch(log=lambda *_: None)  # no progress lines in the test output

pytestmark = pytest.mark.slow


def test_models_and_stain_sets_share_folds_and_seeds_and_resume(prepared, tmp_path):
    config = prepared.with_overrides({"train.max_epochs": 2, "eval.bootstrap": 20})
    out = tmp_path / "models"
    before = copy.deepcopy(config)
    table = compare_models(config, models=["hierarchical", "abmil"], folds=3, seeds=[3, 4],
                           stain_sets=["he+melan+sox10", "he"], out_dir=out, launch=QUIET)
    assert config == before, "compare_models changed the config it was given"
    # the default stain identity (embedding) is in every name
    assert list(table["model"]) == ["hierarchical:embedding (he+melan+sox10)", "abmil:embedding (he+melan+sox10)",
                                    "hierarchical:embedding (he)", "abmil:embedding (he)"]
    splits = sorted((out / "splits").glob("*.npz"))
    assert len(splits) == 3
    for folder in out.glob("*/seed_*"):  # every variant and seed trained on the same folds with its seed
        for fold, shared in zip(sorted((folder / "splits").glob("*.npz")), splits):
            assert np.array_equal(np.load(fold)["test"], np.load(shared)["test"])
        seed = int(folder.name.split("_")[1])
        assert f"seed: {seed}" in (folder / "config.yaml").read_text()
    he_only = out / "hierarchical_embedding_he_" / "seed_3" / "folds" / "fold_01"
    assert "- he\n" in (he_only / "config.yaml").read_text() and "- sox10" not in (he_only / "config.yaml").read_text()
    first = table.iloc[0]
    assert first["delta_auc"] == 0.0 and first["paired_cases"] == first["n_cases"] == 8
    for column in ("auc", "balanced_accuracy", "recall_benign", "recall_high_grade", "brier", "parameters",
                   "seconds_per_epoch"):
        assert table[column].notna().all(), column
    # pooled AUC is that of the per-case mean probability over both seeds
    oof = pd.concat([pd.read_csv(f, dtype={"case": str}) for f in (out / "abmil_embedding_he_melan_sox10_").glob(
        "seed_*/oof_predictions.csv")])
    per_case = oof.groupby("case").agg(label=("label", "first"), prob_1=("prob_1", "mean"))
    assert table.iloc[1]["auc"] == round(roc_auc_score(per_case["label"], per_case["prob_1"]), 3)
    assert table.iloc[0]["parameters"] != table.iloc[1]["parameters"]
    for name in ("models.csv", "models.md", "models.html", "models_roc.png", "models_by_stains.md"):
        assert (out / name).is_file()
    by_stains = (out / "models_by_stains.md").read_text()
    assert "| model | AUC, he+melan+sox10 | AUC, he |" in by_stains
    assert f"| abmil:embedding | {table.iloc[1]['auc']:.3f} {table.iloc[1]['auc_ci95']} | " in by_stains
    # does each model look where the pathologist looks: the tiny cohort's outlines, every model x measure
    lesion = pd.read_csv(out / "models_lesion.csv")
    assert list(dict.fromkeys(lesion["model"])) == list(table["model"])
    assert {"attention_lesion_auc", "attention_topk_precision", "attention_pointing", "patch_prob_lesion_auc",
            "delta_lesion_k", "delta_non_lesion_k"} <= set(lesion["measure"])
    auc = lesion[lesion["measure"] == "attention_lesion_auc"].set_index("model")
    assert auc["cases"].iloc[0] == 8 and auc["mean"].between(0, 1).all()
    assert (auc["ci_low"] <= auc["mean"]).all() and (auc["mean"] <= auc["ci_high"]).all()
    assert auc["delta"].iloc[0] == 0.0 and auc["paired_cases"].iloc[0] == 8   # the reference against itself
    he_only_cases = auc.loc["hierarchical:embedding (he)", "paired_cases"]
    assert 0 < he_only_cases <= 8
    assert "| hierarchical:embedding (he+melan+sox10) |" in (out / "models_lesion.md").read_text()
    html = (out / "models.html").read_text()
    assert "ΔAUC" in html and "data:image/png;base64," in html and 'id="lesion"' in html
    assert html.count("<tr>") == (1 + 4) + (1 + 2) + (1 + 4), "the long table, model x stain set, the lesion table"
    # resuming finds every fold finished and gives the same table
    again = compare_models(config, models=["hierarchical", "abmil"], folds=3, seeds=[3, 4],
                           stain_sets=["he+melan+sox10", "he"], out_dir=out, launch=QUIET)
    pd.testing.assert_frame_equal(table, again)
    assert json.loads((out / "hierarchical_embedding_he_" / "seed_3" / "metrics.json").read_text())["folds"] == 3


def test_bad_model_and_stain_specs_are_refused_before_any_work():
    with pytest.raises(ConfigError, match="transmill"):
        parse_variants(["transmill"], None, ["he"])
    with pytest.raises(ConfigError, match=r"abmil takes \['none', 'embedding', 'gated'\]"):
        parse_variants(["abmil:specific"], None, ["he"])
    with pytest.raises(ConfigError, match="not a stain identity"):
        parse_variants(["hierarchical:stainwise"], None, ["he"])
    with pytest.raises(ConfigError, match="ihc"):
        parse_variants(["abmil"], ["he+ihc"], ["he", "sox10"])
    for sets in (["melan+sox10"], ["he"]):  # aligned needs the reference stain and another one in every set
        with pytest.raises(ConfigError, match="reference stain 'he'"):
            parse_variants(["hierarchical", "aligned"], sets, ["he", "melan", "sox10"])
    variants = parse_variants(["hierarchical:embedding", "abmil:none"], ["he", "he+sox10"], ["he", "sox10"])
    assert [v.name(Config()) for v in variants] == ["hierarchical:embedding (he)", "abmil (he)",
                                          "hierarchical:embedding (he+sox10)", "abmil (he+sox10)"]


def test_paired_auc_difference_is_paired():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    noise = rng.normal(0, 1, 200)
    weak, strong = labels + 2.0 * noise, labels + 0.5 * noise
    d = paired_auc_difference(labels, weak, strong, n_boot=300)
    assert d["delta"] == pytest.approx(roc_auc_score(labels, strong) - roc_auc_score(labels, weak))
    assert 0 < d["ci_low"] < d["delta"] < d["ci_high"] and d["p_not_better"] < 0.01
    same = paired_auc_difference(labels, weak, weak, n_boot=50)
    assert same["delta"] == same["ci_low"] == same["ci_high"] == 0.0


def test_auc_by_stain_set_is_one_row_per_model_and_one_column_per_stain_set():
    from stainmil.experiments.compare_models import auc_by_stain_set

    rows = [("hierarchical", "embedding", "he+sox10", 0.9), ("late_fusion", "embedding", "he+sox10", 0.8),
            ("hierarchical", "none", "he+sox10", 0.85), ("hierarchical", "embedding", "sox10", 0.7),
            ("hierarchical", "none", "sox10", 0.6), ("hierarchical", "embedding", "he", 0.5)]
    table = pd.DataFrame([{"architecture": a, "stain_identity": i, "stains": s, "auc": auc,
                           "auc_ci95": "[0.100, 1.000]"} for a, i, s, auc in rows])
    wide = auc_by_stain_set(table)
    assert list(wide.columns) == ["model", "AUC, he+sox10", "AUC, sox10", "AUC, he"]  # in the order asked for
    assert list(wide["model"]) == ["hierarchical:embedding", "late_fusion:embedding", "hierarchical"]
    assert wide.set_index("model").loc["hierarchical", "AUC, sox10"] == "0.600 [0.100, 1.000]"
    assert wide.set_index("model").loc["late_fusion:embedding", "AUC, he"] == "—"  # not run: never a blank
    assert auc_by_stain_set(table[table["stains"] == "he+sox10"]) is None


def test_the_multistain_preset_sets_every_model_on_all_stains_and_each_alone():
    from stainmil.experiments.compare_models import parse_variants, preset_models

    models, sets = preset_models("multistain", ["he", "melan", "sox10"])
    assert {"late_fusion", "mustang", "biox_cpath", "cross_attention", "hierarchical:none"} <= set(models)
    assert sets == ["he+melan+sox10", "he", "melan", "sox10"]
    variants = parse_variants(models, sets, ["he", "melan", "sox10"])
    assert len(variants) == len(models) * 4
    with pytest.raises(ConfigError, match="multistain"):
        preset_models("everything", ["he"])


def test_graph_models_compare_to_the_same_table_in_fresh_processes_with_one_or_two_workers(prepared, tmp_path):
    """``stainmil compare-models`` of MUSTANG and BioX-CPath run as a user runs it, twice, each in its own fresh
    process: with 1 worker (folds one after the other, two threads) and with 2 (a process per fold, one thread
    each). The same ``models.csv``, to the byte, but for its seconds-per-epoch column (a clock, not a result): a
    difference from any cause that varies between runs (thread count, data order, k-NN ties, scatter order) shows."""
    import subprocess
    import sys
    from pathlib import Path

    from stainmil.config import dump_config

    config = dump_config(prepared.with_overrides({"train.max_epochs": 1, "eval.bootstrap": 20}),
                         tmp_path / "config.yaml")
    stainmil = str(Path(sys.executable).with_name("stainmil"))
    tables = []
    for name, workers in (("one_worker", 1), ("two_workers", 2)):
        subprocess.run([stainmil, "compare-models", "--config", str(config), "--models", "mustang,biox_cpath",
                        "--folds", "2", "--seeds", "5", "--workers", str(workers), "--out", str(tmp_path / name)],
                       check=True, capture_output=True, text=True)
        table = pd.read_csv(tmp_path / name / "models.csv", dtype=str)
        assert len(table) == 2 and table["auc"].notna().all()
        tables.append(table.drop(columns=["seconds_per_epoch"]).to_csv(index=False))
    assert tables[0] == tables[1], "two workers gave another table than one"
    # and beneath the table's rounding, every out-of-fold probability to the last digit written
    oofs = sorted((tmp_path / "one_worker").glob("*/seed_5/oof_predictions.csv"))
    assert len(oofs) == 2, oofs
    for oof in oofs:
        twin = tmp_path / "two_workers" / oof.relative_to(tmp_path / "one_worker")
        assert oof.read_bytes() == twin.read_bytes(), oof
