"""The hierarchy over places: each reference-stain (H&E) patch with what the other stains show at the same spot.

Needs registered serial sections (``stainmil register``; batches carry ``patch_anchor``, see
:mod:`stainmil.data.bags`)::

    patch embeddings h (P, E), as in the hierarchy (standardise -> projector)
    at each reference patch a, K slots (K, E), one per stain (model order):
        its own stain's slot       h_a
        another stain k's slot     mean of h over the stain-k patches lying on a, or a learned token t_k when
                                   none does (the stain is missing there: not cut, not aligned, off the tissue)
    place embedding z_a = h_a + MLP(concat slots)        (K*E -> E; residual: with every slot a token it is
                                                           the H&E patch plus a learned constant)
    the hierarchy then pools the places (z) and every patch without one (h): slices whose registration is
    not ``aligned``, or whose reference slice is not in the batch, are pooled exactly as by ``hierarchical``.

Patches folded into a place have no attention of their own (weight 0; their place carries it), so the
effective attention still sums to 1 over each case and ``stain x slice x patch == effective`` holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from stainmil.config import ModelConfig
from stainmil.errors import ConfigError, DataError
from stainmil.model.hierarchical import HierarchicalMIL
from stainmil.model.output import MILOutput

if TYPE_CHECKING:
    from stainmil.data.bags import CaseBatch


class AlignedMIL(HierarchicalMIL):
    def __init__(self, in_dim: int, config: ModelConfig, stains: list[str] | None = None) -> None:
        super().__init__(in_dim, config, stains)
        if len(self.stains) < 2:
            raise ConfigError("model.architecture 'aligned' combines stains at one place; data.stains must name at "
                              f"least two (got {self.stains}).")
        e, k = config.embed_dim, len(self.stains)
        self.missing_token = nn.Parameter(torch.randn(k, e) * 0.1)              # (K, E) t_k
        self.fuse = nn.Sequential(nn.Linear(k * e, e), nn.ReLU(), nn.Dropout(config.dropout))

    def forward(self, batch: CaseBatch, topk_mask: tuple[int, float] | None = None) -> MILOutput:
        if batch.patch_anchor is None:
            raise DataError("the aligned model needs each patch's place on its reference slice, but the batch has "
                            "none; run `stainmil register --config <config>` and build the cohort through stainmil "
                            "(train / evaluate / predict load the registrations for this architecture).")
        if self.stain_identity != "none":
            self.check_stains(batch)
        patch_stain = batch.group_stain[batch.slice_group][batch.patch_slice]   # (P,)
        h = self.embed(batch.features, patch_stain)                             # (P, E)
        n, (k, e) = len(h), self.missing_token.shape
        rows = torch.arange(n, device=h.device)
        anchor = batch.patch_anchor
        place = anchor == rows                                                  # (P,) reference patches
        member = (anchor >= 0) & ~place                                         # (P,) patches lying on a place
        place_index = torch.cumsum(place.long(), 0) - 1                         # (P,) row -> place number
        n_places = int(place.sum())
        cell = place_index[anchor[member]] * k + patch_stain[member]            # (M,) (place, stain) cell
        sums = h.new_zeros((n_places * k, e)).index_add(0, cell, h[member])
        counts = h.new_zeros(n_places * k).index_add(0, cell, h.new_ones(len(cell)))
        slots = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None],
                            self.missing_token.repeat(n_places, 1)).view(n_places, k, e)
        own = patch_stain[place]                                                # (A,)
        slots = slots.index_put((torch.arange(n_places, device=h.device), own), h[place])
        z = h.clone()
        z[place] = h[place] + self.fuse(slots.flatten(1))                       # (A, E)

        keep = ~member
        out = self.pool(z[keep], batch.subset(keep.cpu().numpy()), topk_mask)
        used_slices = torch.unique(batch.patch_slice[keep])
        used_groups = torch.unique(batch.slice_group[used_slices])

        def spread(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
            full = values.new_zeros((size, *values.shape[1:]))
            full[index] = values
            return full

        n_slices, n_groups = len(batch.slice_group), len(batch.group_case)
        return MILOutput(
            logits=out.logits,
            patch_attention_logits=spread(out.patch_attention_logits, keep, n),
            patch_weights=spread(out.patch_weights, keep, n),
            slice_attention_logits=spread(out.slice_attention_logits, used_slices, n_slices),
            slice_weights=spread(out.slice_weights, used_slices, n_slices),
            stain_attention_logits=spread(out.stain_attention_logits, used_groups, n_groups),
            stain_weights=spread(out.stain_weights, used_groups, n_groups),
            effective_attention=spread(out.effective_attention, keep, n),
            case_embeddings=out.case_embeddings,
            patch_embeddings=z if self.stain_embedding is None else z + self.stain_embedding(patch_stain),
        )
