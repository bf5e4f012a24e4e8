"""The hierarchy with places: each reference-stain (H&E) patch also carries what the other stains show at the
same spot.

Needs registered serial sections (``stainmil register``; batches carry ``patch_anchor``, see
:mod:`stainmil.bags.cohort`)::

    patch embeddings h (P, E), as in the hierarchy (standardise -> projector)
    at each reference patch a, K slots (K, E), one per stain (model order):
        its own stain's slot       h_a
        another stain k's slot     mean of h over the stain-k patches of the batch lying on a, or a learned
                                   token t_k when none does (the stain is missing there: not cut, not aligned,
                                   off the tissue, or not drawn into this batch)
    place embedding z_a = h_a + alpha * MLP(concat slots)      (K*E -> E; alpha a learned gate, 0 at the start)
    the hierarchy then pools every patch as ``hierarchical`` does, the reference patches as their places z.

So the aligned model starts as the hierarchy (alpha = 0: the same output, weight for weight) and only moves
away where co-location helps; IHC slices keep their own attention (heatmaps, tables, QuPath as for the
hierarchy), and a case whose pairs failed sees each H&E patch with every other slot a token (h + alpha *
MLP([h, t_1, t_2]): a learned function of the H&E patch alone).

``patch_alone_logits`` of an H&E patch reads its place z: the case as that spot of tissue, with what the other
stains show there (not the patch cut out of its case, whose slots would all be tokens).
"""

from __future__ import annotations

import torch
from torch import nn

from stainmil.config import ModelConfig
from stainmil.errors import ConfigError, DataError
from stainmil.model.batch import CaseBatch
from stainmil.model.hierarchical import HierarchicalMIL
from stainmil.model.output import MILOutput
from stainmil.model.registry import STAIN_IDENTITIES, register_architecture


@register_architecture("aligned", reference="stainmil: hierarchy over registered H&E+IHC places",
                       stain_identities=STAIN_IDENTITIES, needs_registration=True)
class AlignedMIL(HierarchicalMIL):
    def __init__(self, in_dim: int, config: ModelConfig, stains: list[str] | None = None) -> None:
        super().__init__(in_dim, config, stains)
        if len(self.stains) < 2:
            raise ConfigError("model.architecture 'aligned' combines stains at one place; data.stains must name at "
                              f"least two (got {self.stains}).")
        e, k = config.embed_dim, len(self.stains)
        self.missing_token = nn.Parameter(torch.randn(k, e) * 0.1)              # (K, E) t_k
        self.fuse = nn.Sequential(nn.Linear(k * e, e), nn.ReLU(), nn.Dropout(config.dropout))
        self.place_gate = nn.Parameter(torch.zeros(()))                         # alpha: starts as the hierarchy

    def places(self, h: torch.Tensor, patch_stain: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """(P, E) embeddings -> (P, E) with each reference patch (``anchor == own row``) as its place z."""
        n, (k, e) = len(h), self.missing_token.shape
        rows = torch.arange(n, device=h.device)
        place = anchor == rows                                                  # (P,) reference patches
        member = (anchor >= 0) & ~place                                         # (P,) patches lying on a place
        place_index = torch.cumsum(place.long(), 0) - 1                         # (P,) row -> place number
        n_places = int(place.sum())
        cell = place_index[anchor[member]] * k + patch_stain[member]            # (M,) (place, stain) cell
        sums = h.new_zeros((n_places * k, e)).index_add(0, cell, h[member])
        counts = h.new_zeros(n_places * k).index_add(0, cell, h.new_ones(len(cell)))
        slots = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None],
                            self.missing_token.repeat(n_places, 1)).view(n_places, k, e)
        slots = slots.index_put((torch.arange(n_places, device=h.device), patch_stain[place]), h[place])
        z = h.clone()
        z[place] = h[place] + self.place_gate * self.fuse(slots.flatten(1))      # (A, E)
        return z

    def forward(self, batch: CaseBatch, topk_mask: tuple[int, float] | None = None) -> MILOutput:
        if batch.patch_anchor is None:
            raise DataError("the aligned model needs each patch's place on its reference slice, but the batch has "
                            "none; run `stainmil register --config <config>` and build the cohort through stainmil "
                            "(train / evaluate / predict load the registrations for this architecture).")
        if self.stain_identity != "none":
            self.check_stains(batch)
        patch_stain = batch.group_stain[batch.slice_group][batch.patch_slice]   # (P,)
        h = self.embed(batch.features, patch_stain)                             # (P, E)
        return self.pool(self.places(h, patch_stain, batch.patch_anchor), batch, topk_mask)
