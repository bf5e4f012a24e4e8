"""``stainmil report``: one self-contained ``report.html`` per run or prediction set (images, data and
script inlined; opens offline).

Each mapped slice is an interactive viewer: the slice image with the patches drawn over it on the
fixed heatmap scales (attention or patch-alone probability), zoom and pan, an opacity slider and a
tooltip with the patch's numbers. Colours are computed here, with the same scales as the JPEG heatmaps.

Built from the run folder's files (metrics.json, figures, attention/…); every string that comes
from a file name or a CSV is HTML-escaped by Jinja2's autoescaping.
"""

from __future__ import annotations

import base64
import math
import re
from datetime import datetime
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from stainmil.analysis.analyze import AnalysisResult, report_cases, summary_text, write_analysis
from stainmil.analysis.heatmaps import colour_legends, hex_colour, patch_colours
from stainmil.analysis.lesion import shown_name as lesion_shown_name
from stainmil.classes import ClassScheme, read_metrics
from stainmil.config import Config, load_config
from stainmil.errors import TrainingError
from stainmil.io import atomic_write_text

CASE_COLUMNS = [("case", "case"), ("split", "split"), ("label", "true"), ("pred", "pred"), ("prob", "p(shown class)"),
                ("abs_error", "|p − y|"), ("n_patches", "patches"), ("n_slices", "slices"),
                ("top5pct_share", "top-5% share"), ("patch_entropy_normalised", "patch H/log n"),
                ("slice_entropy_normalised", "slice H/log n"), ("stain_entropy_normalised", "stain H/log n"),
                ("attention_lesion_auc", "attn–lesion AUC"), ("attention_topk_precision", "top-k in lesion"),
                ("attention_pointing", "top-1 in lesion"), ("delta_top_k", "ΔP top-k"),
                ("delta_random_k", "ΔP random-k"), ("delta_lesion_k", "ΔP lesion-k"),
                ("delta_non_lesion_k", "ΔP non-lesion-k")]


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


def build_report(run_dir: str | Path, analysis: AnalysisResult | None = None, split_name: str = "test",
                 settings: list[str] | None = None) -> Path:
    """Write ``<run>/report.html`` (running ``analyze`` first if its outputs are missing; ``settings``: its
    ``--set analysis.…``)."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").is_file():
        raise TrainingError(f"{run_dir} has no metrics.json; run `stainmil evaluate {run_dir}` first.")
    config = load_config(run_dir / "config.yaml")
    metrics = read_metrics(run_dir / "metrics.json", config.data.classes)
    if analysis is None:
        analysis = write_analysis(run_dir, metrics.get("evaluated_split", split_name), settings=settings)
    run_figures = [(title, data_uri(run_dir / name)) for title, name in (
        ("training curves", "curves.png"), ("confusion matrix", "confusion_matrix.png"), ("ROC curve", "roc_curve.png"),
        ("reliability diagram", "reliability.png"))
        if (run_dir / name).is_file()]
    return render_report(run_dir / "report.html", analysis, config, title=f"stainmil report — {run_dir.name}",
                         threshold=metrics["threshold"], threshold_rule=metrics["threshold_rule"],
                         weights=str(metrics.get("weights")), metrics=metrics, run_figures=run_figures)


def build_prediction_report(out_dir: str | Path, analysis: AnalysisResult, config: Config, threshold: float,
                            threshold_rule: str, checkpoint: str | Path) -> Path:
    """Write ``<out_dir>/report.html`` for a prediction set: no labels, so no metrics — the rest as for a run."""
    out_dir = Path(out_dir)
    return render_report(out_dir / "report.html", analysis, config, title=f"stainmil predictions — {out_dir.name}",
                         threshold=threshold, threshold_rule=threshold_rule, weights=config.features.weights,
                         source=f"model {checkpoint}")


def render_report(path: Path, analysis: AnalysisResult, config: Config, *, title: str, threshold: float,
                  threshold_rule: str, weights: str, metrics: dict | None = None,
                  run_figures: list[tuple[str, str]] = (), source: str = "") -> Path:
    """The page itself, for a run (``metrics`` given) or a prediction set (no labels, no metrics)."""
    classes = config.data.classes
    names = list(classes.names)
    prob_label = classes.probability_label
    tables = analysis.tables
    cases = tables.cases
    warnings = []
    if weights == "random":
        warnings.append("The backbone had RANDOM weights (ImageNet weights were not available): features are not "
                        "ImageNet features, and this run is a pipeline check, not a result.")
    chosen = report_cases(cases, config.analysis.max_cases_in_report)
    anchor = anchors(list(cases["case"]))
    delta = tables.stains.set_index("case") if not tables.stains.empty else None
    stain_columns = [(f"delta_{s}", f"ΔP without {s}") for s in config.data.stains
                     if delta is not None and delta[f"delta_{s}"].notna().any()]
    case_columns = [c for c in CASE_COLUMNS if (metrics is not None or c[0] not in ("label", "abs_error", "split"))
                    and (c[0] in cases.columns or c[0] in ("label", "pred", "split"))]
    case_columns = [(c, prob_label.replace("P(", "p(") if c == "prob" else
                     "1 − p(true)" if c == "abs_error" and not classes.binary else label) for c, label in case_columns]
    case_columns += stain_columns
    case_rows = []
    for _, row in cases.iterrows():
        values = {c: _cell(row, c) for c, _ in CASE_COLUMNS}
        values.update({c: _cell(delta.loc[row["case"]], c) for c, _ in stain_columns})
        case_rows.append({"case": row["case"], "anchor": anchor[row["case"]], "split": row["split"], "cells": values,
                          "wrong": row["label"] >= 0 and row["pred"] != row["label"],
                          "has_section": row["case"] in chosen})
    viewers = _viewer_data(analysis, set(chosen))
    case_sections = [_case_section(case, anchor[case], tables, analysis, names, viewers) for case in chosen]
    attention_figures = [(title, data_uri(analysis.figures[key])) for key, title in (
        ("distribution", "effective attention per case"), ("concentration", "attention concentration vs error"),
        ("slices_misclassified", "slice attention of misclassified cases"),
        ("along_slices", "effective attention along the most attended slices")) if key in analysis.figures]
    splits = (metrics or {}).get("splits", {})
    html = _environment().get_template("report.html.j2").render(
        title=title, generated=datetime.now().strftime("%Y-%m-%d %H:%M"), folder=path.parent,
        split=tables.summary["split"],
        n_cases=len(cases), backbone=f"{config.features.backbone} ({config.features.weights})", warnings=warnings,
        labelled=metrics is not None, source=source, threshold=threshold, threshold_rule=threshold_rule,
        best_epoch=(metrics or {}).get("best_epoch"), epochs_run=(metrics or {}).get("epochs_run"),
        metric_names=metric_rows(classes),
        metric_tables=[(n, splits[n]) for n in ("test", "val") if n in splits],
        run_figures=list(run_figures), attention_figures=attention_figures, summary_text=summary_text(tables.summary),
        case_columns=case_columns, case_rows=case_rows, n_sections=len(case_sections), case_sections=case_sections,
        stain_summary=tables.stain_summary.to_dict("records"), stain_weights=tables.stain_weights.to_dict("records"),
        stain_sentences=tables.summary.get(
            "stain_contribution", []), scales=colour_legends(prob_label), binary=classes.binary, prob_label=prob_label,
        class_labels=classes.readable,
        patch_attention=tables.summary.get("patch_attention", True),
        architecture=tables.summary.get("architecture", config.model.architecture),
        lesion=tables.summary.get("lesion"), **_lesion_rows(tables.lesion),
    )
    return atomic_write_text(path, html)


def _lesion_rows(lesion: dict[str, pd.DataFrame]) -> dict:
    """The report's lesion table: one row per measure, a column for all stains and one per stain."""
    if "summary" not in lesion:
        return {"lesion_rows": [], "lesion_stains": []}
    by_stain = lesion["summary_by_stain"]
    stains = list(dict.fromkeys(by_stain["stain"])) if len(by_stain) else []

    def cell(row) -> str:
        return "—" if not row["cases"] else f"{row['mean']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"

    rows = []
    for row in lesion["summary"].to_dict("records"):
        cells = [cell(row)]
        for stain in stains:
            found = by_stain[(by_stain["stain"] == stain) & (by_stain["measure"] == row["measure"])]
            cells.append(cell(found.iloc[0]) if len(found) else "—")
        rows.append({"name": lesion_shown_name(row["measure"]), "cells": cells})
    return {"lesion_rows": rows, "lesion_stains": ["all stains", *stains]}


METRIC_LABELS = {"balanced_accuracy": "balanced accuracy", "auc": "ROC AUC", "f1": "F1", "f1_macro": "F1 (macro)",
                 "brier": "Brier score (lower is better)", "ece": "expected calibration error"}
MULTICLASS_LABELS = {"auc": "ROC AUC (macro, one-vs-rest)", "brier": "Brier score (multi-class; lower is better)",
                     "ece": "top-label calibration error"}


def metric_rows(classes: ClassScheme) -> list[tuple[str, str]]:
    """(key, label) of the report's metric table: the class scheme's metrics, a recall per class."""
    keys = classes.shown_metrics if classes.binary else [
        *classes.recall_metrics, "balanced_accuracy", "auc", "f1_macro", *[f"auc_{c}" for c in classes.names],
        "brier", "ece"]
    labels = METRIC_LABELS if classes.binary else {**METRIC_LABELS, **MULTICLASS_LABELS}
    return [(key, labels.get(key, classes.metric_label(key))) for key in keys]


def _cell(row, column: str):
    value = row[column] if column in row else None
    return None if isinstance(value, float) and math.isnan(value) else value


def _viewer_data(analysis: AnalysisResult, cases: set[str]) -> dict[tuple, dict]:
    """Per mapped slice of ``cases`` (those with a section): the slice image and its patches, each [x, y,
    relative attention, patch P, attention colour, probability colour, patch id] in image pixels — what the
    report's viewer draws."""
    patches = analysis.tables.patches
    grouped = dict(tuple(patches.groupby(["case", "stain", "slice"], sort=False)))
    viewers = {}
    for key, (image_path, view) in analysis.views.items():
        if key[0] not in cases:
            continue
        part = grouped[key]
        att = [hex_colour(c) for c in patch_colours(part["relative_attention"].to_numpy(), "relative_attention")]
        prob = [hex_colour(c) for c in patch_colours(part["patch_prob"].to_numpy(), "patch_prob")]
        rows = [[round(float(x), 1), round(float(y), 1), round(float(a), 4), round(float(p), 4), ca, cp, str(pid)]
                for x, y, a, p, ca, cp, pid in zip(view.xs, view.ys, part["relative_attention"], part["patch_prob"],
                                                   att, prob, part["patch"])]
        viewers[key] = {"src": data_uri(image_path), "width": int(view.image.shape[1]),
                        "height": int(view.image.shape[0]), "side": round(view.side, 2), "source": view.source,
                        "patches": rows, "link": f"{key[0]}/{key[1]}/{key[2]}"}
    viewers.update(_registered_viewers(analysis, viewers))
    return viewers


def _registered_viewers(analysis: AnalysisResult, viewers: dict[tuple, dict]) -> dict[tuple, dict]:
    """Per H&E slice with registered IHC slices (``stainmil register``): one more viewer per IHC stain — the H&E
    image, each H&E patch coloured by the IHC patches that land on it — linked to the H&E viewer (they pan and
    zoom together). Keyed (case, reference stain, slice, IHC stain)."""
    table = analysis.colocated
    out: dict[tuple, dict] = {}
    if table.empty:
        return out
    for (case, stain, slice_id), part in table.groupby(["case", "stain", "slice"], sort=False):
        key = (str(case), str(stain), str(slice_id))
        if key not in viewers:
            continue
        base, view = viewers[key], analysis.views[key][1]
        xy = {str(p[6]): (p[0], p[1]) for p in base["patches"]}
        for column in [c for c in part.columns if c.endswith("_patches")]:
            ihc = column.removesuffix("_patches")
            landed = part[part[column] > 0]
            if landed.empty:  # that stain's slice of this case was not aligned (only other cases' were)
                continue
            att, prob = landed[f"{ihc}_relative_attention"].to_numpy(), landed[f"{ihc}_patch_prob"].to_numpy()
            colours_a = [hex_colour(c) for c in patch_colours(att, "relative_attention")]
            colours_p = [hex_colour(c) for c in patch_colours(prob, "patch_prob")]
            rows = [[*xy[str(pid)], round(float(a), 4), round(float(p), 4), ca, cp, f"{pid} ({int(n)} {ihc})"]
                    for pid, a, p, ca, cp, n in zip(landed["patch"], att, prob, colours_a, colours_p, landed[column])
                    if str(pid) in xy]
            out[(*key, ihc)] = {**base, "patches": rows, "title_suffix": f"{ihc} attention mapped onto it",
                                "source": f"{ihc} registered onto {stain} ({view.source})"}
    return out


def _case_section(case: str, anchor: str, tables, analysis: AnalysisResult, names: list[str],
                  viewers: dict[tuple, dict]) -> dict:
    row = tables.cases[tables.cases["case"] == case].iloc[0]
    slices = tables.slices[tables.slices["case"] == case]
    stains = slices.drop_duplicates("stain")
    views = [{"id": f"view-{anchor}-{i}", "title": f"{key[1]} slice {key[2]}"
              + (f": {viewers[key]['title_suffix']}" if len(key) > 3 else ""), **viewers[key]}
             for i, key in enumerate(sorted((k for k in viewers if k[0] == case), key=lambda k: (k[1:3], len(k))))]
    lesion = row.get("attention_lesion_auc") if "attention_lesion_auc" in row else None
    without = []
    if not tables.stains.empty:
        contribution = tables.stains[tables.stains["case"] == case].iloc[0]
        without = [{"stain": s, "prob": float(contribution[f"prob_without_{s}"]),
                    "delta": float(contribution[f"delta_{s}"]), "flips": bool(contribution[f"flips_{s}"])}
                   for s in tables.stain_summary["stain"].unique()
                   if f"prob_without_{s}" in contribution and not pd.isna(contribution[f"prob_without_{s}"])]
    return {
        "case": case, "anchor": anchor, "prob": float(row["prob"]), "n_patches": int(row["n_patches"]),
        "n_slices": int(row["n_slices"]), "top5": float(row["top5pct_share"]),
        "true_name": names[int(row["label"])] if row["label"] >= 0 else None,
        "pred_name": names[int(row["pred"])],
        "lesion_auc": None if lesion is None or pd.isna(lesion) else float(lesion),
        "stains": [{"name": s, "weight": float(w)} for s, w in zip(stains["stain"], stains["stain_weight"])],
        "slices": [{"stain": s["stain"], "slice": s["slice"], "weight": float(s["slice_weight"]),
                    "n": int(s["n_patches"])} for _, s in slices.iterrows()],
        "views": views, "without": without,
        "grid": data_uri(analysis.grids[case]) if case in analysis.grids else None,
    }
