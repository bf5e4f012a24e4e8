"""Inference batches: cases in order, at most so many cases and patches a batch (a larger case alone), the same
for a manifest in memory and one on disk."""

import numpy as np
import pandas as pd

from stainmil.bags.cohort import CohortBags
from stainmil.data.patch_index import open_patch_index


def _manifest(sizes: list[int]) -> pd.DataFrame:
    frames = [pd.DataFrame({"case": f"{c:03d}", "stain": "HE", "slice": "0", "patch": [str(i) for i in range(n)],
                            "label": c % 2}) for c, n in enumerate(sizes)]
    return pd.concat(frames, ignore_index=True)


def test_inference_batches_are_bounded_in_cases_and_patches(tmp_path):
    sizes = [3, 4, 12, 1, 1, 1, 1, 5, 2]
    manifest = _manifest(sizes)
    path = tmp_path / "manifest.parquet"
    manifest.to_parquet(path, index=False)
    for source in (manifest, open_patch_index(path)):
        bags = CohortBags(source, np.zeros((len(manifest), 4), np.float32), ["HE"])
        batches = bags.case_batches(bags.case_ids, max_cases=3, max_patches=8)
        assert [c for batch in batches for c in batch] == bags.case_ids                  # every case once, in order
        assert [[int(c) for c in batch] for batch in batches] == [[0, 1], [2], [3, 4, 5], [6, 7, 8]]
        for batch in batches:
            patches = sum(sizes[int(c)] for c in batch)
            assert len(batch) <= 3 and (patches <= 8 or len(batch) == 1)                 # 12 patches: alone
