import math

import numpy as np
import pytest

from stainmil.classes import ClassScheme
from stainmil.errors import ConfigError
from stainmil.stats.metrics import binary_metrics, bootstrap_intervals, choose_threshold

TWO = ClassScheme.of(["benign", "high_grade"])


def test_point_metrics_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    probs = np.array([0.1, 0.6, 0.3, 0.8, 0.4, 0.9, 0.7])
    m = binary_metrics(labels, probs, 0.5, TWO)
    assert m["confusion_matrix"] == [[2, 1], [1, 3]]
    assert m["recall_benign"] == pytest.approx(2 / 3)
    assert m["recall_high_grade"] == pytest.approx(3 / 4)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert m["auc"] == pytest.approx(11 / 12)  # 11 of 12 (benign, high-grade) pairs ordered


def test_auc_is_nan_with_one_class():
    m = binary_metrics(np.array([1, 1]), np.array([0.2, 0.9]), 0.5, TWO)
    assert math.isnan(m["auc"]) and math.isnan(m["recall_benign"])


def test_bootstrap_interval_brackets_the_point_estimate():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 6 + [1] * 12)
    probs = np.clip(labels * 0.4 + rng.uniform(0, 0.6, 18), 0, 1)
    point = binary_metrics(labels, probs, 0.5, TWO)
    ci = bootstrap_intervals(labels, probs, 0.5, TWO, n_boot=300)
    for key in ("auc", "balanced_accuracy", "recall_benign"):
        lo, hi = ci[key]
        assert lo <= point[key] <= hi and hi - lo > 0
    assert ci == bootstrap_intervals(labels, probs, 0.5, TWO, n_boot=300)  # seeded


def test_threshold_rules_use_validation_only():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    probs = np.array([0.55, 0.6, 0.62, 0.7, 0.65, 0.8, 0.9, 0.95])
    assert choose_threshold(0.5, labels, probs, TWO)[0] == 0.5
    t, _ = choose_threshold("youden", labels, probs, TWO)
    m = binary_metrics(labels, probs, t, TWO)
    assert m["recall_benign"] + m["recall_high_grade"] - 1 >= 0.5
    t, _ = choose_threshold("recall_benign=0.75", labels, probs, TWO)
    assert binary_metrics(labels, probs, t, TWO)["recall_benign"] >= 0.75
    assert choose_threshold("benign_recall=0.75", labels, probs, TWO)[0] == t  # an old config's spelling
    t, how = choose_threshold("recall_high_grade=1", labels, probs, TWO)  # the highest t keeping every positive
    assert binary_metrics(labels, probs, t, TWO)["recall_high_grade"] == 1 and t == 0.65 and "high-grade" in how
    with pytest.raises(ConfigError):
        choose_threshold("median", labels, probs, TWO)


def _sklearn_bootstrap(labels, probs, threshold, scheme, n_boot, level=0.95, seed=0):
    """The bootstrap as it was: scikit-learn's metrics on every resample (the reference for the NumPy path)."""
    rng = np.random.default_rng(seed)
    samples = {m: [] for m in scheme.point_metrics}
    for _ in range(n_boot):
        idx = rng.integers(0, len(labels), len(labels))
        m = binary_metrics(labels[idx], probs[idx], threshold, scheme)
        for name in samples:
            if not math.isnan(m[name]):
                samples[name].append(m[name])
    alpha = (1 - level) / 2
    return {k: [float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))] for k, v in samples.items()}


def test_the_bootstrap_gives_scikit_learns_intervals_in_numpy():
    """The resamples' metrics in NumPy (a rank AUC, ties counting a half): every interval as scikit-learn's metrics
    give it, on scores with ties, a threshold that lands on them and resamples that lose a class."""
    rng = np.random.default_rng(3)
    for n, ties in ((7, True), (30, True), (120, False)):
        labels = (rng.random(n) < 0.35).astype(int)
        probs = rng.uniform(0, 1, n)
        if ties:
            probs = np.round(probs * 4) / 4  # many equal scores, some exactly at the threshold
        ours = bootstrap_intervals(labels, probs, 0.5, TWO, n_boot=200)
        theirs = _sklearn_bootstrap(labels, probs, 0.5, TWO, n_boot=200)
        assert ours.keys() == theirs.keys()
        for name in theirs:
            assert ours[name] == pytest.approx(theirs[name], abs=1e-12, nan_ok=True), name


def test_rank_auc_is_scikit_learns_auc():
    from sklearn.metrics import roc_auc_score

    from stainmil.stats.metrics import rank_auc

    rng = np.random.default_rng(5)
    for _ in range(50):
        labels = (rng.random(25) < 0.5).astype(int)
        labels[:2] = [0, 1]
        probs = np.round(rng.uniform(0, 1, 25), int(rng.integers(1, 4)))  # ties at 1 to 3 decimals
        assert rank_auc(labels, probs) == pytest.approx(roc_auc_score(labels, probs), abs=1e-15)
    assert math.isnan(rank_auc(np.ones(4, int), np.arange(4.0)))
