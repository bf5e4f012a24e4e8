"""``stainmil bench``: every speed figure measured side by side in one process, printed and saved as JSON.

* backbone bare forward img/s vs extraction img/s (decode + forward + store), same batch and image size;
* training epoch from the feature store vs the old way — ``features.mode: online`` with a frozen
  backbone, i.e. the backbone run on every sampled (augmented) patch image every epoch, same cases and
  caps — and online with the last dense block fine-tuned; online epochs are timed on ``old_cases``
  cases and scaled by patch count;
* vectorised vs nested-loop forward+backward at 8 cases per batch (the loop is the old pseudocode, kept
  in ``stainmil/model/nested_reference.py``; outputs must agree within 1e-5), and the projector alone
  (forward+backward of its matmul over the same patches): the floor of a head step, and the ratio to it;
* peak memory while training from the store and online (RSS; CUDA max allocated on a GPU), and the
  whole process's peak.
"""

from __future__ import annotations

import copy
import os
import platform
import resource
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stainmil.bags.cohort import CohortBags
from stainmil.config import Config
from stainmil.cores import available_cores
from stainmil.data.cohort import build_index, case_labels, write_index
from stainmil.data.splits import make_splits
from stainmil.data.synth import PRESETS, write_cohort, write_slides
from stainmil.device import resolve_device
from stainmil.features.backbones import build_backbone
from stainmil.features.extract import extract_features
from stainmil.features.online import OnlineEncoder
from stainmil.features.plan import extraction_plan
from stainmil.features.store import load_features
from stainmil.io import atomic_write_json
from stainmil.model.hierarchical import HierarchicalMIL
from stainmil.model.nested_reference import nested_forward
from stainmil.model.registry import build_model
from stainmil.model.regularizers import AttentionRegularizer
from stainmil.pipeline import demo_config, tile_cohort
from stainmil.slides.reader import SlideHandles, patch_refs, read_patch
from stainmil.train import trainer
from stainmil.train.losses import build_loss, class_weights
from stainmil.train.trainer import EpochPlan, TrainingStep


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(module, batch_size: int, image_size: int, device: torch.device, n_images: int,
                 autocast: torch.dtype | None = None) -> float:
    """Images per second of the backbone alone on random input (channels_last, inference mode, under
    ``autocast`` on a GPU as extraction runs it).

    Runs as many images as extraction does (in full batches plus the remainder), so both are
    measured over the same stretch of time.
    """
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
    sizes = [batch_size] * (n_images // batch_size) + ([n_images % batch_size] if n_images % batch_size else [])
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast or torch.float32,
                                                enabled=device.type == "cuda" and autocast is not None):
        module(x)  # warm-up
        _sync(device)
        start = time.perf_counter()
        for size in sizes:
            module(x[:size])
        _sync(device)
    return n_images / (time.perf_counter() - start)


def best_forward(module, image_size: int, device: torch.device, n_images: int, autocast: torch.dtype | None,
                 batches: tuple[int, ...] = (32, 64, 128, 256, 512)) -> tuple[float, int]:
    """(img/s, batch) of the fastest batch size for the bare forward (a batch that runs out of memory ends
    the search)."""
    best, best_batch = 0.0, batches[0]
    for batch in batches:
        try:
            rate = bare_forward(module, batch, image_size, device, max(n_images, 4 * batch), autocast)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        if rate > best:
            best, best_batch = rate, batch
    return best, best_batch


class PeakMemory:
    """Peak resident memory (MB) of this process while the block runs, sampled every 5 ms from
    ``/proc/self/statm`` (Linux; elsewhere the process's lifetime peak), and CUDA max allocated."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.rss_mb, self.cuda_mb = device, 0.0, None
        self._stop = threading.Event()

    @staticmethod
    def _rss_mb() -> float:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.rss_mb = max(self.rss_mb, self._rss_mb())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss_mb = self._rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.rss_mb = round(max(self.rss_mb, self._rss_mb()), 1)
        if self.device.type == "cuda":
            self.cuda_mb = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)


def training_epoch(model, optimizer, bags: CohortBags, cases: list[str], rng: np.random.Generator, weights,
                   device: torch.device, config: Config) -> float:
    """Seconds of one training epoch through the trainer's own :func:`~stainmil.train.trainer.run_epoch` (epoch
    order, slices chosen as a run chooses them, the per-slice cap, patch and stain dropout, augmentation,
    prefetch, the loss and regularisers of ``config``): what users run, not a second loop."""
    step = TrainingStep(model, optimizer, build_loss(config.train), AttentionRegularizer(config.model, 1), weights,
                        config.train)
    slices = bags.choose_slices(cases, config.data.max_slices_per_stain, rng)
    plan = EpochPlan(bags, list(cases), slices, step, config, device)
    start = time.perf_counter()
    trainer.run_epoch(plan, 1, rng)
    _sync(device)
    return time.perf_counter() - start


def vectorised_vs_loop(model, bags, cases, device, repeats: int = 5, compile_head: bool = False) -> dict:
    if not isinstance(model, HierarchicalMIL) or model.stain_identity == "specific":
        return {"vectorised_vs_loop": "n/a (the nested reference is the hierarchical model with shared modules)"}
    batch = bags.batch(cases).to(device)
    model.eval()  # no dropout, so both paths compute the same function
    # same outputs: compared in float64, where summation order no longer shows
    exact, exact_batch = copy.deepcopy(model).double(), bags.batch(cases).to(device)
    exact_batch.features = exact_batch.features.double()
    with torch.no_grad():
        difference = float((exact(exact_batch).logits - nested_forward(exact, exact_batch)).abs().max())

    def timed(forward) -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            model.zero_grad()
            forward().sum().backward()
        _sync(device)
        return (time.perf_counter() - start) / repeats

    timed(lambda: model(batch).logits)  # warm-up
    vectorised = timed(lambda: model(batch).logits)
    loop = timed(lambda: nested_forward(model, batch))
    floor = timed(lambda: model.embed(batch.features))  # the projector alone: the step's matmul floor
    compiled = compiled_step(model, batch, timed) if compile_head else {}
    return {**compiled, "fwd_bwd_ms_vectorised": round(vectorised * 1e3, 2),
            "fwd_bwd_ms_nested_loop": round(loop * 1e3, 1),
            "fwd_bwd_ms_projector_floor": round(floor * 1e3, 2),
            "head_step_over_projector_floor": round(vectorised / floor, 2),
            "vectorised_speedup": round(loop / vectorised, 1), "max_abs_logit_difference": difference,
            "batch_cases": len(cases), "batch_patches": int(len(batch.features))}


def compiled_step(model, batch, timed) -> dict:
    """The same forward+backward through ``torch.compile(model, dynamic=True)`` (batches vary in shape), timed
    after its compilation; or why it could not be compiled here."""
    try:
        compiled = torch.compile(model, dynamic=True)
        started = time.perf_counter()
        timed(lambda: compiled(batch).logits)  # compiles
        compile_s = time.perf_counter() - started
        seconds = timed(lambda: compiled(batch).logits)
    except Exception as exc:  # no C++ toolchain, an unsupported op, …: say so, do not fail the bench
        return {"fwd_bwd_ms_compiled": f"n/a ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"}
    return {"fwd_bwd_ms_compiled": round(seconds * 1e3, 2), "compile_s": round(compile_s, 1)}


def head_profile(model, batch, path: Path, repeats: int = 20) -> str:
    """``torch.profiler`` table of the head's forward+backward (operators by self CPU time), saved to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if batch.features.is_cuda else [])
    model.eval()
    for _ in range(3):
        model(batch).logits.sum().backward()
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            model.zero_grad()
            model(batch).logits.sum().backward()
    sort = "self_cuda_time_total" if batch.features.is_cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=40)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"head forward+backward x{repeats}, {len(batch.case_ids)} cases, {len(batch.features)} patches\n"
                    + table)
    return table


def decode_rate(refs, size: int, limit: int = 400) -> float:
    """Patches decoded (and resized to ``size``) per second on one core, as extraction workers do it."""
    refs, slides = refs[:limit], SlideHandles()
    read_patch(refs[0], size, slides)
    start = time.perf_counter()
    for ref in refs:
        read_patch(ref, size, slides)
    seconds = time.perf_counter() - start
    slides.close()
    return len(refs) / seconds


def bench_cohort(out: Path, preset: str, size: int, tag: str, device: torch.device, slides: bool, log,
                 overrides: list[str]) -> tuple[Config, pd.DataFrame]:
    """The synthetic ``preset`` cohort (rendered once under ``out``), indexed from its PNG patches or, with
    ``slides``, written as pyramidal TIFF slides and tiled: (config, manifest)."""
    cohort = out / f"cohort-{preset}"
    if not (cohort / "labels.csv").is_file():
        log(f"rendering the {preset} synthetic cohort into {cohort}")
        write_cohort(cohort, PRESETS[preset])
    config = demo_config(out / tag, cohort, [
        f"features.image_size={size}", f"features.store_dir={out / f'store-{tag}'}",
        f"features.device={device.type}", f"train.device={device.type}",
        f"tile.patch_size={PRESETS[preset].patch_size}", *overrides], slides=slides)
    if slides:
        log("writing the cohort's slices as pyramidal TIFF slides and tiling them")
        write_slides(cohort, mpp=0.5, upsample=2, tile=128)
        tile_cohort(config)
        return config, build_index(config).manifest
    result = build_index(config)
    write_index(result, config)
    return config, result.manifest


def run_bench(out: str | Path = "demo_out/bench", preset: str = "demo", device_name: str = "auto",
              image_size: int = 0, old_cases: int = 0, weights: str = "random", rounds: int = 2,
              backbone_name: str = "densenet121", slides: bool = False, extraction_only: bool = False,
              compile_head: bool = False, log=print) -> dict:
    """Measure everything (see the module docstring). ``slides``: extraction reads the patches from pyramidal
    TIFF slides (the slide route); ``extraction_only``: stop after forward vs extraction (e.g. for big encoders)."""

    device = resolve_device(device_name)
    out = Path(out).resolve()
    size = image_size or PRESETS[preset].patch_size
    tag = f"{preset}-{backbone_name}-{size}px-{'slides' if slides else 'patches'}"
    config, manifest = bench_cohort(out, preset, size, tag, device, slides, log, [
        f"features.backbone={backbone_name}", f"features.weights={weights}"])
    backbone = build_backbone(config.features)
    frozen = backbone.module.to(device).to(memory_format=torch.channels_last)
    f = config.features
    figures: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}",
        "cohort": f"{preset}: {manifest['case'].nunique()} cases, {len(manifest)} patches, {size} px input",
        "encoder": backbone_name, "patch_source": "pyramidal TIFF slides (OpenSlide)" if slides else "PNG files",
    }
    plan = extraction_plan(f, device)
    bare, extraction = 0.0, 0.0
    for round_ in range(1, rounds + 1):  # alternated, best of each: shared machines are noisy
        log(f"round {round_}/{rounds}: the backbone's bare forward throughput, then extraction into a fresh store "
            f"({plan.describe()})")
        bare = max(bare, bare_forward(frozen, plan.batch_size, size, device, len(manifest), plan.autocast))
        shutil.rmtree(config.paths.store, ignore_errors=True)
        extraction = max(extraction, extract_features(config, manifest, backbone=backbone).patches_per_second)
    log("the bare forward at batch sizes 32 … 512: the encoder's best")
    best, best_batch = best_forward(frozen, size, device, len(manifest), plan.autocast,
                                    (32, 64, 128, 256, 512) if device.type == "cuda" else (plan.batch_size,))
    best, best_batch = (bare, plan.batch_size) if bare >= best else (best, best_batch)
    decode = decode_rate(patch_refs(manifest), size)
    cores = available_cores()
    figures.update({"backbone_forward_img_s": round(bare, 1), "best_forward_img_s": round(best, 1),
                    "best_forward_batch": best_batch, "extraction_img_s": round(extraction, 1),
                    "extraction_over_forward": round(extraction / bare, 3),
                    "extraction_over_best": round(extraction / best, 3), "batch_size": plan.batch_size,
                    "decode_workers": plan.workers, "precision": plan.precision,
                    "decode_img_s_one_core": round(decode, 1),
                    # decoding needs core time the forward pass would otherwise use: the best extraction can do
                    # when both share the cores and the forward scales over all of them
                    "extraction_ceiling_shared_cores": round(1 / (1 + bare / (cores * decode)), 3)
                    if device.type == "cpu" else "n/a (decode on CPU, forward on GPU)",
                    "best_of_rounds": rounds})
    if extraction_only:
        atomic_write_json(out / f"bench-{tag}-{device.type}.json", figures)
        return figures

    bags = CohortBags(manifest, load_features(config.paths.store, manifest), config.data.stains)
    split = make_splits(case_labels(manifest), config.split)[0]
    torch.manual_seed(0)
    model = build_model(bags.feature_dim, config.model, config.data.stains).to(device)
    model.set_feature_statistics(*(t.to(device) for t in bags.feature_statistics(split.train)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    class_w = class_weights(config.train, np.array([bags.case_label(c) for c in split.train]), 2).to(device)
    cap, rng = config.data.per_slice_cap, np.random.default_rng(0)
    log("timing training epochs from the feature store")
    training_epoch(model, optimizer, bags, split.train, rng, class_w, device, config)  # warm-up
    with PeakMemory(device) as cached_memory:
        cached = float(np.mean([training_epoch(model, optimizer, bags, split.train, rng, class_w, device, config)
                                for _ in range(3)]))
    timed_cases = split.train[:old_cases] if old_cases else split.train

    def n_patches(cases):
        return sum(min(len(bags.slice_patches[s]), cap or 10**9) for c in cases for s in bags.case_slices[c])

    def online_epoch(trainable_blocks: int) -> float:
        online = config.with_overrides({"features.trainable_blocks": trainable_blocks})
        encoder = OnlineEncoder(online.features, device,
                                backbone=copy.deepcopy(backbone) if trainable_blocks else backbone)
        online_bags = CohortBags(manifest, None, config.data.stains, encoder)
        groups = [{"params": encoder.trainable_parameters(), "lr": 1e-5}] if trainable_blocks else []
        online_optimizer = torch.optim.Adam([{"params": model.parameters()}, *groups], lr=1e-4)
        seconds = training_epoch(model, online_optimizer, online_bags, timed_cases, rng, class_w, device, online)
        return seconds * n_patches(split.train) / n_patches(timed_cases)

    log(f"timing the old way (online mode, frozen backbone on every augmented patch image) on {len(timed_cases)} "
        "cases")
    old = online_epoch(0)
    log(f"timing online mode with the last dense block fine-tuned on {len(timed_cases)} cases")
    with PeakMemory(device) as finetune_memory:
        finetune = online_epoch(1)
    figures.update({"train_cases": len(split.train), "patches_per_epoch": int(n_patches(split.train)),
                    "epoch_s_feature_store": round(cached, 3), "epoch_s_old_way": round(old, 2),
                    "epoch_s_online_finetune_1_block": round(finetune, 2),
                    "old_way_timed_on_cases": len(timed_cases), "epoch_speedup": round(old / cached, 1)})
    log("vectorised vs nested-loop forward+backward at 8 cases (and torch.compile, and the profiler)")
    figures.update(vectorised_vs_loop(model, bags, bags.case_ids[:8], device, compile_head=compile_head))
    head_profile(model, bags.batch(bags.case_ids[:8]).to(device), out / f"head-profile-{tag}-{device.type}.txt")
    figures["head_profile"] = str(out / f"head-profile-{tag}-{device.type}.txt")
    figures["train_peak_rss_mb_store"] = cached_memory.rss_mb
    figures["train_peak_rss_mb_online_finetune"] = finetune_memory.rss_mb
    if device.type == "cuda":
        figures["train_cuda_max_allocated_mb_store"] = cached_memory.cuda_mb
        figures["train_cuda_max_allocated_mb_online_finetune"] = finetune_memory.cuda_mb
    figures["process_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    atomic_write_json(out / f"bench-{tag}-{device.type}.json", figures)
    return figures
