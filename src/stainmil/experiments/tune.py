"""Hyper-parameter tuning with Optuna: TPE (seeded) + MedianPruner on the per-epoch validation loss.

The objective of a trial is the mean validation metric over ``tune.inner_folds`` stratified folds of
the non-test cases (the test cases of ``train.split_file`` are never seen). Storage is Optuna's
journal file by default (safe for several workers on one shared file system), or any URL Optuna
accepts; the study is created before workers start (SQLite needs that), and re-running ``tune``
with the same storage continues the study. Outputs in ``<output_dir>/tune/<study_name>/``: ``trials.csv``,
``best_config.yaml``, ``optimization_history.png``, ``param_importances.png``.
"""

from __future__ import annotations

import math
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from stainmil.config import Config, config_from_dict, config_to_dict, dump_config
from stainmil.data.cohort import case_labels, load_manifest
from stainmil.data.splits import Split, load_split, validation_folds
from stainmil.errors import ConfigError
from stainmil.io import atomic_write, atomic_write_text, save_figure
from stainmil.launch import Launch, run_jobs
from stainmil.locks import folder_lock
from stainmil.train.trainer import train

DEFAULT_SPACE: dict[str, dict] = {
    "train.lr": {"type": "float", "low": 1e-5, "high": 3e-3, "log": True},
    "train.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.6},
    "model.attention": {"type": "categorical", "choices": ["tanh", "gated"]},
    "model.reg.entropy.weight": {"type": "float", "low": 0.0, "high": 0.5},
    "data.per_slice_cap": {"type": "categorical", "choices": [64, 128, 256, 500]},
}
DIRECTIONS = {"val_loss": "minimize", "auc": "maximize", "balanced_accuracy": "maximize"}


def tune_dir(config: Config) -> Path:
    return Path(config.tune.dir) if config.tune.dir else Path(config.output_dir) / "tune" / config.tune.study_name


def storage_for(config: Config):
    """Optuna storage object: journal file by default, else the URL as given."""
    import optuna

    spec = config.tune.storage or str(tune_dir(config) / "study.journal")
    if "://" in spec:
        return spec
    Path(spec).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(spec))


def create_study(config: Config):
    import optuna

    return optuna.create_study(
        study_name=config.tune.study_name, storage=storage_for(config), load_if_exists=True,
        direction=DIRECTIONS[config.tune.metric], sampler=optuna.samplers.TPESampler(seed=config.tune.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=3))


def suggest(trial, space: dict[str, dict]) -> dict[str, object]:
    values = {}
    for key, spec in space.items():
        kind = spec.get("type")
        if kind == "float":
            values[key] = trial.suggest_float(key, spec["low"], spec["high"], log=spec.get("log", False))
        elif kind == "int":
            values[key] = trial.suggest_int(key, spec["low"], spec["high"], log=spec.get("log", False))
        elif kind == "categorical":
            values[key] = trial.suggest_categorical(key, spec["choices"])
        else:
            raise ConfigError(f"tune.space['{key}'] needs type float, int or categorical, got {kind!r}.")
    return values


def inner_splits(config: Config) -> list[Split]:
    """Stratified folds over the non-test cases: val = one fold, train = the rest, test empty."""
    labels = case_labels(load_manifest(config))
    split_file = config.paths.split_file
    held_out = set(load_split(split_file, set(labels.index)).test) if split_file.is_file() else set()
    return validation_folds(labels[[c not in held_out for c in labels.index]], config.tune.inner_folds,
                            config.tune.seed)


def objective_value(history: pd.DataFrame, metric: str) -> float:
    best = history.loc[history["val_loss"].idxmin()]
    return float(best[f"val_{metric}"] if metric != "val_loss" else best["val_loss"])


class Objective:
    """Mean validation ``tune.metric`` over ``splits`` (default: the inner folds of the non-test cases).

    Each trial also records the mean validation AUC and balanced accuracy (``trial.user_attrs``), and every
    inner run folder keeps its ``data_splits.npz``: which cases each trial trained and validated on.
    """

    def __init__(self, config: Config, splits: list[Split] | None = None) -> None:
        self.config = config
        self.space = config.tune.space or DEFAULT_SPACE
        self.splits = splits if splits is not None else inner_splits(config)

    def __call__(self, trial) -> float:
        import optuna


        config = self.config.with_overrides({**suggest(trial, self.space),
                                             "train.runs_dir": str(tune_dir(self.config) / "trials" /
                                                                   f"trial_{trial.number:04d}")})
        values, scores, max_epochs = [], {}, config.train.max_epochs
        for i, split in enumerate(self.splits):
            def report(epoch: int, row: dict, offset: int = i * max_epochs) -> None:
                trial.report(row["val_loss"], offset + epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()

            result = train(config, split=split, run_dir=Path(config.train.runs_dir) / f"inner_{i + 1}",
                           on_epoch_end=report)
            history = pd.read_csv(result.run_dir / "history.csv")
            values.append(objective_value(history, config.tune.metric))
            for metric in ("auc", "balanced_accuracy"):
                scores.setdefault(metric, []).append(objective_value(history, metric))
        for metric, found in scores.items():
            trial.set_user_attr(f"mean_val_{metric}", float(np.nanmean(found)))
        value = float(np.nanmean(values))
        return value if math.isfinite(value) else float("inf")


def _worker(config_values: dict, n_trials: int) -> None:
    config = config_from_dict(config_values)
    create_study(config).optimize(Objective(config), n_trials=n_trials, catch=())


@dataclass
class TuneResult:
    out_dir: Path
    best_value: float
    best_params: dict
    n_trials: int


def run_tune(config: Config, *, trials: int | None = None, launch: Launch = Launch()) -> TuneResult:
    """Add ``trials`` trials to the study with ``workers`` workers, then write the outputs. One ``tune`` per study
    folder at a time (its workers are its own processes or SLURM jobs)."""
    with folder_lock(tune_dir(config), "tune", log=launch.log):
        return _run_tune(config, trials, launch)


def _run_tune(config: Config, trials: int | None, launch: Launch) -> TuneResult:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = trials or config.tune.trials
    study = create_study(config)  # created once, before any worker (SQLite-safe)
    out = tune_dir(config)
    dump_config(config, out / "config.yaml")
    workers = launch.workers
    shares = [trials // workers + (1 if i < trials % workers else 0) for i in range(workers)]
    args = [(config_to_dict(config), n) for n in shares if n]
    if launch.launcher == "local" and workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.starmap(_worker, args)
    else:  # one after another here, or one SLURM job per worker
        run_jobs(_worker, args, Launch(launch.launcher, 1, launch.log), out, config.slurm, name="stainmil-tune")
    study = create_study(config)
    return write_outputs(study, config, out)


def write_outputs(study, config: Config, out: Path) -> TuneResult:
    import optuna

    frame = study.trials_dataframe()
    atomic_write(out / "trials.csv", lambda tmp: frame.to_csv(tmp, index=False))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return TuneResult(out, float("nan"), {}, len(study.trials))
    best = study.best_trial
    best_config = config.with_overrides(best.params)
    atomic_write_text(out / "best_config.yaml", f"# best of {len(complete)} complete trials: {config.tune.metric} = "
                      f"{best.value:.4f} (trial {best.number})\n"
                      + yaml.safe_dump(config_to_dict(best_config), sort_keys=False))
    _plots(study, out)
    return TuneResult(out, float(best.value), dict(best.params), len(study.trials))


def _plots(study, out: Path) -> None:
    import optuna.visualization.matplotlib as ovm  # imported here: optuna's plotting pulls in pyplot


    save_figure(ovm.plot_optimization_history(study).figure, out / "optimization_history.png")
    if len(study.trials) >= 2 and len({k for t in study.trials for k in t.params}) >= 1:
        try:
            save_figure(ovm.plot_param_importances(study).figure, out / "param_importances.png")
        except (RuntimeError, ValueError, ZeroDivisionError) as exc:  # e.g. too few complete trials
            atomic_write_text(out / "param_importances.txt", f"parameter importances not computed: {exc}\n")

