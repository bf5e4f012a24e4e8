"""One pair of neighbouring whole-slide sections registered in its own process: seconds, peak RSS and the
landmark error, at any size (issue 40: a 20 mm section at 0.25 µm/px within 2 GB).

    python benchmarks/registration_memory.py WORK [--section-mm 20] [--mpp 0.25] [--flip]

Writes an H&E and a SOX10 section of one block (``stainmil.data.serial_wsi``: streamed tile by tile into pyramidal
TIFFs, landmarks in level-0 µm beside them; written once, kept for the next run), then registers the SOX10 section
onto the H&E one with the default ``register`` settings (the coarse chain, then the cell-scale refinement) in a fresh
process whose peak RSS the kernel reports (``os.wait4``). Prints one markdown row. Disk: a section of N px takes
about N² x 1.6 bytes (zlib level 1) and twice that while it is written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RUN = """
import json, sys, time
import numpy as np
from stainmil.config import load_config
from stainmil.data.register_cohort import register_slides
from stainmil.data.serial_wsi import pair_errors
fixed, moving, mpp, extent = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
started = time.perf_counter()
result, refinement = register_slides(fixed, moving, (mpp, mpp), (extent, extent), load_config(None).register)
seconds = time.perf_counter() - started
error = pair_errors(result.transform, fixed, moving)
print(json.dumps({"seconds": seconds, "verdict": result.quality.verdict, "reason": result.quality.reason,
                  "landmarks": len(error), "median": float(np.median(error)), "p90": float(np.percentile(error, 90)),
                  "refine_seconds": refinement.seconds if refinement else 0.0}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--section-mm", type=float, default=20.0)
    parser.add_argument("--mpp", type=float, default=0.25)
    parser.add_argument("--flip", action="store_true", help="mount the SOX10 section face down")
    options = parser.parse_args()
    from stainmil.data.serial_wsi import make_block, make_section, section_landmarks, write_section_tiff

    side = int(round(options.section_mm * 1000 / options.mpp))
    folder = options.work.resolve() / f"pair_{options.section_mm:g}mm_{options.mpp:g}"
    folder.mkdir(parents=True, exist_ok=True)
    needed = 2 * 2 * 1.6 * side**2
    free = shutil.disk_usage(folder).free
    block = make_block(40, 1, options.section_mm * 1000)
    paths = []
    for stain, seed, flip in (("HE", 1, False), ("SOX10", 2, options.flip)):
        section = make_section(block, stain.lower(), options.mpp, seed=seed, flip=flip)
        path = folder / f"C040_{stain}_S0.tiff"
        if not path.is_file():
            if free < needed:
                sys.exit(f"{folder} has {free / 1e9:.0f} GB free; two {side:,} px sections need about "
                         f"{needed / 1e9:.0f} GB while written: free space or choose a coarser --mpp.")
            started = time.perf_counter()
            write_section_tiff(section, path, workers=os.cpu_count() or 1)
            print(f"wrote {path.name} ({side:,} px, {path.stat().st_size / 1e9:.1f} GB) in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
        section_landmarks(section).to_csv(folder / f"C040_{stain}_S0_landmarks.csv", index=False)
        paths.append(path)
    process = subprocess.Popen([sys.executable, "-c", RUN, str(paths[0]), str(paths[1]), str(options.mpp),
                                str(options.section_mm * 1000)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "STAINMIL_PROGRESS": "0"})
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        sys.exit(f"registration failed:\n{output[-3000:]}")
    row = json.loads(output.strip().splitlines()[-1])
    print("| section | level 0 | face down | verdict | landmarks | median µm | p90 µm | s (refinement) | peak RSS MB |"
          "\n|---|---|---|---|---|---|---|---|---|")
    print(f"| {options.section_mm:g} mm | {side:,} px at {options.mpp:g} µm/px | {'yes' if options.flip else 'no'} | "
          f"{row['verdict']} | {row['landmarks']} | {row['median']:.1f} | {row['p90']:.1f} | "
          f"{row['seconds']:.0f} ({row['refine_seconds']:.0f}) | {usage.ru_maxrss / 1024:.0f} |")
    print(f"\nreason: {row['reason']}")


if __name__ == "__main__":
    main()
