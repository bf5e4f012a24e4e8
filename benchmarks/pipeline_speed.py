"""Measured, not asserted: extraction speed, epoch time from the feature store, and the old way.

    python benchmarks/pipeline_speed.py [--out demo_out/bench] [--preset demo] [--weights random]

Prints, for the synthetic demo cohort on this machine:
  * extraction patches/s (DenseNet121, fresh store);
  * seconds per training epoch from the feature store (mean of 3 epochs);
  * seconds per training epoch the old way: the same frozen backbone run on every sampled patch image
    every epoch (same cases, same per-slice cap), then the same head forward/backward;
and their ratio. Writes the figures to <out>/pipeline_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from stainmil.data.bags import CohortBags
from stainmil.data.cohort import build_index, case_labels, write_index
from stainmil.data.splits import make_splits
from stainmil.data.synth import PRESETS, write_cohort
from stainmil.features.backbones import build_backbone
from stainmil.features.extract import PatchImages, extract_features
from stainmil.features.store import load_features
from stainmil.model.hierarchical import HierarchicalMIL
from stainmil.pipeline import demo_config
from stainmil.train.losses import class_weights, cross_entropy, weighted_mean


def epoch(model, optimizer, bags, cases, cap, rng, weights, images_of=None, backbone=None) -> float:
    """One training epoch (batch of 1 case, as the old default); returns seconds.

    With ``images_of``/``backbone`` the patch features come from decoding and forwarding the images.
    """
    start = time.perf_counter()
    model.train()
    for i in rng.permutation(len(cases)):
        batch = bags.batch([cases[i]], None, cap, rng)
        if backbone is not None:
            loader = torch.utils.data.DataLoader(images_of(batch.patch_rows), batch_size=32, num_workers=0)
            with torch.inference_mode():
                feats = torch.cat([backbone(x.contiguous(memory_format=torch.channels_last)) for x in loader])
            batch.features = feats.clone()
        loss = weighted_mean(cross_entropy(model(batch), batch.labels, weights), batch.labels, weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out/bench")
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    parser.add_argument("--weights", default="random")
    parser.add_argument("--image-size", type=int, default=0,
                        help="backbone input side (0 = patch size; the old pipeline resized to 224)")
    parser.add_argument("--old-cases", type=int, default=0,
                        help="time the old way on this many training cases and scale to the epoch (0 = all)")
    args = parser.parse_args()
    os.environ.setdefault("STAINMIL_PROGRESS", "0")
    out = Path(args.out).resolve()
    cohort = out / "cohort"
    if not (cohort / "labels.csv").is_file():
        write_cohort(cohort, PRESETS[args.preset])
    size = args.image_size or PRESETS[args.preset].patch_size
    config = demo_config(out, cohort, [f"features.weights={args.weights}", f"features.image_size={size}",
                                       f"features.store_dir={out / f'store-{size}px'}"])
    result = build_index(config)
    write_index(result, config)
    manifest = result.manifest
    shutil.rmtree(config.store_dir, ignore_errors=True)
    backbone = build_backbone(config.features)
    summary = extract_features(config, manifest, backbone=backbone)

    bags = CohortBags(manifest, load_features(config.store_dir, manifest), config.data.stains)
    split = make_splits(case_labels(manifest), config.split)[0]
    torch.manual_seed(0)
    model = HierarchicalMIL(bags.feature_dim, config.model)
    model.set_feature_statistics(*bags.feature_statistics(split.train))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    weights = class_weights(config.train, np.array([bags.case_label(c) for c in split.train]), 2)
    cap = config.data.per_slice_cap
    rng = np.random.default_rng(0)
    epoch(model, optimizer, bags, split.train, cap, rng, weights)  # warm-up
    cached = [epoch(model, optimizer, bags, split.train, cap, rng, weights) for _ in range(3)]

    f = config.features
    paths = manifest["path"].to_numpy()

    def images_of(rows):
        return PatchImages(list(paths[rows]), f.image_size, f.mean, f.std)

    frozen = backbone.module.to(memory_format=torch.channels_last)
    old_cases = split.train[:args.old_cases] if args.old_cases else split.train

    def n_patches(cases):
        return sum(min(len(bags.slice_patches[s]), cap or 10**9) for c in cases for s in bags.case_slices[c])

    patches_per_epoch = n_patches(split.train)
    # scaled by patch count when only some cases are timed
    old = [epoch(model, optimizer, bags, old_cases, cap, rng, weights, images_of, frozen)
           * patches_per_epoch / n_patches(old_cases)]
    figures = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__}, threads "
                   f"{torch.get_num_threads()}",
        "cohort": f"{args.preset}: {bags.labels.size} cases, {len(manifest)} patches, {f.image_size} px",
        "train_cases": len(split.train),
        "patches_per_epoch": int(patches_per_epoch),
        "extraction_patches_per_s": round(summary.patches_per_second, 1),
        "epoch_s_feature_store": round(float(np.mean(cached)), 3),
        "epoch_s_old_way": round(float(np.mean(old)), 2),
        "old_way_timed_on_cases": len(old_cases),
        "speedup": round(float(np.mean(old) / np.mean(cached)), 1),
    }
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    (out / "pipeline_speed.json").write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
