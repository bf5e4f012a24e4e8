"""Cross-validation by case: every fold a normal run folder, one summary for the experiment.

Experiment folder (``<runs_dir>/cv_YYYYMMDD_HHMMSS/``)::

    config.yaml             the config every fold trains with
    splits/fold_01.npz …    train/val/test cases of each fold (val comes from the fold's training part)
    folds/fold_01/ …        a normal run folder per fold (checkpoints, history, predictions, metrics)
    cv_summary.csv          one row per fold: benign/high-grade recall, balanced accuracy, AUC, threshold, epochs
    oof_predictions.csv     every fold's test predictions (out-of-fold)
    metrics.json, cv_report.txt   mean ± SD over folds, and pooled out-of-fold metrics with case-level 95% CIs

A killed or timed-out CV resumes by running it again on the same folder (``--resume``): finished
folds (metrics.json present) are skipped and an interrupted fold continues from its last.pth.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from stainmil.classes import ClassScheme, read_metrics
from stainmil.config import Config, SplitConfig, config_from_dict, config_to_dict, dump_config, load_config
from stainmil.data.cohort import case_labels, load_manifest
from stainmil.data.splits import Split, load_split, make_splits, save_split
from stainmil.errors import DataError
from stainmil.evaluate.evaluation import evaluate_run
from stainmil.io import atomic_write, atomic_write_json, atomic_write_text
from stainmil.launch import Launch, run_jobs
from stainmil.locks import folder_lock
from stainmil.run_files import RunFiles
from stainmil.stats.metrics import bootstrap_intervals, classification_metrics
from stainmil.train.trainer import train


class FoldJob:
    """Train (or resume) and evaluate one fold; picklable, and requeue-able on SLURM via :meth:`checkpoint`."""

    def __init__(self, on_epoch_end: Callable[[int, dict], None] | None = None) -> None:
        self.on_epoch_end = on_epoch_end

    def __call__(self, config_values: dict, split_path: str, fold_dir: str) -> dict:

        fold = Path(fold_dir)
        config = config_from_dict(config_values)
        if (fold / "metrics.json").is_file():
            return read_metrics(fold / "metrics.json", config.data.classes)
        split = load_split(split_path)
        if RunFiles.of(fold).last.is_file():
            train(config, resume_dir=fold, on_epoch_end=self.on_epoch_end)
        else:
            train(config, split=split, run_dir=fold, on_epoch_end=self.on_epoch_end)
        return evaluate_run(fold).metrics

    def checkpoint(self, *args, **kwargs):
        """Called by submitit before a time limit or preemption: requeue the same fold (it resumes)."""
        import submitit

        return submitit.helpers.DelayedSubmission(FoldJob(self.on_epoch_end), *args, **kwargs)


@dataclass
class CVResult:
    out_dir: Path
    summary: pd.DataFrame
    metrics: dict


def cv_splits(config: Config, folds: int, repeats: int, splits_dir: str | Path | None) -> list[Split]:
    manifest = load_manifest(config)
    cases = set(manifest["case"])
    if splits_dir:
        files = sorted(Path(splits_dir).glob("data_splits*.npz"))
        if not files:
            raise DataError(f"no data_splits*.npz files in {splits_dir}; pass the folder holding the split files.")
        return [load_split(f, cases) for f in files]
    return make_splits(case_labels(manifest), kfold_split_config(config.split, folds, repeats), config.data.class_names)


def kfold_split_config(split: SplitConfig, folds: int, repeats: int) -> SplitConfig:
    """``split`` as a (repeated) k-fold of ``folds`` folds."""
    return dataclasses.replace(split, method="repeated_kfold" if repeats > 1 else "kfold", folds=folds,
                               repeats=repeats)


def shared_folds(config: Config, folds: int, repeats: int, out: Path, splits_dir: str | Path | None) -> Path:
    """Fold files every repetition uses (written once into ``out/splits``; the user's own when given)."""
    if splits_dir:
        return Path(splits_dir)
    target = out / "splits"
    if not list(target.glob("data_splits*.npz")):
        split_config = kfold_split_config(config.split, folds, repeats)
        for i, split in enumerate(make_splits(case_labels(load_manifest(config)), split_config), start=1):
            save_split(split, target / f"data_splits_fold_{i:02d}.npz")
    return target


def prepare_experiment(config: Config, folds: int = 5, repeats: int = 1, splits_dir: str | Path | None = None,
                       out_dir: str | Path | None = None) -> tuple[Path, list[tuple[dict, str, str]]]:
    """Create (or reopen) the experiment folder; return it and the per-fold job arguments."""
    if out_dir is not None and (Path(out_dir) / "config.yaml").is_file():  # resume
        out = Path(out_dir)
        config = load_config(out / "config.yaml")
        split_files = sorted((out / "splits").glob("fold_*.npz"))
    else:
        out = Path(out_dir) if out_dir else config.paths.runs_dir / datetime.now().strftime("cv_%Y%m%d_%H%M%S")
        out.mkdir(parents=True, exist_ok=True)
        splits = cv_splits(config, folds, repeats, splits_dir)
        split_files = [save_split(s, out / "splits" / f"fold_{i:02d}.npz") for i, s in enumerate(splits, start=1)]
        dump_config(config, out / "config.yaml")
    values = config_to_dict(config)
    return out, [(values, str(f), str(out / "folds" / f.stem)) for f in split_files]


def run_cv(config: Config, *, folds: int = 5, repeats: int = 1, splits_dir: str | Path | None = None,
           out_dir: str | Path | None = None, only_fold: int | None = None, job: FoldJob | None = None,
           launch: Launch = Launch()) -> CVResult | None:
    """Run every fold (skipping finished ones) and write the summaries; ``only_fold`` runs one fold, counted
    from 0 (fold_01 is 0, as ``$SLURM_ARRAY_TASK_ID`` counts)."""
    out = Path(out_dir) if out_dir else config.paths.runs_dir / datetime.now().strftime("cv_%Y%m%d_%H%M%S")
    # SLURM array tasks of one CV (--fold-index) run in parallel: each holds its fold's part of the lock
    with folder_lock(out, "cv", part=None if only_fold is None else f"fold{only_fold}", log=launch.log):
        out, jobs = prepare_experiment(config, folds, repeats, splits_dir, out)
        return _run_cv(out, jobs, launch, only_fold, job)


def _run_cv(out: Path, jobs: list, launch: Launch, only_fold: int | None, job) -> CVResult:
    log = launch.log
    config = load_config(out / "config.yaml")
    if only_fold is not None:
        if not 0 <= only_fold < len(jobs):
            raise DataError(f"--fold-index {only_fold} is out of range: the experiment {out} has fold indices "
                            f"0..{len(jobs) - 1} (fold_01 is 0).")
        (job or FoldJob())(*jobs[only_fold])
        return None
    pending = [args for args in jobs if not (Path(args[2]) / "metrics.json").is_file()]
    log(f"cross-validation in {out}: {len(jobs)} folds, {len(jobs) - len(pending)} already finished")
    run_jobs(job or FoldJob(), pending, launch, out, config.slurm, name="stainmil-cv")
    return summarise_cv(out, config, [args[2] for args in jobs])


def summarise_cv(out: Path, config: Config, folds: list[str]) -> CVResult:
    """The CV's summaries over ``folds`` (the fold folders) — only from every fold: a fold without its metrics
    (stopped by a time limit, failed, not yet run by its array task) is named, and nothing is written."""
    expected = [Path(fold) for fold in folds]
    unfinished = [fold.name for fold in expected if not (fold / "metrics.json").is_file()]
    if unfinished:
        raise DataError(f"{len(unfinished)} of the {len(expected)} folds of {out} have not finished "
                        f"({', '.join(unfinished)}); run `stainmil cv --resume {out}` to finish them — summaries are "
                        "never written from part of the folds.")
    rows, oof = [], []
    for fold_dir in expected:
        metrics = read_metrics(fold_dir / "metrics.json", config.data.classes)
        test = metrics["splits"]["test"]
        rows.append({"fold": fold_dir.name, **{m: test[m] for m in config.data.classes.summary_metrics},
                     "threshold": metrics["threshold"], "epochs": metrics["epochs_run"],
                     "best_epoch": metrics["best_epoch"], "n_test": test["n_cases"]})
        predictions = pd.read_csv(fold_dir / "predictions.csv", dtype={"case": str})
        oof.append(predictions[predictions["split"] == "test"].assign(fold=fold_dir.name))
    summary = pd.DataFrame(rows)
    oof_frame = pd.concat(oof, ignore_index=True)
    atomic_write(out / "cv_summary.csv", lambda tmp: summary.to_csv(tmp, index=False))
    atomic_write(out / "oof_predictions.csv", lambda tmp: oof_frame.to_csv(tmp, index=False))
    pooled = pooled_out_of_fold(oof_frame, float(summary["threshold"].median()), config)
    over_folds = {m: {"mean": float(np.nanmean(summary[m])), "sd": float(np.nanstd(summary[m], ddof=1))
                      if len(summary) > 1 else 0.0} for m in config.data.classes.summary_metrics}
    metrics = {"folds": len(summary), "over_folds": over_folds, "pooled_out_of_fold": pooled}
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "cv_report.txt", cv_report_text(summary, metrics, config.data.classes))
    return CVResult(out, summary, metrics)


def per_case_probabilities(oof: pd.DataFrame) -> pd.DataFrame:
    """One row per case (index ``case``): its label and mean out-of-fold probability of each class (``prob_<k>``)
    over repeats and seeds."""
    columns = sorted((c for c in oof.columns if c.startswith("prob_") and c[5:].isdigit()), key=lambda c: int(c[5:]))
    return oof.groupby("case").agg(label=("label", "first"), **{c: (c, "mean") for c in columns})


def pooled_out_of_fold(oof: pd.DataFrame, threshold: float, config: Config) -> dict:
    """Metrics of the per-case mean out-of-fold probabilities at ``threshold`` (k > 2 classes: the most probable),
    with case-bootstrap CIs."""
    classes = config.data.classes
    per_case = per_case_probabilities(oof)
    y = per_case["label"].to_numpy()
    p = per_case[classes.probability_columns].to_numpy()                         # (N, k)
    return {**classification_metrics(y, p, threshold, classes),
            "ci95": bootstrap_intervals(y, p, threshold, classes, config.eval.bootstrap, config.eval.ci,
                                        config.train.seed),
            "threshold": threshold}


def cv_report_text(summary: pd.DataFrame, metrics: dict, classes: ClassScheme) -> str:
    lines = [f"stainmil cross-validation — {metrics['folds']} folds", "", summary.round(3).to_string(index=False), "",
             "mean ± SD over folds:"]
    for m, v in metrics["over_folds"].items():
        lines.append(f"  {m:<18} {v['mean']:.3f} ± {v['sd']:.3f}")
    pooled = metrics["pooled_out_of_fold"]
    decision = (f"threshold {pooled['threshold']:.3f} = median of the folds'" if classes.binary else
                "the most probable class")
    lines += ["", f"pooled out-of-fold ({pooled['n_cases']} cases; per-case mean probability, {decision}):"]
    for m in classes.point_metrics:
        if m in ("accuracy",):
            continue
        lo, hi = pooled["ci95"][m]
        lines.append(f"  {m:<18} {pooled[m]:.3f}   95% CI [{lo:.3f}, {hi:.3f}]")
    return "\n".join(lines) + "\n"
