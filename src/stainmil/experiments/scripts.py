"""``stainmil slurm-script``: sbatch scripts equivalent to ``--launcher slurm``, for submitting by hand."""

from __future__ import annotations

from pathlib import Path

from stainmil.config import Config, dump_config
from stainmil.errors import ConfigError
from stainmil.experiments.cv import prepare_experiment
from stainmil.experiments.tune import create_study
from stainmil.io import atomic_write_text
from stainmil.launch import sbatch_script


def command_for(task: str, config_file: Path, shards: int, folds: int, workers: int, experiment: Path | None,
                trials: int) -> tuple[str, int]:
    """(command run by each array task, array size) — pure."""
    if task == "extract":
        return f"stainmil extract --config {config_file} --shards {shards} --shard-index $SLURM_ARRAY_TASK_ID", shards
    if task == "cv":
        if experiment is None:
            raise ConfigError("slurm-script cv needs the experiment folder (--experiment).")
        return f"stainmil cv --resume {experiment} --fold-index $SLURM_ARRAY_TASK_ID", folds
    if task == "tune":
        per_worker = max(1, -(-trials // workers))
        return f"stainmil tune --config {config_file} --trials {per_worker} --workers 1", workers
    raise ConfigError(f"slurm-script task must be extract, cv or tune, got '{task}'.")


def write_sbatch(task: str, config: Config, config_path: Path | None, out: Path, shards: int, folds: int,
                 workers: int, experiment: Path | None) -> Path:
    """Write ``out`` (and ``out``.yaml, the effective config it runs with); prepare what jobs need first."""
    out = Path(out).resolve()
    config_file = out.with_suffix(".yaml")
    dump_config(config, config_file)
    if task == "cv" and experiment is None:

        experiment, jobs = prepare_experiment(config, folds)
        folds = len(jobs)
    if task == "tune":

        create_study(config)  # created before the workers start (SQLite needs that)
    command, array = command_for(task, config_file, shards, folds, workers, experiment, config.tune.trials)
    text = sbatch_script(command, config.slurm, f"stainmil-{task}", array=array,
                         log_dir=str(out.parent / "slurm_logs"))
    if task == "cv":
        text += f"# when every fold is done, write the summary:  stainmil cv --resume {experiment}\n"
    return atomic_write_text(out, text)
