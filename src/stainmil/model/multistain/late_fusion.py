"""Late fusion (as in Wies et al., PLOS One 2024, H&E + Melan-A of melanocytic lesions): one MIL model per stain,
combined at the case.

    for each stain k: a flat MIL model M_k (``model.options.late_fusion.base``, ABMIL by default) on the case's
                      stain-k patches only -> logits z_k (C,) and its patch attention a_k (sums to 1 over them)
    case logits z = sum over the stains the case has of w_k z_k
        mean:    w_k = 1 / (stains the case has)          (a missing stain drops out of the mean, never zero-filled)
        learned: w_k = softmax of a learned score per stain, over the stains the case has

Levels for the analysis: stain weight = w_k; within a stain, M_k's own slice and patch weights; effective attention
w_k x a_k (sums to 1 per case). ``patch_embeddings`` are each patch's patch-alone logits under its stain's model, so
``patch_alone_logits`` is the identity: a one-patch case has one stain, whose weight is 1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from stainmil.config import ModelConfig, setting
from stainmil.errors import ConfigError
from stainmil.model.base import StainAware
from stainmil.model.batch import CaseBatch
from stainmil.model.flat import FlatMIL
from stainmil.model.output import MILOutput
from stainmil.model.registry import (
    build_model,
    has_patch_attention,
    list_architectures,
    options_of,
    register_architecture,
)
from stainmil.model.segment import segment_softmax


@dataclass(frozen=True)
class LateFusionOptions:
    """``model.options.late_fusion``; the members' own options are theirs (``model.options.<base>``)."""

    base: str = setting("The flat architecture trained per stain (Wies et al. 2024 used a CNN per stain; here a MIL "
                        "model on its features).", default="abmil")
    combine: Literal["mean", "learned"] = setting(
        "The case's logits as the mean over the stains it has, or weighted by a learned score per stain (softmax over "
        "the stains present).", default="mean")


def _member_config(config: ModelConfig) -> ModelConfig:
    """The config each per-stain member is built from: its base architecture, no stain identity of its own."""
    return dataclasses.replace(config, architecture=options_of(config, "late_fusion").base, stain_identity="none")


def _members_attend(config: ModelConfig) -> bool:
    """Late fusion attends over patches exactly when its per-stain members do."""
    return has_patch_attention(_member_config(config))


@register_architecture("late_fusion", reference="Wies et al. 2024: a MIL model per stain, fused",
                       options=LateFusionOptions, patch_attention=_members_attend)
class LateFusionMIL(StainAware):
    def __init__(self, in_dim: int, config: ModelConfig, stains: list[str], options: LateFusionOptions) -> None:
        super().__init__(in_dim, stains)
        base, self.combine = options.base, options.combine
        if base == "late_fusion" or base not in list_architectures():
            raise ConfigError(f"model.options.late_fusion.base '{base}' must be a flat architecture (abmil, clam_sb, "
                              "transmil, …: `stainmil models`), one per stain.")
        member = _member_config(config)
        self.members = nn.ModuleList([build_model(in_dim, member, list(stains)) for _ in stains])
        if not all(isinstance(m, FlatMIL) for m in self.members):
            raise ConfigError(f"model.options.late_fusion.base '{base}' is not a flat architecture; choose one "
                              "that pools one bag per case (abmil, clam_sb, transmil, …).")
        self.stain_score = nn.Parameter(torch.zeros(len(stains))) if self.combine == "learned" else None

    def set_feature_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().set_feature_statistics(mean, std)
        for member in self.members:
            member.set_feature_statistics(mean, std)

    def forward(self, batch: CaseBatch, topk_mask: tuple[int, float] | None = None) -> MILOutput:
        self.check_stains(batch)  # a stain no training case had: its model never learned anything
        n_patches, n_slices, n_groups = len(batch.features), len(batch.slice_group), len(batch.group_case)
        patch_stain = batch.group_stain[batch.slice_group[batch.patch_slice]]               # (P,)
        # the fusion weight of each stain group: softmax (learned) or uniform (mean) over the case's stains
        scores = self.stain_score[batch.group_stain] if self.stain_score is not None \
            else batch.features.new_zeros(n_groups)                                          # (G,)
        group_weight = segment_softmax(scores, batch.group_case, batch.n_cases)             # (G,)
        out = {name: batch.features.new_zeros(n) for name, n in (
            ("patch_logits", n_patches), ("patch_weights", n_patches), ("effective", n_patches),
            ("slice_logits", n_slices), ("slice_weights", n_slices))}
        logits = batch.features.new_zeros((batch.n_cases, self.members[0].n_classes))       # (B, C)
        case_embeddings, patch_embeddings, auxiliary = None, None, {}
        for k, member in enumerate(self.members):
            keep = patch_stain == k
            if not bool(keep.any()):
                continue
            part, cases = batch.stain_batch(k)                                               # cases: (B_k,)
            member_out = member(part)
            rows = torch.nonzero(keep).squeeze(1)                                            # (P_k,)
            slices = torch.unique(batch.patch_slice[rows])                                   # (S_k,) sorted
            groups = torch.unique(batch.slice_group[slices])                                 # (G_k,) one per case
            weight = group_weight[groups]                                                    # (G_k,) = (B_k,)
            logits = logits.index_add(0, cases, weight[:, None] * member_out.logits)
            out["patch_logits"][rows] = member_out.patch_attention_logits
            out["patch_weights"][rows] = member_out.patch_weights
            out["effective"][rows] = weight[part.slice_group[part.patch_slice]] * member_out.effective_attention
            out["slice_logits"][slices] = member_out.slice_attention_logits
            out["slice_weights"][slices] = member_out.slice_weights
            alone = member.patch_alone_logits(member_out.patch_embeddings)                   # (P_k, C)
            if patch_embeddings is None:
                patch_embeddings = alone.new_zeros((n_patches, alone.shape[1]))
                case_embeddings = member_out.case_embeddings.new_zeros((batch.n_cases,
                                                                        member_out.case_embeddings.shape[1]))
            patch_embeddings = patch_embeddings.index_copy(0, rows, alone)
            case_embeddings = case_embeddings.index_add(0, cases, weight[:, None] * member_out.case_embeddings)
            for name, value in member_out.auxiliary_losses.items():
                auxiliary[f"{self.stains[k]}_{name}"] = value
        return MILOutput(
            logits=logits,
            patch_attention_logits=out["patch_logits"], patch_weights=out["patch_weights"],
            slice_attention_logits=out["slice_logits"], slice_weights=out["slice_weights"],
            stain_attention_logits=scores, stain_weights=group_weight,
            effective_attention=out["effective"], patch_embeddings=patch_embeddings,
            case_embeddings=case_embeddings, auxiliary_losses=auxiliary,
        )

    def patch_alone_logits(self, patch_embeddings: torch.Tensor) -> torch.Tensor:
        """(P, C) -> (P, C): the patch embeddings are already each patch alone under its stain's model."""
        return patch_embeddings
