"""Case-level metrics with case-level bootstrap confidence intervals, and threshold choice.

Class 1 (high-grade) is the positive class; ``p`` is P(high-grade). ``benign_recall`` is the
specificity, ``high_grade_recall`` the sensitivity; ``brier`` and ``ece`` (expected calibration error,
10 bins) say how far the probabilities are from observed risks. Thresholds are chosen on the validation split
only (:func:`choose_threshold`) and then applied unchanged to the test split.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score, roc_curve

from stainmil.errors import ConfigError
from stainmil.stats.calibration import calibration_metrics

POINT_METRICS = ("benign_recall", "high_grade_recall", "balanced_accuracy", "accuracy", "f1", "auc", "brier", "ece")


def binary_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict:
    """Point metrics at ``threshold``; AUC is NaN when only one class is present."""
    labels = np.asarray(labels, dtype=int)
    predictions = (np.asarray(probabilities) >= threshold).astype(int)
    matrix = confusion_matrix(labels, predictions, labels=[0, 1])
    recall = [matrix[k, k] / matrix[k].sum() if matrix[k].sum() else math.nan for k in (0, 1)]
    both = len(np.unique(labels)) == 2
    return {
        "benign_recall": recall[0],
        "high_grade_recall": recall[1],
        "balanced_accuracy": float(balanced_accuracy_score(labels, predictions)) if both else math.nan,
        "accuracy": float((predictions == labels).mean()) if len(labels) else math.nan,
        "f1": float(f1_score(labels, predictions, zero_division=0)),
        "auc": float(roc_auc_score(labels, probabilities)) if both else math.nan,
        **calibration_metrics(labels, probabilities),  # threshold-free: are the probabilities risks?
        "confusion_matrix": matrix.tolist(),
        "n_cases": int(len(labels)),
        "n_per_class": np.bincount(labels, minlength=2).tolist(),
    }


def bootstrap_intervals(labels: np.ndarray, probabilities: np.ndarray, threshold: float, n_boot: int = 1000,
                        level: float = 0.95, seed: int = 0) -> dict[str, list[float]]:
    """Percentile CIs of every point metric, resampling cases with replacement.

    Resamples lacking a class are skipped for metrics that need both (AUC, balanced accuracy, recall of
    the missing class), so each interval uses the resamples where it is defined.
    """
    labels = np.asarray(labels, dtype=int)
    probabilities = np.asarray(probabilities, dtype=float)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {m: [] for m in POINT_METRICS}
    for _ in range(n_boot):
        idx = rng.integers(0, len(labels), len(labels))
        m = binary_metrics(labels[idx], probabilities[idx], threshold)
        for name in POINT_METRICS:
            if not math.isnan(m[name]):
                samples[name].append(m[name])
    alpha = (1 - level) / 2
    return {name: ([float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))] if v else [math.nan, math.nan])
            for name, v in samples.items()}


def paired_auc_difference(labels: np.ndarray, probabilities_a: np.ndarray, probabilities_b: np.ndarray,
                          n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """AUC(b) - AUC(a) on the same cases, with a paired case-bootstrap percentile CI (both resampled alike).

    Returns ``delta``, ``ci_low``, ``ci_high`` and ``p_not_better`` (share of resamples with delta <= 0).
    """
    labels = np.asarray(labels, dtype=int)
    a, b = np.asarray(probabilities_a, dtype=float), np.asarray(probabilities_b, dtype=float)
    if len(np.unique(labels)) < 2:
        return {"delta": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_not_better": math.nan}
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(labels), len(labels))
        if len(np.unique(labels[idx])) == 2:
            deltas.append(roc_auc_score(labels[idx], b[idx]) - roc_auc_score(labels[idx], a[idx]))
    alpha = (1 - level) / 2
    deltas_arr = np.asarray(deltas)
    return {"delta": float(roc_auc_score(labels, b) - roc_auc_score(labels, a)),
            "ci_low": float(np.quantile(deltas_arr, alpha)), "ci_high": float(np.quantile(deltas_arr, 1 - alpha)),
            "p_not_better": float((deltas_arr <= 0).mean())}


def choose_threshold(spec: float | str, val_labels: np.ndarray, val_probabilities: np.ndarray) -> tuple[float, str]:
    """Decision threshold from the validation split. Returns (threshold, how it was chosen).

    ``spec``: a number in (0, 1) — used as is; ``youden`` — maximises TPR - FPR on val;
    ``benign_recall=R`` — the lowest threshold whose val benign recall is at least R.
    """
    if isinstance(spec, (int, float)):
        if not 0 < spec < 1:
            raise ConfigError(f"eval.threshold {spec} must be in (0, 1).")
        return float(spec), f"fixed {spec:g}"
    labels = np.asarray(val_labels, dtype=int)
    probabilities = np.asarray(val_probabilities, dtype=float)
    if len(np.unique(labels)) < 2:
        return 0.5, f"0.5 (eval.threshold '{spec}' needs both classes in the validation split)"
    if spec == "youden":
        fpr, tpr, thresholds = roc_curve(labels, probabilities)
        best = int(np.argmax(tpr - fpr))
        return float(min(thresholds[best], 1.0)), "youden on validation"
    if spec.startswith("benign_recall="):
        target = float(spec.split("=", 1)[1])
        benign = np.sort(probabilities[labels == 0])
        # predicted benign when p < t: benign recall = share of benign p below t
        k = min(len(benign) - 1, max(0, math.ceil(target * len(benign)) - 1))
        return float(np.nextafter(benign[k], 1.0)), f"benign recall >= {target:g} on validation"
    raise ConfigError(f"eval.threshold '{spec}' must be a number, 'youden' or 'benign_recall=R'.")
