"""Attention pools over ragged groups, and their registry (``model.attention``, per level).

Every pool maps row embeddings ``h`` (N, E) with a group index (N,) to one embedding per group
(G, E) plus per-row attention logits and softmax weights (weights sum to 1 within each group):

* ``tanh``        — Ilse et al. 2018 ABMIL: w^T tanh(V h) (the team's old AttentionPool)
* ``gated``       — Ilse et al. 2018 gated ABMIL: w^T (tanh(V h) * sigmoid(U h))
* ``multihead``   — k tanh heads, each with its own softmax; the pooled embedding and the reported
                    weights/logits are the mean over heads
* ``transformer`` — one self-attention layer over the rows of each group (in chunks of at most
                    ``transformer_max_group`` rows, for memory), then tanh attention pooling

``drop`` (N,) bool masks rows out of the softmax (stochastic top-k masking during training).
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


def _masked(logits: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
    return logits if drop is None else logits.masked_fill(drop, float("-inf"))


class AttentionPool(nn.Module):
    """Base class: subclasses implement :meth:`score` (and may :meth:`transform` rows first)."""

    def transform(self, h: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
        """(N, E) -> (N, E) row embeddings that are scored and pooled (identity by default)."""
        return h

    def score(self, h: torch.Tensor) -> torch.Tensor:
        """(N, E) -> (N,) attention logits."""
        raise NotImplementedError

    def row_logits(self, h: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
        """(N, E) -> (N,) the logits :meth:`forward` reports, without pooling (e.g. to choose rows to mask)."""
        return self.score(self.transform(h, groups, n_groups))

    def forward(self, h: torch.Tensor, groups: torch.Tensor, n_groups: int,
                drop: torch.Tensor | None = None, condition: torch.Tensor | None = None) -> PoolOutput:
        """``condition`` (N, E): added to the rows only where they are scored, not to what is pooled (how much a
        row weighs may depend on it, what the group says may not)."""
        h = self.transform(h, groups, n_groups)                               # (N, E)
        logits = self.score(h if condition is None else h + condition)       # (N,)
        weights = segment_softmax(_masked(logits, drop), groups, n_groups)   # (N,)
        pooled = segment_sum(weights[:, None] * h, groups, n_groups)         # (G, E)
        return PoolOutput(pooled, logits, weights)


class TanhAttention(AttentionPool):
    def __init__(self, dim: int, hidden: int, dropout: float, **_: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def score(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h).squeeze(-1)


class GatedAttention(AttentionPool):
    """``outputs`` > 1: one score per branch, (N, outputs) (CLAM-MB's class branches; not a registered pool)."""

    def __init__(self, dim: int, hidden: int, dropout: float, outputs: int = 1, **_: int) -> None:
        super().__init__()
        self.value = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh())
        self.gate = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid())
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, outputs)

    def score(self, h: torch.Tensor) -> torch.Tensor:
        scores = self.out(self.dropout(self.value(h) * self.gate(h)))      # (N, outputs)
        return scores.squeeze(-1) if scores.shape[-1] == 1 else scores


class MultiHeadAttention(AttentionPool):
    def __init__(self, dim: int, hidden: int, dropout: float, heads: int = 4, **_: int) -> None:
        super().__init__()
        self.heads = heads
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, heads))

    def forward(self, h: torch.Tensor, groups: torch.Tensor, n_groups: int,
                drop: torch.Tensor | None = None, condition: torch.Tensor | None = None) -> PoolOutput:
        logits = self.net(h if condition is None else h + condition)           # (N, K)
        weights = torch.stack([segment_softmax(_masked(logits[:, k], drop), groups, n_groups)
                               for k in range(self.heads)], dim=1)             # (N, K), each column sums to 1
        pooled = segment_sum(weights.mean(1, keepdim=True) * h, groups, n_groups)  # (G, E), mean of head pools
        return PoolOutput(pooled, logits.mean(1), weights.mean(1))

    def row_logits(self, h: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
        return self.net(h).mean(1)


class TransformerAttention(AttentionPool):
    def __init__(self, dim: int, hidden: int, dropout: float, heads: int = 4, max_group: int = 256,
                 **_: int) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"transformer attention: model.embed_dim {dim} must be divisible by "
                              f"model.attention_heads {heads}.")
        self.max_group = max_group
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.scorer = TanhAttention(dim, hidden, dropout)

    def transform(self, h: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
        order = torch.argsort(groups, stable=True)                            # rows sorted by group
        sorted_groups = groups[order]
        starts = torch.searchsorted(sorted_groups, torch.arange(n_groups, device=h.device))
        rank = torch.arange(len(h), device=h.device) - starts[sorted_groups]  # position within the group
        chunk_key = sorted_groups * (len(h) + 1) + rank // self.max_group
        _, chunk = torch.unique_consecutive(chunk_key, return_inverse=True)   # (N,) chunk of each sorted row
        position = rank % self.max_group
        n_chunks = int(chunk.max()) + 1 if len(h) else 0
        padded = h.new_zeros((n_chunks, self.max_group, h.shape[1]))           # (C, L, E)
        padded[chunk, position] = h[order]
        pad_mask = torch.ones((n_chunks, self.max_group), dtype=torch.bool, device=h.device)
        pad_mask[chunk, position] = False
        length = int((~pad_mask).sum(1).max()) if n_chunks else 0
        padded, pad_mask = padded[:, :length], pad_mask[:, :length]           # trim to the longest chunk
        attended, _ = self.attention(padded, padded, padded, key_padding_mask=pad_mask, need_weights=False)
        out = torch.empty_like(h)
        out[order] = self.norm(padded + attended)[chunk, position]            # residual + norm, back to row order
        return out

    def score(self, h: torch.Tensor) -> torch.Tensor:
        return self.scorer.score(h)


ATTENTION_POOLS: dict[str, Callable[..., AttentionPool]] = {
    "tanh": TanhAttention,
    "gated": GatedAttention,
    "multihead": MultiHeadAttention,
    "transformer": TransformerAttention,
}


def build_attention(name: str, dim: int, hidden: int, dropout: float, heads: int = 4,
                    max_group: int = 256) -> AttentionPool:
    if name not in ATTENTION_POOLS:
        raise ConfigError(f"model.attention '{name}' is not registered; choose one of {sorted(ATTENTION_POOLS)}.")
    return ATTENTION_POOLS[name](dim, hidden, dropout, heads=heads, max_group=max_group)
