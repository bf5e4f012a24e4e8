"""Batches of cases from the cohort: the manifest's patch -> slice -> stain -> case structure plus the patch
features, drawn into :class:`~stainmil.model.batch.CaseBatch` objects for the models.

A missing stain or slice is simply absent; softmaxes run over what exists.

Patch embeddings come from one of two sources, and nothing downstream can tell them apart:

* cached (default): rows of the feature store — held in memory, (N, D) or a view bank (V, N, D), or read
  from the store's files when a batch needs them through a bounded cache (``features.cache_mb``; see
  :mod:`stainmil.features.sources`); a training batch (``augment=True``) takes one random view per patch;
* online: a :class:`PatchEncoder` (``features.mode: online``) runs the backbone on the images of the
  batch's patches, with training augmentations when ``augment=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import pandas as pd
import torch

from stainmil.bags.moments import RunningMoments
from stainmil.data.patch_index import PLACES, PatchIndex
from stainmil.data.registration import PatchAlignment
from stainmil.errors import DataError
from stainmil.features.sources import (
    FeatureSource,
    InMemoryFeatures,
    RangeLayout,
    RowLayout,
    StoreFeatures,
    StoreRequest,
)
from stainmil.model.batch import CaseBatch
from stainmil.slides.reader import patch_refs


class PatchEncoder(Protocol):
    """Computes patch embeddings from images during training (online mode)."""

    out_dim: int

    def encode(self, paths: Sequence[str], augment: bool, rng: np.random.Generator | None) -> torch.Tensor:
        """Image files -> features (P, D) on the encoder's device (with grad where it is trainable)."""


class SliceRows:
    """The rows of each slice of a disk index, ``start[s] .. start[s] + count[s] - 1``, made when asked for."""

    def __init__(self, start: np.ndarray, count: np.ndarray) -> None:
        self.start, self.count = start, count

    def __len__(self) -> int:
        return len(self.start)

    def __getitem__(self, s: int) -> np.ndarray:
        return np.arange(self.start[s], self.start[s] + self.count[s])


class CohortBags:
    """All patches of a cohort (manifest order) with their hierarchy.

    ``manifest``: a DataFrame held in memory, or a :class:`~stainmil.data.patch_index.PatchIndex` on disk (a
    bounded store's cohort): then only the per-slice table is held, each slice's rows are a range, and a batch
    reads nothing per patch but its features (and places, where the model asks for them).
    ``features``: (N, D) array or a view bank (V, N, D) held in memory (float16 from the store is kept as is;
    batches are cast to float32); a :class:`StoreRequest` to read the store on demand with a bounded cache;
    an existing :class:`~stainmil.features.sources.FeatureSource`; or ``None`` with an ``encoder`` that
    computes them from the images. ``alignment``: each patch's place on its case's reference slice (``stainmil
    register``; the ``aligned`` architecture): batches then carry ``patch_anchor``.
    """

    def __init__(self, manifest: pd.DataFrame | PatchIndex,
                 features: np.ndarray | FeatureSource | StoreRequest | None, stains: list[str],
                 encoder: PatchEncoder | None = None, alignment: PatchAlignment | None = None) -> None:
        if (features is None) == (encoder is None):
            raise ValueError("CohortBags needs either features or an encoder")
        self.index = manifest if isinstance(manifest, PatchIndex) else None
        if self.index is not None and (encoder is not None or alignment is not None):
            raise ValueError("a disk index serves cached features without an alignment")
        n_rows = self.index.rows if self.index is not None else len(manifest)
        if isinstance(features, np.ndarray) and features.shape[-2] != n_rows:
            raise DataError(f"manifest has {n_rows} rows but the features {features.shape[-2]}; "
                            "re-run extract.")
        keys = ["case", "stain", "slice"]
        if self.index is not None:
            self._manifest = None
            firsts = self.index.slices
            self.slice_patches: list[np.ndarray] | SliceRows = SliceRows(firsts["start"].to_numpy(np.int64),
                                                                         firsts["count"].to_numpy(np.int64))
        else:
            manifest = manifest.reset_index(drop=True)
            self._manifest = manifest
            codes = manifest.groupby(keys, sort=False).ngroup().to_numpy()   # slices numbered by first appearance
            firsts = manifest.drop_duplicates(keys)
            order = np.argsort(codes, kind="stable")
            bounds = np.searchsorted(codes[order], np.arange(len(firsts) + 1))
            self.slice_patches = [order[bounds[i]:bounds[i + 1]] for i in range(len(firsts))]  # rows per slice
        self.encoder = encoder
        self.paths = patch_refs(manifest) if encoder is not None else None  # files or slide regions
        self.stains = list(stains)
        self.slice_case = firsts["case"].to_numpy(dtype=object)
        try:
            self.slice_stain = np.array([self.stains.index(s) for s in firsts["stain"]], dtype=np.int64)
        except ValueError as exc:
            raise DataError(f"the manifest has a stain not in data.stains {self.stains}: {exc}") from None
        self.case_ids = list(pd.unique(firsts["case"]))
        self.case_index = {case: i for i, case in enumerate(self.case_ids)}
        labels = firsts.drop_duplicates("case").set_index("case")["label"]
        self.labels = np.array([int(labels[c]) for c in self.case_ids])
        self.case_slices: dict[str, list[int]] = {c: [] for c in self.case_ids}
        for s, case in enumerate(self.slice_case):
            self.case_slices[case].append(s)
        self.slice_sizes = (self.slice_patches.count if isinstance(self.slice_patches, SliceRows)
                            else np.array([len(rows) for rows in self.slice_patches], dtype=np.int64))  # (S,)
        self.alignment = alignment
        placed = (set(PLACES) <= set(self.index.columns) and self.index.places if self.index is not None
                  else set(PLACES) <= set(manifest.columns))
        self._xy = (manifest[PLACES].to_numpy(dtype=np.float32)
                    if placed and self.index is None else None)                      # (N, 3) or None
        self._placed = placed
        if alignment is not None:
            if len(alignment.anchor) != n_rows:
                raise ValueError("the alignment must have one row per manifest row")
        if isinstance(features, StoreRequest):
            file_keys = [tuple(k) for k in firsts[keys].to_numpy()]
            if self.index is not None:
                layout = RangeLayout(file_keys, self.slice_patches.start, self.slice_patches.count,
                                     firsts["ids"].to_numpy())
            else:
                position = np.empty(n_rows, dtype=np.int32)      # each row's place in its slice's store file
                position[order] = np.arange(n_rows) - np.repeat(bounds[:-1], np.diff(bounds))
                layout = RowLayout(file_keys, manifest["patch"], self.slice_patches, codes.astype(np.int32), position)
            features = StoreFeatures(features.store_dir, layout, features.views, features.cache_mb)
        self.source: FeatureSource | None = (InMemoryFeatures(features) if isinstance(features, np.ndarray)
                                             else features)

    @property
    def manifest(self) -> pd.DataFrame:
        """One row per patch (read whole from a disk index the first time it is asked for: reports, analyses). From a
        disk index its rows are the manifest file's, every stain's (a stain subset drops slices, not rows)."""
        if self._manifest is None:
            self._manifest = self.index.frame()
        return self._manifest

    @property
    def feature_dim(self) -> int:
        return self.encoder.out_dim if self.encoder is not None else self.source.feature_dim

    @property
    def n_views(self) -> int:
        return 1 if self.source is None else self.source.n_views

    def with_manifest(self, manifest: pd.DataFrame) -> CohortBags:
        """The same patches (rows, features, encoder) under another hierarchy, e.g. sub-cases."""
        return CohortBags(manifest, self.source, self.stains, self.encoder, self.alignment)

    def patch_features(self, rows: np.ndarray, augment: bool = False,
                       rng: np.random.Generator | None = None) -> torch.Tensor:
        """Features (P, D) float32 of manifest ``rows``; ``augment``: a random view / augmented images."""
        if self.encoder is not None:
            return self.encoder.encode(self.paths[rows], augment, rng)
        views = rng.integers(0, self.n_views, len(rows)) if augment and self.n_views > 1 else None
        return self.source.gather(rows, views)

    def prefetch(self, cases: list[str], slices: dict[str, list[int]] | None = None) -> None:
        """Ask a store-backed source to start reading ``cases``' slices (all, or ``slices[case]``) in the
        background; nothing to do when the features are in memory or computed online."""
        if not hasattr(self.source, "prefetch") or not cases:
            return
        chosen = [s for c in cases for s in (slices[c] if slices is not None else self.case_slices[c])]
        self.source.prefetch(np.array([self.slice_patches[s][0] for s in chosen if len(self.slice_patches[s])]))

    def case_batches(self, cases: list[str], max_cases: int, max_patches: int) -> list[list[str]]:
        """``cases`` in order, in batches of at most ``max_cases`` cases and ``max_patches`` patches (all of each
        case's patches; a case larger than that goes alone): an inference batch's memory then does not grow with the
        largest cases a cohort happens to hold."""
        batches: list[list[str]] = []
        held = 0
        for case in cases:
            size = int(self.slice_sizes[self.case_slices[case]].sum())
            if not batches or len(batches[-1]) >= max_cases or held + size > max_patches:
                batches.append([])
                held = 0
            batches[-1].append(case)
            held += size
        return batches

    def case_label(self, case: str) -> int:
        return int(self.labels[self.case_index[case]])

    def stains_of(self, cases: list[str]) -> list[int]:
        """Stain indices (into ``stains``) that at least one of ``cases`` has, sorted."""
        return sorted({int(self.slice_stain[s]) for case in cases for s in self.case_slices[case]})

    def choose_slices(self, cases: list[str], max_per_stain: int, rng: np.random.Generator) -> dict[str, list[int]]:
        """Per case, at most ``max_per_stain`` random slices per stain (0 = all); chosen once per run."""
        chosen = {}
        for case in cases:
            slices = np.array(self.case_slices[case])
            keep = []
            for stain in sorted(set(self.slice_stain[slices])):
                of_stain = slices[self.slice_stain[slices] == stain]
                if max_per_stain and len(of_stain) > max_per_stain:
                    of_stain = np.sort(rng.choice(of_stain, max_per_stain, replace=False))
                keep.extend(int(s) for s in of_stain)
            chosen[case] = keep
        return chosen

    def batch(self, cases: list[str], slices: dict[str, list[int]] | None = None, per_slice_cap: int = 0,
              rng: np.random.Generator | None = None, patch_dropout: float = 0.0, augment: bool = False,
              stain_dropout: float = 0.0) -> CaseBatch:
        """Build one batch of ``cases``: all slices (or ``slices[case]``), all patches or a random cap per slice.

        ``stain_dropout`` first drops each stain of a case with that chance (all slices of it; when every
        stain would go, one drawn at random stays). ``patch_dropout`` then drops that share of each slice's
        patches at random (keeping at least one).
        ``augment`` (training): one random feature view per patch, or augmented images online.
        With an alignment, ``patch_anchor`` places each patch on a reference patch of the same case in the batch
        (or -1), and a capped slice draws first the patches lying on the reference patches already drawn (slices
        come in stain order: the reference stain's first when it leads ``data.stains``).
        """
        patch_rows, patch_slice, slice_group, slice_rows, group_case, group_stain = [], [], [], [], [], []
        for b, case in enumerate(cases):
            case_slices = slices[case] if slices is not None else self.case_slices[case]
            if not case_slices:
                raise DataError(f"case {case} has no slices left after filtering; check data.max_slices_per_stain "
                                "and the index report.")
            if stain_dropout:
                case_slices = self._drop_stains(case_slices, stain_dropout, rng)
            stain_groups: dict[int, int] = {}
            drawn: list[np.ndarray] = []  # this case's rows so far (capped slices prefer patches lying on them)
            for s in sorted(case_slices, key=lambda s: (self.slice_stain[s], s)):
                stain = int(self.slice_stain[s])
                if stain not in stain_groups:
                    stain_groups[stain] = len(group_case)
                    group_case.append(b)
                    group_stain.append(stain)
                rows = self.slice_patches[s]
                keep = min(len(rows), per_slice_cap) if per_slice_cap else len(rows)
                if patch_dropout:
                    keep = max(1, int(round(keep * (1 - patch_dropout))))
                if keep < len(rows):
                    rows = self._draw(rows, keep, rng, drawn)
                drawn.append(rows)
                patch_slice.append(np.full(len(rows), len(slice_rows)))
                patch_rows.append(rows)
                slice_group.append(stain_groups[stain])
                slice_rows.append(s)
        rows = np.concatenate(patch_rows)
        anchor = None
        if self.alignment is not None:  # each anchor's batch row, when it is in the batch and in the same case
            position = np.full(len(self.alignment.anchor), -1, dtype=np.int64)
            position[rows] = np.arange(len(rows))
            cohort = self.alignment.anchor[rows]
            placed = np.where(cohort >= 0, position[np.maximum(cohort, 0)], -1)
            case_of = np.asarray(group_case)[np.asarray(slice_group)][np.concatenate(patch_slice)]  # (P,)
            placed[(placed >= 0) & (case_of[np.maximum(placed, 0)] != case_of)] = -1  # sub-cases: not across
            anchor = torch.from_numpy(placed)
        return CaseBatch(
            features=self.patch_features(rows, augment, rng),
            patch_slice=torch.from_numpy(np.concatenate(patch_slice)).long(),
            slice_group=torch.tensor(slice_group, dtype=torch.long),
            group_case=torch.tensor(group_case, dtype=torch.long),
            group_stain=torch.tensor(group_stain, dtype=torch.long),
            labels=torch.tensor([self.case_label(c) for c in cases], dtype=torch.long),
            case_ids=list(cases), patch_rows=rows, slice_rows=np.array(slice_rows), patch_anchor=anchor,
            patch_position=self._positions(rows),
        )

    def _positions(self, rows: np.ndarray) -> torch.Tensor | None:
        """(P, 3) x, y, side (level-0 px) of ``rows`` when the manifest has them (slide route), else None."""
        if not self._placed:
            return None
        if self._xy is None:  # a disk index: only these rows' places are read
            return torch.from_numpy(np.stack([self.index.values(c, rows) for c in PLACES], axis=1).astype(np.float32))
        return torch.from_numpy(self._xy[rows])

    def _draw(self, rows: np.ndarray, keep: int, rng: np.random.Generator, drawn: list[np.ndarray]) -> np.ndarray:
        """``keep`` of a slice's ``rows`` at random; with an alignment, those lying on the case's ``drawn`` rows
        first (a capped IHC slice then brings what lies on the capped H&E places)."""
        if self.alignment is None or not drawn:
            return np.sort(rng.choice(rows, keep, replace=False))
        lying = np.isin(self.alignment.anchor[rows], np.concatenate(drawn))
        first, rest = rows[lying], rows[~lying]
        if len(first) >= keep:
            return np.sort(rng.choice(first, keep, replace=False))
        return np.sort(np.concatenate([first, rng.choice(rest, keep - len(first), replace=False)]))

    def _drop_stains(self, slices: list[int], chance: float, rng: np.random.Generator) -> list[int]:
        """``slices`` without the stains that lose a draw of ``chance`` (at least one stain always stays)."""
        stains = sorted({int(self.slice_stain[s]) for s in slices})
        if len(stains) < 2:
            return slices
        kept = [stain for stain, lost in zip(stains, rng.random(len(stains)) < chance) if not lost]
        if not kept:
            kept = [stains[int(rng.integers(len(stains)))]]
        return [s for s in slices if int(self.slice_stain[s]) in kept]

    def feature_statistics(self, cases: list[str], max_online_patches: int = 2048,
                           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and std (D,) of what training sees, over the patches of ``cases`` (float64).

        Cached: every view of every patch. Online: a seeded sample of at most ``max_online_patches``
        patches, augmented as in training, through the initial backbone.
        """
        if self.encoder is not None:
            rows = np.concatenate([self.slice_patches[s] for c in cases for s in self.case_slices[c]])
            rng = np.random.default_rng(seed)
            if len(rows) > max_online_patches:
                rows = np.sort(rng.choice(rows, max_online_patches, replace=False))
            with torch.inference_mode():
                x = torch.cat([self.patch_features(rows[i:i + 256], augment=True, rng=rng).cpu()
                               for i in range(0, len(rows), 256)])
            return x.double().mean(0).float(), x.double().std(0).clamp_min(1e-6).float()
        moments = RunningMoments(self.feature_dim)  # slice by slice: memory bounded, same sums for every source
        for c in cases:
            for s in self.case_slices[c]:
                moments.add(self.source.all_views(self.slice_patches[s]).reshape(-1, self.feature_dim))
        mean, std = moments.result()
        return mean.float(), std.clamp_min(1e-6).float()
