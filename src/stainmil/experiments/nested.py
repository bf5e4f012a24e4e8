"""Nested cross-validation: hyper-parameters tuned inside each outer fold, scored once on its test cases.

On ~90 cases, tuning on the folds that report the score inflates it (Vabalas et al. 2019). Here each
outer fold runs its own Optuna study on inner folds of that fold's *non-test* cases only
(``train.split_file`` = the outer fold, whose test cases :func:`~stainmil.experiments.tune.inner_splits`
leaves out), trains on the fold with the best parameters and is scored once on its outer test cases.
Beside it, the optimistic non-nested estimate: one study whose trials train on each outer fold's
non-test cases and are *scored on the outer test cases*, reporting its best trial's mean — what a naive
"tune then report the CV score" gives on the same data.

Experiment folder (``<runs_dir>/cv_nested_…/``)::

    splits/data_splits_fold_NN.npz  the outer folds
    nested/folds/fold_NN/           a normal run folder per outer fold, trained with that fold's best
                                    parameters; tune/ inside holds its study (journal), trials and inner runs
    nested/cv_report.txt, metrics.json   pooled out-of-fold metrics with CIs (the honest estimate)
    chosen_params.csv               each outer fold's best parameters (are they stable?)
    non_nested/                     the optimistic study (trials scored on the outer test cases)
    nested_report.txt, nested.json  both estimates side by side

Killed, it resumes like ``cv`` and ``tune``: finished outer folds are skipped, studies continue to their
trial budget from their journal, an interrupted fold run continues from its last.pth.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pandas as pd

from stainmil.config import Config, config_from_dict, config_to_dict, dump_config, load_config
from stainmil.data.splits import Split, load_split
from stainmil.errors import ConfigError
from stainmil.experiments.cv import FoldJob, shared_folds, summarise_cv
from stainmil.experiments.tune import Objective, create_study
from stainmil.io import atomic_write, atomic_write_json, atomic_write_text
from stainmil.launch import Launch, run_jobs


def _complete_trials(study) -> int:
    import optuna

    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def _optimise(config: Config, trials: int, splits: list[Split] | None = None):
    """Run the study of ``config.tune`` until it holds ``trials`` complete trials (resumes from its journal)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = create_study(config)
    remaining = trials - _complete_trials(study)
    if remaining > 0:
        study.optimize(Objective(config, splits), n_trials=remaining, catch=())
    return study


class NestedFoldJob:
    """Tune on one outer fold's non-test cases, then train and score the fold; picklable, requeue-able."""

    def __call__(self, config_values: dict, split_path: str, fold_dir: str, trials: int) -> dict:
        fold = Path(fold_dir)
        if (fold / "metrics.json").is_file():
            return json.loads((fold / "metrics.json").read_text())
        config = config_from_dict(config_values).with_overrides({
            "train.split_file": split_path,  # its test cases never reach the inner folds
            "tune.study_name": f"nested_{fold.name}", "tune.dir": str(fold / "tune"),
            "tune.storage": str(fold / "tune" / "study.journal")})
        study = _optimise(config, trials)
        best = dict(study.best_trial.params)
        atomic_write_json(fold / "tune" / "best_params.json", {"value": study.best_value, "params": best,
                                                               "trials": _complete_trials(study)})
        return FoldJob()(config_to_dict(config.with_overrides(best)), split_path, fold_dir)

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(NestedFoldJob(), *args, **kwargs)


def non_nested_estimate(config: Config, split_files: list[Path], trials: int, out: Path) -> dict:
    """The optimistic estimate: trials train on each outer fold's non-test cases and are scored on its test cases;
    the best trial's mean score is what tuning on the scored folds reports."""
    config = config.with_overrides({"tune.study_name": "non_nested", "tune.dir": str(out),
                                    "tune.storage": str(out / "study.journal")})
    splits = []
    for path in split_files:
        split = load_split(path)
        splits.append(Split(sorted(split.train + split.val), sorted(split.test), []))
    study = _optimise(config, trials, splits)
    best = study.best_trial
    return {"metric": config.tune.metric, "best_value": float(best.value), "params": dict(best.params),
            **{k: float(v) for k, v in best.user_attrs.items()}, "trials": _complete_trials(study)}


def run_nested_cv(config: Config, *, trials: int, folds: int = 5, splits_dir: str | Path | None = None,
                  out_dir: str | Path | None = None, launch: Launch = Launch()) -> dict:
    """Nested CV with ``trials`` Optuna trials per outer fold, plus the non-nested estimate; returns nested.json."""
    if trials < 1:
        raise ConfigError(f"--tune must be at least 1 trial per outer fold, got {trials}.")
    out = Path(out_dir) if out_dir else config.paths.runs_dir / datetime.now().strftime("cv_nested_%Y%m%d_%H%M%S")
    nested = out / "nested"
    if (nested / "config.yaml").is_file():  # resuming: the experiment's own config and folds
        config = load_config(nested / "config.yaml")
        splits_dir = Path((nested / "splits_dir.txt").read_text().strip())
    folds_dir = shared_folds(config, folds, 1, out, splits_dir)
    split_files = sorted(folds_dir.glob("data_splits*.npz"))
    dump_config(config, nested / "config.yaml")
    atomic_write_text(nested / "splits_dir.txt", f"{folds_dir.resolve()}\n")
    values = config_to_dict(config)
    jobs = [(values, str(f), str(nested / "folds" / f"fold_{i:02d}"), trials) for i, f in enumerate(split_files, 1)]
    pending = [job for job in jobs if not (Path(job[2]) / "metrics.json").is_file()]
    launch.log(f"nested cross-validation in {out}: {len(jobs)} outer folds x {trials} trials, "
        f"{len(jobs) - len(pending)} folds already finished")
    run_jobs(NestedFoldJob(), pending, launch, out, config.slurm, name="stainmil-nested")
    honest = summarise_cv(nested, config, [job[2] for job in jobs])
    chosen = pd.DataFrame([{"fold": Path(job[2]).name, **json.loads(
        (Path(job[2]) / "tune" / "best_params.json").read_text())["params"]} for job in jobs])
    atomic_write(out / "chosen_params.csv", lambda tmp: chosen.to_csv(tmp, index=False))
    launch.log("non-nested (optimistic) estimate: tuning scored on the outer test cases")
    optimistic = non_nested_estimate(config, split_files, trials, out / "non_nested")
    pooled, over = honest.metrics["pooled_out_of_fold"], honest.metrics["over_folds"]
    result = {"out_dir": str(out), "outer_folds": len(jobs), "trials_per_study": trials,
              "tune_metric": config.tune.metric,
              "nested": {"pooled_out_of_fold": pooled, "over_folds": over},
              "non_nested": optimistic, "chosen_params": chosen.to_dict(orient="records")}
    atomic_write_json(out / "nested.json", result)
    atomic_write_text(out / "nested_report.txt", nested_report_text(result, chosen))
    return result


def nested_report_text(result: dict, chosen: pd.DataFrame) -> str:
    nested, optimistic = result["nested"], result["non_nested"]
    pooled, over = nested["pooled_out_of_fold"], nested["over_folds"]
    lines = [f"stainmil nested cross-validation — {result['outer_folds']} outer folds, {result['trials_per_study']} "
             f"Optuna trials per study, objective {result['tune_metric']}", "",
             "                         nested (honest)                       non-nested (tuned on the scored folds)"]
    for metric in ("auc", "balanced_accuracy"):
        lo, hi = pooled["ci95"][metric]
        naive = optimistic.get(f"mean_val_{metric}", float("nan"))
        lines.append(f"  {metric:<18}  pooled {pooled[metric]:.3f} [{lo:.3f}, {hi:.3f}], folds "
                     f"{over[metric]['mean']:.3f} ± {over[metric]['sd']:.3f}      best trial's fold mean {naive:.3f}")
    lines += ["", "parameters chosen in each outer fold (stable?):", chosen.round(5).to_string(index=False), "",
              f"non-nested best trial: {optimistic['params']}"]
    return "\n".join(lines) + "\n"
