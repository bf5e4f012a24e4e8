"""Flat MIL: every patch of a case (every stain, every slice) in one bag — the field's standard models.

A :class:`FlatMIL` subclass implements :meth:`FlatMIL.pool_cases` on ragged cases (rows of one flat matrix
with a case index per row; no padding unless the architecture needs a sequence, as TransMIL does) and
:meth:`FlatMIL.instance_logits` (the case logits if the case were one patch). This base class does the
rest the same way for all of them: feature standardisation, the optional stain embedding
(``model.stain_identity: embedding`` adds a learned per-stain vector to each standardised patch), and
the patch / slice / stain levels of :class:`~stainmil.model.output.MILOutput`, derived from the case-level
patch attention ``a`` (sums to 1 per case)::

    slice mass  m_s = sum of a over the slice's patches      stain mass g = sum of m_s over the stain's slices
    patch weight = a / m_s      slice weight = m_s / g      stain weight = g      =>  product == a
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from stainmil.config import ModelConfig
from stainmil.model.base import GATE_START, StainAware
from stainmil.model.batch import CaseBatch
from stainmil.model.output import MILOutput
from stainmil.model.segment import group_sizes, segment_softmax, segment_sum


@dataclass(frozen=True)
class PatchContext:
    """Where each patch of a batch comes from, for an architecture that reads it (graphs by slice or stain)."""

    stain: torch.Tensor                  # (P,) stain index (model order)
    slice: torch.Tensor                  # (P,) slice row of the batch
    position: torch.Tensor | None        # (P, 3) place on its slide, where the cohort knows it (see registry)


@dataclass
class CasePooling:
    """What an architecture computes for the cases of a batch."""

    logits: torch.Tensor                    # (B, C)
    case_embeddings: torch.Tensor           # (B, E)
    patch_embeddings: torch.Tensor          # (P, ·) what instance_logits reads
    attention_logits: torch.Tensor | None   # (P,) scores whose softmax within each case is the patch attention
    attention_weights: torch.Tensor | None = None  # (P,) the attention itself when it is not one softmax
    auxiliary_losses: dict[str, torch.Tensor] = field(default_factory=dict)


class FlatMIL(StainAware):
    """Base of the flat baselines; subclasses implement the two methods (what they can do is in their registry
    entry, :mod:`stainmil.model.registry`)."""

    def __init__(self, in_dim: int, config: ModelConfig, stains: list[str]) -> None:
        super().__init__(in_dim, stains)
        self.n_classes = config.n_classes
        self.stain_identity = config.stain_identity
        self.stain_embedding = self.stain_gate = None
        if self.stain_identity in ("embedding", "gated"):
            self.stain_embedding = nn.Parameter(torch.randn(len(stains), in_dim) * 0.1)  # (K, D)
        if self.stain_identity == "gated":
            self.stain_gate = nn.Parameter(torch.tensor(GATE_START))

    def pool_cases(self, x: torch.Tensor, patch_case: torch.Tensor, n_cases: int,
                   labels: torch.Tensor, context: PatchContext) -> CasePooling:
        """(P, D) standardised features, (P,) case of each patch, (B,) labels (-1: none), where each patch comes
        from -> :class:`CasePooling`.

        ``labels`` are read only in training mode, for the auxiliary losses the architecture's paper specifies.
        """
        raise NotImplementedError

    def instance_logits(self, patch_embeddings: torch.Tensor) -> torch.Tensor:
        """(P, ·) -> (P, C): the case logits if the whole case were this one patch."""
        raise NotImplementedError

    def patch_alone_logits(self, patch_embeddings: torch.Tensor) -> torch.Tensor:
        return self.instance_logits(patch_embeddings)

    def forward(self, batch: CaseBatch, topk_mask: tuple[int, float] | None = None) -> MILOutput:
        """``topk_mask`` is the hierarchical model's (ACMIL masking within slices); flat baselines ignore it."""
        n_slices, n_groups = len(batch.slice_group), len(batch.group_case)
        patch_group = batch.slice_group[batch.patch_slice]                       # (P,)
        patch_case = batch.group_case[patch_group]                               # (P,)
        x = self.standardise(batch.features)                                     # (P, D)
        if self.stain_embedding is not None:
            self.check_stains(batch)
            vector = self.stain_embedding[batch.group_stain[patch_group]]         # (P, D)
            x = x + (vector if self.stain_gate is None else torch.sigmoid(self.stain_gate) * vector)
        context = PatchContext(batch.group_stain[patch_group], batch.patch_slice, batch.patch_position)
        pooled = self.pool_cases(x, patch_case, batch.n_cases, batch.labels, context)
        if pooled.attention_weights is not None:
            attention, scores = pooled.attention_weights, pooled.attention_logits
        elif pooled.attention_logits is not None:
            scores = pooled.attention_logits
            attention = segment_softmax(scores, patch_case, batch.n_cases)      # (P,) sums to 1 per case
        else:  # no attention: uniform shares (its registry entry says so: nothing draws them as a map)
            sizes = group_sizes(patch_case, batch.n_cases).to(x.dtype)
            attention = 1.0 / sizes[patch_case]
            scores = torch.zeros_like(attention)
        slice_mass = segment_sum(attention, batch.patch_slice, n_slices)        # (S,)
        group_mass = segment_sum(slice_mass, batch.slice_group, n_groups)       # (G,)
        tiny = torch.finfo(attention.dtype).tiny
        if pooled.attention_weights is None and pooled.attention_logits is not None:
            patch_weights = segment_softmax(scores, batch.patch_slice, n_slices)  # = a / m_s, without underflow
        else:
            patch_weights = attention / slice_mass[batch.patch_slice].clamp_min(tiny)
        return MILOutput(
            logits=pooled.logits,
            patch_attention_logits=scores,
            patch_weights=patch_weights,
            slice_attention_logits=torch.log(slice_mass.clamp_min(tiny)),
            slice_weights=slice_mass / group_mass[batch.slice_group].clamp_min(tiny),
            stain_attention_logits=torch.log(group_mass.clamp_min(tiny)),
            stain_weights=group_mass,
            effective_attention=attention,
            patch_embeddings=pooled.patch_embeddings,
            case_embeddings=pooled.case_embeddings,
            auxiliary_losses=pooled.auxiliary_losses,
        )


def labelled(labels: torch.Tensor, training: bool) -> torch.Tensor:
    """(B,) bool: the cases whose auxiliary losses are computed (training mode, known label)."""
    return (labels >= 0) & training
