"""Graph pieces for the multi-stain graph models, in plain torch over the batch's ragged cases (no graph library:
torch-geometric's scatter extensions do not install here, and these are a few index operations).

Graphs are one edge list over every patch of the batch, ``edges`` (2, E) = (source, target): a message flows from
source to target, and no edge joins two cases.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stainmil.config import setting
from stainmil.errors import ConfigError
from stainmil.model.segment import group_ranks, group_sizes, segment_softmax, segment_sum

KNN_BLOCK = 1 << 22  # distances computed at once by knn_edges: 4 Mi floats = 16 MB, whatever the case's size


@dataclass(frozen=True)
class GraphOptions:
    """What the graph models (``model.options.mustang`` / ``biox_cpath``) share: their GATv2 + pooling stack."""

    heads: int = setting("Heads of each GATv2 layer, averaged (reference code: 2).", default=2)
    layers: int = setting("GATv2 + pooling layers (papers: 4).", default=4)
    pool_ratio: float = setting("Share of a case's nodes each pooling layer keeps (papers: 0.7).", default=0.7)
    k: int = setting("Neighbours of each patch in the case's k-NN feature graph.", default=5)

    def __post_init__(self) -> None:
        if min(self.k, self.heads, self.layers) < 1 or not 0 < self.pool_ratio <= 1:
            raise ConfigError(f"model.options of a graph model: k, heads and layers must be at least 1 and pool_ratio "
                              f"in (0, 1], got {self.k}, {self.heads}, {self.layers}, {self.pool_ratio}.")


def knn_edges(features: torch.Tensor, groups: torch.Tensor, k: int, self_loops: bool = False,
              block: int = KNN_BLOCK) -> torch.Tensor:
    """Each row's ``k`` nearest rows (Euclidean) within its group, as edges (2, E) from the row to each neighbour
    (as scikit-learn's ``kneighbors_graph(...).nonzero()``); ``self_loops``: the row counts as one of its k.
    Distances are computed ``block`` at a time (rows x group size <= block), never as one N x N matrix."""
    sources, targets = [], []
    for group in torch.unique(groups):
        rows = torch.nonzero(groups == group).squeeze(1)                           # (n,)
        n = len(rows)
        take = min(k, n) if self_loops else min(k, n - 1)
        if take <= 0:
            continue
        x = features[rows]
        chunk = max(1, block // n)
        for start in range(0, n, chunk):
            distance = torch.cdist(x[start:start + chunk], x)                     # (c, n)
            if not self_loops:
                local = torch.arange(start, min(start + chunk, n), device=x.device)
                distance[torch.arange(len(local)), local] = math.inf
            nearest = distance.topk(take, largest=False).indices                  # (c, take)
            sources.append(rows[start:start + chunk].repeat_interleave(take))
            targets.append(rows[nearest.reshape(-1)])
    if not sources:
        return torch.zeros((2, 0), dtype=torch.long, device=features.device)
    return torch.stack([torch.cat(sources), torch.cat(targets)])


class GATv2(nn.Module):
    """GATv2 (Brody et al. 2022) as torch-geometric's ``GATv2Conv(concat=False)``: per edge j -> i,
    alpha = softmax_i(a^T LeakyReLU(W_r x_i + W_l x_j)) with a self-loop per node; out_i = mean over heads of
    sum alpha W_l x_j, + bias. (N, D) -> (N, E)."""

    def __init__(self, in_dim: int, out_dim: int, heads: int, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.heads, self.out_dim, self.negative_slope = heads, out_dim, negative_slope
        self.lin_l, self.lin_r = nn.Linear(in_dim, heads * out_dim), nn.Linear(in_dim, heads * out_dim)
        self.att = nn.Parameter(torch.empty(heads, out_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        nn.init.xavier_uniform_(self.att)

    def forward(self, x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        n, h, o = len(x), self.heads, self.out_dim
        loops = torch.arange(n, device=x.device)
        keep = edges[0] != edges[1]                                                # existing loops replaced
        source = torch.cat([edges[0][keep], loops])
        target = torch.cat([edges[1][keep], loops])
        left, right = self.lin_l(x).view(n, h, o), self.lin_r(x).view(n, h, o)
        # index_select, not left[source]: the backward of indexing with repeated indices (index_put_ accumulate)
        # sums in a thread-dependent order on CPU, so runs differed bit for bit; index_select's does not
        from_source, to_target = left.index_select(0, source), right.index_select(0, target)     # (E, H, O)
        scores = (F.leaky_relu(from_source + to_target, self.negative_slope) * self.att).sum(-1)  # (E, H)
        heads = torch.arange(h, device=x.device)
        groups = (target[:, None] * h + heads).reshape(-1)                        # (E*H,) (target, head)
        alpha = segment_softmax(scores.reshape(-1), groups, n * h).view(-1, h)     # (E, H)
        out = segment_sum((alpha[..., None] * from_source).reshape(len(source), h * o), target, n)
        return out.view(n, h, o).mean(1) + self.bias                               # (N, E)


class GraphConvScore(nn.Module):
    """torch-geometric's ``GraphConv(E, 1)`` (sum aggregation, no self-loop): lin_rel(sum_{j->i} x_j) + lin_root(x_i);
    (N, E) -> (N,), the score SAGPooling ranks nodes by."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin_rel, self.lin_root = nn.Linear(dim, 1), nn.Linear(dim, 1, bias=False)

    def forward(self, x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        neighbours = segment_sum(x.index_select(0, edges[0]), edges[1], len(x))      # (N, E)
        return (self.lin_rel(neighbours) + self.lin_root(x)).squeeze(1)


def top_k_pool(x: torch.Tensor, edges: torch.Tensor, groups: torch.Tensor, n_groups: int, score: torch.Tensor,
               ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAGPooling's selection: the ceil(ratio x n) best-scored nodes of each group, scaled by their score; edges
    between kept nodes renumbered. Returns (x' (N', E), edges', groups' (N',), kept (N',) indices into x)."""
    rank, sizes = group_ranks(score, groups, n_groups)
    kept = torch.nonzero(rank < torch.ceil(ratio * sizes[groups].to(score.dtype))).squeeze(1)   # (N',)
    position = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
    position[kept] = torch.arange(len(kept), device=x.device)
    both = (position[edges[0]] >= 0) & (position[edges[1]] >= 0)
    return (x[kept] * score[kept, None], position[edges[:, both]], groups[kept], kept)


def max_mean_readout(x: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """cat[global max pool, global mean pool] per group: (N, E) -> (n_groups, 2E)."""
    mean = segment_sum(x, groups, n_groups) / group_sizes(groups, n_groups).clamp_min(1)[:, None].to(x.dtype)
    top = x.new_full((n_groups, x.shape[1]), -math.inf).scatter_reduce(
        0, groups[:, None].expand_as(x), x, reduce="amax", include_self=True)
    return torch.cat([torch.where(torch.isinf(top), torch.zeros_like(top), top), mean], dim=1)


def region_adjacency_edges(position: torch.Tensor, slices: torch.Tensor) -> torch.Tensor:
    """BioX-CPath's region adjacency graph: patches of one slice whose grid cells touch (8-neighbourhood and the
    patch itself), both ways. ``position`` (N, 3): x, y, side in level-0 pixels; ``slices`` (N,). -> (2, E)."""
    side = position[:, 2].clamp_min(1)
    gx, gy = torch.round(position[:, 0] / side).long(), torch.round(position[:, 1] / side).long()
    offset = 1 << 20
    key = (slices.long() << 42) + ((gx + offset) << 21) + (gy + offset)              # (N,) one cell per key
    order = torch.argsort(key)
    sorted_key = key[order]
    sources, targets = [], []
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            wanted = key + (dx << 21) + dy
            at = torch.searchsorted(sorted_key, wanted).clamp_max(len(key) - 1)
            hit = sorted_key[at] == wanted
            sources.append(torch.nonzero(hit).squeeze(1))
            targets.append(order[at[hit]])
    return torch.stack([torch.cat(sources), torch.cat(targets)])


def random_walk_encoding(edges: torch.Tensor, n: int, steps: int, block: int = KNN_BLOCK) -> torch.Tensor:
    """Random-walk positional encoding (Dwivedi et al. 2022; torch-geometric's ``AddRandomWalkPE``): the return
    probabilities diag(P^k), k = 1..steps, of the walk P = D_out^-1 A on ``edges`` (2, E) over n nodes.
    Computed ``block`` entries at a time (P^k applied to a block of unit columns): memory n x block/n, never n x n.
    -> (n, steps)."""
    out = torch.zeros((n, steps), device=edges.device)
    if n == 0:
        return out
    degree = torch.bincount(edges[0], minlength=n).clamp_min(1).float()
    walk = torch.sparse_coo_tensor(edges, 1.0 / degree[edges[0]], (n, n),
                                   check_invariants=False).coalesce()               # P (n, n) sparse
    width = max(1, block // n)
    for start in range(0, n, width):
        columns = torch.arange(start, min(start + width, n), device=edges.device)
        state = torch.zeros((n, len(columns)), device=edges.device)
        state[columns, torch.arange(len(columns))] = 1.0
        for step in range(steps):
            state = torch.sparse.mm(walk, state)                                   # P^(step+1) e_columns
            out[columns, step] = state[columns, torch.arange(len(columns))]
    return out


class CaseGraphCache:
    """Each case's graph (edges (2, E) in its own row numbers) and random-walk encoding (n, steps), kept by the
    content of its rows: both depend on the input features (and patch places) only, nothing that trains, so a case
    seen again (every epoch, every evaluation) is not rebuilt; a case whose patches are drawn afresh each epoch
    (slices over ``data.per_slice_cap``) is a new graph each time. Least recently used first out beyond
    ``limit_bytes``."""

    def __init__(self, limit_bytes: int = 256 * 2**20) -> None:
        self.limit_bytes, self.held = limit_bytes, 0
        self.graphs: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def __call__(self, build, *rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``build(*rows)`` -> (edges, walk) of one case, or the kept copy for the same ``rows``."""
        digest = hashlib.blake2b(digest_size=16)
        for part in rows:
            if part is not None:
                digest.update(str((part.dtype, tuple(part.shape))).encode())
                digest.update(part.detach().cpu().contiguous().numpy().tobytes())
        key = digest.digest()
        found = self.graphs.get(key)
        if found is None:
            found = self.graphs[key] = build(*rows)
            self.held += sum(t.element_size() * t.nelement() for t in found)
            while self.held > self.limit_bytes and len(self.graphs) > 1:
                self.held -= sum(t.element_size() * t.nelement() for t in self.graphs.popitem(last=False)[1])
        else:
            self.graphs.move_to_end(key)
        return found
