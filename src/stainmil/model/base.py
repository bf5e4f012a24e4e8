"""What every architecture is: the interface the trainer, evaluation, analysis, report and QuPath export rely on,
and the base class that implements its shared part (feature standardisation, the stains the model has seen).

An architecture is an ``nn.Module`` registered with :func:`stainmil.model.registry.register_architecture` whose
constructor is ``(in_dim, config: ModelConfig, stains: list[str])`` and which satisfies :class:`MILModel`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from stainmil.config import ModelConfig
from stainmil.errors import DataError
from stainmil.model.batch import CaseBatch
from stainmil.model.output import MILOutput

GATE_START = -4.0  # model.stain_identity gated: sigmoid(-4) = 0.018, the stain vector starts nearly shut


@runtime_checkable
class MILModel(Protocol):
    """The one model interface (every registered architecture satisfies it)."""

    stains: list[str]

    def forward(self, batch: CaseBatch, topk_mask: tuple[int, float] | None = None) -> MILOutput:
        """A batch of B cases -> :class:`MILOutput` (logits (B, C), attention at every level, embeddings).

        ``topk_mask=(k, ratio)`` (training only) asks for ACMIL-style masking where the architecture has it.
        """

    def set_feature_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """(D,) per-dimension mean and std of the training features (standardisation inside the model)."""

    def set_seen_stains(self, stain_indices: torch.Tensor) -> None:
        """Mark the stains (indices into ``stains``) the training cases have."""

    def patch_alone_logits(self, patch_embeddings: torch.Tensor) -> torch.Tensor:
        """(P, E) ``MILOutput.patch_embeddings`` -> (P, C): the case logits if the case were that one patch."""


class StainAware(nn.Module):
    """What every architecture shares: feature standardisation and the stains it was trained on.

    ``stains``: the canonical stain names in model order (``data.stains``); ``seen_stains`` (K,) marks those
    that training cases had (set by the trainer, saved in the checkpoint).
    """

    def __init__(self, in_dim: int, stains: list[str]) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.stains = list(stains)
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        self.register_buffer("seen_stains", torch.ones(max(len(self.stains), 1), dtype=torch.bool))

    def set_feature_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    def set_seen_stains(self, stain_indices: torch.Tensor) -> None:
        """Mark the stains (indices into ``stains``) that the training cases have."""
        self.seen_stains.zero_()
        self.seen_stains[stain_indices.long().unique()] = True

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.feature_mean) / self.feature_std           # (P, D)

    def check_stains(self, batch: CaseBatch) -> None:
        """Refuse a batch with a stain no training case had (only where the model tells stains apart)."""
        unseen = ~self.seen_stains[batch.group_stain]                       # (G,)
        if bool(unseen.any()):
            g = int(torch.nonzero(unseen)[0])
            stain = self.stains[int(batch.group_stain[g])] if self.stains else str(int(batch.group_stain[g]))
            raise DataError(f"case {batch.case_ids[int(batch.group_case[g])]} has stain '{stain}', which no training "
                            f"case of this model had, so its stain-specific weights never learned anything; drop "
                            f"that stain (data.stains) or retrain with cases that have it.")


def projector(in_dim: int, config: ModelConfig) -> nn.Sequential:
    """The first layer on pre-extracted features (the hierarchy's and every baseline paper's):
    Linear(D -> E) -> ReLU -> Dropout; (P, D) -> (P, E)."""
    return nn.Sequential(nn.Linear(in_dim, config.embed_dim), nn.ReLU(), nn.Dropout(config.dropout))
