"""Attention tables of a trained run: per patch, per slice, per case — plus faithfulness checks.

Effective attention is normalised for display and comparison as ``effective_attention x n_patches
of the case`` (column ``relative_attention``): 1.0 means "as much as a uniform share", 4.0 four
times that. Unlike per-image min-max scaling this is comparable across slices and cases.

Patch-level predictions (``patch_prob``): P(high-grade) the model gives when the whole case is that
one patch (all attention on it), i.e. the classifier applied to the patch's embedding. With k > 2 classes,
``patch_prob`` and ``case_prob`` are the probability of the class predicted for the case, and
``patch_prob_<class>`` columns hold every class's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from stainmil.analysis.lesion import lesion_measures, measure_columns, summary_table, with_truth
from stainmil.analysis.stains import stain_contribution, stain_sentences, stain_summary
from stainmil.analysis.truth import PatchTruth, patch_truth
from stainmil.bags.cohort import CohortBags
from stainmil.classes import ClassScheme
from stainmil.config import Config
from stainmil.data.cohort import SLIDE_COLUMNS
from stainmil.device import resolve_device
from stainmil.errors import ConfigError, TrainingError
from stainmil.model.registry import has_patch_attention
from stainmil.train.run import open_run

TOP_SHARE = 0.05


@dataclass
class AttentionTables:
    patches: pd.DataFrame
    slices: pd.DataFrame
    cases: pd.DataFrame
    summary: dict = field(default_factory=dict)
    stains: pd.DataFrame = field(default_factory=pd.DataFrame)         # per case: ΔP without each stain
    stain_summary: pd.DataFrame = field(default_factory=pd.DataFrame)  # per stain x class
    stain_weights: pd.DataFrame = field(default_factory=pd.DataFrame)  # per stain x class: mean stain attention
    lesion: dict[str, pd.DataFrame] = field(default_factory=dict)      # case/stain/slice/summary: vs the outline


def stain_weight_table(slices: pd.DataFrame, cases: pd.DataFrame, stains: list[str],
                       classes: ClassScheme) -> pd.DataFrame:
    """Per stain x class (true class when labelled, else predicted): how much stain-level attention the stain gets
    on average in the cases that have it — what a stain-aware model learns to weigh."""
    labelled = bool((cases["label"] >= 0).all())
    by = cases.set_index("case")["label" if labelled else "pred"]
    weights = slices.drop_duplicates(["case", "stain"])[["case", "stain", "stain_weight"]]
    weights = weights.assign(cls=weights["case"].map(by))
    rows = []
    for stain in stains:
        for k, name in enumerate(classes.names):
            part = weights[(weights["stain"] == stain) & (weights["cls"] == k)]["stain_weight"]
            rows.append({"stain": stain, "class": name, "class_is": "true" if labelled else "predicted",
                         "cases_with_stain": len(part), "mean_stain_weight": float(part.mean()) if len(part) else
                         float("nan"), "sd_stain_weight": float(part.std(ddof=1)) if len(part) > 1 else float("nan")})
    return pd.DataFrame(rows)


def _entropy(weights: np.ndarray) -> float:
    w = weights[weights > 0]
    return float(-(w * np.log(w)).sum())


def _normalised(entropy: float, n: int) -> float:
    return entropy / math.log(n) if n > 1 else float("nan")


def patch_table(model: nn.Module, bags: CohortBags, cases: list[str], device: torch.device,
                classes: ClassScheme) -> pd.DataFrame:
    """One row per patch of ``cases`` with every attention weight and the patch-alone prediction."""
    frames = []
    model.eval().to(device)
    with torch.inference_mode():
        for case in cases:
            batch = bags.batch([case]).to(device)
            out = model(batch)
            group = batch.slice_group[batch.patch_slice]                       # (P,) stain group per patch
            patch_all = torch.softmax(model.patch_alone_logits(out.patch_embeddings), -1)   # (P, C)
            shown = classes.shown_class(out.probabilities[0].cpu().numpy())
            patch_probs = patch_all[:, shown]
            rows = bags.manifest.iloc[batch.patch_rows]
            frame = pd.DataFrame({
                "case": case, "stain": rows["stain"].to_numpy(), "slice": rows["slice"].to_numpy(),
                "patch": rows["patch"].to_numpy(), "patch_index": rows["patch_index"].to_numpy(),
                "x": rows["x"].to_numpy(), "y": rows["y"].to_numpy(), "path": rows["path"].to_numpy(),
                "patch_weight": out.patch_weights.cpu().numpy(),
                "slice_weight": out.slice_weights[batch.patch_slice].cpu().numpy(),
                "stain_weight": out.stain_weights[group].cpu().numpy(),
                "effective_attention": out.effective_attention.cpu().numpy(),
                "patch_prob": patch_probs.cpu().numpy(),
                "case_prob": float(out.probabilities[0, shown]),
                **{c: rows[c].to_numpy() for c in SLIDE_COLUMNS if c in rows.columns},  # slide route: thumbnail
            })
            if patch_all.shape[1] > 2:
                for k, name in enumerate(classes.names):
                    frame[f"patch_prob_{name}"] = patch_all[:, k].cpu().numpy()
            frame["relative_attention"] = frame["effective_attention"] * len(frame)
            frame["rank_in_case"] = frame["effective_attention"].rank(ascending=False, method="first").astype(int)
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def slice_table(patches: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (case, stain, slice_id), part in patches.groupby(["case", "stain", "slice"], sort=False):
        entropy = _entropy(part["patch_weight"].to_numpy())
        rows.append({"case": case, "stain": stain, "slice": slice_id,
                     "slice_weight": float(part["slice_weight"].iloc[0]),
                     "stain_weight": float(part["stain_weight"].iloc[0]),
                     "slice_effective": float(part["effective_attention"].sum()),
                     "n_patches": len(part), "patch_entropy": entropy,
                     "patch_entropy_normalised": _normalised(entropy, len(part))})
    return pd.DataFrame(rows)


def case_table(patches: pd.DataFrame, slices: pd.DataFrame, predictions: pd.DataFrame, top_k: int) -> pd.DataFrame:
    rows = []
    preds = predictions.set_index("case")
    multiclass = "prob_2" in preds.columns
    for case, part in patches.groupby("case", sort=False):
        case_slices = slices[slices["case"] == case]
        n = len(part)
        ordered = part.sort_values("effective_attention", ascending=False)
        n_top = max(1, math.ceil(TOP_SHARE * n))
        top = ordered.head(top_k)
        stains = case_slices.drop_duplicates("stain")
        stain_entropy = _entropy(stains["stain_weight"].to_numpy())
        per_stain = [g["slice_weight"].to_numpy() for _, g in case_slices.groupby("stain")]
        slice_entropies = [_entropy(w) for w in per_stain]
        slice_norm = [_normalised(_entropy(w), len(w)) for w in per_stain]
        pred = preds.loc[case]
        rows.append({
            "case": case, "label": int(pred["label"]), "pred": int(pred["pred"]),
            "prob": float(pred["prob_1"] if not multiclass else pred[f"prob_{int(pred['pred'])}"]),
            # 1 - P(true class); with two classes |P(high-grade) - label|, the same number
            "abs_error": (float(abs(pred["prob_1"] - pred["label"])) if not multiclass else
                          1.0 - float(pred[f"prob_{int(pred['label'])}"])) if pred["label"] >= 0 else float("nan"),
            "split": pred.get("split", ""), "n_patches": n, "n_slices": len(case_slices), "n_stains": len(stains),
            "patch_entropy": float(case_slices["patch_entropy"].mean()),
            "patch_entropy_normalised": float(np.nanmean(case_slices["patch_entropy_normalised"]))
            if case_slices["patch_entropy_normalised"].notna().any() else float("nan"),
            "slice_entropy": float(np.mean(slice_entropies)),
            "slice_entropy_normalised": float(np.nanmean(slice_norm)) if not all(map(math.isnan, slice_norm))
            else float("nan"),
            "stain_entropy": stain_entropy, "stain_entropy_normalised": _normalised(stain_entropy, len(stains)),
            "effective_entropy_normalised": _normalised(_entropy(part["effective_attention"].to_numpy()), n),
            "top5pct_n_patches": n_top,
            "top5pct_share": float(ordered["effective_attention"].head(n_top).sum()),
            "topk_by_stain": "; ".join(f"{s}: {c}" for s, c in top["stain"].value_counts().items()),
            "topk_by_stain_slice": "; ".join(f"({s}, slice {sl}): {c}" for (s, sl), c in
                                             top.groupby(["stain", "slice"]).size().items()),
            **{f"stain_weight_{s}": float(w) for s, w in zip(stains["stain"], stains["stain_weight"])},
        })
    return pd.DataFrame(rows)


def _without(model: nn.Module, batch, n: int, removals: list[np.ndarray], device: torch.device,
             classes: ClassScheme) -> tuple[float, list[float]]:
    """P(shown class) of the whole case, and with each set of patch positions removed in turn."""
    full = model(batch.to(device)).probabilities[0]
    shown = classes.shown_class(full.cpu().numpy())
    probs = []
    for removed in removals:
        keep = np.ones(n, dtype=bool)
        keep[removed] = False
        probs.append(float(model(batch.subset(keep).to(device)).probabilities[0, shown]))
    return float(full[shown]), probs


def deletion_check(model: nn.Module, bags: CohortBags, cases: list[str], patches: pd.DataFrame, k: int,
                   device: torch.device, classes: ClassScheme, seed: int = 0) -> pd.DataFrame:
    """Change in P(high-grade) when the top-k attended patches are removed vs k random patches.

    A faithful attention map moves the prediction more when its top patches go than when random ones do.
    """
    rng = np.random.default_rng(seed)
    rows = []
    model.eval().to(device)
    with torch.inference_mode():
        for case in cases:
            part = patches[patches["case"] == case]
            if len(part) <= k:
                continue
            n = len(part)  # rows of ``part`` are in the batch's patch order
            top = np.argsort(part["rank_in_case"].to_numpy())[:k]
            full_prob, probs = _without(model, bags.batch([case]), n, [top, rng.choice(n, k, replace=False)],
                                        device, classes)
            rows.append({"case": case, "prob": full_prob, "prob_without_top_k": probs[0],
                         "prob_without_random_k": probs[1], "delta_top_k": abs(probs[0] - full_prob),
                         "delta_random_k": abs(probs[1] - full_prob)})
    return pd.DataFrame(rows)


def lesion_deletion(model: nn.Module, bags: CohortBags, patches: pd.DataFrame, scored: pd.DataFrame, k: int,
                    device: torch.device, classes: ClassScheme, seed: int = 0) -> pd.DataFrame:
    """Per case: |ΔP| when k random lesion patches are removed vs k random non-lesion patches (k capped by the
    smaller of the two; ignored patches never removed). Needs no attention: every model is scored."""
    rng = np.random.default_rng(seed)
    keys = ["case", "stain", "slice", "patch"]
    rows = []
    model.eval().to(device)
    with torch.inference_mode():
        for case, marked in scored.groupby("case", sort=False):
            part = patches[patches["case"] == case][keys].astype(str).reset_index(drop=True)
            flags = part.reset_index().merge(marked[keys + ["lesion", "ignored"]], on=keys, how="left")
            position = flags["index"].to_numpy()
            lesion = position[(flags["lesion"] == True) & (flags["ignored"] == False)]  # noqa: E712 (NaN: no truth)
            other = position[(flags["lesion"] == False) & (flags["ignored"] == False)]  # noqa: E712
            take = min(k, len(lesion), len(other))
            if not take:
                continue
            removals = [rng.choice(lesion, take, replace=False), rng.choice(other, take, replace=False)]
            full_prob, probs = _without(model, bags.batch([case]), len(part), removals, device, classes)
            rows.append({"case": case, "deletion_k_used": take, "delta_lesion_k": abs(probs[0] - full_prob),
                         "delta_non_lesion_k": abs(probs[1] - full_prob)})
    return pd.DataFrame(rows)


ANALYSIS_SECTIONS = ("analysis.", "eval.")


def analysis_settings(config: Config, settings: list[str] | None) -> Config:
    """A run's config with ``--set`` changes to how it is analysed (``analysis.*``, ``eval.*`` only: the rest is how
    it was trained)."""
    if not settings:
        return config
    other = [s for s in settings if not s.strip().startswith(ANALYSIS_SECTIONS)]
    if other:
        raise ConfigError(f"--set {other[0]} would change how the run was trained; analysing takes only analysis.* "
                          "and eval.* settings (train a new run for the rest).")
    return config.with_overrides(settings)


def analyze_tables(run_dir: str | Path, split_name: str = "test", top_k: int | None = None,
                   bags: CohortBags | None = None, settings: list[str] | None = None
                   ) -> tuple[AttentionTables, Config, CohortBags]:
    """Load the run's best model and compute every table for the cases of ``split_name`` (or ``all``);
    ``settings``: ``--set analysis.truth=…`` and the like (:func:`analysis_settings`)."""
    run_dir = Path(run_dir)
    predictions_file = run_dir / "predictions.csv"
    if not predictions_file.is_file():
        raise TrainingError(f"{run_dir} has no predictions.csv; run `stainmil evaluate {run_dir}` first.")
    run = open_run(run_dir, bags=bags)
    split, bags = run.split, run.bags
    cases = split.train + split.val + split.test if split_name == "all" else split.subset(split_name)
    if not cases:
        raise TrainingError(f"split '{split_name}' of {run_dir} is empty; analyse another (--split val).")
    predictions = pd.read_csv(predictions_file, dtype={"case": str})
    config = analysis_settings(run.config, settings)
    tables = compute_tables(run.model, config, bags, cases, predictions, split_name, run.decision.threshold,
                            run.decision.temperature, top_k)
    return tables, config, bags


def compute_tables(model: nn.Module, config: Config, bags: CohortBags, cases: list[str],
                   predictions: pd.DataFrame, split_name: str, threshold: float, temperature: float = 1.0,
                   top_k: int | None = None) -> AttentionTables:
    """Every table for ``cases`` — of a run's split or of a prediction set (labels -1: no label-based parts).

    ``predictions``: case, label, pred, prob_1 per case (as written by evaluate / predict).
    """
    device = resolve_device(config.train.device)
    classes = config.data.classes
    patches = patch_table(model, bags, cases, device, classes)
    slices = slice_table(patches)
    k = top_k or config.analysis.top_k
    case_frame = case_table(patches, slices, predictions, k)
    patch_attention = has_patch_attention(config.model)
    summary: dict = {"split": split_name, "n_cases": len(cases), "top_k": k, "threshold": threshold,
                     "architecture": config.model.architecture, "patch_attention": patch_attention,
                     "labelled": bool((case_frame["label"] >= 0).all()),
                     "normalisation": "relative_attention = effective_attention x n_patches of the case "
                                      "(1 = uniform share)"}
    truth = patch_truth(config, patches, bags.manifest)
    lesion_tables: dict[str, pd.DataFrame] = {}
    if truth is not None:
        case_frame, lesion_tables = _lesion_tables(model, bags, patches, truth, config, device, k, patch_attention,
                                                   case_frame, summary)
    deletion = deletion_check(model, bags, cases, patches, config.analysis.deletion_k, device, classes,
                              config.train.seed) \
        if patch_attention else pd.DataFrame()  # uniform shares have no top patches to delete
    if not deletion.empty:
        case_frame = case_frame.merge(deletion[["case", "delta_top_k", "delta_random_k"]], on="case", how="left")
        summary["deletion_k"] = config.analysis.deletion_k
        summary["deletion_delta_top_k_mean"] = float(deletion["delta_top_k"].mean())
        summary["deletion_delta_random_k_mean"] = float(deletion["delta_random_k"].mean())
    for level in ("patch", "slice", "stain"):
        summary[f"{level}_entropy_normalised_mean"] = float(case_frame[f"{level}_entropy_normalised"].mean())
    summary["top5pct_share_mean"] = float(case_frame["top5pct_share"].mean())
    contribution = stain_contribution(model, bags, cases, device, threshold, classes, temperature)
    by_stain = stain_summary(contribution, bags.stains, classes, threshold)
    summary["stain_contribution"] = stain_sentences(by_stain, classes)
    stain_weights = stain_weight_table(slices, case_frame, bags.stains, classes)
    return AttentionTables(patches, slices, case_frame, summary, contribution, by_stain, stain_weights, lesion_tables)


def run_lesion_measures(run_dir: str | Path, split_name: str = "test", bags: CohortBags | None = None
                        ) -> pd.DataFrame | None:
    """Per case of a run's split: every lesion measure (:mod:`stainmil.analysis.lesion`), or None when the run's
    config names no ``analysis.truth``. What ``compare-models`` pools over the folds of each model."""
    run = open_run(run_dir, bags=bags)
    config = run.config
    if not config.analysis.truth:
        return None
    cases = run.split.subset(split_name)
    patches = patch_table(run.model, run.bags, cases, run.device, config.data.classes)
    scored = with_truth(patches, patch_truth(config, patches, run.bags.manifest).table,
                        config.analysis.lesion_min_fraction)
    return _case_measures(run.model, run.bags, patches, scored, config, run.device, config.analysis.top_k,
                          has_patch_attention(config.model))


def _case_measures(model: nn.Module, bags: CohortBags, patches: pd.DataFrame, scored: pd.DataFrame, config: Config,
                   device: torch.device, k: int, patch_attention: bool) -> pd.DataFrame:
    """Per case: every lesion measure of the case's patches and the lesion vs non-lesion deletion."""
    per_case = lesion_measures(scored, k, "case", patch_attention)
    deletion = lesion_deletion(model, bags, patches, scored, config.analysis.deletion_k, device,
                               config.data.classes, config.train.seed)
    return per_case.merge(deletion, on="case", how="left") if not deletion.empty else per_case


def _lesion_tables(model: nn.Module, bags: CohortBags, patches: pd.DataFrame, truth: PatchTruth, config: Config,
                   device: torch.device, k: int, patch_attention: bool, case_frame: pd.DataFrame,
                   summary: dict) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """The lesion measures of every level and their summary (mean over cases [CI]); the case table gains the
    per-case measures."""
    analysis, evaluation = config.analysis, config.eval
    scored = with_truth(patches, truth.table, analysis.lesion_min_fraction)
    tables = {"case": _case_measures(model, bags, patches, scored, config, device, k, patch_attention),
              **{level: lesion_measures(scored, k, level, patch_attention) for level in ("stain", "slice")}}
    tables["summary"] = summary_table(tables["case"], evaluation.bootstrap, evaluation.ci, config.train.seed)
    tables["summary_by_stain"] = summary_table(tables["stain"], evaluation.bootstrap, evaluation.ci,
                                               config.train.seed, by="stain")
    case_frame = case_frame.merge(tables["case"][["case", *measure_columns(tables["case"])]], on="case", how="left")
    summary["lesion"] = {
        "truth": truth.source, "slides": truth.slides, "carried_slides": truth.carried, "repaired": truth.repaired,
        "notes": truth.notes, "lesion_min_fraction": analysis.lesion_min_fraction, "k": k,
        "measures": {row["measure"]: {key: row[key] for key in ("mean", "ci_low", "ci_high", "cases")}
                     for row in tables["summary"].to_dict("records")}}
    if patch_attention:  # the headline figure, as before
        summary["attention_lesion_auc_mean"] = float(tables["case"]["attention_lesion_auc"].mean())
        summary["attention_lesion_auc_cases"] = int(tables["case"]["attention_lesion_auc"].notna().sum())
    return case_frame, tables
