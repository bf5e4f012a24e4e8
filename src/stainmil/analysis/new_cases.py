"""New, unlabelled cases: indexed (or tiled), extracted with the run's encoder, predicted with the run's model
and decision, and explained like a run (tables, heatmaps, report) — ``stainmil predict``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from stainmil.analysis.analyze import write_tables
from stainmil.analysis.attention import compute_tables
from stainmil.analysis.report import build_prediction_report
from stainmil.bags.cohort import CohortBags
from stainmil.config import Config, dump_config
from stainmil.data.cohort import build_index, keep_stains, load_manifest, write_index
from stainmil.data.registration import patch_alignment, read_registrations
from stainmil.device import resolve_device
from stainmil.errors import ConfigError, DataError, StoreError
from stainmil.features.extract import extract_features
from stainmil.features.online import backbone_from_checkpoint
from stainmil.features.sources import cohort_features
from stainmil.features.store import StoreMeta, check_store, imported_store
from stainmil.io import atomic_write, atomic_write_text
from stainmil.model.registry import architecture
from stainmil.run_files import RunFiles
from stainmil.train.checkpoint import load_checkpoint, model_from_checkpoint
from stainmil.train.run import case_probabilities, run_decision


def predict_unlabelled(checkpoint: str | Path, config: Config, out_dir: str | Path | None = None,
                       threshold: float | None = None, explain: bool = True) -> Path:
    """Index + extract (if needed) + predict every case of ``config``'s patch folder (or tiled slides); no
    labels needed. Returns the prediction folder (default <output_dir>/predictions)::

        predictions.csv  threshold.txt
        attention/…      the same tables, heatmaps and patch grids as ``stainmil analyze`` (``explain``)
        report.html      probabilities, threshold, stain and slice attention, slice viewers; no metrics

    The threshold (and temperature, when the run calibrated) is ``threshold`` if given, else the run's
    metrics.json next to the checkpoint, else 0.5.
    """
    state = load_checkpoint(checkpoint)
    model, trained_config = model_from_checkpoint(state)
    # the model only understands features made like its own; but they go to this config's own store, never
    # into the training store (where a new case with a training case's id would find the old case's file)
    # (the caller's config is left as it was: this prediction set's config is a new one)
    features = dataclasses.replace(trained_config.features, store_dir=config.features.store_dir, views=1,
                                   cache_mb=config.features.cache_mb)                   # plain view only
    trained_stains = list(trained_config.data.stains)
    # indexed with every stain the config knows; only those the model was trained on are read (a stain subset)
    data = dataclasses.replace(config.data, class_names=list(trained_config.data.class_names),
                               stains=trained_stains + [s for s in config.data.stains if s not in trained_stains])
    aligned = architecture(trained_config.model.architecture).needs_registration
    # said before any extraction: the new slides' registrations place their patches
    register = dataclasses.replace(config.register, reference_stain=trained_config.register.reference_stain) \
        if aligned else config.register
    config = dataclasses.replace(config, features=features, data=data, register=register)
    if aligned:
        if read_registrations(config) is None:
            raise ConfigError(f"this model ({checkpoint}) is 'aligned': it needs the new slides registered; run "
                              f"`stainmil tile` and `stainmil register --config <config>` on them first.")
    if imported_store(config.paths.store):  # features made elsewhere: `stainmil import-features` indexed them
        _same_encoder(config.paths.store, trained_config.paths.store)
        manifest = keep_stains(load_manifest(config), trained_stains)
    else:
        result = build_index(config, require_labels=False)
        write_index(result, config)
        manifest = keep_stains(result.manifest, trained_stains)
        # an online run that fine-tuned its backbone saved it in the checkpoint; its features need that backbone
        tuned = backbone_from_checkpoint(state, trained_config, resolve_device(config.features.device))
        extract_features(config, manifest, backbone=tuned)
    check_store(config.paths.store, config)
    # an aligned model places the new cases' patches through their own registrations (`stainmil register`)
    alignment = patch_alignment(config, manifest) if aligned else None
    features = cohort_features(config.paths.store, manifest, 1, config.features.cache_mb)
    bags = CohortBags(manifest, features, trained_stains, alignment=alignment)
    decision = run_decision(Path(checkpoint).resolve().parent.parent, threshold)  # the run folder's metrics.json
    threshold, rule, temperature = decision.threshold, decision.rule, decision.temperature
    predictions = case_probabilities(model, bags, bags.case_ids, resolve_device(config.train.device), temperature)
    classes = trained_config.data.classes
    predictions["pred"] = classes.decide(predictions[classes.probability_columns].to_numpy(), threshold)
    if not classes.binary:
        threshold, rule = float("nan"), classes.decision_rule()
    predictions["pred_label"] = [trained_config.data.class_names[k] for k in predictions["pred"]]
    predictions["threshold"] = threshold
    out = Path(out_dir) if out_dir else Path(config.output_dir) / "predictions"
    (out / "predictions.csv").unlink(missing_ok=True)  # an earlier set's file must not sit beside new partial files
    atomic_write_text(out / "threshold.txt", f"{threshold}\n{rule}\n")
    dump_config(config, out / "config.yaml")  # this set's cohort (slides, tiles, registrations): `stainmil view`
    if explain:
        tables = compute_tables(model, config, bags, bags.case_ids, predictions, "prediction set", threshold,
                                temperature)
        analysis = write_tables(RunFiles.of(out).attention, tables, config)
        build_prediction_report(out, analysis, config, threshold, rule, checkpoint)
    # written last: a folder with predictions.csv is a finished prediction set
    atomic_write(out / "predictions.csv", lambda tmp: predictions.drop(columns=["label"]).to_csv(tmp, index=False))
    return out


def _same_encoder(store_dir: Path, trained_store: Path) -> None:
    """Refuse imported features of another encoder than the run's store (when that store is still there)."""
    meta = StoreMeta.read(store_dir)
    try:
        trained = StoreMeta.read(trained_store)
    except StoreError:
        return  # the training store moved; the model's own input check still applies
    if (meta.backbone, meta.feature_dim) != (trained.backbone, trained.feature_dim):
        raise DataError(f"the features imported into {store_dir} are {meta.backbone} (D={meta.feature_dim}) but the "
                        f"run was trained on {trained.backbone} (D={trained.feature_dim}); import the new cases' "
                        "features made with the run's encoder.")
