"""A run's cohort, and a trained run opened for use: one home that evaluation, analysis, reports and
predictions share.

:func:`load_cohort` reads a config's manifest, split and features, validated against each other;
:func:`open_run` rebuilds a run's model from its checkpoint with its config, split, cohort, decision
threshold and calibration temperature; :func:`infer` is the one inference loop (the trainer's validation
loss, evaluation and predictions all run it) and :func:`case_probabilities` the one place a temperature is
applied.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from stainmil.bags.cohort import CohortBags
from stainmil.config import Config
from stainmil.data.cohort import keep_stains, load_manifest
from stainmil.data.patch_index import PatchIndex, open_patch_index
from stainmil.data.registration import patch_alignment, registrations_digest
from stainmil.data.splits import Split, load_split
from stainmil.device import resolve_device
from stainmil.errors import DataError, TrainingError
from stainmil.features.online import OnlineEncoder
from stainmil.features.sources import cohort_features
from stainmil.features.store import STORE_META, check_store
from stainmil.model.batch import CaseBatch
from stainmil.model.output import MILOutput
from stainmil.model.registry import architecture, check_model_config
from stainmil.run_files import RunFiles
from stainmil.stats.calibration import apply_temperature
from stainmil.train.checkpoint import load_checkpoint, model_from_checkpoint

TRAINING_COLUMNS = ["case", "stain", "slice", "patch", "patch_index", "label"]
# patches in one inference batch at most (a case larger goes alone): 8 cases of ~1,200 patches held ~400 MB of
# activations at the validation pass's peak, and the largest 8 grow with the cohort
INFER_PATCHES = 4096
PLACE_COLUMNS = ["x", "y", "size0"]  # where a patch lies on its slide: the aligned architecture places patches


def load_cohort(config: Config, split: Split | None = None, training: bool = False) -> tuple[CohortBags, Split]:
    """Manifest + split + patch features of ``config``, validated against each other.

    ``training``: cached mode loads ``features.views`` views per patch; online mode loads no features
    but an encoder that computes them from the images. Otherwise (evaluation, analysis) the plain
    features of the store — for an online run, its own store of the trained backbone. With a stain subset
    (``data.stains``) the cases that have none of its stains drop out of the split.
    """
    bounded = config.features.mode == "cached" and config.features.cache_mb > 0
    check_model_config(config.model)  # before any data is read: a bad option or stain identity is named first
    spec = architecture(config.model.architecture)
    aligned = spec.needs_registration
    # a bounded store's cohort is read through the patch index on disk: memory grows with slices, not patches
    index = open_patch_index(config.paths.manifest) if bounded and not aligned and config.data.subcases <= 1 else None
    if index is not None:
        manifest: pd.DataFrame | PatchIndex = index.with_slices(keep_stains(index.slices, config.data.stains),
                                                                places=spec.patch_positions)
        cases, kept = set(index.slices["case"]), set(manifest.slices["case"])
    else:
        # a bounded training process keeps only the index columns training uses: its memory stays small
        places = PLACE_COLUMNS if aligned or spec.patch_positions else []
        manifest = load_manifest(config, (TRAINING_COLUMNS + places) if bounded and training else None)
        cases = set(manifest["case"])
        manifest = keep_stains(manifest, config.data.stains)
        kept = set(manifest["case"])
    split = split or load_split(config.paths.split_file, cases)
    if len(kept) < len(cases):
        split = split.restricted_to(kept)
    for name in ("train", "val"):
        if not split.subset(name):
            raise DataError(f"the {name} split of {config.paths.split_file} is empty; re-split with more cases.")
    alignment = patch_alignment(config, manifest) if aligned else None
    online = config.features.mode == "online"
    if online and training:
        encoder = OnlineEncoder(config.features, resolve_device(config.train.device))
        return CohortBags(manifest, None, config.data.stains, encoder, alignment), split
    if online and not (config.paths.store / STORE_META).is_file():
        raise TrainingError(f"this online run has no store of its trained backbone's features yet "
                            f"({config.paths.store}); finish training first: `stainmil train --resume <run folder>`.")
    check_store(config.paths.store, config)
    views = config.features.views if training else 1
    features = cohort_features(config.paths.store, manifest, views, config.features.cache_mb)
    return CohortBags(manifest, features, config.data.stains, alignment=alignment), split


@dataclass
class Decision:
    """How a run turns probabilities into classes: threshold (where it came from) and temperature."""

    threshold: float
    rule: str
    temperature: float


def run_decision(run_dir: str | Path, threshold: float | None = None) -> Decision:
    """The decision a run's evaluation chose (``metrics.json``); ``threshold`` overrides its threshold.

    Before evaluation (no metrics.json): threshold 0.5 and no temperature.
    """
    metrics_file = Path(run_dir) / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    temperature = float(metrics.get("calibration", {}).get("temperature", 1.0))
    if threshold is not None:
        return Decision(float(threshold), "given", temperature)
    if metrics:
        return Decision(float(metrics["threshold"]), f"from {metrics_file} ({metrics['threshold_rule']})",
                        temperature)
    return Decision(0.5, f"default 0.5 (no {metrics_file.name} in {metrics_file.parent})", temperature)


@dataclass
class OpenRun:
    run_dir: Path
    config: Config
    model: nn.Module          # eval mode, on ``device``
    state: dict               # the loaded checkpoint
    split: Split
    bags: CohortBags | None   # None when opened without its cohort
    decision: Decision
    device: torch.device


def open_run(run_dir: str | Path, checkpoint: str = "best", bags: CohortBags | None = None,
             with_cohort: bool = True) -> OpenRun:
    """Rebuild a trained run: config, model (``checkpoints/<checkpoint>.pth``), split, cohort, decision."""
    run_dir = Path(run_dir)
    path = RunFiles.of(run_dir).checkpoint(checkpoint)
    if not path.is_file():
        raise TrainingError(f"{run_dir} has no checkpoints/{checkpoint}.pth; train it first (`stainmil train`) or "
                            "resume it (`stainmil train --resume`).")
    state = load_checkpoint(path)
    model, config = model_from_checkpoint(state)
    split = load_split(run_dir / "data_splits.npz")
    if bags is None and with_cohort:
        trained_on = state.get("registrations")
        if trained_on and registrations_digest(config) != trained_on:
            raise DataError(f"{run_dir} was trained on other registrations than {config.paths.registration_dir} holds "
                            "now (`stainmil register` ran again since?), so its patches would be placed differently; "
                            "train the run again, or restore the registrations it was trained with.")
        bags, split = load_cohort(config, split)
    device = resolve_device(config.train.device)
    return OpenRun(run_dir, config, model.to(device), state, split, bags, run_decision(run_dir), device)


def infer(model: nn.Module, bags: CohortBags, cases: list[str], device: torch.device, batch_cases: int = 8
          ) -> Iterator[tuple[CaseBatch, MILOutput]]:
    """The one inference loop: (batch, model output) for ``cases`` in batches of ``batch_cases`` cases and at most
    :data:`INFER_PATCHES` patches (every patch of each case)."""
    model.eval().to(device)
    batches = bags.case_batches(cases, batch_cases, INFER_PATCHES)
    with torch.inference_mode():
        for i, group in enumerate(batches):
            batch = bags.batch(group).to(device)
            bags.prefetch(batches[i + 1] if i + 1 < len(batches) else [])
            yield batch, model(batch)


def calibrated(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """(B, C) class probabilities with the run's temperature applied (binary runs; T = 1 leaves them)."""
    if temperature == 1.0:
        return probabilities
    positive = apply_temperature(probabilities[:, 1], temperature)
    return np.stack([1.0 - positive, positive], axis=1)


def case_probabilities(model: nn.Module, bags: CohortBags, cases: list[str], device: torch.device,
                       temperature: float = 1.0, batch_cases: int = 8) -> pd.DataFrame:
    """One row per case: case, label, prob_<class>… (calibrated by ``temperature``; the raw P(class 1) kept as
    ``prob_1_uncalibrated`` when T != 1)."""
    rows = []
    for batch, out in infer(model, bags, cases, device, batch_cases):
        raw = out.probabilities.cpu().numpy()                                  # (B, C)
        probs = calibrated(raw, temperature)
        for case, label, p, r in zip(batch.case_ids, batch.labels.cpu().tolist(), probs, raw):
            row = {"case": case, "label": label, **{f"prob_{k}": float(v) for k, v in enumerate(p)}}
            if temperature != 1.0:
                row["prob_1_uncalibrated"] = float(r[1])
            rows.append(row)
    return pd.DataFrame(rows)
