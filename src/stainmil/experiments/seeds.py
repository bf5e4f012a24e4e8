"""Seed spread: the whole cross-validation repeated with K training seeds on the same folds.

A difference between two settings means something only when it is larger than what changing the seed
alone does. ``stainmil cv --seeds K`` writes (``<runs_dir>/cv_seeds_…/``)::

    splits/data_splits_fold_NN.npz   the folds, shared by every seed
    seed_1/ … seed_K/                a normal CV experiment per seed (train.seed = base + k - 1; resumable)
    seeds.csv                        one row per seed: pooled out-of-fold metrics and AUC SD over folds
    seeds_report.txt, seeds.json     mean ± SD across seeds of the pooled metrics, next to the mean
                                     across-fold SD (the two kinds of spread side by side)
"""

from __future__ import annotations

import copy
from datetime import datetime
from pathlib import Path

import pandas as pd

from stainmil.config import Config
from stainmil.errors import ConfigError
from stainmil.experiments.cv import run_cv, shared_folds
from stainmil.io import atomic_write, atomic_write_json, atomic_write_text


def run_cv_seeds(config: Config, seeds: int, folds: int = 5, repeats: int = 1, splits_dir: str | Path | None = None,
                 launcher: str = "local", out_dir: str | Path | None = None, log=print) -> tuple[pd.DataFrame, Path]:
    """Cross-validate with ``seeds`` training seeds on the same folds; return (and write) one row per seed, and
    the experiment folder."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}.")
    out = Path(out_dir) if out_dir else config.runs_dir / datetime.now().strftime("cv_seeds_%Y%m%d_%H%M%S")
    folds_dir = shared_folds(config, folds, repeats, out, splits_dir)
    per_fold = config.data.classes.summary_metrics
    seed_metrics = (*per_fold, "brier", "ece")
    rows = []
    for k in range(seeds):
        seeded = copy.deepcopy(config)
        seeded.train.seed = config.train.seed + k
        log(f"seed {k + 1}/{seeds} (train.seed={seeded.train.seed})")
        result = run_cv(seeded, splits_dir=folds_dir, launcher=launcher, out_dir=out / f"seed_{k + 1}", log=log)
        pooled, over = result.metrics["pooled_out_of_fold"], result.metrics["over_folds"]
        rows.append({"seed": seeded.train.seed, **{m: pooled[m] for m in seed_metrics},
                     **{f"{m}_sd_over_folds": over[m]["sd"] for m in per_fold}})
    table = pd.DataFrame(rows)
    summary = {m: {"mean_over_seeds": float(table[m].mean()),
                   "sd_over_seeds": float(table[m].std(ddof=1)) if len(table) > 1 else 0.0,
                   **({"mean_sd_over_folds": float(table[f"{m}_sd_over_folds"].mean())}
                      if f"{m}_sd_over_folds" in table else {})} for m in seed_metrics}
    atomic_write(out / "seeds.csv", lambda tmp: table.to_csv(tmp, index=False))
    atomic_write_json(out / "seeds.json", {"seeds": len(table), "folds": len(list(folds_dir.glob("*.npz"))),
                                           "metrics": summary})
    atomic_write_text(out / "seeds_report.txt", seeds_report_text(table, summary))
    log(f"seed spread in {out}")
    return table, out


def seeds_report_text(table: pd.DataFrame, summary: dict) -> str:
    lines = [f"stainmil seed spread — {len(table)} training seeds, the same folds", "",
             table.round(3).to_string(index=False), "",
             "pooled out-of-fold metric: mean ± SD over seeds   |   mean SD over folds (one seed)"]
    for metric, s in summary.items():
        folds = f"{s['mean_sd_over_folds']:.3f}" if "mean_sd_over_folds" in s else "-"
        lines.append(f"  {metric:<18} {s['mean_over_seeds']:.3f} ± {s['sd_over_seeds']:.3f}   |   {folds}")
    lines += ["", "A difference between two settings smaller than the SD over seeds is within seed noise."]
    return "\n".join(lines) + "\n"
