"""Real-size serial sections through tile, extract and register: seconds, patches and peak memory per stage, and
the registration's landmark error in µm.

    python benchmarks/wsi_scale.py WORK [--section-mm 8] [--mpp 0.5] [--cases 2] [--skip extract]

Writes ``--cases`` cases of H&E/Melan-A/SOX10 sections (``stainmil synth serial --out WORK/cohort --section-mm N``:
tiled pyramidal TIFFs streamed tile by tile, files named ``C001_HE_S0.tiff``) once, then runs each stage as its own
``stainmil`` process on the cohort's ``slides.yaml`` (random DenseNet121 weights), its peak RSS read from the
kernel's accounting of that process (``os.wait4``). Registration: landmark error of every IHC slice onto its H&E
slice (median / p90 µm over all landmarks), seconds per pair, and one pair cut from two blocks (case 1's H&E,
case 2's SOX10), which must come out ``failed``. Prints a markdown table (docs/performance.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd


def run(args: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS MB, output tail) of one process."""
    started = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "STAINMIL_PROGRESS": "0"})
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        sys.exit(f"{' '.join(args)} failed:\n{output[-3000:]}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--section-mm", type=float, default=8.0)
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--skip", default="", help="comma-separated stages to skip: tile, extract, register")
    parser.add_argument("--set", action="append", default=[], dest="changes",
                        help="KEY=VALUE config change for every stage (e.g. register.refine=false: the coarse "
                             "stages alone), repeatable")
    options = parser.parse_args()
    stainmil = str(Path(sys.executable).with_name("stainmil"))
    cohort = options.work.resolve() / f"serial_{options.section_mm:g}mm"
    skip = set(filter(None, options.skip.split(",")))
    rows = []
    side = int(round(options.section_mm * 1000 / options.mpp))
    seconds, rss, _ = run([stainmil, "synth", "serial", "--out", str(cohort), "--section-mm", str(options.section_mm),
                           "--mpp", str(options.mpp), "--cases", str(options.cases)])
    slides = 3 * options.cases
    rows.append(("synth (write slides; 0 s when written before)", f"{seconds:.0f}", f"{slides} slides of {side:,} px",
                 f"{rss:.0f}"))
    changes = ["features.weights=random", *options.changes]
    config = [f"--config={cohort / 'slides.yaml'}", *[arg for change in changes for arg in ("--set", change)]]
    from stainmil.config import load_config
    from stainmil.data.registration import read_registrations

    cfg = load_config(cohort / "slides.yaml", changes)
    for stage in ("tile", "extract", "register"):
        if stage in skip:
            continue
        seconds, rss, output = run([stainmil, stage, *config])
        detail = ""
        if stage == "tile":
            patches = len(pd.read_csv(Path(cfg.tile.out_dir) / "tiles.csv"))
            detail = f"{patches:,} patches ({cfg.tile.patch_size} px at {cfg.tile.mpp} µm/px)"
        elif stage == "register":
            detail = f"{2 * options.cases} pairs"
        rows.append((stage, f"{seconds:.0f}", detail, f"{rss:.0f}"))
    print(f"# {options.cases} cases x 3 stains, {options.section_mm:g} mm sections at {options.mpp} µm/px "
          f"({side:,} px square), {os.cpu_count()} cores\n")
    print("| stage | s | what | peak RSS MB |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if "register" in skip:
        return
    from stainmil.data.register_cohort import register_slides
    from stainmil.data.serial_wsi import landmark_errors

    registrations = read_registrations(cfg)
    errors = landmark_errors(registrations)
    print("\n| pairs | slices | landmarks | median error µm | p90 µm | s per pair (mean / max) |\n"
          "|---|---|---|---|---|---|")
    for name, part in [("all", errors)] + list(errors.groupby("verdict")):
        chosen = registrations if name == "all" else registrations[registrations["verdict"] == name]
        print(f"| {name} | {len(chosen)} | {len(part)} | {part['error_um'].median():.1f} | "
              f"{np.percentile(part['error_um'], 90):.1f} | {chosen['seconds'].mean():.1f} / "
              f"{chosen['seconds'].max():.1f} |")
    print("\n| case | stain | verdict | landmarks | median µm | p90 µm | windows agreeing | s | reason |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for (case, stain), part in errors.groupby(["case", "stain"]):
        row = registrations[(registrations["case"] == case) & (registrations["stain"] == stain)].iloc[0]
        windows = "-" if pd.isna(row.get("refine_windows")) or pd.isna(row.get("refine_accepted")) else \
            f"{int(row['refine_accepted'])} / {int(row['refine_windows'])}"
        print(f"| {case} | {stain} | {row['verdict']} | {len(part)} | {part['error_um'].median():.1f} | "
              f"{np.percentile(part['error_um'], 90):.1f} | {windows} | {row['seconds']:.1f} | {row['reason']} |")
    slide_dir = Path(cfg.tile.slices_dir)
    fixed_path, moving_path = slide_dir / "C001_HE_S0.tiff", slide_dir / "C002_SOX10_S0.tiff"
    extent = options.section_mm * 1000
    started = time.perf_counter()
    cross, _ = register_slides(fixed_path, moving_path, (options.mpp, options.mpp), (extent, extent), cfg.register)
    print(f"\ncross-block pair (C001 HE <- C002 SOX10): {cross.quality.verdict} ({cross.quality.reason}), "
          f"{time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
