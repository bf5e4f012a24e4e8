"""Attention where the stains meet: each IHC patch mapped through its slice's registration onto the H&E slice,
and the H&E patch it lands on (``stainmil register`` first; only pairs whose verdict is ``aligned`` are used —
``doubtful`` and ``failed`` pairs are listed, not mapped).

``attention/colocated.csv`` — one row per H&E patch of a registered slice::

    case, slice, patch, x, y, relative_attention, patch_prob        the H&E patch
    <stain>_patches, <stain>_relative_attention, <stain>_patch_prob  the IHC patches landing on it (count, means)

``attention/colocated_cases.csv`` — per case and IHC stain: the pair's verdict, the share of the stain's
attention that lands on H&E patches (``landed``), and ``overlap``: the attention both put on the same tissue
(the sum over H&E patches of the smaller of the two attention shares, each normalised over the landed patches:
1 = the two stains attend to the same places in the same proportions, 0 = to different places).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stainmil.data.registration import map_patches


def colocated_tables(patches: pd.DataFrame, registrations: pd.DataFrame, reference: str = "he"
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per H&E patch, per case and stain) tables (see the module doc) of an attention patch table."""
    if "size0" not in patches.columns:
        return pd.DataFrame(), pd.DataFrame()
    keyed = {k: part.reset_index(drop=True) for k, part in patches.groupby(["case", "stain", "slice"], sort=False)}
    per_patch: dict[tuple, pd.DataFrame] = {}
    landing: dict[tuple, np.ndarray] = {}  # (H&E slice, stain) -> (count, sum of relative attention, sum of P)
    cases = []
    for reg in registrations.itertuples(index=False):
        case, stain, slice_id = str(reg.case), str(reg.stain), str(reg.slice)
        he_key, ihc_key = (case, reference, str(reg.fixed_slice)), (case, stain, slice_id)
        if he_key not in keyed or ihc_key not in keyed:
            continue  # not in this analysis's split
        row = {"case": case, "stain": stain, "slice": slice_id, "he_slice": he_key[2], "verdict": reg.verdict}
        if reg.verdict != "aligned":
            cases.append({**row, "landed": np.nan, "overlap": np.nan})
            continue
        he, ihc = keyed[he_key], keyed[ihc_key]
        hits = map_patches(ihc, he, reg.transform)
        per_patch.setdefault(he_key, he[["case", "slice", "patch", "x", "y", "relative_attention", "patch_prob"]])
        on = hits >= 0
        # several slices of one stain may land on one H&E slice: counts and sums add up, means come at the end
        sums = landing.setdefault((he_key, stain), np.zeros((3, len(he))))
        sums[0] += np.bincount(hits[on], minlength=len(he))
        sums[1] += np.bincount(hits[on], weights=ihc["relative_attention"].to_numpy(float)[on], minlength=len(he))
        sums[2] += np.bincount(hits[on], weights=ihc["patch_prob"].to_numpy(float)[on], minlength=len(he))
        mass = ihc["effective_attention"].to_numpy(float)
        landed_mass = np.bincount(hits[on], weights=mass[on], minlength=len(he))
        he_mass = he["effective_attention"].to_numpy(float)
        share = landed_mass / landed_mass.sum() if landed_mass.sum() > 0 else landed_mass
        # NaN where either side has no attention on the shared tissue (every IHC patch landed off the H&E ones)
        overlap = float(np.minimum(share, he_mass / he_mass.sum()).sum()) \
            if he_mass.sum() > 0 and landed_mass.sum() > 0 else np.nan
        cases.append({**row, "landed": float(mass[on].sum() / mass.sum()) if mass.sum() > 0 else np.nan,
                      "overlap": overlap})
    for (he_key, stain), (count, attention, prob) in landing.items():
        table = per_patch[he_key] = per_patch[he_key].copy()
        table[f"{stain}_patches"] = count.astype(int)
        with np.errstate(invalid="ignore", divide="ignore"):
            table[f"{stain}_relative_attention"] = np.where(count > 0, attention / count, np.nan)
            table[f"{stain}_patch_prob"] = np.where(count > 0, prob / count, np.nan)
    frames = [frame.assign(stain=reference) for frame in per_patch.values()]
    per_patch_table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return per_patch_table, pd.DataFrame(cases)
