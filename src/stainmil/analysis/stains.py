"""What each stain contributes: every case predicted again with one stain removed.

The model pools over the stains a case has, so removing one is a real question it can answer ("what
would it say without SOX10?"), not a zeroed input. Per case and stain::

    prob_without_<stain>   P(high-grade) with every slice of that stain removed (NaN: the case lacks it,
                           or it is the case's only stain)
    delta_<stain>          prob_without - prob  (negative: the stain pushed towards high-grade)
    flips_<stain>          the decision at the run's threshold changes

With k > 2 classes, ``prob`` is the probability of the class predicted with every stain, ``prob_without`` that
of the same class without the stain, ``pred_without_<stain>`` the most probable class without it, and a flip
is a change of the most probable class.

``stain_summary`` counts, per stain and class, how many cases change side and how much the
probability moves, plus the ROC AUC of the whole set with that stain missing (labelled sets only).
Probabilities pass through the run's temperature when it calibrated, as in ``predictions.csv``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from stainmil.bags.cohort import CohortBags
from stainmil.classes import ClassScheme
from stainmil.stats.metrics import binary_metrics
from stainmil.train.run import calibrated


def stain_contribution(model: nn.Module, bags: CohortBags, cases: list[str], device: torch.device,
                       threshold: float, classes: ClassScheme, temperature: float = 1.0) -> pd.DataFrame:
    """One row per case: prob (all stains) and, per stain of ``bags.stains``, the columns above."""
    rows = []
    model.eval().to(device)
    with torch.inference_mode():
        for case in cases:
            batch = bags.batch([case])
            patch_stain = batch.group_stain[batch.slice_group[batch.patch_slice]].numpy()  # (P,)
            present = sorted(set(patch_stain.tolist()))
            full = _probabilities(model, batch, device, temperature)                       # (C,)
            shown = classes.shown_class(full)  # P(class 1) of two, or P(the predicted class)
            prob = float(full[shown])
            row = {"case": case, "label": int(batch.labels[0]), "prob": prob,
                   "pred": int(classes.decide(full[None], threshold)[0]),
                   "stains": ",".join(bags.stains[s] for s in present)}
            for index, stain in enumerate(bags.stains):
                without = np.full(len(full), np.nan)
                if index in present and len(present) > 1:
                    without = _probabilities(model, batch.subset(patch_stain != index), device, temperature)
                row[f"prob_without_{stain}"] = float(without[shown])
                row[f"delta_{stain}"] = float(without[shown]) - prob
                if classes.binary:
                    row[f"flips_{stain}"] = bool(not np.isnan(without[1])
                                                 and (without[1] >= threshold) != (prob >= threshold))
                else:
                    row[f"pred_without_{stain}"] = int(without.argmax()) if not np.isnan(without).any() else -1
                    row[f"flips_{stain}"] = bool(row[f"pred_without_{stain}"] not in (-1, shown))
            rows.append(row)
    return pd.DataFrame(rows)


def _probabilities(model: nn.Module, batch, device: torch.device, temperature: float) -> np.ndarray:
    probabilities = model(batch.to(device)).probabilities.cpu().numpy()   # (1, C)
    return calibrated(probabilities, temperature)[0]


def stain_summary(contribution: pd.DataFrame, stains: list[str], classes: ClassScheme,
                  threshold: float) -> pd.DataFrame:
    """Per stain x class (true class when labelled, else the predicted one): cases with the stain, mean and
    median ΔP, cases whose decision flips, cases on the other class's side of the threshold with and
    without the stain; plus the set's AUC with and without the stain (labelled sets)."""
    labelled = bool((contribution["label"] >= 0).all())
    by = contribution["label"] if labelled else contribution["pred"]
    rows = []
    for stain in stains:
        delta = contribution[f"delta_{stain}"]
        auc_without = auc_full = float("nan")
        if classes.binary and labelled and contribution["label"].nunique() == 2:
            filled = contribution[f"prob_without_{stain}"].fillna(contribution["prob"])  # cases without it: as is
            y = contribution["label"].to_numpy()
            auc_full = binary_metrics(y, contribution["prob"].to_numpy(), 0.5, classes)["auc"]
            auc_without = binary_metrics(y, filled.to_numpy(), 0.5, classes)["auc"]
        for k, name in enumerate(classes.names):
            part = delta[(by == k) & delta.notna()]
            flips = contribution.loc[part.index, f"flips_{stain}"]
            if classes.binary:
                with_all = contribution.loc[part.index, "prob"] >= threshold
                without = contribution.loc[part.index, f"prob_without_{stain}"] >= threshold
                other_side = (lambda above: ~above) if k == 1 else (lambda above: above)
                away_with, away_without = int(other_side(with_all).sum()), int(other_side(without).sum())
            else:  # cases not predicted as their class, with every stain and without this one
                away_with = int((contribution.loc[part.index, "pred"] != k).sum())
                away_without = int((contribution.loc[part.index, f"pred_without_{stain}"] != k).sum())
            rows.append({"stain": stain, "class": name, "class_is": "true" if labelled else "predicted",
                         "cases": int((by == k).sum()), "cases_with_stain": len(part),
                         "mean_delta": float(part.mean()) if len(part) else float("nan"),
                         "median_delta": float(part.median()) if len(part) else float("nan"),
                         "flipped": int(flips.sum()),
                         "other_side_with": away_with,
                         "other_side_without": away_without,
                         "auc_all_stains": auc_full, "auc_without_stain": auc_without})
    return pd.DataFrame(rows)


def stain_sentences(summary: pd.DataFrame, classes: ClassScheme) -> list[str]:
    """'without sox10: 4 of 6 true high_grade cases are below the threshold (1 with it; mean ΔP -0.310); …'."""
    lines = []
    for stain, part in summary.groupby("stain", sort=False):
        pieces = []
        for _, row in part.iterrows():
            if not row["cases_with_stain"]:
                continue
            if classes.binary:
                side = "below" if classes.names.index(row["class"]) == 1 else "above"
                where = f"{side} the threshold"
            else:
                where = f"not predicted {row['class']}"
            pieces.append(f"{row['other_side_without']} of {row['cases_with_stain']} {row['class_is']} "
                          f"{row['class']} cases are {where} ({row['other_side_with']} with it; "
                          f"mean ΔP {row['mean_delta']:+.3f})")
        if not pieces:
            continue
        auc = part.iloc[0]
        tail = (f"; AUC {auc['auc_all_stains']:.3f} → {auc['auc_without_stain']:.3f}"
                if not np.isnan(auc["auc_without_stain"]) else "")
        lines.append(f"without {stain}: " + "; ".join(pieces) + tail)
    return lines
