"""ABMIL (Ilse, Tomczak & Welling 2018, "Attention-based deep multiple instance learning"), gated.

    patches (P, D) --Linear->ReLU->Dropout--> h (P, E=512)
      --gated attention  w^T (tanh(V h) * sigmoid(U h))  (hidden 128), softmax over the case--> a (P,)
      --sum a h--> case (B, E) --Linear--> logits (B, C)
"""

from __future__ import annotations

import torch
from torch import nn

from stainmil.config import ModelConfig
from stainmil.model.attention import GatedAttention
from stainmil.model.base import projector
from stainmil.model.flat import CasePooling, FlatMIL
from stainmil.model.registry import register_architecture
from stainmil.model.segment import segment_softmax, segment_sum


@register_architecture("abmil", reference="Ilse et al. 2018: gated attention")
class ABMIL(FlatMIL):
    def __init__(self, in_dim: int, config: ModelConfig, stains: list[str]) -> None:
        super().__init__(in_dim, config, stains)
        self.projector = projector(in_dim, config)
        self.attention = GatedAttention(config.embed_dim, config.attention_hidden_dim, config.dropout)
        self.classifier = nn.Linear(config.embed_dim, config.n_classes)

    def pool_cases(self, x, patch_case, n_cases, labels, context) -> CasePooling:
        h = self.projector(x)                                                 # (P, E)
        scores = self.attention.score(h)                                      # (P,)
        weights = segment_softmax(scores, patch_case, n_cases)                # (P,)
        case = segment_sum(weights[:, None] * h, patch_case, n_cases)         # (B, E)
        return CasePooling(self.classifier(case), case, h, scores)

    def instance_logits(self, patch_embeddings: torch.Tensor) -> torch.Tensor:
        return self.classifier(patch_embeddings)
