"""Figures of a run: training curves, confusion matrix, ROC curve (matplotlib, Agg, atomic writes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from stainmil.io import save_figure, subplots
from stainmil.stats.calibration import reliability_curve


def plot_history(history: pd.DataFrame, path: str | Path) -> Path:
    """Loss and validation metrics per epoch (``curves.png``)."""
    fig, (ax_loss, ax_metric) = subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(history["epoch"], history["train_loss"], label="train loss")
    ax_loss.plot(history["epoch"], history["val_loss"], label="val loss")
    best = history.loc[history["val_loss"].idxmin()]
    ax_loss.axvline(best["epoch"], color="grey", ls=":", label=f"best epoch {int(best['epoch'])}")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    for column in ("val_auc", "val_balanced_accuracy"):
        if column in history:
            ax_metric.plot(history["epoch"], history[column], label=column.replace("_", " "))
    ax_metric.set_ylim(0, 1.02)
    ax_metric.set_xlabel("epoch")
    ax_metric.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def plot_confusion(matrix: np.ndarray, class_names: list[str], path: str | Path, title: str = "") -> Path:
    """Confusion matrix with counts and row-normalised recall."""
    fig, ax = subplots(figsize=(4, 3.6))
    rows = matrix.sum(1, keepdims=True).clip(min=1)
    ax.imshow(matrix / rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, f"{matrix[i, j]}\n({matrix[i, j] / rows[i, 0]:.0%})", ha="center", va="center",
                    color="white" if matrix[i, j] / rows[i, 0] > 0.5 else "black")
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_roc(labels: np.ndarray, probabilities: np.ndarray, path: str | Path, title: str = "",
             readable: list[str] | None = None) -> Path:
    """Two classes: ROC of P(class 1); ``readable``: the two class names for the axes."""
    negative, positive = readable or ["benign", "high-grade"]
    fig, ax = subplots(figsize=(4, 4))
    if len(np.unique(labels)) == 2:
        fpr, tpr, _ = roc_curve(labels, probabilities)
        ax.plot(fpr, tpr, lw=2)
    ax.plot([0, 1], [0, 1], color="grey", ls=":")
    ax.set_xlabel(f"1 - {negative} recall (false positive rate)")
    ax.set_ylabel(f"{positive} recall (true positive rate)")
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_roc_one_vs_rest(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str], path: str | Path,
                         title: str = "") -> Path:
    """k classes: one ROC curve per class against the rest (``probabilities`` (N, k))."""
    fig, ax = subplots(figsize=(4.4, 4))
    for k, name in enumerate(class_names):
        positive = np.asarray(labels) == k
        if 0 < positive.sum() < len(positive):
            fpr, tpr, _ = roc_curve(positive, probabilities[:, k])
            ax.plot(fpr, tpr, lw=2, label=name)
    ax.plot([0, 1], [0, 1], color="grey", ls=":")
    ax.set_xlabel("false positive rate (the rest called this class)")
    ax.set_ylabel("recall of the class")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_reliability(labels: np.ndarray, curves: dict[str, np.ndarray], path: str | Path, title: str = "",
                     positive: str = "high-grade") -> Path:
    """Reliability diagram: observed share of class 1 (``positive``) vs mean predicted P(class 1) per bin, one
    line per set of probabilities in ``curves`` (e.g. before / after temperature scaling); marker area ~ cases."""

    fig, ax = subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="perfectly calibrated")
    for name, probabilities in curves.items():
        predicted, observed, counts = reliability_curve(labels, probabilities)
        ax.plot(predicted, observed, marker="o", label=name)
        ax.scatter(predicted, observed, s=12 * counts, alpha=0.3)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"mean predicted P({positive})")
    ax.set_ylabel(f"observed {positive} share")
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)
