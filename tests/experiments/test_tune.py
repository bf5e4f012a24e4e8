import copy
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from stainmil.config import dump_config, load_config
from stainmil.errors import ConfigError
from stainmil.experiments.tune import create_study, run_tune
from stainmil.launch import Launch

QUIET = Launch(log=lambda *_: None)  # no progress lines in the test output

SPACE = {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
         "model.attention": {"type": "categorical", "choices": ["tanh", "gated"]}}


def _config(prepared, tmp_path):
    config = prepared.with_overrides({"tune.study_name": tmp_path.name,
                                      "train.max_epochs": 2,
                                      "tune.inner_folds": 2,
                                      "tune.space": SPACE})  # one study per test, in the shared output folder
    return config


def test_tune_writes_outputs_and_continues_the_study(prepared, tmp_path):
    config = _config(prepared, tmp_path)
    before = copy.deepcopy(config)
    result = run_tune(config, trials=3, launch=QUIET)
    assert config == before, "run_tune changed the config it was given"
    assert result.n_trials == 3
    for name in ("trials.csv", "best_config.yaml", "optimization_history.png"):
        assert (result.out_dir / name).is_file(), name
    best = load_config(result.out_dir / "best_config.yaml")
    assert best.train.lr == pytest.approx(result.best_params["train.lr"])
    assert run_tune(config, trials=2, launch=QUIET).n_trials == 5  # same storage: continued
    trials = pd.read_csv(result.out_dir / "trials.csv")
    assert len(trials) == 5 and trials["number"].is_unique


def test_two_worker_processes_share_one_journal_study(prepared, tmp_path):
    config = _config(prepared, tmp_path)
    config = config.with_overrides({"tune.storage": str(tmp_path / "shared.journal")})
    path = tmp_path / "tune.yaml"
    dump_config(config, path)
    create_study(config)
    script = ("import sys\nfrom stainmil.config import load_config\nfrom stainmil.experiments.tune import "
              "create_study, Objective\nc = load_config(sys.argv[1])\n"
              "create_study(c).optimize(Objective(c), n_trials=2)\n")
    workers = [subprocess.Popen([sys.executable, "-c", script, str(path)], stderr=subprocess.PIPE)
               for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err.decode()[-800:]
    study = create_study(config)
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == [0, 1, 2, 3]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)


def test_space_keys_must_be_config_keys(prepared):
    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'"):
        prepared.with_overrides({"train.lrr": 0.1})  # what a trial does with its suggested values
    assert prepared.with_overrides({"model.reg.entropy.weight": 0.3}).model.reg.entropy.weight == 0.3
    assert yaml.safe_dump({"ok": 1})
