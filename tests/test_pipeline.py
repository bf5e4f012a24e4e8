import json
from pathlib import Path

import pandas as pd
import pytest

from stainmil.config import load_config
from stainmil.launch import Launch
from stainmil.pipeline import run_demo

QUIET = Launch(log=lambda *_: None)  # no progress lines in the test output


@pytest.mark.slow
def test_demo_end_to_end_on_the_tiny_preset(tmp_path):
    logs = []
    result = run_demo(tmp_path / "demo", ["train.max_epochs=5", "features.image_size=32", "eval.bootstrap=50"],
                      weights="random", log=logs.append, preset="tiny")
    run = result.training.run_dir
    for name in ("config.yaml", "history.csv", "predictions.csv", "metrics.json", "results.txt",
                 "confusion_matrix.png", "curves.png", "checkpoints/best.pth"):
        assert (run / name).is_file(), name
    assert json.loads((run / "metrics.json").read_text())["weights"] == "random"
    assert "RANDOM" in (run / "results.txt").read_text()
    assert any("[8/8]" in line for line in logs)
    assert result.report.is_file() and (run / "attention" / "cases.csv").is_file()
    assert list((run / "qupath").glob("*.geojson"))
    # the test cases again as new cases: no labels read, explained, exported
    predictions = result.predictions
    assert (predictions / "report.html").is_file() and list((predictions / "qupath").glob("*.geojson"))
    new = pd.read_csv(predictions / "predictions.csv", dtype={"case": str})
    old = pd.read_csv(run / "predictions.csv", dtype={"case": str})
    assert set(new["case"]) == set(old.loc[old["split"] == "test", "case"])
    again = run_demo(tmp_path / "demo", ["train.max_epochs=1", "features.image_size=32", "eval.bootstrap=10"],
                     weights="random", log=logs.append, preset="tiny")
    assert again.extract.slices_written == 0  # the store is reused


@pytest.mark.slow
def test_online_demo_needs_no_shared_store_and_reports_from_the_runs_own(tmp_path):
    logs = []
    result = run_demo(tmp_path / "demo", ["train.max_epochs=2", "features.image_size=32", "eval.bootstrap=20",
                                          "features.mode=online", "features.trainable_blocks=1"],
                      weights="random", log=logs.append, preset="tiny")
    run = result.training.run_dir
    assert result.extract is None and any("online mode" in line for line in logs)
    assert not (tmp_path / "demo" / "work" / "features").exists()          # no shared store was made
    assert (run / "features" / "store.json").is_file()                      # the trained backbone's own
    assert result.report.is_file() and (run / "attention" / "cases.csv").is_file()
    assert json.loads((run / "status.json").read_text())["state"] == "trained"


@pytest.mark.slow
def test_slide_route_from_slides_to_report_with_heatmaps_on_thumbnails(tmp_path):
    logs = []
    result = run_demo(tmp_path / "demo", ["train.max_epochs=4", "eval.bootstrap=20"], weights="random",
                      log=logs.append, preset="tiny", slides=True)
    manifest = result.config.paths.manifest

    rows = pd.read_parquet(manifest)
    assert rows["path"].str.endswith(".tiff").all() and (rows["level"] == 1).all()
    assert any("tiling them" in line for line in logs)
    run = result.training.run_dir
    heatmaps = list((run / "attention" / "heatmaps").glob("*_attention.jpg"))
    assert heatmaps and result.report.is_file()
    patches = pd.read_csv(run / "attention" / "patches.csv")
    assert {"thumbnail", "thumb_scale", "size0"} <= set(patches.columns)
    # QuPath (run by the demo): one file per slide, named like it, squares in the slide's level-0 pixels
    index = pd.read_csv(run / "qupath" / "index.csv")
    first = index.iloc[0]
    assert first["file"].endswith(f"__{Path(first['image']).stem}.geojson") and first["image"].endswith(".tiff")
    assert index["file"].is_unique and len(index) == patches.groupby(["case", "stain", "slice"]).ngroups
    features = json.loads((run / "qupath" / first["file"]).read_text())["features"]
    slide_patches = patches[patches["path"] == first["image"]].set_index(patches["patch"].astype(str)[
        patches["path"] == first["image"]])
    assert len(features) == len(slide_patches) == first["patches"]
    for feature in features[:5]:
        row = slide_patches.loc[feature["properties"]["patch"]]
        (x0, y0), (x1, _), (_, y2) = feature["geometry"]["coordinates"][0][:3]
        assert (x0, y0, x1 - x0, y2 - y0) == (row["x"], row["y"], row["size0"], row["size0"])
    # new slides, no labels: predicted straight from their tiling

    from stainmil.analysis.new_cases import predict_unlabelled

    new = result.config.with_overrides({"data.labels_csv": "", "output_dir": str(tmp_path / "new"),
                                        "features.store_dir": str(tmp_path / "new" / "store")})
    out = predict_unlabelled(run / "checkpoints" / "best.pth", new, tmp_path / "new" / "predictions")
    predicted = pd.read_csv(out / "predictions.csv", dtype={"case": str})
    assert set(predicted["case"]) == set(rows["case"]) and predicted["prob_1"].between(0, 1).all()
    # explained like a run: heatmaps on the new slides' thumbnails and a report without metrics
    assert list((out / "attention" / "heatmaps").glob("*_attention.jpg"))
    assert "thumbnail" in pd.read_csv(out / "attention" / "patches.csv").columns
    assert "ROC AUC" not in (out / "report.html").read_text()


@pytest.mark.slow
def test_three_classes_from_demo_to_cv_compare_models_and_report(tmp_path):
    """benign / intermediate / high_grade: per-class metrics, figures, report, predictions, CV and compare-models,
    on `synth --preset tiny --classes 3` (8 cases: 3, 3 and 2), every class in training."""
    import dataclasses

    from stainmil.data.splits import load_split
    from stainmil.data.synth import PRESETS, write_cohort
    from stainmil.experiments.compare_models import compare_models
    from stainmil.experiments.cv import run_cv
    from tests.analysis.test_report import opened

    # rendered first: the demo reuses a cohort it finds
    write_cohort(tmp_path / "demo" / "cohort", dataclasses.replace(PRESETS["tiny"], classes=3), workers=1)
    result = run_demo(tmp_path / "demo", ["train.max_epochs=4", "features.image_size=32", "eval.bootstrap=30"],
                      weights="random", log=lambda *_: None, preset="tiny", classes=3)
    run = result.training.run_dir
    labels = pd.read_csv(result.cohort_dir / "labels.csv", dtype=str).set_index("case_id")["label"]
    assert labels.value_counts().to_dict() == {"benign": 3, "intermediate": 3, "high_grade": 2}
    assert set(labels[load_split(run / "data_splits.npz").train]) == {"benign", "intermediate", "high_grade"}
    metrics = json.loads((run / "metrics.json").read_text())
    test = metrics["splits"]["test"]
    for name in ("benign", "intermediate", "high_grade"):
        assert f"recall_{name}" in test and f"auc_{name}" in test and f"recall_{name}" in test["ci95"]
    assert len(test["confusion_matrix"]) == 3 and "most probable of 3 classes" in metrics["threshold_rule"]
    predictions = pd.read_csv(run / "predictions.csv")
    assert {"prob_0", "prob_1", "prob_2"} <= set(predictions.columns)
    assert (predictions["pred"] == predictions[["prob_0", "prob_1", "prob_2"]].to_numpy().argmax(1)).all()
    history = pd.read_csv(run / "history.csv")
    assert {"val_recall_benign", "val_recall_intermediate", "val_recall_high_grade"} <= set(history.columns)
    assert "recall_intermediate" in (run / "results.txt").read_text()
    html = result.report.read_text()
    assert "intermediate recall" in html and "P(predicted class)" in html and "P(high-grade)" not in html
    with opened(result.report) as (page, errors):
        assert errors == []
    patches = pd.read_csv(run / "attention" / "patches.csv")
    assert {"patch_prob_benign", "patch_prob_intermediate", "patch_prob_high_grade"} <= set(patches.columns)
    new = pd.read_csv(result.predictions / "predictions.csv")
    assert set(new["pred_label"]) <= {"benign", "intermediate", "high_grade"}
    cv_config = load_config(run / "config.yaml")
    cv_config = cv_config.with_overrides({"train.max_epochs": 2, "train.runs_dir": str(tmp_path / "cv")})
    cv = run_cv(cv_config, folds=2, launch=QUIET)
    assert {"recall_benign", "recall_intermediate", "recall_high_grade", "auc"} <= set(cv.summary.columns)
    pooled = cv.metrics["pooled_out_of_fold"]
    assert pooled["n_cases"] == 8 and "recall_intermediate" in pooled["ci95"]
    assert "the most probable class" in (cv.out_dir / "cv_report.txt").read_text()
    table = compare_models(cv_config, models=["hierarchical", "mean"], folds=2, seeds=[0], out_dir=tmp_path / "models",
                           launch=QUIET)
    assert {"recall_benign", "recall_intermediate", "recall_high_grade", "delta_auc"} <= set(table.columns)


@pytest.mark.slow
def test_serial_demo_registers_and_trains_the_aligned_model(serial_demo):
    """`stainmil demo --serial`: serial sections registered after tiling; the aligned model trains on the places."""
    result = json.loads((serial_demo / "demo_result.json").read_text())
    assert any("registering every IHC slice" in line for line in result["logs"])
    assert any("training the aligned attention model" in line for line in result["logs"])
    registrations = pd.read_csv(Path(result["tiles"]) / "registration" / "registrations.csv")
    assert len(registrations) == 12 and (registrations["verdict"] == "aligned").sum() >= 4
    run = Path(result["run"])
    assert (run / "attention" / "colocated_cases.csv").is_file()
    assert "attention mapped onto it" in Path(result["report"]).read_text()
    assert (Path(result["predictions"]) / "predictions.csv").is_file()
