"""The class scheme of a cohort: one object, built once from ``data.class_names``, that every part asks.

It owns the class names, the metric names (``recall_<class>`` for every class, two classes included), the
probability columns of a predictions table (``prob_0`` … ``prob_<k-1>``), the decision (two classes: P(last
class) >= threshold; k classes: the most probable one), the class whose probability a table shows for a case,
and the words the report and the command line print. Evaluation, prediction of new cases, cross-validation,
compare-models, the trainer's history, the CLI and the report all read it, so a cohort whose classes are
``nevus, melanoma`` gets ``recall_nevus`` and ``P(melanoma)`` everywhere.

Runs written before the scheme named the two binary recalls ``benign_recall`` and ``high_grade_recall``
whatever the class names; :meth:`ClassScheme.upgrade_metrics` reads their ``metrics.json`` through
:data:`LEGACY_METRIC_KEYS`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# metric names of binary runs written before the class scheme -> the class index whose recall they are
LEGACY_METRIC_KEYS = {"benign_recall": 0, "high_grade_recall": 1}


@dataclass(frozen=True)
class ClassScheme:
    names: tuple[str, ...]

    @classmethod
    def of(cls, class_names: Sequence[str]) -> ClassScheme:
        """The scheme of ``data.class_names`` (index order)."""
        names = tuple(str(n) for n in class_names)
        if len(names) < 2:
            raise ValueError(f"a classification needs at least two classes, got {list(names)}")
        return cls(names)

    @property
    def k(self) -> int:
        return len(self.names)

    @property
    def binary(self) -> bool:
        """Two classes: a threshold on P(class 1) decides, chosen on the validation split."""
        return self.k == 2

    @property
    def readable(self) -> list[str]:
        """The names as words for people (``high_grade`` -> ``high-grade``)."""
        return [n.replace("_", "-") for n in self.names]

    @property
    def positive(self) -> str:
        """The readable name of class 1 of two (the class the threshold is on); k classes: the last one."""
        return self.readable[-1]

    @property
    def probability_columns(self) -> list[str]:
        return [f"prob_{c}" for c in range(self.k)]

    @property
    def probability_label(self) -> str:
        """What the probability shown for a case is: ``P(high-grade)`` of two classes, else of the predicted one."""
        return f"P({self.positive})" if self.binary else "P(predicted class)"

    def recall(self, index: int) -> str:
        return f"recall_{self.names[index]}"

    @property
    def recall_metrics(self) -> list[str]:
        return [self.recall(c) for c in range(self.k)]

    @property
    def point_metrics(self) -> list[str]:
        """Every metric with a bootstrap CI, in display order."""
        if self.binary:
            return [*self.recall_metrics, "balanced_accuracy", "accuracy", "f1", "auc", "brier", "ece"]
        return [*self.recall_metrics, "balanced_accuracy", "accuracy", "f1_macro", "auc",
                *[f"auc_{c}" for c in self.names], "brier", "ece"]

    @property
    def shown_metrics(self) -> list[str]:
        """The metrics printed after an evaluation and in results.txt."""
        return [*self.recall_metrics, "balanced_accuracy", "auc", "f1" if self.binary else "f1_macro", "brier", "ece"]

    @property
    def summary_metrics(self) -> list[str]:
        """A cross-validation's per-fold columns."""
        return [*self.recall_metrics, "balanced_accuracy", "auc"]

    @property
    def compared_metrics(self) -> list[str]:
        """The columns of a model or encoder comparison."""
        return ["auc", "balanced_accuracy", *self.recall_metrics, "brier"]

    def metric_label(self, metric: str) -> str:
        """``recall_high_grade`` -> ``high-grade recall``; others with spaces."""
        for c, name in enumerate(self.names):
            if metric == self.recall(c):
                return f"{self.readable[c]} recall"
            if metric == f"auc_{name}":
                return f"AUC {self.readable[c]} vs rest"
        return metric.replace("_", " ")

    def decision_rule(self) -> str:
        """How a k-class run decides (two classes: the threshold's own rule says it)."""
        return f"most probable of {self.k} classes (no threshold)"

    def decide(self, probabilities: np.ndarray, threshold: float) -> np.ndarray:
        """(N, k) class probabilities -> (N,) predicted class: P(class 1) >= ``threshold`` of two, else argmax."""
        probabilities = np.asarray(probabilities, dtype=float)
        if self.binary:
            return (probabilities[:, 1] >= threshold).astype(int)
        return probabilities.argmax(1).astype(int)

    def shown_class(self, probabilities: np.ndarray) -> int:
        """(k,) probabilities of one case -> the class whose probability its tables show (class 1 of two, else
        the predicted one)."""
        return 1 if self.binary else int(np.asarray(probabilities).argmax())

    def upgrade_metrics(self, metrics: dict) -> dict:
        """A metrics dict (``metrics.json``, a CV fold's, nested ``splits``/``ci95`` included) with the legacy
        binary keys renamed to this scheme's ``recall_<class>``; already-current dicts come back unchanged."""
        if not self.binary:
            return metrics

        def upgrade(value):
            if isinstance(value, dict):
                return {(self.recall(LEGACY_METRIC_KEYS[key]) if key in LEGACY_METRIC_KEYS else key): upgrade(v)
                        for key, v in value.items()}
            return value
        return upgrade(metrics)

    def threshold_target(self, spec: str) -> tuple[int, float] | None:
        """``recall_<class>=R`` (or the legacy ``benign_recall=R``) -> (class index, R); anything else None."""
        key, sep, value = spec.partition("=")
        if not sep:
            return None
        key = key.strip()
        index = LEGACY_METRIC_KEYS.get(key)
        if index is None and key in self.recall_metrics:
            index = self.recall_metrics.index(key)
        return None if index is None else (index, float(value))


def read_metrics(path: str | Path, classes: ClassScheme) -> dict:
    """A ``metrics.json`` (a run's, a fold's, an experiment's) with its metric names in ``classes``' scheme, however
    old the run."""
    return classes.upgrade_metrics(json.loads(Path(path).read_text()))
