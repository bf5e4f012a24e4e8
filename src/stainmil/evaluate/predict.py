"""Predictions and evaluation of a run folder; predictions for unlabelled cases.

``evaluate_run`` reloads ``checkpoints/best.pth``, predicts every case of the run's split, picks
the decision threshold on the validation split only, and writes ``predictions.csv``,
``metrics.json``, ``results.txt``, ``confusion_matrix.png`` and ``roc_curve.png``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from stainmil.analysis.plots import plot_confusion, plot_reliability, plot_roc
from stainmil.config import Config
from stainmil.data.bags import CohortBags
from stainmil.data.splits import SUBSETS, load_split
from stainmil.errors import TrainingError
from stainmil.evaluate.calibration import (
    apply_temperature,
    calibration_metrics,
    fit_temperature,
    temperature_not_identifiable,
)
from stainmil.evaluate.metrics import binary_metrics, bootstrap_intervals, choose_threshold
from stainmil.features.extract import resolve_device
from stainmil.io import atomic_write, atomic_write_json, atomic_write_text
from stainmil.train.checkpoint import load_checkpoint, model_from_checkpoint


def predict_cases(model: nn.Module, bags: CohortBags, cases: list[str], device: torch.device,
                  batch_cases: int = 8) -> pd.DataFrame:
    """One row per case: case, label, prob_<class>… (every patch of every slice used)."""
    model.eval().to(device)
    rows = []
    with torch.inference_mode():
        for i in range(0, len(cases), batch_cases):
            batch = bags.batch(cases[i:i + batch_cases]).to(device)
            probs = model(batch).probabilities.cpu().numpy()  # (B, C)
            for case, label, p in zip(batch.case_ids, batch.labels.cpu().tolist(), probs):
                rows.append({"case": case, "label": label, **{f"prob_{k}": float(v) for k, v in enumerate(p)}})
    return pd.DataFrame(rows)


@dataclass
class Evaluation:
    predictions: pd.DataFrame
    metrics: dict
    threshold: float


def evaluate_run(run_dir: str | Path, split_name: str = "test", bags: CohortBags | None = None) -> Evaluation:
    """Evaluate a trained run on ``split_name`` (metrics for every split are written too)."""
    from stainmil.train.trainer import load_cohort

    run_dir = Path(run_dir)
    best = run_dir / "checkpoints" / "best.pth"
    if not best.is_file():
        raise TrainingError(f"{run_dir} has no checkpoints/best.pth; train it first (`stainmil train`) or resume "
                            "it (`stainmil train --resume`).")
    state = load_checkpoint(best)
    model, config = model_from_checkpoint(state)
    split = load_split(run_dir / "data_splits.npz")
    if bags is None:
        bags, split = load_cohort(config, split)
    device = resolve_device(config.train.device)
    frames = []
    for name in SUBSETS:
        if split.subset(name):
            frame = predict_cases(model, bags, split.subset(name), device)
            frame["split"] = name
            frames.append(frame)
    predictions = pd.concat(frames, ignore_index=True)
    val = predictions[predictions["split"] == "val"]
    calibration = {"method": config.eval.calibrate}
    if config.eval.calibrate == "temperature":  # fitted on val only, applied before the threshold is chosen
        temperature = fit_temperature(val["label"].to_numpy(), val["prob_1"].to_numpy())
        predictions["prob_1_uncalibrated"] = predictions["prob_1"]
        predictions["prob_1"] = apply_temperature(predictions["prob_1"].to_numpy(), temperature)
        predictions["prob_0"] = 1.0 - predictions["prob_1"]
        reason = temperature_not_identifiable(val["label"].to_numpy(), val["prob_1"].to_numpy())
        calibration.update(temperature=temperature, fitted_on=f"val ({len(val)} cases)" + (
            f"; not fitted, T = 1: {reason}" if reason else ""), uncalibrated={
            name: calibration_metrics(part["label"].to_numpy(), part["prob_1_uncalibrated"].to_numpy())
            for name, part in predictions.groupby("split")})
        val = predictions[predictions["split"] == "val"]
    threshold, how = choose_threshold(config.eval.threshold, val["label"].to_numpy(), val["prob_1"].to_numpy())
    predictions["pred"] = (predictions["prob_1"] >= threshold).astype(int)
    predictions["abs_error"] = (predictions["prob_1"] - predictions["label"]).abs()
    history = run_dir / "history.csv"  # best.pth holds the best epoch, not how many ran
    epochs_run = len(pd.read_csv(history)) if history.is_file() else int(state["epoch"])
    metrics = {"threshold": threshold, "threshold_rule": how, "best_epoch": int(state["early_stopping"]["best_epoch"]),
               "epochs_run": epochs_run, "weights": config.features.weights, "calibration": calibration,
               "splits": {}}
    for name in SUBSETS:
        part = predictions[predictions["split"] == name]
        if part.empty:
            continue
        y, p = part["label"].to_numpy(), part["prob_1"].to_numpy()
        metrics["splits"][name] = {**binary_metrics(y, p, threshold),
                                   "ci95": bootstrap_intervals(y, p, threshold, config.eval.bootstrap,
                                                               config.eval.ci, seed=config.train.seed)}
    if split_name not in metrics["splits"]:
        raise TrainingError(f"split '{split_name}' of {run_dir} is empty; evaluate another split (--split val).")
    metrics["evaluated_split"] = split_name
    _write_outputs(run_dir, config, predictions, metrics, split_name)
    return Evaluation(predictions, metrics, threshold)


def _write_outputs(run_dir: Path, config: Config, predictions: pd.DataFrame, metrics: dict, split_name: str) -> None:
    names = config.data.class_names
    columns = ["case", "split", "label", "pred"] + [c for c in predictions if c.startswith("prob_")] + ["abs_error"]
    curves = {"predicted": part_probabilities(predictions, split_name, "prob_1")}
    if "prob_1_uncalibrated" in predictions:
        curves = {"before temperature scaling": part_probabilities(predictions, split_name, "prob_1_uncalibrated"),
                  f"after (T = {metrics['calibration']['temperature']:.2f})": curves["predicted"]}
    plot_reliability(predictions.loc[predictions["split"] == split_name, "label"].to_numpy(), curves,
                     run_dir / "reliability.png", title=f"{split_name} reliability")
    atomic_write(run_dir / "predictions.csv", lambda tmp: predictions[columns].to_csv(tmp, index=False))
    part = predictions[predictions["split"] == split_name]
    result = metrics["splits"][split_name]
    plot_confusion(np.array(result["confusion_matrix"]), names, run_dir / "confusion_matrix.png",
                   title=f"{split_name} (threshold {metrics['threshold']:.3f})")
    plot_roc(part["label"].to_numpy(), part["prob_1"].to_numpy(), run_dir / "roc_curve.png",
             title=f"{split_name} ROC, AUC {result['auc']:.3f}")
    atomic_write_text(run_dir / "results.txt", results_text(metrics, split_name))
    atomic_write_json(run_dir / "metrics.json", metrics)


def part_probabilities(predictions: pd.DataFrame, split_name: str, column: str) -> np.ndarray:
    return predictions.loc[predictions["split"] == split_name, column].to_numpy()


def results_text(metrics: dict, split_name: str) -> str:
    lines = [f"stainmil results — split '{split_name}'",
             f"threshold: {metrics['threshold']:.4f} ({metrics['threshold_rule']})",
             f"best epoch: {metrics['best_epoch']} of {metrics['epochs_run']}", ""]
    calibration = metrics.get("calibration", {})
    if calibration.get("method") == "temperature":
        before = calibration["uncalibrated"][split_name]
        lines.insert(3, f"calibration: temperature {calibration['temperature']:.3f} fitted on "
                        f"{calibration['fitted_on']}; before it, {split_name} Brier {before['brier']:.3f}, "
                        f"ECE {before['ece']:.3f}")
    if str(metrics.get("weights")) == "random":
        lines.insert(1, "WARNING: backbone weights were RANDOM (no ImageNet weights available): a smoke test only.")
    for name, m in metrics["splits"].items():
        lines.append(f"[{name}] {m['n_cases']} cases (benign {m['n_per_class'][0]}, high-grade {m['n_per_class'][1]})")
        for key in ("benign_recall", "high_grade_recall", "balanced_accuracy", "auc", "f1", "brier", "ece"):
            lo, hi = m["ci95"][key]
            lines.append(f"  {key:<18} {m[key]:.3f}   95% CI [{lo:.3f}, {hi:.3f}]")
        lines.append(f"  confusion (rows true benign/high-grade): {m['confusion_matrix']}")
    return "\n".join(lines) + "\n"


def predict_unlabelled(checkpoint: str | Path, config: Config, out_dir: str | Path | None = None,
                       threshold: float | None = None, explain: bool = True) -> Path:
    """Index + extract (if needed) + predict every case of ``config``'s patch folder (or tiled slides); no
    labels needed. Returns the prediction folder (default <output_dir>/predictions)::

        predictions.csv  threshold.txt
        attention/…      the same tables, heatmaps and patch grids as ``stainmil analyze`` (``explain``)
        report.html      probabilities, threshold, stain and slice attention, slice viewers; no metrics

    The threshold (and temperature, when the run calibrated) is ``threshold`` if given, else the run's
    metrics.json next to the checkpoint, else 0.5.
    """
    from stainmil.analysis.analyze import write_tables
    from stainmil.analysis.attention import compute_tables
    from stainmil.analysis.report import build_prediction_report
    from stainmil.data.cohort import build_index, keep_stains, write_index
    from stainmil.features.extract import extract_features
    from stainmil.features.online import backbone_from_checkpoint
    from stainmil.features.sources import cohort_features
    from stainmil.features.store import check_store

    state = load_checkpoint(checkpoint)
    model, trained_config = model_from_checkpoint(state)
    # the model only understands features made like its own; but they go to this config's own store, never
    # into the training store (where a new case with a training case's id would find the old case's file)
    store_dir, cache_mb = config.features.store_dir, config.features.cache_mb
    config.features = dataclasses.replace(trained_config.features, store_dir=store_dir, views=1,  # plain view only
                                          cache_mb=cache_mb)
    trained_stains = list(trained_config.data.stains)
    # indexed with every stain the config knows; only those the model was trained on are read (a stain subset)
    config.data.stains = trained_stains + [s for s in config.data.stains if s not in trained_stains]
    config.data.class_names = list(trained_config.data.class_names)
    result = build_index(config, require_labels=False)
    write_index(result, config)
    manifest = keep_stains(result.manifest, trained_stains)
    # an online run that fine-tuned its backbone saved it in the checkpoint; its features need that backbone
    tuned = backbone_from_checkpoint(state, trained_config, resolve_device(config.features.device))
    extract_features(config, manifest, backbone=tuned)
    check_store(config.store_dir, config)
    bags = CohortBags(manifest, cohort_features(config.store_dir, manifest, 1, cache_mb), trained_stains)
    device = resolve_device(config.train.device)
    predictions = predict_cases(model, bags, bags.case_ids, device)
    threshold, rule, temperature = _decision(checkpoint, threshold)
    if temperature != 1.0:
        predictions["prob_1_uncalibrated"] = predictions["prob_1"]
        predictions["prob_1"] = apply_temperature(predictions["prob_1"].to_numpy(), temperature)
        predictions["prob_0"] = 1.0 - predictions["prob_1"]
    predictions["pred"] = (predictions["prob_1"] >= threshold).astype(int)
    predictions["pred_label"] = [trained_config.data.class_names[k] for k in predictions["pred"]]
    predictions["threshold"] = threshold
    out = Path(out_dir) if out_dir else Path(config.output_dir) / "predictions"
    (out / "predictions.csv").unlink(missing_ok=True)  # an earlier set's file must not sit beside new partial files
    atomic_write_text(out / "threshold.txt", f"{threshold}\n{rule}\n")
    if explain:
        tables = compute_tables(model, config, bags, bags.case_ids, predictions, "prediction set", threshold,
                                temperature)
        analysis = write_tables(out / "attention", tables, config)
        build_prediction_report(out, analysis, config, threshold, rule, checkpoint)
    # written last: a folder with predictions.csv is a finished prediction set
    atomic_write(out / "predictions.csv", lambda tmp: predictions.drop(columns=["label"]).to_csv(tmp, index=False))
    return out


def _decision(checkpoint: str | Path, threshold: float | None) -> tuple[float, str, float]:
    """(threshold, where it came from, temperature) for predictions with a run's checkpoint."""
    import json

    metrics_file = Path(checkpoint).resolve().parent.parent / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    temperature = float(metrics.get("calibration", {}).get("temperature", 1.0))
    if threshold is not None:
        return threshold, "given", temperature
    if metrics:
        return float(metrics["threshold"]), f"from {metrics_file} ({metrics['threshold_rule']})", temperature
    return 0.5, "default 0.5 (no metrics.json next to the checkpoint)", temperature
