"""Floors: mean and max pooling of the projected patches, then a linear classifier (no attention)."""

from __future__ import annotations

import torch
from torch import nn

from stainmil.config import ModelConfig
from stainmil.model.base import projector
from stainmil.model.flat import CasePooling, FlatMIL
from stainmil.model.registry import register_architecture
from stainmil.model.segment import group_sizes, segment_sum


@register_architecture("mean", reference="floor: mean of the projected patches", patch_attention=False)
class MeanPoolMIL(FlatMIL):
    def __init__(self, in_dim: int, config: ModelConfig, stains: list[str]) -> None:
        super().__init__(in_dim, config, stains)
        self.projector = projector(in_dim, config)
        self.classifier = nn.Linear(config.embed_dim, config.n_classes)

    def reduce(self, h: torch.Tensor, patch_case: torch.Tensor, n_cases: int) -> torch.Tensor:
        """(P, E) -> (B, E) mean over each case's patches."""
        return segment_sum(h, patch_case, n_cases) / group_sizes(patch_case, n_cases)[:, None].clamp_min(1)

    def pool_cases(self, x, patch_case, n_cases, labels, context) -> CasePooling:
        h = self.projector(x)                                                 # (P, E)
        case = self.reduce(h, patch_case, n_cases)                            # (B, E)
        return CasePooling(self.classifier(case), case, h, None)

    def instance_logits(self, patch_embeddings: torch.Tensor) -> torch.Tensor:
        return self.classifier(patch_embeddings)


@register_architecture("max", reference="floor: feature-wise max of the projected patches", patch_attention=False)
class MaxPoolMIL(MeanPoolMIL):
    def reduce(self, h: torch.Tensor, patch_case: torch.Tensor, n_cases: int) -> torch.Tensor:
        """(P, E) -> (B, E) feature-wise max over each case's patches."""
        out = h.new_zeros((n_cases, h.shape[1]))
        index = patch_case[:, None].expand_as(h)
        return out.scatter_reduce(0, index, h, reduce="amax", include_self=False)
