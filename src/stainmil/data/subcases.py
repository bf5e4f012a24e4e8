"""Sub-case augmentation ("making more cases"): split each *training* case into k sub-cases.

Within every slice, the patches are partitioned into k parts — contiguous patch-index ranges
(``index``, as the team proposed: the same range of patch numbers from every slice) or at random
(``random``) — and sub-case j takes part j of every slice. Sub-cases keep the parent's label and
are named ``<case>::sub<j>``. Validation and test cases are
never split, and only rows of training cases are touched.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SEPARATOR = "::sub"


def expand_subcases(manifest: pd.DataFrame, train_cases: list[str], k: int, mode: str,
                    rng: np.random.Generator) -> tuple[pd.DataFrame, list[str]]:
    """Manifest whose training-case rows are relabelled to sub-cases, and the new training case list.

    Row order (and so the feature store alignment) is unchanged. Sub-cases that get no patch (every slice
    smaller than k) are not created.
    """
    if k <= 1:
        return manifest, list(train_cases)
    manifest = manifest.copy()
    train = manifest["case"].isin(set(train_cases))
    part = np.zeros(len(manifest), dtype=int)
    for _, rows in manifest[train].groupby(["case", "stain", "slice"], sort=False):
        ordered = rows.sort_values("patch_index").index.to_numpy()
        if mode == "random":
            ordered = rng.permutation(ordered)
        part[manifest.index.get_indexer(ordered)] = np.arange(len(ordered)) * k // len(ordered)
    manifest.loc[train, "case"] = manifest.loc[train, "case"] + SEPARATOR + pd.Series(part, index=manifest.index)[
        train].astype(str)
    present = set(manifest.loc[train, "case"])
    expanded = [f"{c}{SEPARATOR}{j}" for c in train_cases for j in range(k) if f"{c}{SEPARATOR}{j}" in present]
    return manifest, expanded
