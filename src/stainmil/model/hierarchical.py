"""The hierarchical attention MIL model: patch -> slice -> stain -> case.

    patch features (P, D) --standardise--> projector Linear->ReLU->Dropout (P, E)
      --attention over the patches of each slice-->  slice embeddings (S, E)
      --attention over the slices of each stain--->  stain embeddings (G, E)
      --attention over the stains of each case---->  case embeddings  (B, E)
      --linear classifier-------------------------> logits (B, C)

``effective_attention`` of a patch = stain weight x slice weight x patch weight; it sums to 1
over the patches of each case. Everything is vectorised over the batch (segment softmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stainmil.config import LEVELS, ModelConfig
from stainmil.data.bags import CaseBatch
from stainmil.model.attention import build_attention
from stainmil.model.segment import group_sizes


@dataclass
class HierarchicalOutput:
    logits: torch.Tensor                  # (B, C)
    patch_attention_logits: torch.Tensor  # (P,)
    patch_weights: torch.Tensor           # (P,)  softmax within each slice
    slice_attention_logits: torch.Tensor  # (S,)
    slice_weights: torch.Tensor           # (S,)  softmax within each stain group
    stain_attention_logits: torch.Tensor  # (G,)
    stain_weights: torch.Tensor           # (G,)  softmax within each case
    effective_attention: torch.Tensor     # (P,)  product down the hierarchy; sums to 1 per case
    patch_embeddings: torch.Tensor        # (P, E) projector output
    case_embeddings: torch.Tensor         # (B, E)

    @property
    def probabilities(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=-1)  # (B, C)

    def level(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention logits, weights) of level ``patch`` | ``slice`` | ``stain``."""
        return getattr(self, f"{name}_attention_logits"), getattr(self, f"{name}_weights")


class HierarchicalMIL(nn.Module):
    def __init__(self, in_dim: int, config: ModelConfig) -> None:
        super().__init__()
        self.in_dim = in_dim
        e, h, p = config.embed_dim, config.attention_hidden_dim, config.dropout
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        self.projector = nn.Sequential(nn.Linear(in_dim, e), nn.ReLU(), nn.Dropout(p))
        names = config.attention if isinstance(config.attention, list) else [config.attention] * len(LEVELS)
        if len(names) != len(LEVELS):
            from stainmil.errors import ConfigError

            raise ConfigError(f"model.attention must be one name or {len(LEVELS)} names [patch, slice, stain], "
                              f"got {config.attention}.")
        self.pools = nn.ModuleDict({
            level: build_attention(name, e, h, p, heads=config.attention_heads,
                                   max_group=config.transformer_max_group)
            for level, name in zip(LEVELS, names)})
        self.classifier = nn.Linear(e, config.n_classes)

    def set_feature_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """(P, D) raw features -> (P, E) patch embeddings."""
        return self.projector((features - self.feature_mean) / self.feature_std)

    def forward(self, batch: CaseBatch, topk_mask: tuple[int, float] | None = None) -> HierarchicalOutput:
        """``topk_mask=(k, ratio)`` (training only): mask that share of each slice's k top patches (ACMIL)."""
        n_slices, n_groups = len(batch.slice_group), len(batch.group_case)
        h = self.embed(batch.features)                                              # (P, E)
        drop = None
        if topk_mask is not None and topk_mask[0] > 0:
            with torch.no_grad():
                logits = self.pools["patch"].row_logits(h, batch.patch_slice, n_slices)
            drop = topk_drop(logits, batch.patch_slice, n_slices, *topk_mask)
        patch = self.pools["patch"](h, batch.patch_slice, n_slices, drop)           # pooled (S, E)
        slice_ = self.pools["slice"](patch.pooled, batch.slice_group, n_groups)     # pooled (G, E)
        stain = self.pools["stain"](slice_.pooled, batch.group_case, batch.n_cases)  # pooled (B, E)
        logits = self.classifier(stain.pooled)                                      # (B, C)
        patch_group = batch.slice_group[batch.patch_slice]                          # (P,) stain group of each patch
        effective = stain.weights[patch_group] * slice_.weights[batch.patch_slice] * patch.weights  # (P,)
        return HierarchicalOutput(
            logits=logits,
            patch_attention_logits=patch.logits, patch_weights=patch.weights,
            slice_attention_logits=slice_.logits, slice_weights=slice_.weights,
            stain_attention_logits=stain.logits, stain_weights=stain.weights,
            effective_attention=effective, patch_embeddings=h, case_embeddings=stain.pooled,
        )

    def patch_alone_logits(self, patch_embeddings: torch.Tensor) -> torch.Tensor:
        """(P, E) -> (P, C): the case logits if the whole case were this one patch (all attention on it)."""
        return self.classifier(patch_embeddings)


def topk_drop(logits: torch.Tensor, groups: torch.Tensor, n_groups: int, k: int, ratio: float) -> torch.Tensor:
    """Stochastic top-k masking (ACMIL, ECCV 2024): (N,) bool, True for rows masked out of the softmax.

    Among the k highest-logit rows of each group, each is masked with probability ``ratio``; the
    group's lowest-ranked row is never eligible, so every group keeps at least one row.
    """
    order = torch.argsort(logits, descending=True, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]             # group-major, logit-descending
    sorted_groups = groups[order]
    starts = torch.searchsorted(sorted_groups, torch.arange(n_groups, device=logits.device))
    rank = torch.arange(len(logits), device=logits.device) - starts[sorted_groups]
    sizes = group_sizes(groups, n_groups)[sorted_groups]
    eligible = (rank < k) & (rank < sizes - 1)
    drop_sorted = eligible & (torch.rand(len(logits), device=logits.device) < ratio)
    drop = torch.zeros_like(drop_sorted)
    drop[order] = drop_sorted
    return drop
