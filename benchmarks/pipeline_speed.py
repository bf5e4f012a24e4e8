"""Measured, not asserted: the same figures as `stainmil bench`, from a script.

    python benchmarks/pipeline_speed.py [--out demo_out/bench] [--preset demo] [--image-size 224 --old-cases 3]
"""

from __future__ import annotations

import argparse
import os

from stainmil.bench.training import run_bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out/bench")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", type=int, default=0)
    parser.add_argument("--old-cases", type=int, default=0)
    parser.add_argument("--weights", default="random")
    args = parser.parse_args()
    os.environ.setdefault("STAINMIL_PROGRESS", "0")
    figures = run_bench(args.out, args.preset, args.device, args.image_size, args.old_cases, args.weights)
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
