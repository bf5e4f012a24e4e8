"""Loss terms of the one training loop, chosen by config (``train.loss``), and class weights."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from stainmil.config import TrainConfig
from stainmil.errors import ConfigError
from stainmil.model.output import MILOutput


def class_weights(config: TrainConfig, train_labels: np.ndarray, n_classes: int) -> torch.Tensor | None:
    """``auto``: inverse class frequency of the training split, n / (C * n_c); ``none``; or the given list."""
    spec = config.class_weights
    if isinstance(spec, list):
        if len(spec) != n_classes:
            raise ConfigError(f"train.class_weights has {len(spec)} values but there are {n_classes} classes.")
        return torch.tensor(spec, dtype=torch.float32)
    if spec == "none":
        return None
    if spec != "auto":
        raise ConfigError(f"train.class_weights must be 'auto', 'none' or a list of numbers, got {spec!r}.")
    counts = np.bincount(train_labels, minlength=n_classes).astype(float)
    if (counts == 0).any():
        raise ConfigError(f"the training split lacks class(es) {np.flatnonzero(counts == 0).tolist()}; "
                          "class_weights 'auto' needs every class — re-split the cohort.")
    return torch.tensor(len(train_labels) / (n_classes * counts), dtype=torch.float32)


LossFn = Callable[[MILOutput, torch.Tensor, torch.Tensor | None], torch.Tensor]
"""(output, labels (B,), class weights (C,) | None) -> per-case loss (B,), already multiplied by w[label]."""


def cross_entropy(output: MILOutput, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Class-weighted cross-entropy per case (B,)."""
    return F.cross_entropy(output.logits, labels, weight=weights, reduction="none")


def weighted_mean(per_case: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-case losses that were scaled by w[label]: sum / sum(w[label]) (as torch's 'mean')."""
    if weights is None:
        return per_case.mean()
    return per_case.sum() / weights[labels].sum()


def focal(gamma: float) -> LossFn:
    """Focal loss (Lin et al. 2017): (1 - p_y)^gamma * CE, times the class weight, per case."""

    def loss(output: MILOutput, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        ce = F.cross_entropy(output.logits, labels, reduction="none")
        p_true = torch.exp(-ce)
        scaled = (1 - p_true) ** gamma * ce
        return scaled * weights[labels] if weights is not None else scaled

    return loss


def label_smoothing_ce(epsilon: float) -> LossFn:
    def loss(output: MILOutput, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        return F.cross_entropy(output.logits, labels, weight=weights, label_smoothing=epsilon, reduction="none")

    return loss


def build_loss(config: TrainConfig) -> LossFn:
    """``train.loss``: ce | focal (``train.focal_gamma``) | label_smoothing_ce (``train.label_smoothing``)."""
    if config.loss == "ce":
        return cross_entropy
    if config.loss == "focal":
        return focal(config.focal_gamma)
    if config.loss == "label_smoothing_ce":
        return label_smoothing_ce(config.label_smoothing)
    raise ConfigError(f"train.loss '{config.loss}' is unknown; choose ce, focal or label_smoothing_ce.")
