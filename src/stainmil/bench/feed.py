"""``stainmil bench feed``: can the data path feed a GPU? Extraction's loader (decode, resize, collate,
pinned copies) with a no-op encoder, timed with 0, 1, 2, 4, … decode workers.

The forward pass is left out on purpose: on a CPU-only machine the encoder would compete with the decoders
for the same cores, so img/s with *n* workers and no encoder — and how it scales with *n* — is the number
that says whether a 16-core GPU node can keep an encoder at ~3,000–10,000 img/s busy. Both patch sources are
measured: PNG files (the patch route) and regions of pyramidal TIFF slides (the slide route, OpenSlide).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from torch.utils.data import DataLoader

from stainmil.bench.training import bench_cohort
from stainmil.cores import available_cores
from stainmil.data.synth import PRESETS
from stainmil.device import resolve_device
from stainmil.features.extract import PatchImages, fresh_slide_handles
from stainmil.features.plan import extraction_plan
from stainmil.io import atomic_write_json
from stainmil.slides.reader import patch_refs


def worker_counts(cores: int) -> list[int]:
    """0 (decode in the main process), then 1, 2, 4, … up to the cores available."""
    counts, n = [0], 1
    while n <= cores:
        counts.append(n)
        n *= 2
    if counts[-1] != cores and cores > 0:
        counts.append(cores)
    return counts


def feed_rate(refs: list, image_size: int, workers: int, batch_size: int, pin: bool, limit: int = 0) -> float:
    """Images per second through extraction's DataLoader with ``workers`` decode workers and no encoder."""
    refs = refs[:limit] if limit else refs
    loader = DataLoader(PatchImages(refs, image_size), batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=pin, prefetch_factor=4 if workers else None, worker_init_fn=fresh_slide_handles)
    started, seen = time.perf_counter(), 0
    for images in loader:
        seen += len(images)
        images.float()  # what the encoder's first step does to a batch
    return seen / (time.perf_counter() - started)


def feed_table(sources: dict[str, list], image_size: int, batch_size: int, cores: int | None = None,
               limit: int = 0, pin: bool = False, log=print) -> pd.DataFrame:
    """img/s per source (name -> patch refs) and worker count, with the speed-up over one worker."""
    cores = cores or available_cores()
    rows = []
    for name, refs in sources.items():
        feed_rate(refs, image_size, 0, batch_size, False, limit=min(len(refs), 2 * batch_size))  # warm the page cache
        one = None
        for workers in worker_counts(cores):
            rate = feed_rate(refs, image_size, workers, batch_size, pin, limit)
            one = rate if workers == 1 else one
            rows.append({"source": name, "workers": workers, "img_s": round(rate, 1),
                         "speedup_vs_1": round(rate / one, 2) if one and workers >= 1 else None})
            log(f"feed {name:<7} {workers:>2} workers  {rate:9.1f} img/s")
    return pd.DataFrame(rows)


def run_feed(out: str | Path, preset: str = "demo", device_name: str = "auto", image_size: int = 0,
             slides: bool = False, log=print) -> dict:
    """Feed rates of the ``preset`` cohort's PNG patches (and slide regions with ``slides``) at extraction's
    batch size for this device, by decode workers; saved as ``feed-<preset>-<size>px-<device>.json``."""
    device = resolve_device(device_name)
    out = Path(out).resolve()
    size = image_size or PRESETS[preset].patch_size
    sources = {}
    for slide_route in (False, True) if slides else (False,):
        tag = f"{preset}-feed-{size}px-{'slides' if slide_route else 'patches'}"
        config, manifest = bench_cohort(out, preset, size, tag, device, slide_route, log, [])
        sources["slides" if slide_route else "PNGs"] = patch_refs(manifest)
    plan = extraction_plan(config.features, device)
    table = feed_table(sources, size, plan.batch_size, pin=device.type == "cuda", log=log)
    figures = {"device": device.type, "cores": available_cores(), "batch_size": plan.batch_size,
               "image_size": size, "patches": {k: len(v) for k, v in sources.items()},
               "rows": table.to_dict("records")}
    atomic_write_json(out / f"feed-{preset}-{size}px-{device.type}.json", figures)
    return figures
