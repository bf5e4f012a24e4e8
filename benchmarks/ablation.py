"""Ablation of the team's next-step methods: baseline vs each method, several seeds, one table.

    python benchmarks/ablation.py [--out ablation_out] [--signal 0.12] [--seeds 3] [--max-epochs 20]

Renders the `real-shape` synthetic preset (~86 cases, 1/3 benign, 1-15 slices per stain) at a harder
signal level, extracts features once (random DenseNet121 unless --weights says otherwise), then trains
every variant with every seed on the same 60/20/20 split (split seed = run seed) through the normal
trainer, evaluates, and analyses attention (including the test AUC with each stain removed from every
case, "auc without <stain>"). Writes <out>/ablation_runs.csv (one row per run) and
<out>/ablation.md (mean ± SD per variant), and prints the table.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

VARIANTS: dict[str, list[str]] = {
    "baseline (tanh)": [],
    "gated attention": ["model.attention=gated"],
    "multihead attention": ["model.attention=multihead"],
    "transformer attention": ["model.attention=transformer"],
    "elastic net (l2 0.01)": ["model.reg.elastic.l2=0.01"],
    "entropy (0.1, normalised)": ["model.reg.entropy.weight=0.1"],
    "adaptive weight decay": ["train.weight_decay_mode=adaptive", "train.weight_decay=0.001"],
    "focal loss": ["train.loss=focal"],
    "balanced sampler": ["train.sampler=balanced"],
    "patch dropout 0.3": ["train.patch_dropout=0.3"],
    "top-k masking (k 10)": ["train.topk_mask_k=10"],
    "sub-cases x2": ["data.subcases=2"],
    "stain dropout 0.5": ["train.stain_dropout=0.5"],
}
STAIN_METRICS = ["auc_without_he", "auc_without_melan", "auc_without_sox10"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="ablation_out")
    parser.add_argument("--signal", type=float, default=0.12)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-epochs", type=int, default=20)
    parser.add_argument("--weights", default="random")
    parser.add_argument("--variants", default="", help="comma-separated subset of variant names")
    args = parser.parse_args()
    os.environ.setdefault("STAINMIL_PROGRESS", "0")

    from stainmil.analysis.attention import analyze_tables
    from stainmil.config import load_config
    from stainmil.data.cohort import build_index, case_labels, write_index
    from stainmil.data.splits import make_splits
    from stainmil.data.synth import PRESETS, write_cohort
    from stainmil.evaluate.evaluation import evaluate_run
    from stainmil.features.extract import extract_features
    from stainmil.train.run import load_cohort
    from stainmil.train.trainer import train

    out = Path(args.out).resolve()
    cohort = out / "cohort"
    if not (cohort / "labels.csv").is_file():
        import dataclasses

        write_cohort(cohort, dataclasses.replace(PRESETS["real-shape"], signal=args.signal))
    base = [f"output_dir={out / 'work'}", f"data.patches_dir={cohort / 'patches'}",
            f"data.labels_csv={cohort / 'labels.csv'}", f"features.weights={args.weights}",
            f"features.image_size={PRESETS['real-shape'].patch_size}", f"train.max_epochs={args.max_epochs}",
            "eval.bootstrap=200"]
    config = load_config(None, base)
    if not config.paths.manifest.is_file():
        write_index(build_index(config), config)
    import pandas as _pd

    manifest = _pd.read_parquet(config.paths.manifest)
    started = time.perf_counter()
    extract_features(config, manifest)
    print(f"cohort: {manifest['case'].nunique()} cases, {len(manifest)} patches; extraction "
          f"{time.perf_counter() - started:.0f} s", flush=True)

    chosen = [v for v in VARIANTS if not args.variants or v in args.variants.split(",")]
    rows_file = out / "ablation_runs.csv"
    done = pd.read_csv(rows_file) if rows_file.is_file() else pd.DataFrame()
    rows = done.to_dict("records")
    bags = None
    for seed in range(args.seeds):
        split = make_splits(case_labels(manifest), load_config(None, base + [f"split.seed={seed}"]).split)[0]
        for name in chosen:
            if any(r["variant"] == name and r["seed"] == seed for r in rows):
                continue
            run_config = load_config(None, base + VARIANTS[name] + [f"train.seed={seed}",
                                                                    f"train.runs_dir={out / 'runs'}"])
            if bags is None:
                bags, _ = load_cohort(run_config, split)
            t0 = time.perf_counter()
            result = train(run_config, split=split)
            evaluation = evaluate_run(result.run_dir, bags=bags)
            tables, _, _ = analyze_tables(result.run_dir, "test", bags=bags)
            test = evaluation.metrics["splits"]["test"]
            s = tables.summary
            rows.append({"variant": name, "seed": seed, "recall_benign": test["recall_benign"],
                         "recall_high_grade": test["recall_high_grade"], "auc": test["auc"],
                         "balanced_accuracy": test["balanced_accuracy"],
                         "entropy_patch": s["patch_entropy_normalised_mean"],
                         "entropy_slice": s["slice_entropy_normalised_mean"],
                         "entropy_stain": s["stain_entropy_normalised_mean"],
                         "attention_lesion_auc": s.get("attention_lesion_auc_mean", np.nan),
                         **{f"auc_without_{r['stain']}": r["auc_without_stain"]
                            for r in tables.stain_summary.drop_duplicates("stain").to_dict("records")},
                         "epochs": result.epochs_run, "seconds": round(time.perf_counter() - t0, 1),
                         "run": result.run_dir.name})
            pd.DataFrame(rows).to_csv(rows_file, index=False)
            print(f"{name:<28} seed {seed}: AUC {test['auc']:.3f}, benign recall {test['recall_benign']:.2f}, "
                  f"{result.epochs_run} epochs, {time.perf_counter() - t0:.0f} s", flush=True)
    table = summarise(pd.DataFrame(rows))
    (out / "ablation.md").write_text(table)
    print(table)


def summarise(runs: pd.DataFrame) -> str:
    metrics = ["recall_benign", "recall_high_grade", "auc", "entropy_patch", "entropy_slice", "entropy_stain",
               "attention_lesion_auc"] + [m for m in STAIN_METRICS if m in runs and runs[m].notna().any()]
    lines = ["| variant | seeds | " + " | ".join(m.replace("_", " ") for m in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for name in dict.fromkeys(runs["variant"]):
        part = runs[runs["variant"] == name]
        cells = [f"{part[m].mean():.2f} ± {part[m].std(ddof=1) if len(part) > 1 else 0:.2f}" for m in metrics]
        lines.append(f"| {name} | {len(part)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
