"""Calibration: Brier / ECE by hand, temperature scaling lowers ECE of an over-confident model on held-out
cases and never changes the ranking; a run evaluated with eval.calibrate=temperature fits on val only."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from stainmil.stats.calibration import (
    apply_temperature,
    brier_score,
    expected_calibration_error,
    fit_temperature,
    logit,
)


def test_brier_and_ece_by_hand():
    labels, p = np.array([0, 1, 1, 0]), np.array([0.1, 0.9, 0.6, 0.4])
    assert brier_score(labels, p) == pytest.approx((0.01 + 0.01 + 0.16 + 0.16) / 4)
    # bins: 0.1 -> [0], 0.4 -> [0], 0.6 -> [1], 0.9 -> [1]: each |p - y| weighted 1/4
    assert expected_calibration_error(labels, p) == pytest.approx((0.1 + 0.4 + 0.4 + 0.1) / 4)
    assert expected_calibration_error(np.array([1, 0]), np.array([0.5, 0.5])) == 0.0


def _overconfident(n, rng):
    true_logit = rng.normal(0, 1.5, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-true_logit))).astype(int)
    return labels, 1 / (1 + np.exp(-4 * true_logit))  # the model's logits are 4x too large


def test_temperature_scaling_lowers_ece_on_held_out_cases_and_keeps_the_ranking():
    rng = np.random.default_rng(0)
    val_y, val_p = _overconfident(400, rng)
    test_y, test_p = _overconfident(400, rng)
    temperature = fit_temperature(val_y, val_p)
    assert temperature == pytest.approx(4, rel=0.3)
    scaled = apply_temperature(test_p, temperature)
    assert expected_calibration_error(test_y, scaled) < 0.6 * expected_calibration_error(test_y, test_p)
    assert brier_score(test_y, scaled) < brier_score(test_y, test_p)
    assert roc_auc_score(test_y, scaled) == roc_auc_score(test_y, test_p)
    assert (np.diff(scaled[np.argsort(test_p, kind="stable")]) >= 0).all()  # order kept (ties only at float limits)
    assert np.allclose(apply_temperature(test_p, 1.0), test_p, atol=1e-6) and np.allclose(logit([0.5]), 0)
    assert fit_temperature(np.ones(5), np.full(5, 0.9)) == 1.0  # one class on val: nothing to fit
    # perfectly separated val: the likelihood only grows as T -> 0, so there is no temperature to fit
    assert fit_temperature(np.array([0, 0, 1, 1]), np.array([0.2, 0.4, 0.6, 0.7])) == 1.0


def test_run_evaluated_with_temperature_fits_on_val_only(prepared, tmp_path):
    from stainmil.evaluate.evaluation import evaluate_run
    from tests.conftest import trained_run

    config = prepared.with_overrides({"eval.calibrate": "temperature"})
    run = trained_run(config, tmp_path, max_epochs=3)
    metrics = json.loads((run / "metrics.json").read_text())
    calibration = metrics["calibration"]
    predictions = pd.read_csv(run / "predictions.csv", dtype={"case": str})
    val = predictions[predictions["split"] == "val"]
    assert calibration["temperature"] == pytest.approx(
        fit_temperature(val["label"].to_numpy(), val["prob_1_uncalibrated"].to_numpy()))
    test = predictions[predictions["split"] == "test"]
    assert np.allclose(test["prob_1"], apply_temperature(test["prob_1_uncalibrated"].to_numpy(),
                                                         calibration["temperature"]))
    assert {"brier", "ece"} <= set(metrics["splits"]["test"]["ci95"])
    assert "calibration: temperature" in (run / "results.txt").read_text()
    assert (run / "reliability.png").is_file()
    uncalibrated = evaluate_run(trained_run(prepared, tmp_path / "plain", max_epochs=3)).metrics
    assert uncalibrated["calibration"] == {"method": "none"}
