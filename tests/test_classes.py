"""The class scheme: one object owns the class names, metric names, probability columns and the decision."""

import json

import numpy as np
import pytest

from stainmil.classes import ClassScheme, read_metrics
from stainmil.config import load_config
from stainmil.stats.metrics import bootstrap_intervals, classification_metrics


def test_metric_names_follow_the_cohorts_class_names_for_two_classes_too():
    classes = ClassScheme.of(["nevus", "melanoma"])
    assert classes.binary and classes.recall_metrics == ["recall_nevus", "recall_melanoma"]
    assert classes.probability_columns == ["prob_0", "prob_1"] and classes.probability_label == "P(melanoma)"
    labels, probs = np.array([0, 0, 1, 1]), np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.8, 0.2]])
    metrics = classification_metrics(labels, probs, 0.5, classes)
    assert metrics["recall_nevus"] == 0.5 and metrics["recall_melanoma"] == 0.5
    assert set(classes.point_metrics) <= set(metrics)
    assert set(bootstrap_intervals(labels, probs, 0.5, classes, n_boot=20)) == set(classes.point_metrics)


def test_the_decision_is_a_threshold_for_two_classes_and_the_most_probable_of_k():
    two, three = ClassScheme.of(["benign", "high_grade"]), ClassScheme.of(["benign", "intermediate", "high_grade"])
    probs = np.array([[0.7, 0.3], [0.45, 0.55]])
    assert two.decide(probs, 0.25).tolist() == [1, 1] and two.decide(probs, 0.5).tolist() == [0, 1]
    assert two.shown_class(probs[0]) == 1
    k = np.array([[0.2, 0.5, 0.3], [0.1, 0.2, 0.7]])
    assert three.decide(k, 0.9).tolist() == [1, 2] and three.shown_class(k[0]) == 1
    assert three.point_metrics[:3] == ["recall_benign", "recall_intermediate", "recall_high_grade"]
    assert "auc_intermediate" in three.point_metrics and "f1_macro" in three.point_metrics


def test_an_old_runs_metrics_are_read_in_the_new_names(tmp_path):
    old = {"threshold": 0.5, "splits": {"test": {"benign_recall": 0.25, "high_grade_recall": 0.75, "auc": 0.8,
                                                 "ci95": {"benign_recall": [0.1, 0.4]}}}}
    (tmp_path / "metrics.json").write_text(json.dumps(old))
    read = read_metrics(tmp_path / "metrics.json", ClassScheme.of(["nevus", "melanoma"]))
    assert read["splits"]["test"]["recall_nevus"] == 0.25 and read["splits"]["test"]["recall_melanoma"] == 0.75
    assert read["splits"]["test"]["ci95"] == {"recall_nevus": [0.1, 0.4]} and read["threshold"] == 0.5


def test_the_config_hands_out_one_scheme_from_its_class_names():
    config = load_config(None, ["data.label_values={nevus: 0, dysplastic: 1, melanoma: 2}"])
    assert config.data.classes.names == ("nevus", "dysplastic", "melanoma")
    with pytest.raises(ValueError):
        ClassScheme.of(["only"])
