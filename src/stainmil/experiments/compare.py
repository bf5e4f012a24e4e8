"""Compare patch encoders on one cohort: same folds, same seeds, one table.

For each encoder: extract its feature store (skipped when it exists; extraction img/s measured when it
runs), then cross-validate the head on the *same* fold files. Output (``<runs_dir>/encoders_…/``)::

    splits/data_splits_fold_NN.npz   the folds every encoder uses
    <encoder>/                       a normal CV experiment folder per encoder (resumable)
    encoders.csv, encoders.md        one row per encoder: dimension, weights, extraction img/s, pooled
                                     out-of-fold metrics with case-bootstrap 95% CIs, AUC mean ± SD over folds

Re-running with the same ``--out`` resumes: finished stores and folds are reused.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pandas as pd

from stainmil.classes import ClassScheme
from stainmil.config import Config
from stainmil.data.cohort import load_manifest
from stainmil.errors import ConfigError
from stainmil.experiments.cv import run_cv, shared_folds
from stainmil.features.encoders import ENCODERS, check_image_size
from stainmil.features.extract import extract_features
from stainmil.io import atomic_write, atomic_write_text, safe_name
from stainmil.launch import Launch


def compare_encoders(config: Config, *, backbones: list[str], folds: int = 5, out_dir: str | Path | None = None,
                     launch: Launch = Launch()) -> pd.DataFrame:
    """Extract + cross-validate each encoder in ``backbones`` on the same folds; return (and write) the table."""
    if not backbones:
        raise ConfigError("--backbones is empty; name at least one encoder (`stainmil backbones` lists them).")
    for name in backbones:  # fail before any work, not after the first encoder's hour
        if name not in ENCODERS and not name.startswith("file:"):
            raise ConfigError(f"encoder '{name}' is not registered; choose from {sorted(ENCODERS)}.")
        if name in ENCODERS:
            check_image_size(ENCODERS[name], config.features.image_size)
    out = Path(out_dir) if out_dir else config.paths.runs_dir / datetime.now().strftime("encoders_%Y%m%d_%H%M%S")
    manifest = load_manifest(config)
    splits_dir = shared_folds(config, folds, 1, out, None)
    rows = []
    for name in backbones:
        # one store per encoder, named after it
        encoder_config = config.with_overrides({"features.backbone": name, "features.store_dir": ""})
        launch.log(f"[{name}] extracting features into {encoder_config.paths.store}")
        summary = extract_features(encoder_config, manifest)
        speed = round(summary.patches_per_second, 1) if summary.patches_written else float("nan")
        launch.log(f"[{name}] cross-validating on the shared folds")
        result = run_cv(encoder_config, splits_dir=splits_dir, out_dir=out / safe_name(name), launch=launch)
        pooled, over = result.metrics["pooled_out_of_fold"], result.metrics["over_folds"]
        spec = ENCODERS.get(name)
        row = {"encoder": name, "dim": spec.dim if spec else None, "weights": encoder_config.features.weights,
               "extraction_img_s": speed}
        for metric in encoder_metrics(config.data.classes):
            lo, hi = pooled["ci95"][metric]
            row[metric] = round(pooled[metric], 3)
            row[f"{metric}_ci95"] = f"[{lo:.3f}, {hi:.3f}]"
        row["auc_over_folds"] = f"{over['auc']['mean']:.3f} ± {over['auc']['sd']:.3f}"
        rows.append(row)
    table = pd.DataFrame(rows)
    atomic_write(out / "encoders.csv", lambda tmp: table.to_csv(tmp, index=False))
    atomic_write_text(out / "encoders.md", comparison_markdown(table, len(list(splits_dir.glob("*.npz"))),
                                                                   encoder_metrics(config.data.classes)))
    launch.log(f"encoder comparison in {out}")
    return table


def encoder_metrics(classes: ClassScheme) -> list[str]:
    """The comparison's columns: the class scheme's compared metrics but the Brier score."""
    return [m for m in classes.compared_metrics if m != "brier"]


def comparison_markdown(table: pd.DataFrame, folds: int, metrics: list[str]) -> str:
    header = ["encoder", "dim", "weights", "extraction img/s"] + [f"{m} [95% CI]" for m in metrics] + \
        [f"AUC over {folds} folds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in table.iterrows():
        cells = [r["encoder"], r["dim"], r["weights"], r["extraction_img_s"]]
        cells += [f"{r[m]:.3f} {r[f'{m}_ci95']}" for m in metrics] + [r["auc_over_folds"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
