"""Evaluation of a run folder.

``evaluate_run`` opens the run (:func:`stainmil.train.run.open_run`), predicts every case of its split,
fits the temperature (``eval.calibrate``) and picks the decision threshold on the validation split only, and
writes ``predictions.csv``, ``metrics.json``, ``results.txt``, ``confusion_matrix.png``, ``roc_curve.png`` and
``reliability.png``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stainmil.bags.cohort import CohortBags
from stainmil.classes import ClassScheme
from stainmil.config import Config
from stainmil.data.splits import SUBSETS
from stainmil.errors import TrainingError
from stainmil.io import atomic_write, atomic_write_json, atomic_write_text
from stainmil.stats.calibration import calibration_metrics, fit_temperature, temperature_not_identifiable
from stainmil.stats.metrics import bootstrap_intervals, choose_threshold, classification_metrics
from stainmil.stats.plots import plot_confusion, plot_reliability, plot_roc, plot_roc_one_vs_rest
from stainmil.train.run import calibrated, case_probabilities, open_run


def _binary_decision(predictions: pd.DataFrame, config: Config) -> tuple[pd.DataFrame, dict, float, str]:
    """Two classes: the temperature (``eval.calibrate``) and the threshold (``eval.threshold``), both fitted on the
    validation split only; the predictions get ``pred`` and ``abs_error``."""
    val = predictions[predictions["split"] == "val"]
    calibration = {"method": config.eval.calibrate}
    if config.eval.calibrate == "temperature":  # fitted on val only, applied before the threshold is chosen
        temperature = fit_temperature(val["label"].to_numpy(), val["prob_1"].to_numpy())
        predictions["prob_1_uncalibrated"] = predictions["prob_1"]
        probs = calibrated(predictions[["prob_0", "prob_1"]].to_numpy(), temperature)
        predictions["prob_0"], predictions["prob_1"] = probs[:, 0], probs[:, 1]
        reason = temperature_not_identifiable(val["label"].to_numpy(), val["prob_1"].to_numpy())
        calibration.update(temperature=temperature, fitted_on=f"val ({len(val)} cases)" + (
            f"; not fitted, T = 1: {reason}" if reason else ""), uncalibrated={
            name: calibration_metrics(part["label"].to_numpy(), part["prob_1_uncalibrated"].to_numpy())
            for name, part in predictions.groupby("split")})
        val = predictions[predictions["split"] == "val"]
    threshold, how = choose_threshold(config.eval.threshold, val["label"].to_numpy(), val["prob_1"].to_numpy(),
                                      config.data.classes)
    predictions["pred"] = config.data.classes.decide(predictions[["prob_0", "prob_1"]].to_numpy(), threshold)
    predictions["abs_error"] = (predictions["prob_1"] - predictions["label"]).abs()
    return predictions, calibration, threshold, how


@dataclass
class Evaluation:
    """A run's evaluation: every case's prediction, the metrics of every split and the decision threshold."""

    predictions: pd.DataFrame   # case, split, label, pred, prob_<k>…, abs_error
    metrics: dict               # what metrics.json holds
    threshold: float            # on P(class 1) (two classes; 0.5 and unused with k classes)
    classes: ClassScheme        # the run's class scheme (metric names, decision)


def evaluate_run(run_dir: str | Path, split_name: str = "test", bags: CohortBags | None = None) -> Evaluation:
    """Evaluate a trained run on ``split_name`` (metrics for every split are written too)."""
    run = open_run(run_dir, bags=bags)
    run_dir, config, state, split = run.run_dir, run.config, run.state, run.split
    frames = []
    for name in SUBSETS:
        if split.subset(name):
            frame = case_probabilities(run.model, run.bags, split.subset(name), run.device)
            frame["split"] = name
            frames.append(frame)
    predictions = pd.concat(frames, ignore_index=True)
    classes = config.data.classes
    if classes.binary:
        predictions, calibration, threshold, how = _binary_decision(predictions, config)
    else:  # k classes: the most probable one; temperature scaling is fitted for two classes only
        threshold, how = 0.5, classes.decision_rule()
        calibration = {"method": "none" if config.eval.calibrate == "none" else
                       f"none ({config.eval.calibrate} is fitted for two classes only)"}
        probs = predictions[classes.probability_columns].to_numpy()
        predictions["pred"] = classes.decide(probs, threshold)
        predictions["abs_error"] = 1.0 - probs[range(len(probs)), predictions["label"].clip(lower=0)]  # 1 - P(true)
    history = run_dir / "history.csv"  # best.pth holds the best epoch, not how many ran
    epochs_run = len(pd.read_csv(history)) if history.is_file() else int(state["epoch"])
    metrics = {"threshold": threshold, "threshold_rule": how, "best_epoch": int(state["early_stopping"]["best_epoch"]),
               "epochs_run": epochs_run, "weights": config.features.weights, "calibration": calibration,
               "splits": {}}
    for name in SUBSETS:
        part = predictions[predictions["split"] == name]
        if part.empty:
            continue
        y, p = part["label"].to_numpy(), part[classes.probability_columns].to_numpy()  # (N, k)
        metrics["splits"][name] = {**classification_metrics(y, p, threshold, classes),
                                   "ci95": bootstrap_intervals(y, p, threshold, classes, config.eval.bootstrap,
                                                               config.eval.ci, seed=config.train.seed)}
    if split_name not in metrics["splits"]:
        raise TrainingError(f"split '{split_name}' of {run_dir} is empty; evaluate another split (--split val).")
    metrics["evaluated_split"] = split_name
    _write_outputs(run_dir, config.data.classes, predictions, metrics, split_name)
    return Evaluation(predictions, metrics, threshold, classes)


def _write_outputs(run_dir: Path, classes: ClassScheme, predictions: pd.DataFrame, metrics: dict,
                   split_name: str) -> None:
    columns = ["case", "split", "label", "pred"] + [c for c in predictions if c.startswith("prob_")] + ["abs_error"]
    atomic_write(run_dir / "predictions.csv", lambda tmp: predictions[columns].to_csv(tmp, index=False))
    part = predictions[predictions["split"] == split_name]
    result = metrics["splits"][split_name]
    if not classes.binary:
        plot_confusion(np.array(result["confusion_matrix"]), list(classes.names), run_dir / "confusion_matrix.png",
                       title=f"{split_name} (most probable class)")
        plot_roc_one_vs_rest(part["label"].to_numpy(), part[classes.probability_columns].to_numpy(),
                             list(classes.names), run_dir / "roc_curve.png",
                             title=f"{split_name} one-vs-rest ROC, macro AUC {result['auc']:.3f}")
    else:
        curves = {"predicted": part_probabilities(predictions, split_name, "prob_1")}
        if "prob_1_uncalibrated" in predictions:
            curves = {"before temperature scaling": part_probabilities(predictions, split_name, "prob_1_uncalibrated"),
                      f"after (T = {metrics['calibration']['temperature']:.2f})": curves["predicted"]}
        plot_reliability(part["label"].to_numpy(), curves, run_dir / "reliability.png",
                         title=f"{split_name} reliability", positive=classes.positive)
        plot_confusion(np.array(result["confusion_matrix"]), list(classes.names), run_dir / "confusion_matrix.png",
                       title=f"{split_name} (threshold {metrics['threshold']:.3f})")
        plot_roc(part["label"].to_numpy(), part["prob_1"].to_numpy(), run_dir / "roc_curve.png",
                 title=f"{split_name} ROC, AUC {result['auc']:.3f}", readable=classes.readable)
    atomic_write_text(run_dir / "results.txt", results_text(metrics, split_name, classes))
    atomic_write_json(run_dir / "metrics.json", metrics)


def part_probabilities(predictions: pd.DataFrame, split_name: str, column: str) -> np.ndarray:
    return predictions.loc[predictions["split"] == split_name, column].to_numpy()


def results_text(metrics: dict, split_name: str, classes: ClassScheme) -> str:
    metrics = classes.upgrade_metrics(metrics)
    lines = [f"stainmil results — split '{split_name}'",
             f"threshold: {metrics['threshold']:.4f} ({metrics['threshold_rule']})" if classes.binary else
             f"decision: {metrics['threshold_rule']}",
             f"best epoch: {metrics['best_epoch']} of {metrics['epochs_run']}", ""]
    calibration = metrics.get("calibration", {})
    if calibration.get("method") == "temperature":
        before = calibration["uncalibrated"][split_name]
        lines.insert(3, f"calibration: temperature {calibration['temperature']:.3f} fitted on "
                        f"{calibration['fitted_on']}; before it, {split_name} Brier {before['brier']:.3f}, "
                        f"ECE {before['ece']:.3f}")
    if str(metrics.get("weights")) == "random":
        lines.insert(1, "WARNING: backbone weights were RANDOM (no ImageNet weights available): a smoke test only.")
    shown = classes.shown_metrics if classes.binary else classes.point_metrics
    readable = classes.readable
    for name, m in metrics["splits"].items():
        counts = ", ".join(f"{c} {n}" for c, n in zip(readable, m["n_per_class"]))
        lines.append(f"[{name}] {m['n_cases']} cases ({counts})")
        for key in shown:
            lo, hi = m["ci95"][key]
            lines.append(f"  {key:<18} {m[key]:.3f}   95% CI [{lo:.3f}, {hi:.3f}]")
        lines.append(f"  confusion (rows true {'/'.join(readable)}): {m['confusion_matrix']}")
    return "\n".join(lines) + "\n"
