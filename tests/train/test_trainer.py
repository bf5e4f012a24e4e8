import json
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from stainmil.config import dump_config
from stainmil.data.splits import Split, load_split
from stainmil.errors import DataError, TrainingError
from stainmil.evaluate.evaluation import evaluate_run
from stainmil.train.checkpoint import load_checkpoint, model_from_checkpoint
from stainmil.train.trainer import train

RUN_FILES = ("config.yaml", "data_splits.npz", "history.csv", "curves.png", "checkpoints/best.pth",
             "checkpoints/last.pth", "status.json")
EVAL_FILES = ("predictions.csv", "metrics.json", "results.txt", "confusion_matrix.png", "roc_curve.png")


def _history(run_dir):
    return pd.read_csv(run_dir / "history.csv").drop(columns=["seconds"])


def test_run_folder_and_evaluation(prepared, tmp_path):
    config = prepared.with_overrides({"train.runs_dir": str(tmp_path)})
    result = train(config)
    assert result.run_dir.name.startswith("run_") and result.epochs_run == 6
    for name in RUN_FILES:
        assert (result.run_dir / name).is_file(), name
    evaluation = evaluate_run(result.run_dir)
    for name in EVAL_FILES:
        assert (result.run_dir / name).is_file(), name
    predictions = pd.read_csv(result.run_dir / "predictions.csv", dtype={"case": str})
    split = load_split(result.run_dir / "data_splits.npz")
    assert sorted(predictions["case"]) == sorted(split.train + split.val + split.test)
    assert {"case", "split", "label", "pred", "prob_0", "prob_1"} <= set(predictions.columns)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"train", "val", "test"}
    assert metrics["threshold"] == evaluation.threshold == 0.5
    assert "recall_benign" in metrics["splits"]["test"]["ci95"]
    history = pd.read_csv(result.run_dir / "history.csv")
    assert list(history.columns[:5]) == ["epoch", "lr", "train_loss", "val_loss", "val_auc"]


def test_same_seed_same_history(prepared, tmp_path):
    config = prepared.with_overrides({"train.runs_dir": str(tmp_path), "train.max_epochs": 3})
    a, b = train(config).run_dir, train(config).run_dir
    assert _history(a).equals(_history(b))
    config = config.with_overrides({"train.seed": 7})
    c = train(config).run_dir
    assert not _history(a).equals(_history(c))


def test_checkpoint_alone_rebuilds_the_model(prepared, tmp_path):
    config = prepared.with_overrides({"train.runs_dir": str(tmp_path), "train.max_epochs": 2})
    run = train(config).run_dir
    state = load_checkpoint(run / "checkpoints" / "last.pth")
    model, rebuilt_config = model_from_checkpoint(state)
    assert rebuilt_config.model == config.model
    assert torch.equal(model.feature_std, state["model"]["feature_std"])


@pytest.mark.slow
def test_resume_after_kill_matches_an_uninterrupted_run(prepared, tmp_path):
    """Kill a real `stainmil train` process after epoch 2 (SIGKILL), resume, compare with a full run."""
    config = prepared.with_overrides({"train.max_epochs": 8, "train.runs_dir": str(tmp_path / "full")})
    full = train(config).run_dir

    config = config.with_overrides({"train.runs_dir": str(tmp_path / "killed")})
    dump_config(config, tmp_path / "killed.yaml")
    script = ("import time, sys\nfrom stainmil.config import load_config\nfrom stainmil.train.trainer import train\n"
              "train(load_config(sys.argv[1]), on_epoch_end=lambda epoch, row: time.sleep(0.4))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "killed.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    history = None
    while time.time() < deadline:
        runs = list((tmp_path / "killed").glob("run_*/history.csv"))
        if runs and len(pd.read_csv(runs[0])) >= 2:
            history = runs[0]
            break
        if proc.poll() is not None:
            pytest.fail(f"training exited early: {proc.stderr.read().decode()[-500:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert history is not None, "the training process never finished epoch 2"
    run = history.parent
    killed_at = len(pd.read_csv(history))
    assert killed_at < 8, "the process finished before it could be killed"
    assert json.loads((run / "status.json").read_text())["state"] == "training"  # does not look finished

    result = train(config, resume_dir=run)
    assert result.epochs_run == 8
    assert _history(run).equals(_history(full))
    resumed = load_checkpoint(run / "checkpoints" / "last.pth")["model"]
    uninterrupted = load_checkpoint(full / "checkpoints" / "last.pth")["model"]
    for key in uninterrupted:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    assert evaluate_run(run).metrics["splits"]["test"] == evaluate_run(full).metrics["splits"]["test"]


def test_nan_loss_stops_with_one_sentence(prepared, tmp_path):
    config = prepared.with_overrides({"train.runs_dir": str(tmp_path), "train.lr": float("inf")})
    with pytest.raises(TrainingError, match="lower train.lr"):
        train(config)
    (run,) = tmp_path.glob("run_*")
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
    assert not (run / "metrics.json").exists()


def test_empty_split_is_refused(prepared, tmp_path):
    split = load_split(prepared.paths.split_file)
    with pytest.raises(DataError, match="val split"):
        train(prepared, split=Split(split.train + split.val, [], split.test))


def _crashed_run(config, runs_dir, after_epoch: int):
    """A run of ``config`` in ``runs_dir`` killed right after ``after_epoch``; returns its folder."""
    config = config.with_overrides({"train.runs_dir": str(runs_dir)})

    def crash(epoch, row):
        if epoch == after_epoch:
            raise _Crash

    with pytest.raises(_Crash):
        train(config, on_epoch_end=crash)
    return next(runs_dir.glob("run_*"))


class _Crash(Exception):
    pass


def test_online_fine_tuning_run_resumes_exactly_and_evaluates_on_its_own_store(prepared, tmp_path):
    """Online mode, last dense block trained: a crash after epoch 2 + resume == an uninterrupted run."""
    import numpy as np

    from stainmil.analysis.new_cases import predict_unlabelled
    from stainmil.data.cohort import load_manifest
    from stainmil.features.store import load_features

    config = prepared.with_overrides({"features.mode": "online",
                                      "features.trainable_blocks": 1,
                                      "features.backbone_lr": 1e-3,
                                      "train.max_epochs": 3,
                                      "train.runs_dir": str(tmp_path / "full")})
    full = train(config).run_dir
    assert json.loads((full / "status.json").read_text())["state"] == "trained"
    state = load_checkpoint(full / "checkpoints" / "best.pth")
    assert state["backbone"] and all(k.startswith(("net.features.denseblock4.", "net.features.norm5."))
                                     for k in state["backbone"])
    assert len(state["optimizer"]["param_groups"]) == 2
    assert state["optimizer"]["param_groups"][1]["lr"] == pytest.approx(1e-3)

    run = _crashed_run(config, tmp_path / "crashed", after_epoch=2)
    with pytest.raises(TrainingError, match="finish training first"):
        evaluate_run(run)                                  # no store of the trained backbone yet
    train(config, resume_dir=run)
    assert _history(run).equals(_history(full))
    resumed = load_checkpoint(run / "checkpoints" / "last.pth")
    uninterrupted = load_checkpoint(full / "checkpoints" / "last.pth")
    for part in ("model", "backbone"):
        for key in uninterrupted[part]:
            assert torch.equal(resumed[part][key], uninterrupted[part][key]), (part, key)

    # the run's own store holds features of the fine-tuned backbone, not of the initial one
    manifest = load_manifest(prepared)
    tuned = load_features(full / "features", manifest).astype(np.float32)
    initial = load_features(prepared.paths.store, manifest).astype(np.float32)
    assert tuned.shape == initial.shape and not np.allclose(tuned, initial, atol=1e-2)
    metrics = evaluate_run(full).metrics
    assert set(metrics["splits"]) == {"train", "val", "test"}

    # predicting new cases uses the fine-tuned backbone too
    new = prepared.with_overrides({"output_dir": str(tmp_path / "new"),
                                   "features.store_dir": str(tmp_path / "new" / "store")})
    predict_unlabelled(full / "checkpoints" / "best.pth", new, tmp_path / "new" / "predictions")
    assert np.allclose(load_features(new.paths.store, manifest).astype(np.float32), tuned, rtol=1e-2, atol=1e-3)


def test_online_vit_fine_tuning_resumes_exactly(prepared, tmp_path):
    """A ViT's last transformer block and final norm trained online: crash + resume == uninterrupted."""
    config = prepared.with_overrides({"features.mode": "online",
                                      "features.backbone": "kaiko_vits16",
                                      "features.trainable_blocks": 1,
                                      "features.backbone_lr": 1e-3,
                                      "train.max_epochs": 2,
                                      "data.per_slice_cap": 4,
                                      "train.runs_dir": str(tmp_path / "full")})
    full = train(config).run_dir
    state = load_checkpoint(full / "checkpoints" / "last.pth")
    assert state["backbone"] and all(k.startswith(("net.blocks.11.", "net.norm.")) for k in state["backbone"])
    run = _crashed_run(config, tmp_path / "crashed", after_epoch=1)
    train(config, resume_dir=run)
    assert _history(run).equals(_history(full))
    resumed = load_checkpoint(run / "checkpoints" / "last.pth")
    for key, value in state["backbone"].items():
        assert torch.equal(resumed["backbone"][key], value), key


def test_metrics_report_the_epochs_actually_run(prepared, tmp_path):
    """best.pth holds the best epoch; metrics.json must say how many epochs ran (lr 0: epoch 1 stays best)."""
    config = prepared.with_overrides({"train.runs_dir": str(tmp_path), "train.lr": 0.0, "train.max_epochs": 4})
    result = train(config)
    metrics = evaluate_run(result.run_dir).metrics
    assert (metrics["best_epoch"], metrics["epochs_run"]) == (1, 4)
    assert "best epoch: 1 of 4" in (result.run_dir / "results.txt").read_text()


def test_bounded_memory_store_gives_a_bit_identical_run(prepared, tmp_path):
    """features.cache_mb: slices read from the store on demand through a cache smaller than the store (so it
    evicts and re-reads), the cohort read through the patch index on disk — the same seed gives the very same
    history, weights and predictions as the whole store and manifest in memory."""
    from stainmil.bags.cohort import CohortBags
    from stainmil.features.store import StoreMeta
    from stainmil.train.run import load_cohort

    meta = StoreMeta.read(prepared.paths.store)
    runs = {}
    for cache_mb in (0.0, 0.25):
        config = prepared.with_overrides({"features.cache_mb": cache_mb,
                                          "train.runs_dir": str(tmp_path / f"cache{cache_mb}")})
        runs[cache_mb] = train(config).run_dir
        evaluate_run(runs[cache_mb])
    assert meta.feature_dim * 2 * 300 / 2 ** 20 > 0.25  # the tiny store (~300 patches, fp16) does not fit
    pd.testing.assert_frame_equal(_history(runs[0.0]), _history(runs[0.25]), check_exact=True)
    a, b = (load_checkpoint(runs[k] / "checkpoints" / "last.pth")["model"] for k in (0.0, 0.25))
    assert all(torch.equal(a[key], b[key]) for key in a)
    pa, pb = (pd.read_csv(runs[k] / "predictions.csv") for k in (0.0, 0.25))
    pd.testing.assert_frame_equal(pa, pb, check_exact=True)
    bounded = prepared.with_overrides({"features.cache_mb": 0.25})
    bags, _ = load_cohort(bounded)
    assert isinstance(bags, CohortBags) and bags.source.reads == 0  # nothing read until a batch needs it
    assert bags.index is not None and bags._manifest is None  # the memory-mapped index, no manifest in memory
    for _ in range(2):
        bags.batch(bags.case_ids)
    n_slices = len(bags.slice_patches)
    assert bags.source.reads > n_slices and bags.source._held <= 0.25 * 2 ** 20  # evicted and re-read, bounded
