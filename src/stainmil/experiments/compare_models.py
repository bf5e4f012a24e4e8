"""Compare MIL architectures (and stain subsets) on one store: same folds, same seeds, one table.

Each *variant* is an architecture, optionally with a stain identity (``hierarchical:embedding``), crossed
with a stain set (``he`` or ``he+melan+sox10``; cases without any of a set's stains drop out of that
variant). Every variant cross-validates on the *same* fold files with the *same* seeds. Output
(``<runs_dir>/models_…/``)::

    splits/data_splits_fold_NN.npz   the folds every variant uses
    <variant>/seed_<s>/              a normal CV experiment folder per variant and seed (resumable)
    models.csv, models.md            one row per variant: pooled out-of-fold AUC, balanced accuracy, per-class
                                     recall, Brier (case-bootstrap 95% CIs); the paired ΔAUC against the first
                                     variant on their common cases (paired case bootstrap); parameters; s/epoch
    models_by_stains.md              with several stain sets: AUC [95% CI] per model (rows) and stain set (columns)
    models_lesion.csv, .md           with analysis.truth: does each model look where the pathologist looks — every
                                     measure of stainmil.analysis.lesion over the out-of-fold cases [CI], and its
                                     paired difference to the first variant
    models.html, models_roc.png      the table(s) and the ROC curves of every variant

Probabilities are averaged per case over seeds before pooling. Re-running with the same ``--out`` resumes:
finished folds are reused.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from stainmil.analysis.attention import run_lesion_measures
from stainmil.analysis.lesion import HEADLINE as LESION_HEADLINE
from stainmil.analysis.lesion import MODELS_NOTE as LESION_NOTE
from stainmil.analysis.lesion import models_rows as lesion_models_rows
from stainmil.analysis.lesion import models_table as lesion_models_table
from stainmil.classes import ClassScheme
from stainmil.config import Config
from stainmil.data.registration import reference_stain
from stainmil.errors import ConfigError, DataError
from stainmil.experiments.cv import per_case_probabilities, pooled_out_of_fold, run_cv, shared_folds
from stainmil.io import atomic_write, atomic_write_text, safe_name, save_figure, subplots
from stainmil.launch import Launch
from stainmil.locks import folder_lock
from stainmil.model.registry import STAIN_IDENTITIES, architecture, build_model, list_architectures
from stainmil.run_files import RunFiles, glob_runs
from stainmil.stats.metrics import paired_auc_difference
from stainmil.tables import render_table
from stainmil.train.checkpoint import load_checkpoint


def case_probabilities_of(per_case: pd.DataFrame) -> np.ndarray:
    """(N,) P(class 1) of a binary comparison, else (N, k) class probabilities."""
    columns = [c for c in per_case.columns if c.startswith("prob_") and c[5:].isdigit()]
    return per_case["prob_1"].to_numpy() if len(columns) == 2 else per_case[columns].to_numpy()


@dataclass(frozen=True)
class Variant:
    architecture: str
    stain_identity: str | None  # None: the config's own (a model that does not take it: 'embedding')
    stains: tuple[str, ...] | None  # None: the config's data.stains

    def configure(self, config: Config) -> Config:
        changes: dict[str, object] = {"model.architecture": self.architecture}
        if self.stain_identity:
            changes["model.stain_identity"] = self.stain_identity
        elif config.model.stain_identity not in architecture(self.architecture).stain_identities:
            changes["model.stain_identity"] = "embedding"  # the flat models' counterpart of 'specific', 'attention'
        if self.stains:
            changes["data.stains"] = list(self.stains)
        return config.with_overrides(changes)

    def name(self, config: Config) -> str:
        """``abmil``, ``hierarchical:embedding (he+sox10)``: the stain identity it trains with, when not none."""
        identity = self.configure(config).model.stain_identity
        name = self.architecture + (f":{identity}" if identity != "none" else "")
        return name + (f" ({'+'.join(self.stains)})" if self.stains else "")


# --preset NAME: (architectures, stain sets; None: every stain together and each stain alone)
PRESETS = {
    # the multi-stain field's models beside the hierarchy
    "multistain": (["hierarchical", "hierarchical:none", "abmil", "late_fusion", "mustang", "biox_cpath",
                    "cross_attention"], None),
}


def preset_models(name: str, stains: list[str]) -> tuple[list[str], list[str]]:
    """The architectures and stain sets of ``--preset name`` for a cohort of ``stains`` (data.stains)."""
    if name not in PRESETS:
        raise ConfigError(f"--preset '{name}' is unknown; choose one of {sorted(PRESETS)}.")
    models, sets = PRESETS[name]
    return list(models), list(sets) if sets is not None else ["+".join(stains), *stains]


def parse_variants(models: list[str], stain_sets: list[str] | None, known_stains: list[str],
                   reference: str = "he") -> list[Variant]:
    """``models``: ``name`` or ``name:stain_identity``; ``stain_sets``: ``he+sox10`` … (None: the config's);
    ``reference``: the registration's reference stain (``aligned`` needs it and another stain in every set)."""
    if not models:
        raise ConfigError("--models is empty; name at least one architecture (`stainmil models` lists them).")
    parsed = []
    for spec in models:
        name, _, identity = spec.strip().partition(":")
        if name not in list_architectures():
            raise ConfigError(f"--models: '{name}' is not an architecture; choose from {list_architectures()}.")
        takes = architecture(name).stain_identities
        if identity and identity not in takes:
            known = "" if identity in STAIN_IDENTITIES else f" (not a stain identity: {list(STAIN_IDENTITIES)})"
            raise ConfigError(f"--models: '{spec}' asks for stain identity '{identity}'{known}; {name} takes "
                              f"{list(takes)}.")
        parsed.append((name, identity or None))
    sets: list[tuple[str, ...] | None] = [None]
    if stain_sets:
        sets = []
        for spec in stain_sets:
            stains = tuple(s.strip() for s in spec.split("+") if s.strip())
            unknown = [s for s in stains if s not in known_stains]
            if not stains or unknown:
                raise ConfigError(f"--stain-sets: '{spec}' names stain(s) {unknown or '(none)'} not in data.stains "
                                  f"{known_stains}; join known stains with '+', e.g. he+sox10.")
            sets.append(stains)
    variants = [Variant(name, identity, stains) for stains in sets for name, identity in parsed]
    for v in variants:
        stains = list(v.stains or known_stains)
        if architecture(v.architecture).needs_registration and (reference not in stains or len(stains) < 2):
            raise ConfigError(f"--models {v.architecture} places other stains on the reference stain "
                              f"'{reference}', but the stain set {'+'.join(stains)} lacks it or another stain; "
                              f"give sets like {reference}+sox10.")
    return variants


def compare_models(config: Config, *, models: list[str], folds: int = 5, seeds: list[int] | None = None,
                   stain_sets: list[str] | None = None, out_dir: str | Path | None = None,
                   launch: Launch = Launch()) -> pd.DataFrame:
    """Cross-validate every variant on the same folds and seeds; return (and write) the comparison table."""
    if stain_sets:  # the stains as users write them: HE+SOX10 is he+sox10
        stain_sets = ["+".join(config.data.canonical_stain(s) or s.strip() for s in spec.split("+") if s.strip())
                      for spec in stain_sets]
    variants = parse_variants(models, stain_sets, config.data.stains, reference_stain(config))
    seeds = seeds or [config.train.seed]
    out = Path(out_dir) if out_dir else config.paths.runs_dir / datetime.now().strftime("models_%Y%m%d_%H%M%S")
    with folder_lock(out, "compare-models", log=launch.log):
        return _compare(config, variants, folds, seeds, out, launch)


def _compare(config: Config, variants: list, folds: int, seeds: list[int], out: Path, launch: Launch) -> pd.DataFrame:
    log = launch.log
    splits_dir = shared_folds(config, folds, 1, out, None)
    oof: dict[str, pd.DataFrame] = {}
    rows = []
    for variant in variants:
        frames, thresholds, seconds, dirs = [], [], [], []
        for seed in seeds:
            run_config = variant.configure(config).with_overrides({"train.seed": seed})
            log(f"[{variant.name(config)}] seed {seed}: cross-validating on the shared folds")
            result = run_cv(run_config, splits_dir=splits_dir, launch=launch,
                            out_dir=out / safe_name(variant.name(config)) / f"seed_{seed}")
            frames.append(pd.read_csv(result.out_dir / "oof_predictions.csv", dtype={"case": str}))
            thresholds += result.summary["threshold"].tolist()
            seconds += _seconds_per_epoch(result.out_dir)
            dirs.append(result.out_dir)
        frame = pd.concat(frames, ignore_index=True)
        oof[variant.name(config)] = frame
        pooled = pooled_out_of_fold(frame, float(np.median(thresholds)), variant.configure(config))
        row = {"model": variant.name(config), "architecture": variant.architecture,
               "stain_identity": variant.configure(config).model.stain_identity,
               "stains": "+".join(variant.configure(config).data.stains), "n_cases": pooled["n_cases"],
               "seeds": len(seeds)}
        for metric in config.data.classes.compared_metrics:
            lo, hi = pooled["ci95"][metric]
            row[metric], row[f"{metric}_ci95"] = round(pooled[metric], 3), f"[{lo:.3f}, {hi:.3f}]"
        row["parameters"] = _parameters(dirs[0], variant.configure(config))
        row["seconds_per_epoch"] = round(float(np.mean(seconds)), 3) if seconds else float("nan")
        rows.append(row)
    table = pd.DataFrame(rows)
    table = _paired_differences(table, oof, variants, config)
    atomic_write(out / "models.csv", lambda tmp: table.to_csv(tmp, index=False))
    metrics = config.data.classes.compared_metrics
    atomic_write_text(out / "models.md", models_markdown(table, folds, seeds, metrics))
    by_stains = auc_by_stain_set(table)
    if by_stains is not None:
        atomic_write_text(out / "models_by_stains.md", render_table(by_stains.to_dict("records"),
                                                                    fmt="markdown"))
    try:
        lesion = _lesion_comparison(config, variants, seeds, out, table, log)
    except (DataError, ConfigError) as exc:  # the comparison stands; only the lesion table is missing
        lesion = None
        log(f"the lesion table was not made ({exc}); fix analysis.truth and run the same command again (finished "
            "folds are reused).")
    roc = _roc_plot(oof, out / "models_roc.png", config.data.classes)
    atomic_write_text(out / "models.html", models_html(table, folds, seeds, roc, metrics, by_stains, lesion))
    log(f"model comparison in {out}")
    return table


def _lesion_comparison(config: Config, variants: list, seeds: list[int], out: Path, table: pd.DataFrame,
                       log) -> list[dict] | None:
    """With ``analysis.truth``: every variant's lesion measures on its out-of-fold cases (each fold's model on its
    test cases, averaged over seeds), models x measures with paired differences; None without truth."""
    if not config.analysis.truth:
        return None
    per_model = {}
    for variant in variants:
        name = variant.name(config)
        frames = []
        for seed in seeds:
            for fold in sorted((out / safe_name(name) / f"seed_{seed}" / "folds").glob("fold_*")):
                frame = run_lesion_measures(fold, "test")
                if frame is not None:
                    frames.append(frame)
        if frames:
            per_model[name] = pd.concat(frames, ignore_index=True).groupby("case", sort=False).mean(
                numeric_only=True).reset_index()
    if not per_model:
        return None
    lesion = lesion_models_table(per_model, config.eval.bootstrap, config.eval.ci, config.train.seed)
    atomic_write(out / "models_lesion.csv", lambda tmp: lesion.to_csv(tmp, index=False))
    case_auc = {r["model"]: f"{r['auc']:.3f} {r['auc_ci95']}" for r in table.to_dict("records") if "auc" in r}
    rows = lesion_models_rows(lesion, case_auc)
    atomic_write_text(out / "models_lesion.md", LESION_NOTE + "\n\n" + render_table(rows, fmt="markdown"))
    log("does each model look where the pathologist looks (every measure: models_lesion.md):\n"
        + render_table(lesion_models_rows(lesion, case_auc, LESION_HEADLINE)))
    return rows


def _paired_differences(table: pd.DataFrame, oof: dict[str, pd.DataFrame], variants: list[Variant],
                        config: Config) -> pd.DataFrame:
    reference = per_case_probabilities(oof[variants[0].name(config)])
    deltas = []
    for variant in variants:
        other = per_case_probabilities(oof[variant.name(config)])
        common = reference.index.intersection(other.index)                 # e.g. a stain subset drops cases
        labels = reference.loc[common, "label"].to_numpy()
        d = paired_auc_difference(labels, case_probabilities_of(reference.loc[common]),
                                  case_probabilities_of(other.loc[common]), config.eval.bootstrap, config.eval.ci,
                                  config.train.seed)
        deltas.append({"delta_auc": round(d["delta"], 3), "delta_auc_ci95": f"[{d['ci_low']:.3f}, {d['ci_high']:.3f}]",
                       "paired_cases": len(common)})
    return pd.concat([table, pd.DataFrame(deltas)], axis=1)


def _seconds_per_epoch(cv_dir: Path) -> list[float]:
    values = []
    for history in sorted((cv_dir / "folds").glob("fold_*/history.csv")):
        values += pd.read_csv(history)["seconds"].tolist()
    return values


def _parameters(cv_dir: Path, config: Config) -> int:
    """Trainable parameters of the variant's model, built for the store's feature dimension."""

    first = sorted(RunFiles.of(fold).best for fold in glob_runs(cv_dir / "folds"))[0]
    model = build_model(int(load_checkpoint(first)["in_dim"]), config.model, config.data.stains)
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def models_markdown(table: pd.DataFrame, folds: int, seeds: list[int], metrics: list[str]) -> str:
    first = table["model"].iloc[0]
    header = ["model", "cases"] + [f"{m} [95% CI]" for m in metrics] + [f"ΔAUC vs {first} [95% CI]",
                                                                          "parameters", "s/epoch"]
    lines = [f"{folds}-fold CV, seeds {', '.join(map(str, seeds))}; pooled out-of-fold, case-bootstrap CIs",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in table.iterrows():
        cells = [r["model"], r["n_cases"]] + [f"{r[m]:.3f} {r[f'{m}_ci95']}" for m in metrics]
        cells += [f"{r['delta_auc']:+.3f} {r['delta_auc_ci95']}", f"{r['parameters']:,}", r["seconds_per_epoch"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def auc_by_stain_set(table: pd.DataFrame) -> pd.DataFrame | None:
    """AUC [95% CI] with one row per model (architecture and stain identity) and one column per stain set, in
    the order they were asked for; None when the comparison has a single stain set (or the table no stain sets)."""
    if "stains" not in table:
        return None
    sets = list(dict.fromkeys(table["stains"]))
    if len(sets) < 2:
        return None
    model = table["architecture"] + np.where(table["stain_identity"] == "none", "", ":" + table["stain_identity"])
    cells = table.assign(model=model, cell=[f"{a:.3f} {ci}" for a, ci in zip(table["auc"], table["auc_ci95"])])
    wide = cells.pivot(index="model", columns="stains", values="cell").reindex(
        index=list(dict.fromkeys(model)), columns=sets).fillna("—")
    return wide.rename(columns=lambda s: f"AUC, {s}").reset_index()


def _roc_plot(oof: dict[str, pd.DataFrame], path: Path, classes: ClassScheme) -> Path:
    """One pooled out-of-fold ROC curve per model (k classes: the last class, e.g. high-grade, vs the rest)."""
    fig, ax = subplots(figsize=(6, 6))
    for name, frame in oof.items():
        per_case = per_case_probabilities(frame)
        y, p = per_case["label"].to_numpy(), case_probabilities_of(per_case)
        if p.ndim == 2:
            y, p = (y == p.shape[1] - 1).astype(int), p[:, -1]
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, p):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    positive = classes.positive if classes.binary else f"{classes.positive} vs the rest (legend: its AUC)"
    ax.set(xlabel="false positive rate", ylabel=f"recall of {positive}", title="pooled out-of-fold ROC")
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def _html_table(rows: list[dict] | None, title: str, table_id: str, note: str = "") -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row.values()) + "</tr>"
                   for row in rows)
    note = f"<p>{html.escape(note)}</p>" if note else ""
    return (f'<h2>{html.escape(title)}</h2>{note}<table id="{table_id}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>\n")


def models_html(table: pd.DataFrame, folds: int, seeds: list[int], roc: Path, metrics: list[str],
                by_stains: pd.DataFrame | None = None, lesion: list[dict] | None = None) -> str:
    image = base64.b64encode(roc.read_bytes()).decode()
    first = html.escape(str(table["model"].iloc[0]))
    columns = ["model", "n_cases"] + list(metrics) + ["delta_auc", "parameters", "seconds_per_epoch"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for _, r in table.iterrows():
        cells = [html.escape(str(r["model"])), str(r["n_cases"])]
        cells += [f"{r[m]:.3f}<br><small>{r[f'{m}_ci95']}</small>" for m in metrics]
        cells += [f"{r['delta_auc']:+.3f}<br><small>{r['delta_auc_ci95']}</small>", f"{r['parameters']:,}",
                  str(r["seconds_per_epoch"])]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    meta = html.escape(json.dumps({"folds": folds, "seeds": seeds}))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>stainmil model comparison</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
small{{color:#666}}</style></head><body>
<h1>Model comparison</h1>
<p>{folds}-fold cross-validation on the same folds and seeds ({html.escape(', '.join(map(str, seeds)))}); pooled
out-of-fold metrics with case-bootstrap 95% CIs; ΔAUC is each model's AUC minus {first}'s on their common cases
(paired case bootstrap). Brier: lower is better.</p>
<table id="models"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>
{_html_table(None if by_stains is None else by_stains.to_dict("records"), "By stain set", "by-stains")}
{_html_table(lesion, "Does the model look where the pathologist looks?", "lesion", LESION_NOTE)}<h2>ROC</h2>
<img alt="ROC curves of every model" src="data:image/png;base64,{image}" width="540">
<script type="application/json" id="meta">{meta}</script>
</body></html>
"""
