"""Does the model look where the pathologist looks? Attention (and the patch-alone probability) against the lesion
outline (:mod:`stainmil.analysis.truth`), per case, per case x stain and per slice.

For each score — ``attention`` (effective attention) and ``patch_prob`` (P of the shown class when the case is that
patch alone) — and each group of patches (ignored patches left out):

    <score>_lesion_auc       ROC AUC of the score for "patch is lesion" (needs lesion and non-lesion patches)
    <score>_topk_precision   share of the k highest-scored patches that are lesion
    <score>_recall_at_k      share of the lesion patches among the k highest-scored
    <score>_pointing         1 when the single highest-scored patch is lesion, else 0 (pointing game)

k = ``analysis.top_k`` (all patches when the group has fewer). A patch is lesion when more than
``analysis.lesion_min_fraction`` of it lies in the outline. A model without patch attention has no attention
measures (NaN, said in the summary): uniform shares are never scored.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from stainmil.stats.metrics import bootstrap_mean, paired_mean_difference

SCORES = {"attention": "effective_attention", "patch_prob": "patch_prob"}
MEASURES = ("lesion_auc", "topk_precision", "recall_at_k", "pointing")
LEVELS = {"case": ["case"], "stain": ["case", "stain"], "slice": ["case", "stain", "slice"]}
SHOWN = {"lesion_auc": "lesion AUC", "topk_precision": "top-k precision", "recall_at_k": "lesion recall at k",
         "pointing": "pointing game", "delta_lesion_k": "ΔP without k lesion patches",
         "delta_non_lesion_k": "ΔP without k non-lesion patches"}  # ΔP: |change| of the case probability


def with_truth(patches: pd.DataFrame, truth: pd.DataFrame, min_fraction: float) -> pd.DataFrame:
    """The patch table with ``lesion_fraction``, ``lesion`` (bool) and ``ignored`` of every patch that has truth
    (patches without truth are dropped: their slide has no outline)."""
    keys = ["case", "stain", "slice", "patch"]
    left = patches.assign(**{k: patches[k].astype(str) for k in keys})
    merged = left.merge(truth[keys + ["lesion_fraction", "ignored", "truth_source"]], on=keys, how="inner")
    return merged.assign(lesion=merged["lesion_fraction"] > min_fraction)


def _measures(score: np.ndarray, lesion: np.ndarray, k: int) -> dict[str, float]:
    n, n_lesion = len(score), int(lesion.sum())
    order = np.argsort(-score, kind="stable")
    top = lesion[order[:min(k, n)]]
    return {"lesion_auc": float(roc_auc_score(lesion, score)) if 0 < n_lesion < n else math.nan,
            "topk_precision": float(top.mean()) if n else math.nan,
            "recall_at_k": float(top.sum() / n_lesion) if n_lesion else math.nan,
            "pointing": float(lesion[order[0]]) if n and n_lesion else math.nan}


def lesion_measures(scored: pd.DataFrame, k: int, level: str, patch_attention: bool) -> pd.DataFrame:
    """One row per group of ``level`` (case | stain | slice): patch counts and every measure of every score."""
    rows = []
    kept = scored[~scored["ignored"]]
    for key, part in kept.groupby(LEVELS[level], sort=False):
        key = key if isinstance(key, tuple) else (key,)
        lesion = part["lesion"].to_numpy()
        row = {**dict(zip(LEVELS[level], key)), "n_patches": len(part), "lesion_patches": int(lesion.sum())}
        for name, column in SCORES.items():
            values = _measures(part[column].to_numpy(float), lesion, k)
            if name == "attention" and not patch_attention:
                values = dict.fromkeys(values, math.nan)
            row.update({f"{name}_{m}": v for m, v in values.items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    if len(frame):
        ignored = scored[scored["ignored"]].groupby(LEVELS[level]).size().rename("ignored_patches")
        frame = frame.merge(ignored.reset_index(), on=LEVELS[level], how="left")
        frame["ignored_patches"] = frame["ignored_patches"].fillna(0).astype(int)
    return frame


def measure_columns(frame: pd.DataFrame) -> list[str]:
    """The measure columns of a per-case table, in a fixed order (scores x measures, then the deletion deltas)."""
    columns = [f"{s}_{m}" for s in SCORES for m in MEASURES] + ["delta_lesion_k", "delta_non_lesion_k"]
    return [c for c in columns if c in frame.columns]


def summary_table(per_case: pd.DataFrame, n_boot: int, level: float, seed: int,
                  by: str | None = None) -> pd.DataFrame:
    """Per measure (and per value of ``by``, e.g. stain): mean over cases [CI] and the cases it is defined for."""
    rows = []
    groups = [(None, per_case)] if by is None else list(per_case.groupby(by, sort=False))
    for group, part in groups:
        for column in measure_columns(per_case):
            mean, low, high, n = bootstrap_mean(part[column].to_numpy(float), n_boot, level, seed)
            rows.append({**({by: group} if by else {}), "measure": column, "mean": mean, "ci_low": low,
                         "ci_high": high, "cases": n})
    return pd.DataFrame(rows)


def shown_name(column: str) -> str:
    """``attention_topk_precision`` -> ``attention: top-k precision`` (a table header)."""
    for score in SCORES:
        if column.startswith(score + "_"):
            return f"{score.replace('_', ' ')}: {SHOWN[column[len(score) + 1:]]}"
    return SHOWN.get(column, column)


def summary_lines(table: pd.DataFrame, patch_attention: bool, architecture: str) -> list[str]:
    lines = [] if patch_attention else [f"{architecture} has no patch attention: the attention measures are not "
                                        "scored (a uniform share says nothing); the patch-alone ones are."]
    for row in table.itertuples(index=False):
        if row.cases:
            lines.append(f"  {shown_name(row.measure)}: {row.mean:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}] "
                         f"({row.cases} cases)")
    return lines


def models_table(per_model: dict[str, pd.DataFrame], n_boot: int, level: float, seed: int) -> pd.DataFrame:
    """Models x measures (long): each model's mean over its cases [CI], and its paired difference to the first
    model on the cases both scored [CI]. ``per_model``: model -> per-case table (one row per case)."""
    names = list(per_model)
    reference = per_model[names[0]].set_index("case")
    rows = []
    for name in names:
        frame = per_model[name].set_index("case")
        common = reference.index.intersection(frame.index)
        for column in measure_columns(frame):
            mean, low, high, n = bootstrap_mean(frame[column].to_numpy(float), n_boot, level, seed)
            ref = reference.loc[common, column].to_numpy(float) if column in reference.columns \
                else np.full(len(common), math.nan)
            d, d_low, d_high, paired = paired_mean_difference(ref, frame.loc[common, column].to_numpy(float),
                                                              n_boot, level, seed)
            rows.append({"model": name, "measure": column, "mean": mean, "ci_low": low, "ci_high": high,
                         "cases": n, "delta": d, "delta_ci_low": d_low, "delta_ci_high": d_high,
                         "paired_cases": paired})
    return pd.DataFrame(rows)


MODELS_NOTE = ("Against the lesion outline: mean over out-of-fold cases [95% CI]; Δ vs the first model on the cases "
               "both scored [95% paired CI]; — where a model has no patch attention.")


HEADLINE = ("attention_lesion_auc", "attention_topk_precision", "attention_pointing", "patch_prob_lesion_auc",
            "delta_lesion_k", "delta_non_lesion_k")  # what a terminal shows; the .md and .csv hold every measure


def models_rows(table: pd.DataFrame, case_auc: dict[str, str], measures: tuple[str, ...] | None = None) -> list[dict]:
    """One row per model for the printed table: its case AUC, then each measure (``measures``: only these) as
    mean [CI]; Δ vs the first model [CI]."""
    models = list(dict.fromkeys(table["model"]))
    rows = []
    for model in models:
        row = {"model": model, "case AUC": case_auc.get(model, "")}
        for r in table[table["model"] == model].itertuples(index=False):
            if measures is not None and r.measure not in measures:
                continue
            text = "—" if not r.cases else f"{r.mean:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]"
            if r.cases and model != models[0] and r.paired_cases:
                text += f"; Δ {r.delta:+.3f} [{r.delta_ci_low:+.3f}, {r.delta_ci_high:+.3f}]"
            row[shown_name(r.measure)] = text
        rows.append(row)
    return rows
