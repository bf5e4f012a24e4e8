import numpy as np
import pandas as pd

from stainmil.data.subcases import SEPARATOR, expand_subcases


def parent_case(case: str) -> str:
    return case.split(SEPARATOR, 1)[0]


def _manifest():
    rows = []
    for case in ("1", "2", "3"):
        for stain in ("he", "sox10"):
            for p in range(10):
                rows.append({"case": case, "stain": stain, "slice": "0", "patch": str(p), "patch_index": p,
                             "label": int(case) % 2})
    return pd.DataFrame(rows)


def test_only_training_cases_are_split_and_map_back():
    manifest = _manifest()
    expanded, train = expand_subcases(manifest, ["1", "2"], 3, "index", np.random.default_rng(0))
    assert train == [f"{c}::sub{j}" for c in ("1", "2") for j in range(3)]
    assert (expanded.loc[manifest["case"] == "3", "case"] == "3").all()   # val/test case untouched
    assert not expanded["case"].str.startswith("3::").any()
    assert set(map(parent_case, expanded["case"])) == {"1", "2", "3"}
    assert (expanded["path" if "path" in expanded else "patch"] == manifest["patch"]).all()  # row order kept
    for sub in train:  # every sub-case has part of every slice, labels kept
        rows = expanded[expanded["case"] == sub]
        assert set(rows["stain"]) == {"he", "sox10"}
        assert (rows["label"] == int(parent_case(sub)) % 2).all()


def test_index_mode_takes_contiguous_ranges_and_random_mode_does_not():
    manifest = _manifest()
    expanded, _ = expand_subcases(manifest, ["1"], 2, "index", np.random.default_rng(0))
    first = expanded[(expanded["case"] == "1::sub0") & (expanded["stain"] == "he")]["patch_index"]
    assert list(first) == [0, 1, 2, 3, 4]
    shuffled, _ = expand_subcases(manifest, ["1"], 2, "random", np.random.default_rng(0))
    first = shuffled[(shuffled["case"] == "1::sub0") & (shuffled["stain"] == "he")]["patch_index"]
    assert len(first) == 5 and list(first) != [0, 1, 2, 3, 4]


def test_no_val_or_test_patch_reaches_training_through_subcases(prepared, tmp_path):

    from stainmil.data.splits import load_split
    from stainmil.train.trainer import train

    config = prepared.with_overrides({"data.subcases": 2, "train.max_epochs": 2, "train.runs_dir": str(tmp_path)})
    run = train(config).run_dir
    split = load_split(run / "data_splits.npz")
    from stainmil.data.cohort import load_manifest

    manifest = load_manifest(config)
    expanded, train_cases = expand_subcases(manifest, split.train, 2, "index", np.random.default_rng(0))
    held_out = set(split.val + split.test)
    train_rows = expanded["case"].isin(set(train_cases))
    assert not manifest.loc[train_rows, "case"].isin(held_out).any()
    assert {parent_case(c) for c in train_cases} == set(split.train)
    from stainmil.evaluate.evaluation import evaluate_run

    predictions = evaluate_run(run).predictions  # outputs speak of parent cases only
    assert not predictions["case"].str.contains("::sub").any()
    assert set(predictions["case"]) == set(split.train + split.val + split.test)
