"""Multi-step jobs built from the library: index, split and the end-to-end demo."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from stainmil.analysis.analyze import summary_text, write_analysis
from stainmil.analysis.new_cases import predict_unlabelled
from stainmil.analysis.qupath import export_folder
from stainmil.analysis.report import build_report
from stainmil.config import Config, dump_config, load_config
from stainmil.data.cohort import build_index, case_labels, load_manifest, write_index
from stainmil.data.register_cohort import register_cohort
from stainmil.data.slide_route import tile_cohort
from stainmil.data.splits import load_split, make_splits, write_splits
from stainmil.data.synth import PRESETS, TRUTH_TEMPLATE, write_cohort, write_slides
from stainmil.errors import StoreError
from stainmil.evaluate.evaluation import Evaluation, evaluate_run
from stainmil.features.backbones import build_backbone
from stainmil.features.extract import ExtractSummary, extract_features
from stainmil.run_files import RunFiles
from stainmil.train.trainer import TrainResult, train


def index_cohort(config: Config) -> tuple[Path, dict]:
    result = build_index(config)
    return write_index(result, config), result.report


def split_cohort(config: Config, out_dir: str | Path | None = None) -> list[Path]:
    out = Path(out_dir) if out_dir else config.paths.splits_dir
    manifest = load_manifest(config)
    paths = write_splits(make_splits(case_labels(manifest), config.split, config.data.class_names), out)
    dump_config(config, out / "config.yaml")
    return paths


@dataclass
class DemoResult:
    out_dir: Path
    cohort_dir: Path
    config: Config
    weights_note: str
    extract: ExtractSummary | None  # None in online mode (no shared store; the run writes its own)
    training: TrainResult
    evaluation: Evaluation
    report: Path
    analysis_summary: str
    predictions: Path  # the test cases predicted as new cases: predictions.csv, attention/, report.html


def demo_config(out_dir: Path, cohort_dir: Path, overrides: list[str], slides: bool = False) -> Config:
    base = [f"output_dir={out_dir / 'work'}", f"data.labels_csv={cohort_dir / 'labels.csv'}",
            "features.num_workers=1", "train.max_epochs=40"]
    if slides:  # the slide route: "40x" pyramidal TIFFs tiled at 0.5 um/px (their 2x level)
        base += ["data.source=slides", f"tile.slices_dir={cohort_dir / 'slides'}", f"tile.out_dir={out_dir / 'tiles'}",
                 "tile.mpp=0.5", "tile.mask_downsample=1",
                 f"analysis.truth={cohort_dir / 'slide_annotations' / TRUTH_TEMPLATE}"]
    else:
        base += [f"data.patches_dir={cohort_dir / 'patches'}",
                 f"analysis.slice_images={cohort_dir / 'slices' / 'case{case}' / '{stain}' / 'slice{slice}.png'}",
                 f"analysis.truth={cohort_dir / 'annotations' / TRUTH_TEMPLATE}"]
    return load_config(None, base + list(overrides))


def run_demo(out_dir: str | Path = "demo_out", overrides: list[str] | None = None, weights: str = "auto",
             log=print, preset: str = "demo", slides: bool = False, classes: int = 2,
             serial: bool = False) -> DemoResult:
    """synth -> index -> split -> extract -> train -> evaluate -> analyze + report on the synthetic cohort.

    ``slides=True`` runs the slide route: the slices are written as pyramidal TIFF slides, tiled (tissue
    masks + coordinates) and features are read straight from the slides; heatmaps go on their thumbnails.

    ``weights='auto'`` tries ImageNet weights and, when they cannot be had offline, falls back to
    random weights *and says so* in the output and in results.txt. ``classes=3``: benign, intermediate and
    high-grade cases (metrics, reports and predictions per class). ``serial=True`` (implies ``slides``): each
    case's stains are serial sections of one block, registered after tiling (``stainmil register``): the report
    shows the IHC attention on the H&E slices in linked viewers (``model.architecture=aligned`` in
    ``overrides`` trains the model that fuses them).
    """
    out_dir = Path(out_dir).resolve()
    serial = serial or PRESETS[preset].serial  # a serial preset is registered: it needs the slide route
    slides = slides or serial
    synth = dataclasses.replace(PRESETS[preset], classes=classes, serial=serial)
    cohort_dir = out_dir / "cohort"
    if (cohort_dir / "labels.csv").is_file():
        log(f"[1/8] synthetic cohort already in {cohort_dir} (delete it to regenerate)")
    else:
        log(f"[1/8] rendering the synthetic cohort into {cohort_dir}")
        write_cohort(cohort_dir, synth)
    size = synth.patch_size
    words = ", ".join(f"{word}: {index}" for index, word in enumerate(synth.class_words))
    classes_override = [f"data.label_values={{{words}}}"] if classes != 2 else []
    config = demo_config(out_dir, cohort_dir, [f"features.image_size={size}", f"tile.patch_size={size}",
                                                *classes_override, *(overrides or [])], slides=slides)
    note = ""
    if weights == "auto":
        config = config.with_overrides({"features.weights": "pretrained"})
        try:
            backbone = build_backbone(config.features)
        except StoreError as exc:
            config = config.with_overrides({"features.weights": "random"})
            backbone = build_backbone(config.features)
            note = ("WARNING: ImageNet weights for densenet121 are not available offline, so this demo uses a "
                    f"RANDOMLY initialised backbone ({exc}). Results show the pipeline works, not ImageNet features.")
            log("!" * 100 + "\n" + note + "\n" + "!" * 100)
    else:
        config = config.with_overrides({"features.weights": weights})
        backbone = build_backbone(config.features)
    if slides:
        log("[2/8] writing the slices as pyramidal TIFF slides, then tiling them (tissue masks + coordinates)")
        write_slides(cohort_dir, mpp=0.5, upsample=2, tile=128)
        tiled, index_dir = tile_cohort(config)
        report = json.loads((index_dir / "index_report.json").read_text())
        log(f"      {len(tiled.slides)} slides tiled; report: {tiled.out_dir / 'tile_report.txt'}")
        if synth.serial:
            log("      registering every IHC slice to the H&E slice of its case (rigid with flips -> affine -> "
                "B-spline)")
            registered = register_cohort(config)
            verdicts = registered.table["verdict"].value_counts().to_dict()
            log(f"      {len(registered.table)} slices: " + ", ".join(f"{n} {v}" for v, n in sorted(verdicts.items()))
                + f"; report: {registered.out_dir / 'register_report.txt'}")
    else:
        log("[2/8] indexing and validating the patch folder")
        index_dir, report = index_cohort(config)
    log(f"      {report['files_used']} patches of {report['cases_used']} cases; "
        f"report: {index_dir / 'index_report.txt'}")
    log("[3/8] case-level stratified split (60/20/20)")
    split_cohort(config)
    if config.features.mode == "online":
        summary = None
        log(f"[4/8] online mode: no shared store — {config.features.backbone} runs on the images in every step "
            f"(last {config.features.trainable_blocks} dense block(s) trained)")
    else:
        log(f"[4/8] extracting {config.features.backbone} features once into {config.paths.store}")
        summary = extract_features(config, load_manifest(config), backbone=backbone)
        log(f"      {summary.patches_written} patches in {summary.seconds:.1f} s "
            f"({summary.slices_done_before} slices were already done)")
    log(f"[5/8] training the {config.model.architecture} attention model")
    trained = train(config)
    log(f"      {trained.epochs_run} epochs, best epoch {trained.best_epoch}; run folder {trained.run_dir}")
    log("[6/8] evaluating on the held-out test cases")
    evaluation = evaluate_run(trained.run_dir)
    log("[7/8] attention analysis and report")
    analysis = write_analysis(trained.run_dir, "test")
    report = build_report(trained.run_dir, analysis)
    export_folder(trained.run_dir, "test")
    log(f"      report {report}; QuPath GeoJSON in {trained.run_dir / 'qupath'}")
    log("[8/8] predicting the test cases again as new cases (labels withheld), explained and exported")
    predictions = predict_as_new(config, trained.run_dir, out_dir / "predictions")
    export_folder(predictions)
    log(f"      report {predictions / 'report.html'}; QuPath GeoJSON in {predictions / 'qupath'}")
    return DemoResult(out_dir, cohort_dir, config, note, summary, trained, evaluation, report,
                      summary_text(analysis.tables.summary), predictions)


def predict_as_new(config: Config, run_dir: Path, out: Path) -> Path:
    """The run's test cases predicted like a new cohort: no labels read, their own index and store."""
    new = config.with_overrides({"data.labels_csv": "",
                                 "data.include_cases": list(load_split(run_dir / "data_splits.npz").test),
                                 "output_dir": str(out / "work"), "features.store_dir": str(out / "work" / "features")})
    return predict_unlabelled(RunFiles.of(run_dir).best, new, out)
