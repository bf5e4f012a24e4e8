"""The models' input: several cases of nested bags as one flat feature matrix and three index vectors.

A :class:`CaseBatch` holds::

    features     (P, D)  patch features of every case in the batch
    patch_slice  (P,)    slice of each patch           in [0, S)
    slice_group  (S,)    stain group of each slice      in [0, G)   (a stain group = one stain of one case)
    group_case   (G,)    case of each stain group       in [0, B)
    group_stain  (G,)    canonical stain index of each group (he=0, melan=1, sox10=2 by default)
    patch_position (P, 3) where each patch lies on its slide when the cohort knows it (slide route): x, y of its
                         top-left corner and its side, in level-0 pixels (architectures with patch_positions read it)
    patch_anchor (P,)    only for architectures that need a registration (``aligned``): the batch row of the
                         reference-stain patch each patch lies on (a reference patch: itself), -1 for none

A missing stain or slice is simply absent; softmaxes run over what exists. Built by
:class:`stainmil.bags.cohort.CohortBags` (or by hand: it is plain torch and numpy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class CaseBatch:
    features: torch.Tensor     # (P, D) float32
    patch_slice: torch.Tensor  # (P,) long
    slice_group: torch.Tensor  # (S,) long
    group_case: torch.Tensor   # (G,) long
    group_stain: torch.Tensor  # (G,) long
    labels: torch.Tensor       # (B,) long; -1 when unlabelled
    case_ids: list[str]
    patch_rows: np.ndarray     # (P,) manifest row of each patch
    slice_rows: np.ndarray     # (S,) cohort slice index of each slice
    patch_anchor: torch.Tensor | None = None  # (P,) long: batch row of the reference patch under each patch, or -1
    patch_position: torch.Tensor | None = None  # (P, 3) float: x, y, side in level-0 pixels

    @property
    def n_cases(self) -> int:
        return len(self.case_ids)

    def to(self, device: torch.device) -> CaseBatch:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return CaseBatch(**moved)

    def subset(self, keep: np.ndarray) -> CaseBatch:
        """The batch with only the patches where ``keep`` (P,) is true; emptied slices and stains are dropped.

        Every case must keep at least one patch (a case with none has nothing to predict from).
        """
        keep_t = torch.from_numpy(np.asarray(keep, dtype=bool)).to(self.patch_slice.device)
        patch_slice = self.patch_slice[keep_t]
        used_slices, new_slice = torch.unique(patch_slice, return_inverse=True)
        slice_group = self.slice_group[used_slices]
        used_groups, new_group = torch.unique(slice_group, return_inverse=True)
        anchor = None
        if self.patch_anchor is not None:  # renumbered; a patch whose anchor left the batch has no place now
            position = torch.cumsum(keep_t.long(), 0) - 1
            old = self.patch_anchor[keep_t]
            placed = (old >= 0) & keep_t[old.clamp_min(0)]
            anchor = torch.where(placed, position[old.clamp_min(0)], torch.full_like(old, -1))
        return CaseBatch(features=self.features[keep_t], patch_slice=new_slice, slice_group=new_group,
                         group_case=self.group_case[used_groups], group_stain=self.group_stain[used_groups],
                         labels=self.labels, case_ids=self.case_ids, patch_rows=self.patch_rows[np.asarray(keep)],
                         slice_rows=self.slice_rows[used_slices.cpu().numpy()], patch_anchor=anchor,
                         patch_position=None if self.patch_position is None else self.patch_position[keep_t])

    def stain_batch(self, stain: int) -> tuple[CaseBatch, torch.Tensor]:
        """The patches of one stain (index into the model's stains), as a batch of the cases that have it, and
        those cases' indices (B_k,) in this batch."""
        patch_stain = self.group_stain[self.slice_group[self.patch_slice]]                  # (P,)
        part = self.subset((patch_stain == stain).cpu().numpy())
        cases, group_case = torch.unique(part.group_case, return_inverse=True)             # (B_k,), (G_k,)
        kept = cases.cpu().tolist()
        return CaseBatch(features=part.features, patch_slice=part.patch_slice, slice_group=part.slice_group,
                         group_case=group_case, group_stain=part.group_stain, labels=self.labels[cases],
                         case_ids=[self.case_ids[i] for i in kept], patch_rows=part.patch_rows,
                         slice_rows=part.slice_rows, patch_anchor=part.patch_anchor,
                         patch_position=part.patch_position), cases
