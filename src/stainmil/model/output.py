"""What every MIL model returns: one dataclass, whatever the architecture.

The hierarchical model fills every level from its own pools. A flat baseline (one bag per case) has
one attention per patch over the whole case; its slice and stain levels are that attention summed
over the patches of each slice and stain, so ``stain x slice x patch weight == effective attention``
holds for every architecture and the analysis code reads them all alike. A model with no patch
attention (TransMIL, mean, max) reports uniform weights, and its registry entry says so
(:func:`stainmil.model.registry.has_patch_attention`): the analysis then says so instead of drawing a map.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MILOutput:
    logits: torch.Tensor                  # (B, C)
    patch_attention_logits: torch.Tensor  # (P,)
    patch_weights: torch.Tensor           # (P,)  softmax within each slice
    slice_attention_logits: torch.Tensor  # (S,)
    slice_weights: torch.Tensor           # (S,)  softmax within each stain group
    stain_attention_logits: torch.Tensor  # (G,)
    stain_weights: torch.Tensor           # (G,)  softmax within each case
    effective_attention: torch.Tensor     # (P,)  product down the hierarchy; sums to 1 per case
    patch_embeddings: torch.Tensor        # (P, E) what :meth:`patch_alone_logits` of the model reads
    case_embeddings: torch.Tensor         # (B, E)
    # extra loss terms the architecture's paper trains with (CLAM instance clustering, DSMIL max-instance
    # stream, DTFD tier 1), already weighted; the training step adds them to the case loss
    auxiliary_losses: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def probabilities(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=-1)  # (B, C)

    def level(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention logits, weights) of level ``patch`` | ``slice`` | ``stain``."""
        return getattr(self, f"{name}_attention_logits"), getattr(self, f"{name}_weights")
