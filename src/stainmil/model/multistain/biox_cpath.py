"""BioX-CPath (CVPR 2025; AmayaGS/BioX-CPath): a graph of every stain's patches of a patient, graph attention, and
stain-aware attention pooling (SAAP).

    graph (KRAG): k-NN on the features (k = model.options.biox_cpath.k, 7, the patch itself included) united with the
      region adjacency of each slice (patches whose grid cells touch) where the batch knows the patches' places
    random-walk encoding pe (N, 20): the return probabilities diag(P^k) of the walk on that graph
    layers (4) x [ x <- cat(x, pe) -> GATv2(-> E) -> ReLU -> pooling: s = softsign(GraphConv(E -> 1)), keep
      the best ceil(0.7 n) nodes, scaled by s -> SAAP readout:
        w_stain = sum of s over the stain's kept nodes / sum of s over the case's
        h = cat[ sum_stain w_stain mean_stain(x), sum_stain w_stain max_stain(x) ]            (2E) ]
    z = cat of the layers' h (L*2E) -> layer attention: LN(z' + out(v(z'))), z' = LN(z)  (multi-head attention over
      a sequence of one, which is what the reference's nn.MultiheadAttention computes; its attention dropout drops
      the branch)
    -> ReLU -> Dropout -> Linear(L*2E, L*E) -> Linear(L*E, C)

Deviations (dev-notes/multistain-recipes.md): several cases per step; k-NN on the standardised features; the
region adjacency within each slice (the reference links patches at the same grid cell across unregistered slides)
and only where the cohort has slide places (a patch-image cohort: k-NN only); the pooling's tie-breaking noise only
in training; the SAAP denominator kept away from 0 (the reference divides by it unguarded). Patch attention: the
pooling scores summed over the layers each patch survives (the reference's node heatmap), softmaxed within the case.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stainmil.config import ModelConfig, setting
from stainmil.model.flat import CasePooling, FlatMIL
from stainmil.model.graph import (
    CaseGraphCache,
    GATv2,
    GraphConvScore,
    GraphOptions,
    knn_edges,
    random_walk_encoding,
    region_adjacency_edges,
    top_k_pool,
)
from stainmil.model.registry import register_architecture
from stainmil.model.segment import segment_sum

WALK_STEPS = 20


@dataclass(frozen=True)
class BioXCPathOptions(GraphOptions):
    """``model.options.biox_cpath``."""

    k: int = setting("Neighbours in the k-NN part of its graph, the patch itself included (reference code: 7).",
                     default=7)


@register_architecture("biox_cpath", reference="BioX-CPath 2025: graph + stain-aware pooling",
                       options=BioXCPathOptions, patch_positions=True, fused_optimizer=True)
class BioXCPath(FlatMIL):
    def __init__(self, in_dim: int, config: ModelConfig, stains: list[str], options: BioXCPathOptions) -> None:
        super().__init__(in_dim, config, stains)
        b, e, layers = options, config.embed_dim, options.layers
        self.k, self.ratio, self.n_stains = b.k, b.pool_ratio, max(len(stains), 1)
        self.convs = nn.ModuleList([GATv2((in_dim if i == 0 else e) + WALK_STEPS, e, b.heads)
                                    for i in range(layers)])
        self.scores = nn.ModuleList([GraphConvScore(e) for _ in range(layers)])
        width = layers * 2 * e
        self.norm_pre, self.norm_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.value, self.out = nn.Linear(width, width), nn.Linear(width, width)
        self.dropout = config.dropout
        self.graph_cache = CaseGraphCache()
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(config.dropout), nn.Linear(width, layers * e),
                                  nn.Linear(layers * e, config.n_classes))

    def saap(self, x: torch.Tensor, score: torch.Tensor, groups: torch.Tensor, stain: torch.Tensor,
             n_groups: int) -> torch.Tensor:
        """Stain-aware attention pooling of kept nodes (N', E) -> (n_groups, 2E)."""
        cell = groups * self.n_stains + stain                                         # (N',) (case, stain)
        cells = n_groups * self.n_stains
        count = segment_sum(torch.ones_like(score), cell, cells)                      # (cells,)
        mass = segment_sum(score, cell, cells)                                        # (cells,)
        total = segment_sum(mass, torch.arange(cells, device=x.device) // self.n_stains, n_groups)   # (B,)
        total = torch.where(total.abs() < 1e-6, torch.full_like(total, 1e-6), total)
        weight = mass / total.repeat_interleave(self.n_stains)                        # (cells,) w_stain
        mean = segment_sum(x, cell, cells) / count.clamp_min(1)[:, None]
        top = x.new_full((cells, x.shape[1]), -torch.inf).scatter_reduce(
            0, cell[:, None].expand_as(x), x, reduce="amax", include_self=True)
        top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
        by_case = torch.arange(cells, device=x.device) // self.n_stains
        return torch.cat([segment_sum(weight[:, None] * mean, by_case, n_groups),
                          segment_sum(weight[:, None] * top, by_case, n_groups)], dim=1)

    def network(self, x, edges, walk, groups, stain, n_groups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, D) nodes of n_groups graphs, their edges and walk encodings (N, 20) -> logits (n_groups, C),
        z (n_groups, L*2E), node score sums (N,)."""
        node = torch.arange(len(x), device=x.device)                                 # original index of each node
        heat = x.new_zeros(len(x))
        readouts = []
        for conv, score_layer in zip(self.convs, self.scores):
            x = F.relu(conv(torch.cat([x, walk], dim=1), edges))
            s = F.softsign(score_layer(x, edges))
            if self.training:  # the reference's tie-breaking noise
                s = s + 1e-6 * torch.randn_like(s)
            heat = heat.index_add(0, node, s)
            x, edges, groups, kept = top_k_pool(x, edges, groups, n_groups, s, self.ratio)
            walk, stain, node, s = walk[kept], stain[kept], node[kept], s[kept]
            readouts.append(self.saap(x, s, groups, stain, n_groups))
        z = self.norm_pre(torch.cat(readouts, dim=1))                                 # (B, L*2E)
        branch = self.out(self.value(z))
        if self.training and self.dropout > 0:  # attention dropout on the one attention weight
            keep = torch.rand((len(z), 1), device=z.device) >= self.dropout
            branch = branch * keep / (1 - self.dropout)
        z = self.norm_post(z + branch)
        return self.head(z), z, heat

    def pool_cases(self, x, patch_case, n_cases, labels, context) -> CasePooling:
        with torch.no_grad():
            edges, walk = self.case_graphs(x.detach(), patch_case, context.position, context.slice)
        logits, z, heat = self.network(x, edges, walk, patch_case, context.stain, n_cases)
        # the patch embedding keeps the stain (SAAP pools by stain) in the last column: see instance_logits
        return CasePooling(logits, z, torch.cat([x, context.stain[:, None].to(x.dtype)], dim=1), heat)

    def case_graph(self, x: torch.Tensor, position: torch.Tensor | None, slices: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """One case's KRAG edges (2, E) (k-NN on the features, with the region adjacency when patch places are
        known) and its random-walk encoding (n, 20)."""
        edges = knn_edges(x, torch.zeros(len(x), dtype=torch.long, device=x.device), self.k, self_loops=True)
        if position is not None:
            edges = torch.unique(torch.cat([edges, region_adjacency_edges(position, slices)], 1), dim=1)
        return edges, random_walk_encoding(edges, len(x), WALK_STEPS)

    def case_graphs(self, x: torch.Tensor, patch_case: torch.Tensor, position: torch.Tensor | None,
                    slices: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's graph, case by case (cases never connect): edges (2, E) in batch rows, walk (P, 20); each
        case's part built once (:class:`CaseGraphCache`)."""
        all_edges, walk = [], x.new_zeros((len(x), WALK_STEPS))
        for case in torch.unique(patch_case):
            rows = torch.nonzero(patch_case == case).squeeze(1)                         # (n,)
            edges, case_walk = self.graph_cache(self.case_graph, x[rows], None if position is None else
                                                position[rows], None if slices is None else slices[rows])
            all_edges.append(rows[edges])
            walk[rows] = case_walk
        edges = torch.cat(all_edges, 1) if all_edges else torch.zeros((2, 0), dtype=torch.long, device=x.device)
        return (torch.unique(edges, dim=1) if position is not None else edges), walk

    def instance_logits(self, patch_embeddings: torch.Tensor) -> torch.Tensor:
        """(P, D + 1) standardised features and stain -> (P, C): each patch a one-node graph (its own loop)."""
        x, stain = patch_embeddings[:, :-1], patch_embeddings[:, -1].long()
        alone = torch.arange(len(x), device=x.device)
        walk = x.new_ones((len(x), WALK_STEPS))  # a one-node graph with its loop returns with probability 1 each step
        return self.network(x, torch.stack([alone, alone]), walk, alone, stain, len(x))[0]
