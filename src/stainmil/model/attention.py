"""Attention pools over ragged groups, and their registry (``model.attention``).

Every pool maps row embeddings ``h`` (N, E) with a group index (N,) to one embedding per group
(G, E) plus the per-row attention logits and softmax weights; only the scoring differs:

* ``tanh``  — Ilse et al. 2018 ABMIL: w^T tanh(V h) (the team's old AttentionPool)
* ``gated`` — Ilse et al. 2018 gated ABMIL: w^T (tanh(V h) * sigmoid(U h))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from stainmil.errors import ConfigError
from stainmil.model.segment import segment_softmax, segment_sum


@dataclass
class PoolOutput:
    pooled: torch.Tensor   # (G, E) attention-weighted sum of each group's rows
    logits: torch.Tensor   # (N,) attention logits before the softmax
    weights: torch.Tensor  # (N,) softmax weights; sum to 1 within each group


class AttentionPool(nn.Module):
    """Base class: subclasses implement :meth:`score`."""

    def score(self, h: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
        """(N, E) -> (N,) attention logits."""
        raise NotImplementedError

    def forward(self, h: torch.Tensor, groups: torch.Tensor, n_groups: int) -> PoolOutput:
        logits = self.score(h, groups, n_groups)                    # (N,)
        weights = segment_softmax(logits, groups, n_groups)         # (N,)
        pooled = segment_sum(weights[:, None] * h, groups, n_groups)  # (G, E)
        return PoolOutput(pooled, logits, weights)


class TanhAttention(AttentionPool):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def score(self, h: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
        return self.net(h).squeeze(-1)


class GatedAttention(AttentionPool):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.value = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh())
        self.gate = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid())
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, 1)

    def score(self, h: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
        return self.out(self.dropout(self.value(h) * self.gate(h))).squeeze(-1)


ATTENTION_POOLS: dict[str, Callable[[int, int, float], AttentionPool]] = {
    "tanh": TanhAttention,
    "gated": GatedAttention,
}


def build_attention(name: str, dim: int, hidden: int, dropout: float) -> AttentionPool:
    if name not in ATTENTION_POOLS:
        raise ConfigError(f"model.attention '{name}' is not registered; choose one of {sorted(ATTENTION_POOLS)}.")
    return ATTENTION_POOLS[name](dim, hidden, dropout)
