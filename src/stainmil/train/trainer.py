"""The one training loop: seeded, checkpointed every epoch, resumable, early-stopped on val loss.

Per epoch: the training cases are shuffled, grouped into batches of ``train.cases_per_batch``;
each slice contributes a fresh random ``data.per_slice_cap`` patches; ``data.max_slices_per_stain``
slices per stain are chosen once per run. Validation uses every patch of every slice.

Patch embeddings come from the feature store (``features.mode: cached``; with ``features.views``
one random view per patch per step) or from the backbone run on the images in the step
(``online``, see ``stainmil.features.online``); everything else is the same loop.

Run folder (``runs/run_YYYYMMDD_HHMMSS/``)::

    config.yaml  data_splits.npz  status.json  history.csv  curves.png
    checkpoints/best.pth  checkpoints/last.pth
    (online mode) features/   the trained backbone's features of every patch, written when training ends
    (after evaluation) predictions.csv  metrics.json  results.txt  confusion_matrix.png  roc_curve.png
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stainmil.bags.cohort import CohortBags
from stainmil.config import Config, TrainConfig, config_to_dict, dump_config, load_config
from stainmil.data.registration import registrations_digest
from stainmil.data.splits import Split, load_split, save_split
from stainmil.data.subcases import expand_subcases
from stainmil.device import resolve_device
from stainmil.errors import TrainingError
from stainmil.features.extract import extract_features
from stainmil.io import atomic_write, atomic_write_json
from stainmil.locks import folder_lock
from stainmil.model.registry import architecture, build_model
from stainmil.model.regularizers import AttentionRegularizer
from stainmil.progress import progress_bar
from stainmil.run_files import RunFiles
from stainmil.stats.metrics import classification_metrics
from stainmil.stats.plots import plot_history
from stainmil.train.checkpoint import load_checkpoint, save_checkpoint
from stainmil.train.losses import build_loss, class_weights, weighted_mean
from stainmil.train.optim import build_optimizer
from stainmil.train.run import infer, load_cohort


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    epochs_run: int
    best_val_loss: float
    stopped_early: bool


def new_run_dir(runs_dir: Path) -> Path:
    """``runs/run_YYYYMMDD_HHMMSS`` (with a suffix if that second is taken)."""
    stamp = datetime.now().strftime("run_%Y%m%d_%H%M%S")
    path, n = runs_dir / stamp, 1
    while path.exists():
        n += 1
        path = runs_dir / f"{stamp}_{n}"
    path.mkdir(parents=True)
    return path


def _set_status(run_dir: Path, state: str, **extra: object) -> None:
    atomic_write_json(run_dir / "status.json", {"state": state, "updated": datetime.now().isoformat(), **extra})


def _rng_state(rng: np.random.Generator) -> str:
    return json.dumps(rng.bit_generator.state)


def evaluate_loss(model: torch.nn.Module, bags: CohortBags, cases: list[str], loss_fn, weights, device,
                  batch_cases: int = 8) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean loss over ``cases`` (every patch), their labels and class probabilities (B, C)."""
    losses, labels, probs = [], [], []
    for batch, out in infer(model, bags, cases, device, batch_cases):
        losses.append(loss_fn(out, batch.labels, weights).cpu())
        labels.append(batch.labels.cpu())
        probs.append(out.probabilities.cpu())
    all_labels = torch.cat(labels)
    loss = weighted_mean(torch.cat(losses), all_labels, weights.cpu() if weights is not None else None)
    return float(loss), all_labels.numpy(), torch.cat(probs).numpy()


def train(config: Config, resume_dir: str | Path | None = None, split: Split | None = None,
          run_dir: str | Path | None = None, on_epoch_end: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train one run; ``resume_dir`` continues a killed run from its ``last.pth``.

    ``on_epoch_end(epoch, history_row)`` is called after each epoch's checkpoint is written (e.g. to
    report to an Optuna pruner, which may raise to stop the run). The run folder is locked while it trains (a
    second ``train --resume`` on it is refused).
    """
    created = resume_dir is None and run_dir is None
    folder = Path(resume_dir if resume_dir is not None else run_dir if run_dir is not None
                  else new_run_dir(config.paths.runs_dir))
    try:
        with folder_lock(folder, "train"):
            return _train(config, None if resume_dir is None else folder, split, folder, on_epoch_end)
    except BaseException:
        if created and not (folder / "config.yaml").exists():  # refused before it began: no empty run folder left
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _train(config: Config, resume_dir: Path | None, split: Split | None, run_dir: Path,
           on_epoch_end: Callable[[int, dict], None] | None) -> TrainResult:
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        if not (run_dir / "config.yaml").is_file():
            raise TrainingError(f"{run_dir} is not a run folder (no config.yaml); pass runs/run_…/ to --resume.")
        config = load_config(run_dir / "config.yaml")
        split = load_split(run_dir / "data_splits.npz")
    bags, split = load_cohort(config, split, training=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_dir is None:
        if config.features.mode == "online":  # the trained backbone's features go to the run's own store
            config = config.with_overrides({"features.store_dir": str(run_dir / "features")})
        dump_config(config, run_dir / "config.yaml")
        save_split(split, run_dir / "data_splits.npz")

    t = config.train
    device = resolve_device(t.device)
    torch.manual_seed(t.seed)
    model = build_model(bags.feature_dim, config.model, config.data.stains)
    if config.model.standardize_features:
        model.set_feature_statistics(*bags.feature_statistics(split.train, seed=t.seed))
    model.set_seen_stains(torch.as_tensor(bags.stains_of(split.train)))
    model.to(device)
    encoder = bags.encoder
    tuned = encoder.trainable_parameters() if encoder is not None else []
    optimizer = build_optimizer(model, t, [{"params": tuned, "lr": config.features.backbone_lr}] if tuned else [],
                                fused=architecture(config.model.architecture).fused_optimizer)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(getattr(optimizer, "optimizer", optimizer), mode="min",
                                                           factor=t.scheduler_factor, patience=t.scheduler_patience)
    train_labels = np.array([bags.case_label(c) for c in split.train])
    weights = class_weights(t, train_labels, config.model.n_classes)
    weights = weights.to(device) if weights is not None else None
    loss_fn = build_loss(t)
    regularizer = AttentionRegularizer(config.model, t.max_epochs)
    rng = np.random.default_rng(t.seed)
    # sub-cases: training cases only, relabelled rows over the same in-memory features
    train_bags, train_cases = bags, list(split.train)
    if config.data.subcases > 1:
        manifest, train_cases = expand_subcases(bags.manifest, split.train, config.data.subcases,
                                                config.data.subcase_mode, np.random.default_rng([t.seed, 2]))
        train_bags = bags.with_manifest(manifest)
    slices = train_bags.choose_slices(train_cases, config.data.max_slices_per_stain,
                                      np.random.default_rng([t.seed, 1]))
    step = TrainingStep(model, optimizer, loss_fn, regularizer, weights, config.train)
    plan = EpochPlan(train_bags, train_cases, slices, step, config, device, then=(bags, split.val[:8]))
    history: list[dict] = []
    stopping = {"best_val_loss": math.inf, "best_epoch": 0, "bad_epochs": 0}
    start_epoch = 1

    last = RunFiles.of(run_dir).last
    if resume_dir is not None and last.is_file():
        state = load_checkpoint(last)
        model.load_state_dict(state["model"])
        if tuned:
            encoder.load_tail_state(state["backbone"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stopping = dict(state["early_stopping"])
        history = [dict(row) for row in state["history"]]
        rng.bit_generator.state = json.loads(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        start_epoch = int(state["epoch"]) + 1
        if state.get("finished"):
            start_epoch = t.max_epochs + 1

    _set_status(run_dir, "training", epoch=start_epoch - 1)
    stopped_early = bool(history) and stopping["bad_epochs"] >= t.early_stopping_patience
    for epoch in range(start_epoch, t.max_epochs + 1):
        if stopped_early:
            break
        started = time.perf_counter()
        try:
            terms = run_epoch(plan, epoch, rng)
        except TrainingError:
            _set_status(run_dir, "failed", epoch=epoch, reason="non-finite loss")
            raise
        val_loss, val_labels, val_probs = evaluate_loss(model, bags, split.val, loss_fn, weights, device)
        if not math.isfinite(val_loss):
            _set_status(run_dir, "failed", epoch=epoch, reason="non-finite validation loss")
            raise TrainingError(f"validation loss became {val_loss} at epoch {epoch}; lower train.lr.")
        scheduler.step(val_loss)
        metrics = classification_metrics(val_labels, val_probs, 0.5, config.data.classes)
        improved = val_loss < stopping["best_val_loss"] - 1e-6
        if improved:
            stopping.update(best_val_loss=val_loss, best_epoch=epoch, bad_epochs=0)
        else:
            stopping["bad_epochs"] += 1
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": terms.pop("total"),
               "val_loss": val_loss, "val_auc": metrics["auc"], "val_balanced_accuracy": metrics["balanced_accuracy"],
               **{f"val_{name}": metrics[name] for name in config.data.classes.recall_metrics},
               **{f"train_{name}": value for name, value in terms.items()},
               "seconds": time.perf_counter() - started}
        # plain Python types, so the checkpoint loads with weights_only=True
        history.append({k: float(v) if k != "epoch" else int(v) for k, v in row.items()})
        stopped_early = stopping["bad_epochs"] >= t.early_stopping_patience
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "early_stopping": stopping, "epoch": epoch, "history": history,
            "rng": {"numpy": _rng_state(rng), "torch": torch.get_rng_state()},
            "config": config_to_dict(config), "in_dim": bags.feature_dim,
            "finished": stopped_early or epoch == t.max_epochs,
            # a registered model's places come from these registrations (open_run refuses others)
            "registrations": registrations_digest(config) if architecture(config.model.architecture).needs_registration
            else None,
        }
        if tuned:
            state["backbone"] = encoder.tail_state()
        if improved:
            save_checkpoint(RunFiles.of(run_dir).best, state)
        save_checkpoint(last, state)
        frame = pd.DataFrame(history)
        atomic_write(run_dir / "history.csv", lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
        plot_history(frame, run_dir / "curves.png")
        _set_status(run_dir, "training", epoch=epoch)
        if on_epoch_end is not None:
            on_epoch_end(epoch, history[-1])
    if encoder is not None:
        _set_status(run_dir, "extracting", epoch=len(history))
        extract_with_trained_backbone(config, run_dir, bags)
    _set_status(run_dir, "trained", epoch=len(history), best_epoch=stopping["best_epoch"])
    return TrainResult(run_dir, stopping["best_epoch"], len(history), stopping["best_val_loss"], stopped_early)


def extract_with_trained_backbone(config: Config, run_dir: Path, bags: CohortBags) -> None:
    """Online runs: the best checkpoint's backbone extracts every patch into the run's store (resumable)."""
    if bags.encoder.trainable_parameters():
        bags.encoder.load_tail_state(load_checkpoint(RunFiles.of(run_dir).best)["backbone"])
    extract_features(config, bags.manifest, backbone=bags.encoder.as_backbone())


@dataclass
class EpochPlan:
    """What every training epoch of a run draws from (set up once per run)."""

    bags: CohortBags                      # the training cohort (sub-cases expanded)
    cases: list[str]                      # its training cases
    slices: dict[str, list[int]] | None   # slices chosen once per run (data.max_slices_per_stain); None: all
    step: TrainingStep
    config: Config
    device: torch.device
    then: tuple[CohortBags, list[str]] | None = None  # prefetched while the last batch trains (validation)


def run_epoch(plan: EpochPlan, epoch: int, rng: np.random.Generator) -> dict[str, float]:
    """One training epoch — the one every run, tuning trial and benchmark times: the cases in epoch order
    (``train.sampler``), batches of ``train.cases_per_batch`` with ``data.per_slice_cap`` patches drawn per slice,
    patch and stain dropout, one random feature view (or augmented images online) per patch, the next batch
    prefetched while this one trains. Returns each loss term's mean over the epoch's cases (``total`` included)."""
    t = plan.config.train
    plan.step.model.train()
    order = epoch_order(plan.cases, plan.bags, t.sampler, rng)
    batches = [order[i:i + t.cases_per_batch] for i in range(0, len(order), t.cases_per_batch)]
    terms: dict[str, float] = {}
    with progress_bar(f"epoch {epoch}", total=len(batches)) as advance:
        for k, cases in enumerate(batches):
            batch = plan.bags.batch(cases, plan.slices, plan.config.data.per_slice_cap, rng, t.patch_dropout,
                                    augment=True, stain_dropout=t.stain_dropout).to(plan.device)
            if k + 1 < len(batches):  # a store-backed cohort reads the next batch while this one trains
                plan.bags.prefetch(batches[k + 1], plan.slices)
            elif plan.then is not None:
                plan.then[0].prefetch(plan.then[1])
            for name, value in plan.step(batch, epoch).items():
                terms[name] = terms.get(name, 0.0) + value * len(cases)
            advance()
    return {name: value / len(order) for name, value in terms.items()}


class TrainingStep:
    """One optimisation step: forward (with top-k masking if configured), loss + regularisers, backward, step."""

    def __init__(self, model: torch.nn.Module, optimizer, loss_fn, regularizer: AttentionRegularizer,
                 weights: torch.Tensor | None, t: TrainConfig) -> None:
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.regularizer, self.weights = regularizer, weights
        self.topk = (t.topk_mask_k, t.topk_mask_ratio) if t.topk_mask_k > 0 else None

    def __call__(self, batch, epoch: int) -> dict[str, float]:
        """Returns the loss terms of this step (``total``, the case loss under its name, each regulariser)."""
        out = self.model(batch, topk_mask=self.topk)
        case_loss = weighted_mean(self.loss_fn(out, batch.labels, self.weights), batch.labels, self.weights)
        terms = {"case_loss": case_loss, **out.auxiliary_losses}  # + the architecture's own terms (CLAM, DSMIL, DTFD)
        if self.regularizer.active:
            terms.update(self.regularizer(out, batch, epoch))
        total = sum(terms.values())
        if not torch.isfinite(total):
            raise TrainingError(f"loss became {total.item()} at epoch {epoch} on case(s) {batch.case_ids}; lower "
                                "train.lr or check the features of these cases.")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return {"total": total.item(), **{name: value.item() for name, value in terms.items()}}


def epoch_order(cases: list[str], bags: CohortBags, sampler: str, rng: np.random.Generator) -> list[str]:
    """Training cases of one epoch: shuffled once each, or class-balanced draws with replacement."""
    if sampler == "balanced":
        labels = np.array([bags.case_label(c) for c in cases])
        counts = np.bincount(labels)
        p = 1.0 / counts[labels]
        return [cases[i] for i in rng.choice(len(cases), len(cases), replace=True, p=p / p.sum())]
    return [cases[i] for i in rng.permutation(len(cases))]

