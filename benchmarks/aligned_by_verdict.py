"""`aligned` vs `hierarchical` by registration verdict, from a `stainmil compare-models` folder.

    stainmil register --config serial/slides.yaml
    stainmil compare-models --config serial/slides.yaml --models hierarchical,aligned --out cmp
    python benchmarks/aligned_by_verdict.py cmp serial/slides.yaml

Prints, for the cases whose every IHC slice registered ``aligned`` and for those with a ``doubtful`` or ``failed``
pair or no registered IHC slice at all (where the aligned model has no places for that slice), each model's
out-of-fold Brier score, log-loss and AUC (per-case probabilities averaged over seeds, as compare-models pools
them) — the question being whether the aligned model is worse anywhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from stainmil.config import load_config
from stainmil.data.registration import read_registrations
from stainmil.experiments.cv import per_case_probabilities


def main() -> None:
    folder, config = Path(sys.argv[1]), load_config(sys.argv[2])
    registrations = read_registrations(config)
    if registrations is None:
        sys.exit(f"no registrations for {sys.argv[2]}: run `stainmil register` first")
    all_aligned = registrations.groupby("case")["verdict"].agg(lambda v: bool((v == "aligned").all()))
    models = {}
    for variant in sorted(p for p in folder.iterdir() if p.is_dir() and list(p.glob("seed_*/oof_predictions.csv"))):
        frames = [pd.read_csv(f, dtype={"case": str}) for f in sorted(variant.glob("seed_*/oof_predictions.csv"))]
        models[variant.name] = per_case_probabilities(pd.concat(frames, ignore_index=True))
    if not models:
        sys.exit(f"no seed_*/oof_predictions.csv under {folder}: is it a finished `stainmil compare-models` folder?")
    shared = sorted(set.intersection(*(set(per_case.index) for per_case in models.values())))
    print("| cases | n | " + " | ".join(f"{m} Brier | {m} log-loss | {m} AUC" for m in models) + " |")
    print("|---|---|" + "---|" * 3 * len(models))
    for name, keep in (("every IHC slice aligned", True), ("a pair doubtful or failed", False), ("all", None)):
        cells = []
        cases = [c for c in shared if keep is None or all_aligned.get(c, False) == keep]  # cases every model has
        for per_case in models.values():
            y, p = per_case.loc[cases, "label"].to_numpy(), per_case.loc[cases, "prob_1"].to_numpy()
            clipped = np.clip(p, 1e-6, 1 - 1e-6)
            loss = float(-np.mean(y * np.log(clipped) + (1 - y) * np.log(1 - clipped)))
            auc = roc_auc_score(y, p) if len(set(y)) == 2 else float("nan")
            cells += [f"{np.mean((p - y) ** 2):.3f}", f"{loss:.3f}", f"{auc:.3f}"]
        print(f"| {name} | {len(cases)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
