"""Shared fixtures: a tiny synthetic cohort, indexed, split and extracted once per test process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("STAINMIL_PROGRESS", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from stainmil.config import Config, load_config  # noqa: E402
from stainmil.data.synth import PRESETS, TRUTH_TEMPLATE, write_cohort  # noqa: E402

# The modules with the longest tests (`make test`'s --durations; docs/development.md), collected first: xdist's
# work stealing then ends the run on short tests, instead of one worker finishing a minute-long test alone while the
# other idles. The order within a module is kept (its module-scoped fixtures are made once).
LONG_FIRST = ("tests/data/test_serial_wsi.py", "tests/data/test_registration.py", "tests/test_check.py",
              "tests/test_bench.py", "tests/analysis/test_attention.py", "tests/slides/test_register.py",
              "tests/test_pipeline.py", "tests/experiments/test_compare_models.py", "tests/features/test_external.py",
              "tests/train/test_trainer.py", "tests/model/test_graph.py", "tests/test_cli.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {module: i for i, module in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: a module's order kept


def made_once(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` once per test run, shared by every xdist worker: the first to ask builds it under a file
    lock (into ``<basetemp>/<name>``, marked finished by ``<name>.done``); the others wait and read it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # the run's, not this worker's
    out, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            build(out)
            done.write_text("ok\n")
    return out


def tiny_config(cohort: Path, work: Path, *overrides: str) -> Config:
    return load_config(None, [
        f"output_dir={work}", f"data.patches_dir={cohort / 'patches'}", f"data.labels_csv={cohort / 'labels.csv'}",
        "features.weights=random", "features.image_size=32", "features.num_workers=0", "features.batch_size=64",
        "model.embed_dim=64", "model.attention_hidden_dim=32", "train.max_epochs=6", "train.cases_per_batch=2",
        "train.early_stopping_patience=50", "data.per_slice_cap=8", "eval.bootstrap=100",
        f"analysis.truth={cohort / 'annotations' / TRUTH_TEMPLATE}", *overrides,
    ])


def synth_patches(cohort: Path):
    """Every patch of a synthetic cohort from its file name (case, stain, slice, patch, x, y as text)."""
    import re

    import pandas as pd

    name = re.compile(r"case(?P<case>[^_]+)_(?P<stain>[^_]+)_slice(?P<slice>[^_]+)_patch(?P<patch>\d+)"
                      r"_x(?P<x>\d+)_y(?P<y>\d+)")
    rows = [{**name.match(p.stem).groupdict(), "file": p.name} for p in sorted((cohort / "patches").rglob("*.png"))]
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """8 cases, 1 slice per stain, 32 px patches (about 300 patches)."""
    return write_cohort(tmp_path_factory.mktemp("cohort") / "tiny", PRESETS["tiny"], workers=1)


@pytest.fixture(scope="session")
def prepared(tiny_cohort, tmp_path_factory) -> Config:
    """The tiny cohort indexed, split (holdout) and extracted with random DenseNet121 weights."""
    from stainmil.data.cohort import load_manifest
    from stainmil.features.extract import extract_features
    from stainmil.pipeline import index_cohort, split_cohort

    config = tiny_config(tiny_cohort, tmp_path_factory.mktemp("work"))
    index_cohort(config)
    split_cohort(config)
    extract_features(config, load_manifest(config))
    return config


def trained_run(prepared: Config, folder: Path, max_epochs: int, **analysis) -> Path:
    """Train and evaluate a run on the tiny cohort (``analysis`` overrides config.analysis fields)."""

    from stainmil.evaluate.evaluation import evaluate_run
    from stainmil.train.trainer import train

    config = prepared.with_overrides({"train.runs_dir": str(folder), "train.max_epochs": max_epochs,
                                      **{f"analysis.{key}": value for key, value in analysis.items()}})
    run = train(config).run_dir
    evaluate_run(run)
    return run


@pytest.fixture(scope="session")
def slide_cohort(tiny_cohort) -> Path:
    """The tiny cohort's slices as "40x" pyramidal TIFF slides (0.25 µm/px; their 2x level is the 20x slice)."""
    from stainmil.data.synth import write_slides

    write_slides(tiny_cohort, mpp=0.5, upsample=2, tile=64)
    return tiny_cohort


@pytest.fixture(scope="session")
def serial_cohort(tmp_path_factory) -> Path:
    """serial-tiny: 6 cases, every stain a section of one block (known landmarks), as 0.25 µm/px TIFF slides; made
    once per test run and shared by every worker (read it, never write into it)."""
    from stainmil.data.synth import write_slides

    def build(folder: Path) -> None:
        write_cohort(folder, PRESETS["serial-tiny"], workers=1)
        write_slides(folder, mpp=0.5, upsample=2, tile=64)

    return made_once(tmp_path_factory, "serial_cohort", build)


def slide_config(cohort: Path, work: Path, *overrides: str) -> Config:
    """The slide route on ``slide_cohort``: tile at 0.5 µm/px into ``work``, tiny-model settings."""
    return tiny_config(cohort, work, "data.source=slides", f"tile.slices_dir={cohort / 'slides'}",
                       f"tile.out_dir={work / 'tiles'}", "tile.mpp=0.5", "tile.patch_size=32", "tile.mask_downsample=1",
                       f"analysis.truth={cohort / 'slide_annotations' / TRUTH_TEMPLATE}", *overrides)


@pytest.fixture(scope="session")
def serial_demo(tmp_path_factory) -> Path:
    """`stainmil demo --serial` on serial-tiny (random weights, 2 epochs, non-rigid registration on small thumbnails):
    the demo's folder, made once per test run and shared by every worker (read it, never write into it)."""
    import json

    from stainmil.pipeline import run_demo

    def build(folder: Path) -> None:
        logs: list[str] = []
        result = run_demo(folder, ["train.max_epochs=2", "eval.bootstrap=10", "model.architecture=aligned",
                                   "register.max_side=192", "split.method=holdout", "split.val_fraction=0.34",
                                   "split.test_fraction=0.34"],
                          weights="random", log=logs.append, preset="serial-tiny", serial=True)
        (folder / "demo_result.json").write_text(json.dumps({
            "run": str(result.training.run_dir), "report": str(result.report), "predictions": str(result.predictions),
            "tiles": result.config.tile.out_dir, "logs": logs}))

    return made_once(tmp_path_factory, "serial_demo", build)
