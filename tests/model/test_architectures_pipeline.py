"""Every architecture through the whole pipeline on the tiny preset: train -> evaluate -> analyze -> report ->
predict -> QuPath, and exact resume after a stop."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from stainmil.analysis.analyze import write_analysis
from stainmil.analysis.new_cases import predict_unlabelled
from stainmil.analysis.qupath import export_folder
from stainmil.analysis.report import build_report
from stainmil.config import ModelConfig
from stainmil.data.splits import load_split
from stainmil.errors import ConfigError
from stainmil.evaluate.evaluation import evaluate_run
from stainmil.model.registry import ARCHITECTURES, has_patch_attention
from stainmil.train.checkpoint import load_checkpoint
from stainmil.train.trainer import train
from tests.analysis.test_report import opened

pytestmark = pytest.mark.slow


def _config(prepared, folder, architecture, **model):
    return prepared.with_overrides({"train.runs_dir": str(folder), "train.max_epochs": 3,
                                    "model.architecture": architecture, "model.options.transmil.heads": 4,
                                    **{f"model.{key}": value for key, value in model.items()}})


@pytest.fixture(scope="module")
def new_cases_store(tmp_path_factory):
    """One store for the new cases every architecture predicts: the features are the encoder's, not the model's,
    so the first prediction extracts them and the others reuse them (prediction sets are explained in
    tests/analysis/test_new_cases.py)."""
    return tmp_path_factory.mktemp("new_cases")


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_pipeline_for_every_architecture(prepared, tmp_path, architecture, new_cases_store):
    if ARCHITECTURES[architecture].needs_registration:  # places need registered slides: see test_registration.py
        with pytest.raises(ConfigError, match="patch-image cohorts cannot be aligned"):
            train(_config(prepared, tmp_path / "runs", architecture))
        return
    run = train(_config(prepared, tmp_path / "runs", architecture)).run_dir
    evaluation = evaluate_run(run)
    test = evaluation.metrics["splits"]["test"]
    part = evaluation.predictions[evaluation.predictions["split"] == "test"]
    test_cases = load_split(run / "data_splits.npz").test
    assert test["n_cases"] == len(part) == len(test_cases) and np.sum(test["confusion_matrix"]) == len(part)
    assert np.allclose(part[["prob_0", "prob_1"]].sum(axis=1), 1.0) and set(part["pred"]) <= {0, 1}
    if part["label"].nunique() == 2:  # the metric is the one of the predictions written beside it
        assert test["auc"] == pytest.approx(roc_auc_score(part["label"], part["prob_1"]))
    else:
        assert np.isnan(test["auc"])
    analysis = write_analysis(run)
    summary = json.loads((run / "attention" / "summary.json").read_text())
    has_attention = has_patch_attention(ModelConfig(architecture=architecture))
    assert summary["architecture"] == architecture and summary["patch_attention"] == has_attention
    patches = pd.read_csv(run / "attention" / "patches.csv", dtype={"case": str})
    assert np.allclose(patches.groupby("case")["effective_attention"].sum(), 1.0, atol=1e-4)
    drawn = {kind for maps in analysis.heatmaps.values() for kind in maps}
    assert drawn == ({"relative_attention", "patch_prob"} if has_attention else {"patch_prob"})
    report = build_report(run, analysis)
    html = report.read_text()
    assert ('id="no-attention"' in html) == (not has_attention)
    if architecture in ("transmil", "abmil"):  # the page runs, and a map without attention shows P only
        with opened(report) as (page, errors):
            radios = page.locator("figure.viewer input[type=radio]")
            values = [radios.nth(i).get_attribute("value") for i in range(radios.count())]
            assert errors == [] and values and ("attention" in values) == has_attention
    assert (run / "qupath" / "index.csv").is_file() or export_folder(run).files
    new = prepared.with_overrides({"data.labels_csv": "",
                                   "data.include_cases": list(test_cases),
                                   "output_dir": str(new_cases_store),
                                   "features.store_dir": str(new_cases_store / "store")})
    out = predict_unlabelled(run / "checkpoints" / "best.pth", new, tmp_path / "predictions", explain=False)
    mine = pd.read_csv(out / "predictions.csv", dtype={"case": str}).set_index("case")
    theirs = pd.read_csv(run / "predictions.csv", dtype={"case": str}).set_index("case").loc[test_cases]
    assert np.allclose(mine.loc[test_cases, "prob_1"], theirs["prob_1"], atol=1e-4)


@pytest.mark.parametrize("architecture", ["clam_sb", "dtfd_mil", "hierarchical:specific"])
def test_resume_after_a_stop_matches_an_uninterrupted_run(prepared, tmp_path, architecture):
    name, _, identity = architecture.partition(":")
    model = {"stain_identity": identity} if identity else {}
    full = train(_config(prepared, tmp_path / "full", name, **model)).run_dir
    config = _config(prepared, tmp_path / "part", name, **model)

    def stop(epoch, row):
        if epoch == 2:
            raise KeyboardInterrupt  # as a killed job: the checkpoint of epoch 2 is written, the run not finished

    with pytest.raises(KeyboardInterrupt):
        train(config, on_epoch_end=stop)
    part = next((tmp_path / "part").glob("run_*"))
    train(config, resume_dir=part)
    resumed = load_checkpoint(part / "checkpoints" / "last.pth")["model"]
    uninterrupted = load_checkpoint(full / "checkpoints" / "last.pth")["model"]
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key
