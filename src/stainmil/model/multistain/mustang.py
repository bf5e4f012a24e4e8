"""MUSTANG (Gallagher-Syed et al., BMVC 2023; AmayaGS/MUSTANG): every patch of every stain of a patient in one
k-nearest-neighbour graph, graph attention layers, self-attention graph pooling.

    patches of a case, all stains (P, D) --standardise (+ stain vector with model.stain_identity embedding)-->
    k-NN graph on those features (k = model.options.mustang.k, 5; Euclidean; edge i -> j for j in kNN(i), no self)
    layers (4) x [ GATv2(-> E, heads averaged) -> ReLU -> SAGPooling(ratio 0.7: score tanh(GraphConv(E -> 1)),
                         keep the best ceil(0.7 n) nodes, scaled by their score) -> readout cat[max, mean] (2E) ]
    sum of the readouts -> Linear(2E, E) -> ReLU -> Dropout -> Linear(E, E/2) -> ReLU -> Linear(E/2, C)

Deviations from the reference code (dev-notes/multistain-recipes.md): several cases per step (one block-diagonal
graph; every operation stays within a case); k-NN on the standardised features the network reads; any number of
classes; dropout ``model.dropout``. Patch attention (for heatmaps and tables): the first pooling layer's score,
the one layer that scores every patch, softmaxed within the case. A one-patch case is a graph of one node: that is
what ``instance_logits`` runs for each patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stainmil.config import ModelConfig, setting
from stainmil.model.flat import CasePooling, FlatMIL
from stainmil.model.graph import GATv2, GraphConvScore, GraphOptions, knn_edges, max_mean_readout, top_k_pool
from stainmil.model.registry import register_architecture


@dataclass(frozen=True)
class MustangOptions(GraphOptions):
    """``model.options.mustang``."""

    k: int = setting("Neighbours of each patch in the case's k-NN feature graph (paper: 5).", default=5)


@register_architecture("mustang", reference="Gallagher-Syed et al. 2023: k-NN graph, GATv2", options=MustangOptions)
class MUSTANG(FlatMIL):
    def __init__(self, in_dim: int, config: ModelConfig, stains: list[str], options: MustangOptions) -> None:
        super().__init__(in_dim, config, stains)
        b, e = options, config.embed_dim
        self.k, self.ratio = b.k, b.pool_ratio
        self.convs = nn.ModuleList([GATv2(in_dim if i == 0 else e, e, b.heads) for i in range(b.layers)])
        self.scores = nn.ModuleList([GraphConvScore(e) for _ in range(b.layers)])
        self.head = nn.Sequential(nn.Linear(2 * e, e), nn.ReLU(), nn.Dropout(config.dropout),
                                  nn.Linear(e, e // 2), nn.ReLU(), nn.Linear(e // 2, config.n_classes))

    def network(self, x: torch.Tensor, edges: torch.Tensor, groups: torch.Tensor, n_groups: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, D) nodes of ``n_groups`` graphs -> logits (n_groups, C), readout (n_groups, 2E), first scores (N,)."""
        readout, first = 0, None
        for conv, score in zip(self.convs, self.scores):
            x = F.relu(conv(x, edges))
            s = torch.tanh(score(x, edges))                                        # (N,)
            first = s if first is None else first
            x, edges, groups, _ = top_k_pool(x, edges, groups, n_groups, s, self.ratio)
            readout = readout + max_mean_readout(x, groups, n_groups)             # (n_groups, 2E)
        return self.head(readout), readout, first

    def pool_cases(self, x, patch_case, n_cases, labels, context) -> CasePooling:
        with torch.no_grad():
            edges = knn_edges(x.detach(), patch_case, self.k)                      # (2, P*k) within each case
        logits, readout, first = self.network(x, edges, patch_case, n_cases)
        return CasePooling(logits, readout, x, first)

    def instance_logits(self, patch_embeddings: torch.Tensor) -> torch.Tensor:
        alone = torch.arange(len(patch_embeddings), device=patch_embeddings.device)  # each patch its own graph
        none = torch.zeros((2, 0), dtype=torch.long, device=patch_embeddings.device)
        return self.network(patch_embeddings, none, alone, len(patch_embeddings))[0]
