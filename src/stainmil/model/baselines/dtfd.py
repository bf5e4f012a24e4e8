"""DTFD-MIL (Zhang et al. 2022, "Double-tier feature distillation MIL"), AFS distillation.

    patches (P, D) --Linear(512)->ReLU--> h (P, 512)
    tier 1: each case's patches are split into ``dtfd_pseudo_bags`` pseudo-bags (fewer for small cases);
            per pseudo-bag gated attention (hidden 128) -> pooled feature (Q, 512) -> tier-1 classifier (Q, C)
    distillation (AFS): each pseudo-bag's attention-pooled feature is its distilled feature
    tier 2: gated attention over the case's distilled features -> case (B, 512) -> classifier -> logits (B, C)

Loss (paper): tier-2 CE (the case loss) + mean tier-1 CE of the pseudo-bags, each labelled with its case's
label. The reference code steps two optimisers on these; its tier-2 loss also reaches the tier-1 weights
(the distilled features are not detached), so one sum with one optimiser gives the same gradients.

Pseudo-bags are random in training (torch's seeded generator: resumable) and deterministic in eval
(patch i of a case in pseudo-bag i mod n: the same prediction every time). Reported patch attention:
tier-1 weight within its pseudo-bag x tier-2 weight of that pseudo-bag (sums to 1 per case).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stainmil.config import ModelConfig, setting
from stainmil.errors import ConfigError
from stainmil.model.attention import GatedAttention
from stainmil.model.flat import CasePooling, FlatMIL, labelled
from stainmil.model.registry import register_architecture
from stainmil.model.segment import group_ranks, segment_softmax, segment_sum


@dataclass(frozen=True)
class DTFDOptions:
    """``model.options.dtfd_mil``."""

    pseudo_bags: int = setting("Pseudo-bags per case (Zhang et al. 2022: 4); fewer when a case has fewer patches.",
                               default=4)

    def __post_init__(self) -> None:
        if self.pseudo_bags < 1:
            raise ConfigError(f"model.options.dtfd_mil.pseudo_bags must be at least 1, got {self.pseudo_bags}.")


@register_architecture("dtfd_mil", reference="Zhang et al. 2022: two tiers of pseudo-bags, AFS", options=DTFDOptions)
class DTFDMIL(FlatMIL):
    def __init__(self, in_dim: int, config: ModelConfig, stains: list[str], options: DTFDOptions) -> None:
        super().__init__(in_dim, config, stains)
        e, hidden, c = config.embed_dim, config.attention_hidden_dim, config.n_classes
        self.pseudo_bags = options.pseudo_bags
        self.reduce = nn.Sequential(nn.Linear(in_dim, e), nn.ReLU())
        self.tier1_attention = GatedAttention(e, hidden, 0.0)
        self.tier1_classifier = nn.Linear(e, c)
        self.tier2_attention = GatedAttention(e, hidden, 0.0)
        self.tier2_classifier = nn.Linear(e, c)

    def pseudo_bag_of(self, patch_case: torch.Tensor, n_cases: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(P,) pseudo-bag of each patch in [0, Q) and (Q,) case of each pseudo-bag."""
        keys = torch.rand(len(patch_case), device=patch_case.device) if self.training else \
            -torch.arange(len(patch_case), device=patch_case.device, dtype=torch.float32)
        rank, sizes = group_ranks(keys, patch_case, n_cases)        # random | patch order
        n_bags = torch.clamp(sizes, max=self.pseudo_bags)                       # (B,)
        offsets = torch.cumsum(n_bags, 0) - n_bags                              # first pseudo-bag of each case
        within = rank % n_bags[patch_case]                                      # (P,)
        bag_case = torch.repeat_interleave(torch.arange(n_cases, device=patch_case.device), n_bags)  # (Q,)
        return offsets[patch_case] + within, bag_case

    def pool_cases(self, x, patch_case, n_cases, labels, context) -> CasePooling:
        h = self.reduce(x)                                                      # (P, E)
        bag_of, bag_case = self.pseudo_bag_of(patch_case, n_cases)
        n_bags = len(bag_case)
        scores1 = self.tier1_attention.score(h)                                 # (P,)
        weights1 = segment_softmax(scores1, bag_of, n_bags)                     # (P,)
        distilled = segment_sum(weights1[:, None] * h, bag_of, n_bags)          # (Q, E) AFS
        scores2 = self.tier2_attention.score(distilled)                         # (Q,)
        weights2 = segment_softmax(scores2, bag_case, n_cases)                  # (Q,)
        case = segment_sum(weights2[:, None] * distilled, bag_case, n_cases)    # (B, E)
        aux = {}
        use = labelled(labels, self.training)
        if bool(use.any()):
            bag_use = use[bag_case]
            aux["dtfd_tier1_loss"] = F.cross_entropy(self.tier1_classifier(distilled[bag_use]),
                                                     labels[bag_case][bag_use])
        return CasePooling(self.tier2_classifier(case), case, h, scores1,
                           attention_weights=weights1 * weights2[bag_of], auxiliary_losses=aux)

    def instance_logits(self, patch_embeddings: torch.Tensor) -> torch.Tensor:
        """One patch: one pseudo-bag whose distilled feature is the patch's own."""
        return self.tier2_classifier(patch_embeddings)
