"""Cross-stain attention fusion: the stains of a case pooled to one token each, the tokens attending to each other,
then an attention pool over the stains (fusion that needs no registration, beside ``aligned``, which does)::

    patches (P, D) --standardise, projector--> h (P, E)
    per stain k, over the case's stain-k patches: gated attention (a pool of its own per stain)
        a (P,) sums to 1 per (case, stain); token t_g = sum a h + s_k          (G, E)  s_k: a learned stain vector
    the case's tokens (B, K, E), missing stains masked out of the keys:
        T' = LN(T + MHA(T))    T'' = LN(T' + FFN(T'))          (model.options.cross_attention.heads)
    gated attention over the case's tokens -> w (G,) -> case (B, E) -> Linear -> logits (B, C)

Levels: stain weight w; slice and patch weights from a within each stain (slice mass = sum of a over its patches);
effective attention w x a (sums to 1 per case). A one-patch case is one token t = h + s_k through the block and
the head: ``patch_embeddings`` are those tokens and ``patch_alone_logits`` runs them through alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stainmil.config import ModelConfig, setting
from stainmil.errors import ConfigError
from stainmil.model.attention import GatedAttention
from stainmil.model.base import StainAware, projector
from stainmil.model.batch import CaseBatch
from stainmil.model.output import MILOutput
from stainmil.model.registry import register_architecture
from stainmil.model.segment import segment_softmax, segment_sum


@dataclass(frozen=True)
class CrossAttentionOptions:
    """``model.options.cross_attention``."""

    heads: int = setting("Heads of the attention between stain tokens.", default=4)

    def __post_init__(self) -> None:
        if self.heads < 1:
            raise ConfigError(f"model.options.cross_attention.heads must be at least 1, got {self.heads}.")


@register_architecture("cross_attention", reference="stain tokens attend to each other, then pooled",
                       options=CrossAttentionOptions)
class CrossStainAttentionMIL(StainAware):
    def __init__(self, in_dim: int, config: ModelConfig, stains: list[str], options: CrossAttentionOptions) -> None:
        super().__init__(in_dim, stains)
        e, h, p, heads = config.embed_dim, config.attention_hidden_dim, config.dropout, options.heads
        if e % heads:  # (one stain works: its token attends to itself, the ablation beside the others)
            raise ConfigError(f"model.architecture 'cross_attention' needs model.embed_dim ({e}) divisible by "
                              f"model.options.cross_attention.heads ({heads}).")
        self.projector = projector(in_dim, config)
        self.patch_pools = nn.ModuleList([GatedAttention(e, h, p) for _ in stains])
        self.stain_vectors = nn.Parameter(torch.randn(len(stains), e) * 0.1)              # (K, E)
        self.mix = nn.MultiheadAttention(e, heads, dropout=p, batch_first=True)
        self.norm_mix, self.norm_ffn = nn.LayerNorm(e), nn.LayerNorm(e)
        self.ffn = nn.Sequential(nn.Linear(e, 2 * e), nn.ReLU(), nn.Dropout(p), nn.Linear(2 * e, e))
        self.stain_pool = GatedAttention(e, h, p)
        self.classifier = nn.Linear(e, config.n_classes)

    def block(self, tokens: torch.Tensor, missing: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K, E) stain tokens, (B, K) True where a case lacks the stain -> (B, K, E) after attending."""
        mixed, _ = self.mix(tokens, tokens, tokens, key_padding_mask=missing, need_weights=False)
        tokens = self.norm_mix(tokens + mixed)
        return self.norm_ffn(tokens + self.ffn(tokens))

    def forward(self, batch: CaseBatch, topk_mask: tuple[int, float] | None = None) -> MILOutput:
        self.check_stains(batch)  # a stain no training case had: its pool and vector never learned anything
        n_slices, n_groups, k = len(batch.slice_group), len(batch.group_case), len(self.stains)
        patch_group = batch.slice_group[batch.patch_slice]                                # (P,)
        patch_stain = batch.group_stain[patch_group]                                      # (P,)
        h = self.projector(self.standardise(batch.features))                              # (P, E)
        scores = h.new_zeros(len(h))
        for stain, pool in enumerate(self.patch_pools):
            rows = patch_stain == stain
            if bool(rows.any()):
                scores[rows] = pool.score(h[rows])
        a = segment_softmax(scores, patch_group, n_groups)                                # (P,) per (case, stain)
        tokens = segment_sum(a[:, None] * h, patch_group, n_groups) + self.stain_vectors[batch.group_stain]  # (G, E)
        dense = h.new_zeros((batch.n_cases, k, h.shape[1]))                               # (B, K, E)
        dense[batch.group_case, batch.group_stain] = tokens
        missing = torch.ones((batch.n_cases, k), dtype=torch.bool, device=h.device)
        missing[batch.group_case, batch.group_stain] = False
        mixed = self.block(dense, missing)[batch.group_case, batch.group_stain]           # (G, E)
        stain_scores = self.stain_pool.score(mixed)                                       # (G,)
        w = segment_softmax(stain_scores, batch.group_case, batch.n_cases)                # (G,)
        case = segment_sum(w[:, None] * mixed, batch.group_case, batch.n_cases)           # (B, E)
        slice_mass = segment_sum(a, batch.patch_slice, n_slices)                          # (S,) sums to 1 per group
        tiny = torch.finfo(a.dtype).tiny
        return MILOutput(
            logits=self.classifier(case),
            patch_attention_logits=scores,
            patch_weights=segment_softmax(scores, batch.patch_slice, n_slices),
            slice_attention_logits=torch.log(slice_mass.clamp_min(tiny)), slice_weights=slice_mass,
            stain_attention_logits=stain_scores, stain_weights=w,
            effective_attention=w[patch_group] * a,
            patch_embeddings=h + self.stain_vectors[patch_stain],
            case_embeddings=case,
        )

    def patch_alone_logits(self, patch_embeddings: torch.Tensor) -> torch.Tensor:
        """(P, E) tokens h + s_k -> (P, C): each patch as a one-patch case (one token attending to itself)."""
        return self.classifier(self.block(patch_embeddings[:, None, :])[:, 0])
