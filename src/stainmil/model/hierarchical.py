"""The hierarchical attention MIL model: patch -> slice -> stain -> case.

    patch features (P, D) --standardise--> projector Linear->ReLU->Dropout (P, E)
      --attention over the patches of each slice-->  slice embeddings (S, E)
      --attention over the slices of each stain--->  stain embeddings (G, E)
      --attention over the stains of each case---->  case embeddings  (B, E)
      --linear classifier-------------------------> logits (B, C)

``effective_attention`` of a patch = stain weight x slice weight x patch weight; it sums to 1
over the patches of each case. Everything is vectorised over the batch (segment softmax).

Stain identity (``model.stain_identity``):

* ``none``      — every level shared across stains; a stain is known only through what its features show.
* ``embedding`` — a learned vector per stain (E,) is added to each slice embedding before the slice pool; the
                  stain embeddings pooled from them carry it into the stain pool, and the case embedding
                  carries it weighted by the stain attention: the pools can weigh a stain by what it is.
* ``gated``     — the same vector, times a learned gate sigmoid(g) that starts nearly closed (g = -4): the model
                  starts as ``none`` and opens the gate only as far as the data keeps pushing it.
* ``attention`` — a learned vector per stain, starting at zero, seen only where the stain pool scores each stain
                  embedding: which stain it is may change how much a stain weighs, never what it says (nothing
                  of it reaches the pooled embeddings or the classifier); at the start exactly ``none``.
* ``specific``  — each stain has its own projector and patch and slice pools; the stain pool and the
                  classifier are shared (more parameters: for cohorts large enough to afford them).

A missing stain or slice is simply absent (no padding, no imputation). A stain that no training case
had is refused at prediction (its vector or projector never learned anything).
"""

from __future__ import annotations

import torch
from torch import nn

from stainmil.config import LEVELS, ModelConfig
from stainmil.errors import ConfigError
from stainmil.model.attention import PoolOutput, build_attention
from stainmil.model.base import GATE_START, StainAware, projector
from stainmil.model.batch import CaseBatch
from stainmil.model.output import MILOutput
from stainmil.model.registry import STAIN_IDENTITIES, register_architecture
from stainmil.model.segment import group_ranks


@register_architecture("hierarchical", reference="stainmil: attention patch -> slice -> stain -> case",
                       stain_identities=STAIN_IDENTITIES)
class HierarchicalMIL(StainAware):
    def __init__(self, in_dim: int, config: ModelConfig, stains: list[str] | None = None) -> None:
        stains = list(stains) if stains is not None else []
        super().__init__(in_dim, stains)
        e, h, p = config.embed_dim, config.attention_hidden_dim, config.dropout
        self.stain_identity = config.stain_identity
        if self.stain_identity != "none" and not stains:
            raise ConfigError("model.stain_identity needs the stain names (data.stains) to build the model.")
        names = config.attention if isinstance(config.attention, list) else [config.attention] * len(LEVELS)
        if len(names) != len(LEVELS):
            raise ConfigError(f"model.attention must be one name or {len(LEVELS)} names [patch, slice, stain], "
                              f"got {config.attention}.")

        def pool(level: str, name: str) -> nn.Module:
            return build_attention(name, e, h, p, heads=config.attention_heads, max_group=config.transformer_max_group)

        specific = self.stain_identity == "specific"
        self.projector = nn.ModuleList([projector(in_dim, config) for _ in stains]) if specific \
            else projector(in_dim, config)
        self.pools = nn.ModuleDict({
            level: nn.ModuleList([pool(level, name) for _ in stains]) if specific and level != "stain"
            else pool(level, name) for level, name in zip(LEVELS, names)})
        self.stain_embedding = nn.Embedding(len(stains), e) if self.stain_identity in ("embedding", "gated") else None
        if self.stain_embedding is not None:
            nn.init.normal_(self.stain_embedding.weight, std=0.1)
        self.stain_gate = nn.Parameter(torch.tensor(GATE_START)) if self.stain_identity == "gated" else None
        self.stain_condition = nn.Parameter(torch.zeros(len(stains), e)) if self.stain_identity == "attention" \
            else None
        self.classifier = nn.Linear(e, config.n_classes)

    def embed(self, features: torch.Tensor, patch_stain: torch.Tensor | None = None) -> torch.Tensor:
        """(P, D) raw features -> (P, E) patch embeddings (``specific``: each patch through its stain's projector)."""
        x = self.standardise(features)
        if self.stain_identity != "specific":
            return self.projector(x)
        if patch_stain is None:
            raise ValueError("stain_identity 'specific' embeds each patch with its stain's projector: pass patch_stain")
        out = x.new_empty((len(x), self.classifier.in_features))
        for k, project in enumerate(self.projector):
            rows = patch_stain == k
            out[rows] = project(x[rows])
        return out

    def _pool(self, level: str, h: torch.Tensor, groups: torch.Tensor, n_groups: int, row_stain: torch.Tensor,
              drop: torch.Tensor | None = None, logits_only: bool = False):
        """One level's pool; ``specific``: each stain's rows through that stain's pool (groups never mix stains)."""
        pools = self.pools[level]
        if not isinstance(pools, nn.ModuleList):
            return pools.row_logits(h, groups, n_groups) if logits_only else pools(h, groups, n_groups, drop)
        logits = h.new_zeros(len(h))
        weights = h.new_zeros(len(h))
        pooled = h.new_zeros((n_groups, h.shape[1]))
        for k, stain_pool in enumerate(pools):
            rows = row_stain == k
            if not bool(rows.any()):
                continue
            if logits_only:
                logits[rows] = stain_pool.row_logits(h[rows], groups[rows], n_groups)
                continue
            part = stain_pool(h[rows], groups[rows], n_groups, None if drop is None else drop[rows])
            logits[rows], weights[rows] = part.logits, part.weights
            pooled = pooled + part.pooled                                    # groups of other stains get zeros
        if logits_only:
            return logits
        return PoolOutput(pooled, logits, weights)

    def forward(self, batch: CaseBatch, topk_mask: tuple[int, float] | None = None) -> MILOutput:
        """``topk_mask=(k, ratio)`` (training only): mask that share of each slice's k top patches (ACMIL)."""
        if self.stain_identity != "none":
            self.check_stains(batch)
        patch_stain = batch.group_stain[batch.slice_group][batch.patch_slice]        # (P,)
        return self.pool(self.embed(batch.features, patch_stain), batch, topk_mask)

    def pool(self, h: torch.Tensor, batch: CaseBatch, topk_mask: tuple[int, float] | None = None) -> MILOutput:
        """Pool the patch embeddings ``h`` (P, E) of ``batch``'s patches up the hierarchy (its features unused)."""
        n_slices, n_groups = len(batch.slice_group), len(batch.group_case)
        slice_stain = batch.group_stain[batch.slice_group]                          # (S,)
        patch_stain = slice_stain[batch.patch_slice]                                # (P,)
        drop = None
        if topk_mask is not None and topk_mask[0] > 0:
            with torch.no_grad():
                logits = self._pool("patch", h, batch.patch_slice, n_slices, patch_stain, logits_only=True)
            drop = topk_drop(logits, batch.patch_slice, n_slices, *topk_mask)
        patch = self._pool("patch", h, batch.patch_slice, n_slices, patch_stain, drop)   # pooled (S, E)
        slice_in = patch.pooled
        if self.stain_embedding is not None:  # once: the stain and case embeddings pooled from here carry it
            slice_in = slice_in + self.stain_vector(slice_stain)                    # (S, E)
        slice_ = self._pool("slice", slice_in, batch.slice_group, n_groups, slice_stain)  # pooled (G, E)
        condition = self.stain_condition[batch.group_stain] if self.stain_condition is not None else None  # (G, E)
        stain = self.pools["stain"](slice_.pooled, batch.group_case, batch.n_cases, condition=condition)  # (B, E)
        logits = self.classifier(stain.pooled)                                      # (B, C)
        patch_group = batch.slice_group[batch.patch_slice]                          # (P,) stain group of each patch
        effective = stain.weights[patch_group] * slice_.weights[batch.patch_slice] * patch.weights  # (P,)
        return MILOutput(
            logits=logits,
            patch_attention_logits=patch.logits, patch_weights=patch.weights,
            slice_attention_logits=slice_.logits, slice_weights=slice_.weights,
            stain_attention_logits=stain.logits, stain_weights=stain.weights,
            effective_attention=effective, case_embeddings=stain.pooled,
            # what a one-patch case would pool to: the patch's embedding (+ its stain's vector)
            patch_embeddings=h if self.stain_embedding is None else h + self.stain_vector(patch_stain),
        )

    def stain_vector(self, stain: torch.Tensor) -> torch.Tensor:
        """(N,) stain indices -> (N, E) the learned stain vectors (``gated``: times the gate)."""
        vector = self.stain_embedding(stain)
        return vector if self.stain_gate is None else torch.sigmoid(self.stain_gate) * vector

    def patch_alone_logits(self, patch_embeddings: torch.Tensor) -> torch.Tensor:
        """(P, E) ``patch_embeddings`` of the output -> (P, C): the case logits if the whole case were this one
        patch (all attention on it)."""
        return self.classifier(patch_embeddings)


def topk_drop(logits: torch.Tensor, groups: torch.Tensor, n_groups: int, k: int, ratio: float) -> torch.Tensor:
    """Stochastic top-k masking (ACMIL, ECCV 2024): (N,) bool, True for rows masked out of the softmax.

    Among the k highest-logit rows of each group, each is masked with probability ``ratio``; the
    group's lowest-ranked row is never eligible, so every group keeps at least one row.
    """
    rank, sizes = group_ranks(logits, groups, n_groups)                   # (N,), (n_groups,)
    eligible = (rank < k) & (rank < sizes[groups] - 1)
    # one uniform draw per row, taken in group-major rank order (the order the draws were always taken in)
    position = torch.cumsum(sizes, 0)[groups] - sizes[groups] + rank
    return eligible & (torch.rand(len(logits), device=logits.device)[position] < ratio)
