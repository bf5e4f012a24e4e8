"""Seed spread: the whole cross-validation repeated with K training seeds on the same folds.

A difference between two settings means something only when it is larger than what changing the seed
alone does. ``stainmil cv --seeds 0,1,2`` writes (``<runs_dir>/cv_seeds_…/``)::

    splits/data_splits_fold_NN.npz   the folds, shared by every seed
    seed_1/ … seed_K/                a normal CV experiment per seed, the k-th of --seeds in seed_k (resumable)
    seeds.csv                        one row per seed: pooled out-of-fold metrics and AUC SD over folds
    seeds_report.txt, seeds.json     mean ± SD across seeds of the pooled metrics, next to the mean
                                     across-fold SD (the two kinds of spread side by side)
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pandas as pd

from stainmil.config import Config, load_config
from stainmil.errors import ConfigError
from stainmil.experiments.cv import run_cv, shared_folds
from stainmil.io import atomic_write, atomic_write_json, atomic_write_text
from stainmil.launch import Launch


def run_cv_seeds(config: Config, *, seeds: list[int], folds: int = 5, repeats: int = 1,
                 splits_dir: str | Path | None = None, out_dir: str | Path | None = None,
                 launch: Launch = Launch()) -> tuple[pd.DataFrame, Path]:
    """Cross-validate once per training seed in ``seeds`` on the same folds (``workers`` folds at once); return
    (and write) one row per seed, and the experiment folder."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must name at least one seed, each once, e.g. 0,1,2; got {seeds}.")
    out = Path(out_dir) if out_dir else config.paths.runs_dir / datetime.now().strftime("cv_seeds_%Y%m%d_%H%M%S")
    folds_dir = shared_folds(config, folds, repeats, out, splits_dir)
    per_fold = config.data.classes.summary_metrics
    seed_metrics = (*per_fold, "brier", "ece")
    rows = []
    for k, seed in enumerate(seeds):
        seeded = config.with_overrides({"train.seed": seed})
        launch.log(f"seed {k + 1}/{len(seeds)} (train.seed={seed})")
        seed_dir = out / f"seed_{k + 1}"
        if (seed_dir / "config.yaml").is_file() and (was := load_config(seed_dir / "config.yaml").train.seed) != seed:
            raise ConfigError(f"{seed_dir} was trained with train.seed={was}, not {seed}; resume {out} with the "
                              "--seeds it was started with, in the same order.")
        result = run_cv(seeded, splits_dir=folds_dir, out_dir=seed_dir, launch=launch)
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
    launch.log(f"seed spread in {out}")
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
