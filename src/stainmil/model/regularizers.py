"""Regularisers on attention, per level (patch, slice, stain), chosen by ``model.reg``.

* elastic net on the attention logits (before the softmax):
  ``l1 * mean|logits| + l2 * mean(logits^2)`` — keeps logits from running away (hyper-focus);
* entropy of the attention weights (after the softmax): ``-lambda * mean_groups H(w)``,
  ``H(w) = -sum w log w``, optionally divided by log(group size) so big and small slices weigh alike
  (groups of one row have no entropy to gain and are left out); ``lambda`` may decay over the epochs.

Each term is returned under its own name (``elastic_patch``, ``entropy_slice``, …) and logged
separately in history.csv. A level whose coefficients are all zero adds nothing at all, so a zero
coefficient trains bit-identically to no regulariser.
"""

from __future__ import annotations

import math

import torch

from stainmil.config import LEVELS, ModelConfig, PerLevelFloat
from stainmil.errors import ConfigError
from stainmil.model.batch import CaseBatch
from stainmil.model.output import MILOutput
from stainmil.model.segment import group_sizes, segment_entropy


def per_level(value: PerLevelFloat, key: str) -> list[float]:
    """One value for every level, or exactly one per level [patch, slice, stain]."""
    if isinstance(value, (int, float)):
        return [float(value)] * len(LEVELS)
    if len(value) != len(LEVELS):
        raise ConfigError(f"{key} must be one number or {len(LEVELS)} numbers [patch, slice, stain], got {value}.")
    return [float(v) for v in value]


def level_groups(batch: CaseBatch, level: str) -> tuple[torch.Tensor, int]:
    """Group index of the rows attended at ``level`` and the number of groups."""
    if level == "patch":
        return batch.patch_slice, len(batch.slice_group)
    if level == "slice":
        return batch.slice_group, len(batch.group_case)
    return batch.group_case, batch.n_cases


def schedule_factor(schedule: str, epoch: int, max_epochs: int) -> float:
    """Multiplier of lambda at ``epoch`` (1-based): constant 1, or linear / cosine decay to 0."""
    progress = (epoch - 1) / max(1, max_epochs)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


class AttentionRegularizer:
    """Computes the configured attention penalty terms for one forward pass."""

    def __init__(self, config: ModelConfig, max_epochs: int) -> None:
        reg = config.reg
        self.l1 = per_level(reg.elastic.l1, "model.reg.elastic.l1")
        self.l2 = per_level(reg.elastic.l2, "model.reg.elastic.l2")
        self.entropy = per_level(reg.entropy.weight, "model.reg.entropy.weight")
        self.normalize = reg.entropy.normalize
        self.schedule = reg.entropy.schedule
        self.max_epochs = max_epochs

    @property
    def active(self) -> bool:
        return any(self.l1) or any(self.l2) or any(self.entropy)

    def __call__(self, output: MILOutput, batch: CaseBatch, epoch: int) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        for i, level in enumerate(LEVELS):
            logits, weights = output.level(level)
            if self.l1[i] or self.l2[i]:
                terms[f"elastic_{level}"] = self.l1[i] * logits.abs().mean() + self.l2[i] * logits.pow(2).mean()
            if self.entropy[i]:
                groups, n_groups = level_groups(batch, level)
                entropy = segment_entropy(weights, groups, n_groups)          # (n_groups,)
                sizes = group_sizes(groups, n_groups)
                multi = sizes > 1
                if multi.any():
                    h = entropy[multi] / torch.log(sizes[multi].float()) if self.normalize else entropy[multi]
                    factor = schedule_factor(self.schedule, epoch, self.max_epochs)
                    terms[f"entropy_{level}"] = -self.entropy[i] * factor * h.mean()
        return terms
