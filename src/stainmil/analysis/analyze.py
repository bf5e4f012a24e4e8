"""``stainmil analyze``: every attention table and figure of a run, under ``<run>/attention/``::

    patches.csv  slices.csv  cases.csv  summary.json  summary.txt
    stain_contribution.csv  stain_summary.csv    every case predicted again without each stain
    stain_weights.csv                            mean stain attention per stain and class
    effective_attention_distribution.png  concentration_vs_error.png  slice_attention_misclassified.png
    attention_along_slices.png
    patches/case<id>.jpg                         top and bottom patches per case
    heatmaps/case<id>_<stain>_slice<id>_attention.jpg / _patchprob.jpg / _slice.jpg (the viewer's image)
    colocated.csv  colocated_cases.csv           after `stainmil register`: IHC attention on the H&E patches
    lesion_cases.csv  lesion_stains.csv  lesion_slices.csv   with analysis.truth: attention vs the lesion outline
    lesion_summary.csv  lesion_summary_by_stain.csv           (stainmil.analysis.lesion), mean over cases [CI]

The same code writes the analysis of a prediction set (new, unlabelled cases) under its own folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from stainmil.analysis import figures
from stainmil.analysis.attention import AttentionTables, analyze_tables
from stainmil.analysis.colocated import colocated_tables
from stainmil.analysis.heatmaps import SliceView, draw_heatmap, slice_view
from stainmil.analysis.lesion import summary_lines as lesion_summary_lines
from stainmil.config import Config
from stainmil.data.registration import read_registrations, reference_stain
from stainmil.io import atomic_write, atomic_write_json, atomic_write_text, safe_name, save_image
from stainmil.progress import progress_bar
from stainmil.run_files import RunFiles

safe = safe_name


@dataclass
class AnalysisResult:
    out_dir: Path
    tables: AttentionTables
    heatmaps: dict[tuple[str, str, str], dict[str, Path]]  # (case, stain, slice) -> {attention, patchprob}
    grids: dict[str, Path]
    figures: dict[str, Path]
    views: dict[tuple[str, str, str], tuple[Path, SliceView]] = field(default_factory=dict)  # viewer images
    colocated: pd.DataFrame = field(default_factory=pd.DataFrame)  # IHC attention on the H&E patches (register)


def report_cases(cases: pd.DataFrame, limit: int) -> list[str]:
    """Cases that get their own section: misclassified first, then by |p - y| descending; unlabelled cases
    (a prediction set) by P(high-grade), highest first."""
    wrong = (cases["label"] >= 0) & (cases["pred"] != cases["label"])
    ordered = cases.assign(_wrong=wrong, _error=cases["abs_error"].fillna(-1), _prob=cases["prob"]).sort_values(
        ["_wrong", "_error", "_prob"], ascending=[False, False, False])
    return list(ordered["case"].head(limit))


def summary_text(summary: dict) -> str:
    lines = [f"stainmil attention analysis — {summary['split']}, {summary['n_cases']} cases",
             *([f"{summary['architecture']} has no patch attention: every attention number below is a uniform share "
                "(1/n), not the model's choice; only the patch-alone predictions are drawn."]
               if not summary.get("patch_attention", True) else []),
             f"normalisation: {summary['normalisation']}",
             f"mean normalised attention entropy: patch {summary['patch_entropy_normalised_mean']:.3f}, "
             f"slice {summary['slice_entropy_normalised_mean']:.3f}, "
             f"stain {summary['stain_entropy_normalised_mean']:.3f}"
             " (1 = uniform, 0 = all on one)",
             f"mean share of effective attention in the top 5% of patches: {summary['top5pct_share_mean']:.3f}"]
    if "lesion" in summary:
        lesion = summary["lesion"]
        lines.append(f"against the lesion outline ({lesion['truth']}; {lesion['slides']} slides, "
                     f"{lesion['carried_slides']} carried from the reference stain; k={lesion['k']}), mean over "
                     "cases [95% CI]:")
        table = pd.DataFrame([{"measure": m, **v} for m, v in lesion["measures"].items()])
        lines += lesion_summary_lines(table, summary.get("patch_attention", True), summary["architecture"])
        lines += [f"  note: {note}" for note in lesion["notes"]]
    if "deletion_k" in summary:
        lines.append(f"deletion check (k={summary['deletion_k']}): mean |dP| removing the top-k attended patches "
                     f"{summary['deletion_delta_top_k_mean']:.3f} vs k random patches "
                     f"{summary['deletion_delta_random_k_mean']:.3f}")
    if summary.get("stain_contribution"):
        lines.append(f"each stain removed in turn (threshold {summary['threshold']:.3f}):")
        lines += [f"  {line}" for line in summary["stain_contribution"]]
    return "\n".join(lines) + "\n"


def write_analysis(run_dir: str | Path, split_name: str = "test", top_k: int | None = None,
                   bags=None, settings: list[str] | None = None) -> AnalysisResult:
    """Analyse the cases of a run's ``split_name`` into ``<run>/attention/`` (``settings``: ``--set analysis.…``)."""
    tables, config, _ = analyze_tables(run_dir, split_name, top_k, bags=bags, settings=settings)
    return write_tables(RunFiles.of(run_dir).attention, tables, config)


def write_analyses(runs: list[Path], split_name: str = "test", log=print) -> list[Path]:
    """:func:`write_analysis` of each run in turn (the folds of a CV, the runs of a comparison)."""
    for run in runs:
        log(f"analysing {run}")
        write_analysis(run, split_name)
    return runs


def write_tables(out: Path, tables: AttentionTables, config: Config) -> AnalysisResult:
    """Write every table and figure of ``tables`` under ``out`` (labels -1: the label-based figures are left out)."""
    for name, frame in (("patches", tables.patches), ("slices", tables.slices), ("cases", tables.cases),
                        ("stain_contribution", tables.stains), ("stain_summary", tables.stain_summary),
                        ("stain_weights", tables.stain_weights)):
        atomic_write(out / f"{name}.csv", lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
    atomic_write_json(out / "summary.json", tables.summary)
    atomic_write_text(out / "summary.txt", summary_text(tables.summary))
    made = {
        "distribution": figures.effective_attention_distribution(
            tables.patches, tables.cases, out / "effective_attention_distribution.png", config.data.classes),
        "along_slices": figures.attention_along_slices(
            tables.patches, figures.top_slices(tables.slices, config.analysis.top_slices),
            out / "attention_along_slices.png"),
    }
    if (tables.cases["label"] >= 0).any():
        made["concentration"] = figures.concentration_vs_error(tables.cases, out / "concentration_vs_error.png",
                                                               config.data.classes)
    misclassified = figures.slice_attention_misclassified(tables.slices, tables.cases,
                                                          out / "slice_attention_misclassified.png")
    if misclassified:
        made["slices_misclassified"] = misclassified
    for stale in out.glob("lesion_*.csv") if not tables.lesion else []:  # from an earlier analysis with truth
        stale.unlink()
    for name, frame in tables.lesion.items():  # case, stain, slice, summary, summary_by_stain
        file = f"lesion_{name}.csv" if name.startswith("summary") else f"lesion_{name}s.csv"
        atomic_write(out / file, lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
    registrations = read_registrations(config)
    per_patch = pd.DataFrame()
    if registrations is not None:  # `stainmil register` ran: attention where the stains meet
        per_patch, per_case = colocated_tables(tables.patches, registrations, reference_stain(config))
        for name, frame in (("colocated", per_patch), ("colocated_cases", per_case)):
            if len(frame):
                atomic_write(out / f"{name}.csv", lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
    heatmaps, grids, views = _case_images(tables, config, out)
    return AnalysisResult(out, tables, heatmaps, grids, made, views, per_patch)


def _case_images(tables: AttentionTables, config: Config, out: Path):
    a = config.analysis
    chosen_cases = report_cases(tables.cases, a.max_cases_in_report)
    wrong = set(tables.cases.loc[(tables.cases["label"] >= 0) & (tables.cases["pred"] != tables.cases["label"]),
                                 "case"])
    top = figures.top_slices(tables.slices, a.top_slices)
    keys = {tuple(k) for k in top[["case", "stain", "slice"]].to_numpy()}
    for case in chosen_cases:  # the most attended slice of every stain of a reported case
        part = tables.slices[tables.slices["case"] == case]
        for _, best in part.sort_values("slice_weight", ascending=False).drop_duplicates("stain").iterrows():
            keys.add((best["case"], best["stain"], best["slice"]))
    keys |= {tuple(k) for k in tables.slices.loc[tables.slices["case"].isin(wrong), ["case", "stain", "slice"]]
             .to_numpy()}
    heatmaps: dict = {}
    views: dict = {}
    grouped = dict(tuple(tables.patches.groupby(["case", "stain", "slice"], sort=False)))
    with progress_bar("analyze: heatmaps", total=len(keys) + len(chosen_cases)) as advance:
        for key in sorted(keys, key=lambda k: tuple(map(str, k))):
            part = grouped[key]
            case, stain, slice_id = key
            stem = f"case{safe(case)}_{safe(stain)}_slice{safe(slice_id)}"
            view = slice_view(part, a.slice_images, a.thumbnail_px)
            views[key] = (save_image(view.image, out / "heatmaps" / f"{stem}_slice.jpg"), view)
            heatmaps[key] = {
                value: draw_heatmap(part, a.slice_images, out / "heatmaps" / f"{stem}_{suffix}.jpg", value=value,
                                    title=f"case {case} · {stain} · slice {slice_id} · {what}", view=view)
                for value, suffix, what in (("relative_attention", "attention", "effective attention"),
                                            ("patch_prob", "patchprob", "patch-alone prediction"))
                if value != "relative_attention" or tables.summary.get("patch_attention", True)
            }
            advance()
        grids = {}
        shown = config.data.classes.probability_label.replace("P(", "p(")
        for case in chosen_cases:
            part = tables.patches[tables.patches["case"] == case]
            row = tables.cases[tables.cases["case"] == case].iloc[0]
            truth = f"true {row['label']}" if row["label"] >= 0 else "unlabelled"
            grids[case] = figures.patch_grid(part, a.grid_patches, out / "patches" / f"case{safe(case)}.jpg",
                                             f"case {case}: {truth}, {shown} {row['prob']:.2f}")
            advance()
    return heatmaps, grids, views
