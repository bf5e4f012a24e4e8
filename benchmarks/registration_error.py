"""Registration error on synthetic serial sections (known landmarks), after `stainmil register`.

    stainmil synth slides --out serial --preset serial --slide-format tiff
    stainmil tile --config serial/slides.yaml && stainmil register --config serial/slides.yaml
    python benchmarks/registration_error.py serial [--cross]

Prints the landmark error (µm, level 0 at 0.25 µm/px) of every registered IHC slice — median and 90th
percentile over all landmarks, per verdict — and with ``--cross`` registers each case's H&E slice to the next
case's IHC slices (pairs from two blocks: every one should come out ``failed``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from stainmil.config import load_config
from stainmil.data.registration import read_pair
from stainmil.slides.register import read_section, register_sections


def landmarks_um(cohort: Path, case: str, stain: str, slice_id: str) -> pd.DataFrame:
    """Landmarks in level-0 µm: slice pixels are 0.5 µm (the slides' level 0 is the slice x 2 at 0.25 µm/px)."""
    table = pd.read_csv(cohort / "slices" / f"case{case}" / stain / f"slice{slice_id}_landmarks.csv").set_index("id")
    return (table[["x", "y"]] + 0.5) * 0.5


def main() -> None:
    cohort = Path(sys.argv[1]).resolve()
    config = load_config(cohort / "slides.yaml")
    table = pd.read_csv(config.paths.registration_dir / "registrations.csv", dtype={"case": str, "slice": str,
                                                                               "fixed_slice": str})
    rows, errors = [], []
    for r in table.itertuples(index=False):
        transform, attrs = read_pair(r.transform)
        fixed = landmarks_um(cohort, r.case, r.fixed_stain, r.fixed_slice)
        moving = landmarks_um(cohort, r.case, r.stain, r.slice)
        ids = fixed.index.intersection(moving.index)
        if transform is None or not len(ids):
            continue
        e = np.linalg.norm(transform.moving_to_fixed(moving.loc[ids].to_numpy()) - fixed.loc[ids].to_numpy(), axis=1)
        errors.append(pd.DataFrame({"verdict": r.verdict, "error_um": e}))
        rows.append({"case": r.case, "stain": r.stain, "verdict": r.verdict, "median_um": np.median(e),
                     "p90_um": np.percentile(e, 90), "seconds": r.seconds})
    pairs = pd.DataFrame(rows)
    every = pd.concat(errors, ignore_index=True)
    print(f"{len(pairs)} registered IHC slices of {pairs['case'].nunique()} cases; "
          f"{pairs['seconds'].mean():.1f} s per pair (mean), {pairs['seconds'].max():.1f} s at most")
    print("| pairs | slices | landmarks | median error µm | 90th percentile µm |\n|---|---|---|---|---|")
    for name, part in [("all", every)] + list(every.groupby("verdict")):
        n = len(pairs) if name == "all" else int((pairs["verdict"] == name).sum())
        print(f"| {name} | {n} | {len(part)} | {part['error_um'].median():.1f} | "
              f"{np.percentile(part['error_um'], 90):.1f} |")
    if "--cross" in sys.argv:
        spacing = max(0.25, 0.25 * max(yaml.safe_load((cohort / "synth.yaml").read_text())["slice_size"] * 2, 1)
                      / config.register.max_side)
        cases = sorted(table["case"].unique(), key=int)
        verdicts = []
        started = time.perf_counter()
        for case, other in zip(cases, cases[1:] + cases[:1]):
            fixed = read_section(cohort / "slides" / f"case{case}" / "he" / "slice0.tiff", spacing)
            for stain in ("melan", "sox10"):
                path = cohort / "slides" / f"case{other}" / stain / "slice0.tiff"
                if path.is_file():
                    verdicts.append(register_sections(fixed, read_section(path, spacing)).quality.verdict)
        counts = pd.Series(verdicts).value_counts().to_dict()
        seconds = (time.perf_counter() - started) / max(len(verdicts), 1)
        print(f"pairs from two blocks: {len(verdicts)} ({counts}), {seconds:.1f} s per pair")


if __name__ == "__main__":
    main()
