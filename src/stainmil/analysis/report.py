"""``stainmil report``: one self-contained ``report.html`` per run (images inlined, opens offline).

Built from the run folder's files (metrics.json, figures, attention/…); every string that comes
from a file name or a CSV is HTML-escaped by Jinja2's autoescaping.
"""

from __future__ import annotations

import base64
import json
import math
import re
from datetime import datetime
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from stainmil.analysis.analyze import AnalysisResult, report_cases, summary_text, write_analysis
from stainmil.config import load_config
from stainmil.errors import TrainingError
from stainmil.io import atomic_write_text

METRIC_NAMES = [("benign_recall", "benign recall"), ("high_grade_recall", "high-grade recall"),
                ("balanced_accuracy", "balanced accuracy"), ("auc", "ROC AUC"), ("f1", "F1"),
                ("brier", "Brier score (lower is better)"), ("ece", "expected calibration error")]
CASE_COLUMNS = [("case", "case"), ("split", "split"), ("label", "true"), ("pred", "pred"), ("prob", "p(high-grade)"),
                ("abs_error", "|p − y|"), ("n_patches", "patches"), ("n_slices", "slices"),
                ("top5pct_share", "top-5% share"), ("patch_entropy_normalised", "patch H/log n"),
                ("slice_entropy_normalised", "slice H/log n"), ("stain_entropy_normalised", "stain H/log n"),
                ("attention_lesion_auc", "attn–lesion AUC"), ("delta_top_k", "ΔP top-k"),
                ("delta_random_k", "ΔP random-k")]


def anchors(cases: list[str]) -> dict[str, str]:
    """HTML ids for case sections: unique (row number) and CSS-safe, with the readable case id after."""
    return {case: f"{i}-{re.sub(r'[^A-Za-z0-9_-]', '_', case)}" for i, case in enumerate(cases)}


def data_uri(path: str | Path) -> str:
    mime = "image/jpeg" if Path(path).suffix.lower() in (".jpg", ".jpeg") else "image/png"
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("stainmil.analysis", "templates"),
                      autoescape=select_autoescape(["html", "j2"], default=True))
    env.globals["fmt"] = fmt
    return env


def build_report(run_dir: str | Path, analysis: AnalysisResult | None = None, split_name: str = "test") -> Path:
    """Write ``<run>/report.html`` (running ``analyze`` first if its outputs are missing)."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").is_file():
        raise TrainingError(f"{run_dir} has no metrics.json; run `stainmil evaluate {run_dir}` first.")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if analysis is None:
        analysis = write_analysis(run_dir, metrics.get("evaluated_split", split_name))
    config = load_config(run_dir / "config.yaml")
    names = config.data.class_names
    tables = analysis.tables
    cases = tables.cases
    split = tables.summary["split"]
    warnings = []
    if str(metrics.get("weights")) == "random":
        warnings.append("The backbone had RANDOM weights (ImageNet weights were not available): features are not "
                        "ImageNet features, and this run is a pipeline check, not a result.")
    sections = set(report_cases(cases, config.analysis.max_cases_in_report))
    anchor = anchors(list(cases["case"]))
    case_rows = []
    for _, row in cases.iterrows():
        values = {c: (row[c] if c in row and not (isinstance(row[c], float) and math.isnan(row[c])) else None)
                  for c, _ in CASE_COLUMNS}
        case_rows.append({"case": row["case"], "anchor": anchor[row["case"]], "split": row["split"], "cells": values,
                          "wrong": row["label"] >= 0 and row["pred"] != row["label"],
                          "has_section": row["case"] in sections})
    case_sections = [_case_section(case, anchor[case], tables, analysis, names) for case in report_cases(
        cases, config.analysis.max_cases_in_report)]
    run_figures = [(title, data_uri(run_dir / name)) for title, name in (
        ("training curves", "curves.png"), ("confusion matrix", "confusion_matrix.png"), ("ROC curve", "roc_curve.png"),
        ("reliability diagram", "reliability.png"))
        if (run_dir / name).is_file()]
    attention_figures = [(title, data_uri(analysis.figures[key])) for key, title in (
        ("distribution", "effective attention per case"), ("concentration", "attention concentration vs error"),
        ("slices_misclassified", "slice attention of misclassified cases"),
        ("along_slices", "effective attention along the most attended slices")) if key in analysis.figures]
    html = _environment().get_template("report.html.j2").render(
        run_name=run_dir.name, generated=datetime.now().strftime("%Y-%m-%d %H:%M"), split=split,
        n_cases=len(cases), backbone=f"{config.features.backbone} ({config.features.weights})", warnings=warnings,
        threshold=metrics["threshold"], threshold_rule=metrics["threshold_rule"], best_epoch=metrics["best_epoch"],
        epochs_run=metrics["epochs_run"], metric_names=METRIC_NAMES,
        metric_tables=[(n, metrics["splits"][n]) for n in ("test", "val") if n in metrics["splits"]],
        run_figures=run_figures, attention_figures=attention_figures, summary_text=summary_text(tables.summary),
        case_columns=CASE_COLUMNS, case_rows=case_rows, n_sections=len(case_sections), case_sections=case_sections,
    )
    return atomic_write_text(run_dir / "report.html", html)


def _case_section(case: str, anchor: str, tables, analysis: AnalysisResult, names: list[str]) -> dict:
    row = tables.cases[tables.cases["case"] == case].iloc[0]
    slices = tables.slices[tables.slices["case"] == case]
    stains = slices.drop_duplicates("stain")
    heatmaps = []
    for key, files in analysis.heatmaps.items():
        if key[0] == case:
            for value, path in files.items():
                what = "effective attention" if value == "relative_attention" else "patch-alone prediction"
                heatmaps.append({"src": data_uri(path), "title": f"{key[1]} slice {key[2]} — {what}"})
    lesion = row.get("attention_lesion_auc") if "attention_lesion_auc" in row else None
    return {
        "case": case, "anchor": anchor, "prob": float(row["prob"]), "n_patches": int(row["n_patches"]),
        "n_slices": int(row["n_slices"]), "top5": float(row["top5pct_share"]),
        "true_name": names[int(row["label"])] if row["label"] >= 0 else "unknown",
        "pred_name": names[int(row["pred"])],
        "lesion_auc": None if lesion is None or pd.isna(lesion) else float(lesion),
        "stains": [{"name": s, "weight": float(w)} for s, w in zip(stains["stain"], stains["stain_weight"])],
        "slices": [{"stain": s["stain"], "slice": s["slice"], "weight": float(s["slice_weight"]),
                    "n": int(s["n_patches"])} for _, s in slices.iterrows()],
        "heatmaps": heatmaps,
        "grid": data_uri(analysis.grids[case]) if case in analysis.grids else None,
    }
