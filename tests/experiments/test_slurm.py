"""Against a real SLURM (started by the test setup): CV and sharded extraction through submitit, and a
fold job that is preempted mid-training (the time-limit signal) continues from its checkpoint."""

import json
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from stainmil.data.cohort import load_manifest
from stainmil.features.extract import extract_sharded
from stainmil.features.store import load_features
from stainmil.launch import Launch

pytestmark = pytest.mark.slurm  # `make test` runs these in their own single-process pass


LR_SPACE = {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}


def _slurm_config(prepared, tmp_path):
    config = prepared.with_overrides({"train.runs_dir": str(tmp_path / "runs"),
                                      "train.max_epochs": 3,
                                      "slurm.partition": "debug",
                                      "slurm.time": 10,
                                      "slurm.mem": 1,
                                      "slurm.cpus": 1})
    return config


def test_cv_through_slurm(slurm, prepared, tmp_path):
    from stainmil.experiments.cv import run_cv

    config = _slurm_config(prepared, tmp_path)
    logs = []
    result = run_cv(config, folds=2, launch=Launch("slurm", log=logs.append))
    assert any("submitted 2 SLURM job(s)" in line for line in logs), logs
    assert len(result.summary) == 2
    assert list((result.out_dir / "slurm_logs").iterdir()), "submitit wrote no job folders"
    assert (result.out_dir / "cv_report.txt").is_file()


def test_sharded_extract_through_slurm(slurm, prepared, tmp_path):
    config = _slurm_config(prepared, tmp_path).with_overrides({"features.store_dir": str(tmp_path / "store")})
    summaries = extract_sharded(config, shards=2, launch=Launch("slurm", log=lambda *_: None))
    assert len(summaries) == 2
    manifest = load_manifest(config)
    assert sum(s.slices_written for s in summaries) == manifest.groupby(["case", "stain", "slice"]).ngroups
    features = load_features(config.paths.store, manifest)
    assert features.shape == (len(manifest), 1024)


class SlowEpochs:
    """Pause after each epoch so the test can signal the job mid-training (picklable)."""

    def __call__(self, epoch, row):
        time.sleep(1.5)


def test_preempted_fold_requeues_and_resumes_from_its_checkpoint(slurm, prepared, tmp_path):
    from stainmil.experiments.cv import FoldJob, prepare_experiment
    from stainmil.launch import slurm_executor

    config = _slurm_config(prepared, tmp_path)
    config = config.with_overrides({"train.max_epochs": 8})
    out, jobs = prepare_experiment(config, folds=3)
    values, split_path, fold_dir = jobs[0]
    executor = slurm_executor(out, config.slurm, "requeue-test")
    job = executor.submit(FoldJob(SlowEpochs()), values, split_path, fold_dir)
    history = Path(fold_dir) / "history.csv"
    deadline = time.time() + 180
    while time.time() < deadline and not (history.is_file() and len(pd.read_csv(history)) >= 2):
        time.sleep(0.3)
    assert history.is_file(), f"fold never trained 2 epochs: {job.stderr()}"
    epochs_before = len(pd.read_csv(history))
    # what SLURM sends before a time limit / on preemption: submitit checkpoints and requeues the job
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, env=slurm.env)
    metrics = job.result()
    history_rows = pd.read_csv(history)
    assert list(history_rows["epoch"]) == list(range(1, 9))         # no epoch lost or repeated
    assert epochs_before < 8
    assert json.loads((Path(fold_dir) / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    log = "\n".join(p.read_text() for p in (out / "slurm_logs").rglob("*.err"))
    assert "requeu" in log.lower(), log[-2000:]


def test_tune_workers_as_a_slurm_array(slurm, prepared, tmp_path):
    from stainmil.experiments.tune import run_tune

    config = _slurm_config(prepared, tmp_path).with_overrides({
        "train.max_epochs": 2, "tune.inner_folds": 2, "tune.study_name": "slurm-study",
        "tune.storage": str(tmp_path / "study.journal"), "tune.space": LR_SPACE})
    logs = []
    result = run_tune(config, trials=4, launch=Launch("slurm", 2, logs.append))
    assert any("submitted 2 SLURM job(s)" in line for line in logs), logs
    trials = pd.read_csv(result.out_dir / "trials.csv")
    assert sorted(trials["number"]) == [0, 1, 2, 3]
    assert (result.out_dir / "best_config.yaml").is_file()


def test_nested_cv_outer_folds_as_slurm_jobs(slurm, prepared, tmp_path):
    from stainmil.experiments.nested import run_nested_cv

    config = _slurm_config(prepared, tmp_path).with_overrides({"train.max_epochs": 2, "tune.inner_folds": 2,
                                                               "tune.space": LR_SPACE})
    logs = []
    result = run_nested_cv(config, trials=1, folds=3, out_dir=tmp_path / "nested",
                           launch=Launch("slurm", log=logs.append))
    assert any("submitted 3 SLURM job(s)" in line for line in logs), logs
    assert result["outer_folds"] == 3 and (tmp_path / "nested" / "nested_report.txt").is_file()
    assert len(list((tmp_path / "nested" / "nested" / "folds").glob("fold_*/tune/best_params.json"))) == 3
