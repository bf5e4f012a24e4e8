"""Case-level metrics with case-level bootstrap confidence intervals, and threshold choice.

The metric names come from the cohort's :class:`~stainmil.classes.ClassScheme` (``recall_<class>`` for every
class). Two classes: class 1 is the positive class; ``p`` is P(class 1). The recall of class 0 is the
specificity, that of class 1 the sensitivity; ``brier`` and ``ece`` (expected calibration error,
10 bins) say how far the probabilities are from observed risks. Thresholds are chosen on the validation split
only (:func:`choose_threshold`) and then applied unchanged to the test split.

k > 2 classes (:func:`multiclass_metrics`): the prediction is the most probable class; ``recall_<class>`` per
class, balanced accuracy (their mean), macro F1, ``auc`` = macro one-vs-rest AUC and ``auc_<class>`` per class,
multi-class Brier and top-label ECE. :func:`classification_metrics` and :func:`bootstrap_intervals` take either.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score, roc_curve

from stainmil.classes import ClassScheme
from stainmil.errors import ConfigError
from stainmil.stats.calibration import calibration_metrics, multiclass_calibration_metrics


def binary_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float, scheme: ClassScheme) -> dict:
    """Point metrics of (N,) P(class 1) at ``threshold``; AUC is NaN when only one class is present."""
    labels = np.asarray(labels, dtype=int)
    predictions = (np.asarray(probabilities) >= threshold).astype(int)
    matrix = confusion_matrix(labels, predictions, labels=[0, 1])
    recall = [matrix[k, k] / matrix[k].sum() if matrix[k].sum() else math.nan for k in (0, 1)]
    both = len(np.unique(labels)) == 2
    return {
        scheme.recall(0): recall[0],
        scheme.recall(1): recall[1],
        "balanced_accuracy": float(balanced_accuracy_score(labels, predictions)) if both else math.nan,
        "accuracy": float((predictions == labels).mean()) if len(labels) else math.nan,
        "f1": float(f1_score(labels, predictions, zero_division=0)),
        "auc": float(roc_auc_score(labels, probabilities)) if both else math.nan,
        **calibration_metrics(labels, probabilities),  # threshold-free: are the probabilities risks?
        "confusion_matrix": matrix.tolist(),
        "n_cases": int(len(labels)),
        "n_per_class": np.bincount(labels, minlength=2).tolist(),
    }


def rank_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """ROC AUC of (N,) 0/1 ``labels`` by (N,) scores as the Mann-Whitney statistic (ties count a half): the value
    ``roc_auc_score`` gives (to ~1e-16: its trapezoids round differently), without its input checks; NaN when a
    class is missing."""
    positive = labels == 1
    n1 = int(positive.sum())
    n0 = len(labels) - n1
    if not n1 or not n0:
        return math.nan
    ranks = rankdata(probabilities)  # ties share their mean rank
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _binary_resample(labels: np.ndarray, probabilities: np.ndarray, threshold: float, scheme: ClassScheme) -> dict:
    """The bootstrap's share of :func:`binary_metrics` (its CI metrics) in NumPy: the same values (AUC by
    :func:`rank_auc`) at a hundredth of the time — scikit-learn's input checks made the 3 x 1,000 resamples of one
    evaluation take 40 s."""
    predictions = (probabilities >= threshold).astype(int)
    matrix = np.bincount(labels * 2 + predictions, minlength=4).reshape(2, 2)
    totals = matrix.sum(1)
    recall = [matrix[k, k] / totals[k] if totals[k] else math.nan for k in (0, 1)]
    both = bool(totals.all())
    tp, fp, fn = matrix[1, 1], matrix[0, 1], matrix[1, 0]
    return {
        scheme.recall(0): recall[0],
        scheme.recall(1): recall[1],
        "balanced_accuracy": float(np.mean(recall)) if both else math.nan,
        "accuracy": float((predictions == labels).mean()) if len(labels) else math.nan,
        "f1": float(2.0 * tp / ((tp + fn) + (tp + fp))) if tp + fp + fn else 0.0,  # scikit-learn's 2 tp / (T + P)
        "auc": rank_auc(labels, probabilities) if both else math.nan,
        **calibration_metrics(labels, probabilities),
    }


def multiclass_metrics(labels: np.ndarray, probabilities: np.ndarray, scheme: ClassScheme) -> dict:
    """Point metrics of (N, k) class probabilities; the prediction is the most probable class."""
    labels = np.asarray(labels, dtype=int)
    probabilities = np.asarray(probabilities, dtype=float)
    k = probabilities.shape[1]
    predictions = probabilities.argmax(1)
    matrix = confusion_matrix(labels, predictions, labels=list(range(k)))
    present = [c for c in range(k) if matrix[c].sum()]
    out: dict = {}
    aucs = []
    for c, name in enumerate(scheme.names):
        out[scheme.recall(c)] = matrix[c, c] / matrix[c].sum() if matrix[c].sum() else math.nan
        positive = labels == c
        out[f"auc_{name}"] = (float(roc_auc_score(positive, probabilities[:, c]))
                              if 0 < positive.sum() < len(labels) else math.nan)
        aucs.append(out[f"auc_{name}"])
    out.update({
        "balanced_accuracy": float(np.mean([out[scheme.recall(c)] for c in present])) if len(present) > 1
        else math.nan,
        "accuracy": float((predictions == labels).mean()) if len(labels) else math.nan,
        "f1_macro": float(f1_score(labels, predictions, labels=present, average="macro", zero_division=0))
        if present else math.nan,
        "auc": float(np.mean(aucs)) if len(present) == k else math.nan,
        **multiclass_calibration_metrics(labels, probabilities),
        "confusion_matrix": matrix.tolist(),
        "n_cases": int(len(labels)),
        "n_per_class": np.bincount(labels, minlength=k).tolist(),
    })
    return out


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float,
                           scheme: ClassScheme) -> dict:
    """Binary (``probabilities`` (N,) = P(class 1), or (N, 2)) at ``threshold``; k > 2: the most probable class."""
    probabilities = np.asarray(probabilities, dtype=float)
    if probabilities.ndim == 2 and probabilities.shape[1] == 2:
        probabilities = probabilities[:, 1]
    if probabilities.ndim == 1:
        return binary_metrics(labels, probabilities, threshold, scheme)
    return multiclass_metrics(labels, probabilities, scheme)


def bootstrap_intervals(labels: np.ndarray, probabilities: np.ndarray, threshold: float, scheme: ClassScheme,
                        n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, list[float]]:
    """Percentile CIs of every point metric, resampling cases with replacement.

    ``probabilities``: (N,) P(class 1) of a binary run, or (N, k). Resamples lacking a class
    are skipped for metrics that need it (AUC, balanced accuracy, recall of the missing class), so each interval
    uses the resamples where it is defined.
    """
    labels = np.asarray(labels, dtype=int)
    probabilities = np.asarray(probabilities, dtype=float)
    names = scheme.point_metrics
    if probabilities.ndim == 2 and probabilities.shape[1] == 2:
        probabilities = probabilities[:, 1]
    metrics = _binary_resample if probabilities.ndim == 1 else classification_metrics
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {m: [] for m in names}
    for _ in range(n_boot):
        idx = rng.integers(0, len(labels), len(labels))
        m = metrics(labels[idx], probabilities[idx], threshold, scheme)
        for name in names:
            if not math.isnan(m[name]):
                samples[name].append(m[name])
    alpha = (1 - level) / 2
    return {name: ([float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))] if v else [math.nan, math.nan])
            for name, v in samples.items()}


def paired_auc_difference(labels: np.ndarray, probabilities_a: np.ndarray, probabilities_b: np.ndarray,
                          n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """AUC(b) - AUC(a) on the same cases, with a paired case-bootstrap percentile CI (both resampled alike).

    Probabilities (N,) = P(class 1), or (N, k): then the macro one-vs-rest AUC. Returns ``delta``, ``ci_low``,
    ``ci_high`` and ``p_not_better`` (share of resamples with delta <= 0).
    """
    labels = np.asarray(labels, dtype=int)
    a, b = np.asarray(probabilities_a, dtype=float), np.asarray(probabilities_b, dtype=float)
    k = 2 if a.ndim == 1 else a.shape[1]

    def auc(y: np.ndarray, p: np.ndarray) -> float:  # binary, or macro one-vs-rest over k classes
        return rank_auc(y, p) if p.ndim == 1 else float(np.mean([roc_auc_score(y == c, p[:, c])
                                                                    for c in range(k)]))

    if len(np.unique(labels)) < k:
        return {"delta": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_not_better": math.nan}
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(labels), len(labels))
        if len(np.unique(labels[idx])) == k:
            deltas.append(auc(labels[idx], b[idx]) - auc(labels[idx], a[idx]))
    alpha = (1 - level) / 2
    deltas_arr = np.asarray(deltas)
    if not len(deltas_arr):  # no resample held every class: a point estimate without an interval
        return {"delta": float(auc(labels, b) - auc(labels, a)), "ci_low": math.nan, "ci_high": math.nan,
                "p_not_better": math.nan}
    return {"delta": float(auc(labels, b) - auc(labels, a)),
            "ci_low": float(np.quantile(deltas_arr, alpha)), "ci_high": float(np.quantile(deltas_arr, 1 - alpha)),
            "p_not_better": float((deltas_arr <= 0).mean())}


def choose_threshold(spec: float | str, val_labels: np.ndarray, val_probabilities: np.ndarray,
                     scheme: ClassScheme) -> tuple[float, str]:
    """Decision threshold on P(class 1) from the validation split. Returns (threshold, how it was chosen).

    ``spec``: a number in (0, 1) — used as is; ``youden`` — maximises TPR - FPR on val;
    ``recall_<class 0>=R`` — the lowest threshold whose val recall of class 0 is at least R;
    ``recall_<class 1>=R`` — the highest threshold whose val recall of class 1 is at least R.
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
    target = scheme.threshold_target(spec)
    if target is not None and 0 < target[1] <= 1:
        index, share = target
        if index == 0:  # predicted class 0 when p < t: its recall = share of its p below t
            negative = np.sort(probabilities[labels == 0])
            k = min(len(negative) - 1, max(0, math.ceil(share * len(negative)) - 1))
            return float(np.nextafter(negative[k], 1.0)), f"{scheme.metric_label(scheme.recall(0))} >= {share:g} " \
                "on validation"
        positive = np.sort(probabilities[labels == 1])[::-1]  # predicted class 1 when p >= t
        k = min(len(positive) - 1, max(0, math.ceil(share * len(positive)) - 1))
        return float(positive[k]), f"{scheme.metric_label(scheme.recall(1))} >= {share:g} on validation"
    raise ConfigError(f"eval.threshold '{spec}' must be a number, 'youden' or '{scheme.recall(0)}=R' / "
                      f"'{scheme.recall(1)}=R' with R in (0, 1].")


def bootstrap_mean(values: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple:
    """(mean, low, high, n): the mean of the defined values with a percentile case-bootstrap interval."""
    values = np.asarray(values, float)
    values = values[~np.isnan(values)]
    if not len(values):
        return math.nan, math.nan, math.nan, 0
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(values.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)), len(values)


def paired_mean_difference(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, level: float = 0.95,
                           seed: int = 0) -> tuple[float, float, float, int]:
    """mean(b - a) over the cases where both are defined, with a paired case-bootstrap interval, and that count."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    both = ~np.isnan(a) & ~np.isnan(b)
    mean, low, high, n = bootstrap_mean(b[both] - a[both], n_boot, level, seed)
    return mean, low, high, n
