"""The bounded store reads exactly what h5py reads: contiguous files through os.preadv (GIL released), chunked
or compressed ones (linked TRIDENT/CLAM files) through h5py; a truncated file is named."""

import h5py
import numpy as np
import pandas as pd
import pytest

from stainmil.bags.cohort import CohortBags
from stainmil.errors import StoreError
from stainmil.features.sources import StoreRequest
from stainmil.features.store import StoreMeta, load_features, slice_file, write_slice


def _store(tmp_path, views=1):
    rng = np.random.default_rng(0)
    frames = []
    for index, (case, layout) in enumerate([("1", "contiguous"), ("2", "chunked"), ("3", "gzip")]):
        n = 37 + index
        features = rng.standard_normal((views, n, 16)).astype(np.float16)
        path = slice_file(tmp_path, case, "he", "0")
        if layout == "contiguous":
            write_slice(path, features if views > 1 else features[0], np.zeros((n, 2)), [str(i) for i in range(n)],
                        {})
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            options = {"chunks": True} if layout == "chunked" else {"compression": "gzip"}
            with h5py.File(path, "w") as h5:
                h5.create_dataset("features", data=features[0], **options)
                if views > 1:
                    h5.create_dataset("augmented_features", data=features[1:], **options)
        frames.append(pd.DataFrame({"case": case, "stain": "he", "slice": "0", "patch": [str(i) for i in range(n)],
                                    "label": index % 2}))
    StoreMeta("x", "random", "", 32, [], [], 16, "float16", views=views).write(tmp_path)
    return pd.concat(frames, ignore_index=True)


@pytest.mark.parametrize("views", [1, 3])
def test_bounded_reads_equal_in_memory_for_every_layout(tmp_path, views):
    manifest = _store(tmp_path, views)
    memory = load_features(tmp_path, manifest, views)
    bags = CohortBags(manifest, StoreRequest(str(tmp_path), views, cache_mb=0.001), ["he"])
    rows = np.arange(len(manifest))
    got = bags.source.all_views(rows)
    assert np.array_equal(got.numpy(), memory if views > 1 else memory[None])
    assert bags.source.reads == 3


def test_a_truncated_store_file_is_named(tmp_path):
    manifest = _store(tmp_path)
    path = slice_file(tmp_path, "1", "he", "0")
    with h5py.File(path, "r") as h5:
        end = h5["features"].id.get_offset() + h5["features"].id.get_storage_size()
    with open(path, "r+b") as handle:
        handle.truncate(end - 10)
    bags = CohortBags(manifest, StoreRequest(str(tmp_path), 1, cache_mb=1), ["he"])
    with pytest.raises((StoreError, OSError), match="truncated|slice|file"):
        bags.source.gather(np.arange(5), None)
