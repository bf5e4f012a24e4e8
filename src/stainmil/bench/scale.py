"""``stainmil bench scale``: does training hold as the cohort outgrows memory?

A synthetic store of random features is written straight to disk (no images; real-shape structure:
~1,200 patches per case in 3 stains, 1–8 slices per stain, 1024-dim float16) at 1×, 10× and 30× the
real-shape cohort by default (86, 860 and 2,580 cases ≈ 0.1 M, 1 M and 3 M patches; 0.2, 2 and 6 GB; 100× is
10.5 M patches and ~20 GB: the free space is checked first), with its patch index on disk
(:mod:`stainmil.data.patch_index`). For each size a fresh training process runs ``--epochs`` epochs through the
normal trainer, once reading the store through a cache of ``--cache-mb`` (``features.cache_mb``) and, where the
store fits (sizes up to ``--memory-up-to``), once with the whole store in memory. Reported per run: patches,
epoch seconds (median; train + validation pass), seconds per million patches, the process's peak RSS and the
rate it read files at while training (bytes read / training seconds, through the OS page cache).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from stainmil.config import Config, dump_config, load_config
from stainmil.data.patch_index import open_patch_index
from stainmil.data.splits import make_splits, write_splits
from stainmil.errors import ConfigError
from stainmil.features.store import StoreMeta, expected_settings, slice_file, write_slice
from stainmil.io import atomic_write, atomic_write_json
from stainmil.progress import progress_bar

REAL_SHAPE_CASES = 86
DIM = 1024
# ~1,230 patches a case: fp16 features + HDF5's overhead, and the manifest with its index on disk
BYTES_PER_CASE = 1_230 * (DIM * 2 * 1.03 + 120)


def scale_config(folder: Path, *overrides: str) -> Config:
    return load_config(None, [f"output_dir={folder}", "features.weights=random", "features.image_size=224",
                              "train.early_stopping_patience=1000", *overrides])


def write_random_store(folder: Path, n_cases: int, seed: int = 0, log=print) -> tuple[Config, int]:
    """Manifest, split and a float16 store of random features for ``n_cases`` cases (skipped when done)."""
    config = scale_config(folder)
    done = folder / "store_done.json"
    if done.is_file():
        return config, int(json.loads(done.read_text())["patches"])
    folder.mkdir(parents=True, exist_ok=True)
    need, free = n_cases * BYTES_PER_CASE, shutil.disk_usage(folder).free
    if need > 0.95 * free:
        raise ConfigError(f"the {n_cases}-case scale store needs ~{need / 2 ** 30:.1f} GB but {folder} has "
                          f"{free / 2 ** 30:.1f} GB free; free space or pass --out on a larger disk.")
    log(f"scale store: {n_cases} cases need ~{need / 2 ** 30:.1f} GB; {free / 2 ** 30:.1f} GB free in {folder}")
    rng = np.random.default_rng(seed)
    frames = []
    started = time.perf_counter()
    with progress_bar(f"scale store: {n_cases} cases", total=n_cases) as advance:
        for c in range(n_cases):
            case, label = f"S{c:05d}", int(rng.random() < 2 / 3)
            for stain in config.data.stains:
                for s in range(int(rng.integers(1, 9))):
                    n = int(rng.integers(40, 141))
                    features = rng.standard_normal((n, DIM), dtype=np.float32)
                    features[:, :16] += 0.5 * label  # a weak signal, so training has something to fit
                    ids = [str(i) for i in range(n)]
                    write_slice(slice_file(config.paths.store, case, stain, str(s)), features.astype(np.float16),
                                np.full((n, 2), -1), ids, {"case": case, "stain": stain, "slice": str(s)})
                    frames.append(pd.DataFrame({"case": case, "stain": stain, "slice": str(s), "patch": ids,
                                                "patch_index": np.arange(n), "label": label, "x": -1, "y": -1,
                                                "path": ""}))
            advance()
    manifest = pd.concat(frames, ignore_index=True)
    StoreMeta(**expected_settings(config.features), weights_hash="random-features", feature_dim=DIM,
              dtype="float16").write(config.paths.store)
    atomic_write(config.paths.manifest, lambda tmp: manifest.to_parquet(tmp, index=False), suffix=".parquet")
    if open_patch_index(config.paths.manifest) is None:  # built here, so the training process only maps it
        raise RuntimeError("the scale store's manifest got no disk index")
    labels = manifest.drop_duplicates("case").set_index("case")["label"]
    write_splits(make_splits(labels, config.split), config.paths.splits_dir)
    atomic_write_json(done, {"cases": n_cases, "patches": len(manifest), "seconds": time.perf_counter() - started})
    log(f"scale store: {n_cases} cases, {len(manifest):,} patches in {time.perf_counter() - started:.0f} s")
    return config, len(manifest)


def train_process(config: Config, folder: Path, epochs: int, cache_mb: float) -> dict:
    """One training run in a fresh process; epoch seconds from its history, its peak RSS from the kernel."""
    run_config = folder / f"train-cache{cache_mb:g}.yaml"
    config = config.with_overrides({"train.max_epochs": epochs, "features.cache_mb": cache_mb,
                                    "train.runs_dir": str(folder / f"runs-cache{cache_mb:g}")})
    dump_config(config, run_config)
    code = ("import json, resource, sys, pandas as pd; from stainmil.config import load_config; "
            "from stainmil.train.trainer import train; from stainmil.bench.scale import read_bytes; "
            "before = read_bytes(); r = train(load_config(sys.argv[1])); after = read_bytes(); "
            "h = pd.read_csv(r.run_dir / 'history.csv'); "
            "print(json.dumps({'epoch_s': float(h['seconds'].median()), "
            "'read_mb_s': (after - before) / 2 ** 20 / float(h['seconds'].sum()) if min(before, after) >= 0 "
            "else float('nan'), "
            "'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, str(run_config)], capture_output=True, text=True,
                            env={**os.environ, "STAINMIL_PROGRESS": "0"})
    if result.returncode != 0:
        raise RuntimeError(f"scale training run failed: {result.stderr[-2000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - started}


def read_bytes() -> int:
    """Bytes this process has read through read calls so far (``rchar`` of /proc/self/io: page cache or disk; pages
    of a memory-mapped file are not counted), or -1 where the kernel does not say."""
    try:
        return int(next(line.split()[1] for line in Path("/proc/self/io").read_text().splitlines()
                        if line.startswith("rchar:")))
    except (OSError, StopIteration, ValueError):
        return -1


def run_scale(out: str | Path, scales: tuple[int, ...] = (1, 10, 30), cache_mb: float = 256, epochs: int = 2,
              memory_up_to: int = 10, base_cases: int = REAL_SHAPE_CASES, device: str = "auto",
              log=print) -> pd.DataFrame:
    """Every size (``scales`` x ``base_cases`` cases) trained bounded, and in memory up to ``memory_up_to``, on
    ``device`` (train.device)."""
    out = Path(out)
    rows = []
    for scale in scales:
        folder = out / f"scale-{scale}x-{base_cases}"
        config, patches = write_random_store(folder, base_cases * scale, log=log)
        config = config.with_overrides({"train.device": device})
        modes = [cache_mb] + ([0.0] if scale <= memory_up_to else [])
        for mode in modes:
            measured = train_process(config, folder, epochs, mode)
            row = {"scale": f"{scale}x", "cases": base_cases * scale, "patches": patches,
                   "store_gb": patches * DIM * 2 / 2 ** 30,
                   "reading": f"cache {mode:g} MB" if mode else "whole store in memory", **measured,
                   "s_per_m_patches": measured["epoch_s"] / (patches / 1e6)}
            rows.append(row)
            log(f"{row['scale']:>4} {patches:>10,} patches  {row['reading']:<22} epoch {row['epoch_s']:7.1f} s  "
                f"peak RSS {row['peak_rss_mb']:7.0f} MB  read {row['read_mb_s']:6.0f} MB/s")
    table = pd.DataFrame(rows)
    atomic_write(out / "scale.csv", lambda tmp: table.to_csv(tmp, index=False))
    atomic_write(out / "scale.md", lambda tmp: tmp.write_text(scale_markdown(table)))
    return table


def scale_markdown(table: pd.DataFrame) -> str:
    lines = ["| size | cases | patches | store | reading | epoch s | s per 1 M patches | peak RSS MB | read MB/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        lines.append(f"| {r['scale']} | {r['cases']:,} | {r['patches']:,} | {r['store_gb']:.1f} GB | {r['reading']} | "
                     f"{r['epoch_s']:.1f} | {r['s_per_m_patches']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['read_mb_s']:.0f} |")
    return "\n".join(lines) + "\n"
