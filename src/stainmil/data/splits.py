"""Case-level splits: a case, with all its stains, slices and patches, is in exactly one subset.

File format (``data_splits.npz``, as in the old pipeline): arrays ``train``, ``val``, ``test`` of
case ids. Files whose arrays are named ``train_cases``, ``val_cases``, ``test_cases`` are read too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedKFold, train_test_split

from stainmil.config import SplitConfig
from stainmil.data.labels import normalize_case_id
from stainmil.errors import DataError
from stainmil.io import atomic_write

SUBSETS = ("train", "val", "test")


@dataclass
class Split:
    train: list[str]
    val: list[str]
    test: list[str]

    def subset(self, name: str) -> list[str]:
        if name not in SUBSETS:
            raise DataError(f"unknown split '{name}'; use one of {list(SUBSETS)}.")
        return getattr(self, name)

    def restricted_to(self, cases: set[str]) -> Split:
        """The same split over only ``cases`` (e.g. the cases that have one of the stains a model uses)."""
        return Split(*[[c for c in self.subset(name) if c in cases] for name in SUBSETS])



def _stratified_two_way(cases: np.ndarray, labels: np.ndarray, fraction: float, seed: int, keep: int = 1
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Split off ``fraction`` of the cases, stratified by label; ``keep``: cases of each class that stay on the
    first side where the class has them (1: training keeps every class; 2 before a validation split follows).

    sklearn's stratified split when every class is large enough for it; otherwise (a class of one or two cases,
    more classes than cases to take) each class is allocated by hand, so a small class is never lost to chance.
    """
    n_take = max(1, int(round(fraction * len(cases))))
    counts = np.bincount(labels)
    if counts[counts > 0].min() >= 2 and n_take >= len(np.unique(labels)):
        rest, taken = train_test_split(cases, test_size=n_take, stratify=labels, random_state=seed)
        rest_counts = np.bincount(labels[np.isin(cases, rest)], minlength=len(counts))
        if (rest_counts >= np.minimum(counts, keep)).all():
            return np.sort(rest), np.sort(taken)
    take = _allocate(counts, n_take, fraction, keep)
    rng = np.random.default_rng(seed)
    taken = np.concatenate([rng.permutation(cases[labels == c])[:take[c]] for c in range(len(counts))])
    return np.sort(np.setdiff1d(cases, taken)), np.sort(taken)


def _allocate(counts: np.ndarray, n_take: int, fraction: float, keep: int) -> np.ndarray:
    """Cases to take of each class: at most ``count - keep`` (the rest keeps ``keep`` of every class that has
    them), one of every class that can spare one first (even past ``n_take``), then by largest share."""
    room = np.maximum(counts - keep, 0)
    take = np.minimum(room, 1)
    for _ in range(max(0, n_take - int(take.sum()))):
        want = np.where(take < room, fraction * counts - take, -np.inf)
        if not np.isfinite(want).any():
            break
        take[int(np.argmax(want))] += 1
    return take


def validation_folds(case_labels: pd.Series, folds: int, seed: int) -> list[Split]:
    """Stratified folds where each fold is the validation set once and the rest trains (test empty): the inner
    loop of tuning, over cases that exclude the held-out test set."""
    cases = np.array(case_labels.index, dtype=object)
    labels = case_labels.to_numpy(dtype=int)
    if np.bincount(labels).min() < folds:
        raise DataError(f"{folds} validation folds need at least {folds} cases per class; the cases have "
                        f"{np.bincount(labels).tolist()} — lower tune.inner_folds.")
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return [Split(sorted(cases[tr]), sorted(cases[va]), []) for tr, va in splitter.split(cases, labels)]


def make_splits(case_labels: pd.Series, config: SplitConfig, class_names: list[str] | None = None) -> list[Split]:
    """Case-level stratified splits. ``case_labels``: case id -> class index.

    Every class reaches training, and validation and test where its cases allow (a class of two cases: one
    trains, one validates); ``class_names`` (``data.class_names``): a class that no case has is named here,
    not when training finds it missing.

    * ``holdout``: the old 60/20/20 (test split off first, then val from the rest) -> one split.
    * ``kfold``: each fold is the test set once; val is ``val_fraction`` of the remaining cases.
    * ``repeated_kfold``: ``repeats`` x ``folds`` splits, reshuffled each repeat.
    """
    cases = np.array(case_labels.index, dtype=object)
    labels = case_labels.to_numpy(dtype=int)
    if len(cases) < 3:
        raise DataError(f"only {len(cases)} labelled case(s); a train/val/test split needs at least 3.")
    if class_names is not None:
        counts = np.bincount(labels, minlength=len(class_names))
        empty = [class_names[k] for k in range(len(class_names)) if counts[k] == 0]
        if empty:
            raise DataError(f"no labelled case has class(es) {empty} (cases per class: "
                            f"{dict(zip(class_names, counts.tolist()))}); label some cases with them or remove "
                            "them from data.label_values / data.class_names.")
    if config.method == "holdout":
        train_val, test = _stratified_two_way(cases, labels, config.test_fraction, config.seed, keep=2)
        tv_labels = case_labels.loc[list(train_val)].to_numpy(dtype=int)
        val_share = config.val_fraction / (1 - config.test_fraction)
        train, val = _stratified_two_way(train_val, tv_labels, val_share, config.seed + 1)
        return [Split(list(train), list(val), list(test))]
    if np.bincount(labels).min() < config.folds:
        raise DataError(f"k-fold with {config.folds} folds needs at least {config.folds} cases per class; "
                        f"the cohort has {np.bincount(labels).tolist()} — lower split.folds.")
    splitter = (StratifiedKFold(config.folds, shuffle=True, random_state=config.seed) if config.method == "kfold"
                else RepeatedStratifiedKFold(n_splits=config.folds, n_repeats=config.repeats,
                                             random_state=config.seed))
    splits = []
    for i, (train_val_idx, test_idx) in enumerate(splitter.split(cases, labels)):
        train, val = _stratified_two_way(cases[train_val_idx], labels[train_val_idx], config.val_fraction,
                                         config.seed + 1 + i)
        splits.append(Split(list(train), list(val), sorted(cases[test_idx])))
    return splits


def validate_split(split: Split, cohort_cases: set[str] | None, source: str = "split") -> Split:
    """Refuse a split that puts a case in two subsets or names a case not in the cohort."""
    seen: dict[str, str] = {}
    overlaps = []
    for name in SUBSETS:
        for case in split.subset(name):
            if case in seen:
                overlaps.append(f"{case} ({seen[case]}+{name})")
            seen[case] = name
    if overlaps:
        raise DataError(f"{source} puts case(s) in two subsets: {', '.join(overlaps)}; each case must be in "
                        "exactly one of train/val/test.")
    if cohort_cases is not None:
        unknown = sorted(set(seen) - cohort_cases)
        if unknown:
            raise DataError(f"{source} names case(s) not in the indexed cohort: {unknown[:20]}; re-index or "
                            "remove them from the split file.")
    return split


def save_split(split: Split, path: str | Path) -> Path:
    arrays = {name: np.array(split.subset(name), dtype=str) for name in SUBSETS}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a handle: np.savez would append ".npz" to a path
            np.savez(handle, **arrays)

    return atomic_write(path, write)


def load_split(path: str | Path, cohort_cases: set[str] | None = None) -> Split:
    """Read a ``data_splits.npz`` (``train``/``val``/``test`` or ``*_cases`` arrays) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file {path} does not exist; run `stainmil split` or set train.split_file.")
    with np.load(path, allow_pickle=False) as data:
        subsets = {}
        for name in SUBSETS:
            key = name if name in data.files else f"{name}_cases" if f"{name}_cases" in data.files else None
            if key is None:
                raise DataError(f"split file {path} has no array '{name}' or '{name}_cases' (it has "
                                f"{data.files}).")
            subsets[name] = [normalize_case_id(c) for c in data[key].tolist()]
    return validate_split(Split(**subsets), cohort_cases, source=f"split file {path}")


def write_splits(splits: list[Split], out_dir: str | Path) -> list[Path]:
    """One split -> ``data_splits.npz``; several -> ``data_splits_01.npz`` … (old naming)."""
    out_dir = Path(out_dir)
    if len(splits) == 1:
        return [save_split(splits[0], out_dir / "data_splits.npz")]
    return [save_split(s, out_dir / f"data_splits_{i:02d}.npz") for i, s in enumerate(splits, start=1)]


def split_table(split: Split, case_labels: pd.Series, class_names: list[str]) -> pd.DataFrame:
    """Counts per subset and class, e.g. for printing."""
    rows = []
    for name in SUBSETS:
        counts = case_labels.loc[split.subset(name)].value_counts()
        rows.append({"subset": name, **{class_names[k]: int(counts.get(k, 0)) for k in range(len(class_names))}})
    return pd.DataFrame(rows)
