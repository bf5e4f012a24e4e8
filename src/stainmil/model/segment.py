"""Segment operations on ragged groups: softmax and weighted sums over rows sharing a group index.

A batch of cases is one flat matrix of rows plus a group index per row, so pooling over the
patches of every slice (or the slices of every stain, …) is one vectorised call, with no Python
loop over groups and no padding.
"""

from __future__ import annotations

import torch


def segment_softmax(logits: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Softmax of ``logits`` (N,) within each group; ``groups`` (N,) in [0, n_groups). Returns (N,)."""
    group_max = torch.full((n_groups,), float("-inf"), dtype=logits.dtype, device=logits.device)
    group_max = group_max.scatter_reduce(0, groups, logits.detach(), reduce="amax", include_self=True)
    exp = torch.exp(logits - group_max[groups])                              # (N,)
    denom = torch.zeros(n_groups, dtype=logits.dtype, device=logits.device).index_add(0, groups, exp)
    return exp / denom[groups]


def segment_sum(values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Sum rows of ``values`` (N, E) per group -> (n_groups, E)."""
    out = torch.zeros((n_groups, *values.shape[1:]), dtype=values.dtype, device=values.device)
    return out.index_add(0, groups, values)


def segment_entropy(weights: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Entropy -sum w log w of the weights (N,) of each group -> (n_groups,)."""
    terms = -weights * torch.log(weights.clamp_min(1e-12))
    return torch.zeros(n_groups, dtype=weights.dtype, device=weights.device).index_add(0, groups, terms)


def group_sizes(groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Number of rows in each group -> (n_groups,) long."""
    return torch.bincount(groups, minlength=n_groups)


def group_ranks(keys: torch.Tensor, groups: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of each row within its group by ``keys`` (N,) descending (0 = highest; ties by row order).

    Returns ``rank`` (N,) long and the group sizes (n_groups,) long.
    """
    order = torch.argsort(keys, descending=True, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]                # group-major, key-descending
    sorted_groups = groups[order]
    starts = torch.searchsorted(sorted_groups, torch.arange(n_groups, device=keys.device))
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(keys), device=keys.device) - starts[sorted_groups]
    return rank, group_sizes(groups, n_groups)
