"""Are the probabilities risks? Brier score, expected calibration error, reliability curves, and
temperature scaling fitted on the validation split.

For a binary model P(high-grade) = sigmoid(z) with z = logit(p); temperature scaling divides z by one
T > 0 fitted by minimising the negative log-likelihood on the validation cases (Guo et al. 2017). It is
monotonic, so rankings — and the AUC — never change; only how confident the probabilities are.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar

_EPS = 1e-7


def brier_score(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean squared error of P(high-grade) against the 0/1 label (0 = perfect)."""
    labels, probabilities = np.asarray(labels, float), np.asarray(probabilities, float)
    return float(np.mean((probabilities - labels) ** 2)) if len(labels) else math.nan


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> float:
    """ECE over ``bins`` equal-width bins of P(high-grade): sum over bins of (cases in bin / n) x
    |mean predicted probability - observed high-grade share|."""
    labels, probabilities = np.asarray(labels, float), np.asarray(probabilities, float)
    if not len(labels):
        return math.nan
    which = np.minimum((probabilities * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(probabilities[inside].mean() - labels[inside].mean())
    return float(total)


def calibration_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    return {"brier": brier_score(labels, probabilities), "ece": expected_calibration_error(labels, probabilities)}


def multiclass_calibration_metrics(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> dict[str, float]:
    """k classes: Brier = mean over cases of sum_k (p_k - [y = k])^2 (0 = perfect; 2 = sure and wrong); ECE on the
    top label (confidence = highest probability, correct = it is the true class)."""
    labels, probabilities = np.asarray(labels, int), np.asarray(probabilities, float)
    if not len(labels):
        return {"brier": math.nan, "ece": math.nan}
    onehot = np.eye(probabilities.shape[1])[labels]
    correct = (probabilities.argmax(1) == labels).astype(float)
    return {"brier": float(np.mean(((probabilities - onehot) ** 2).sum(1))),
            "ece": expected_calibration_error(correct, probabilities.max(1), bins)}


def reliability_curve(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean predicted, observed share, cases) per non-empty bin — the points of a reliability diagram."""
    labels, probabilities = np.asarray(labels, float), np.asarray(probabilities, float)
    which = np.minimum((probabilities * bins).astype(int), bins - 1)
    kept = [b for b in range(bins) if (which == b).any()]
    return (np.array([probabilities[which == b].mean() for b in kept]),
            np.array([labels[which == b].mean() for b in kept]), np.array([(which == b).sum() for b in kept]))


def logit(probabilities: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probabilities, float), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """P(high-grade) with its logit divided by ``temperature`` (T > 1 softens, T < 1 sharpens)."""
    return 1.0 / (1.0 + np.exp(-logit(probabilities) / temperature))


def temperature_not_identifiable(labels: np.ndarray, probabilities: np.ndarray) -> str | None:
    """Why a temperature cannot be fitted on these cases, or None.

    With one class there is nothing to fit; when the model separates the classes perfectly, the likelihood
    keeps rising as T -> 0, so the "fit" is the bound (maximal sharpening) — on a handful of validation cases
    that is overfitting, not calibration.
    """
    labels = np.asarray(labels, int)
    probabilities = np.asarray(probabilities, float)
    if len(np.unique(labels)) < 2:
        return "validation holds one class"
    if probabilities[labels == 1].min() > probabilities[labels == 0].max():
        return "validation cases are perfectly separated (T would only sharpen without bound)"
    return None


def fit_temperature(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The T in [0.05, 20] minimising the validation negative log-likelihood; 1.0 (no scaling) when it is not
    identifiable (:func:`temperature_not_identifiable`)."""
    labels = np.asarray(labels, float)
    if temperature_not_identifiable(labels, probabilities):
        return 1.0
    z = logit(probabilities)

    def nll(log_t: float) -> float:
        q = np.clip(1.0 / (1.0 + np.exp(-z / math.exp(log_t))), _EPS, 1 - _EPS)
        return float(-np.mean(labels * np.log(q) + (1 - labels) * np.log1p(-q)))

    result = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(result.x))
