"""Command line: parse -> call one library function -> print. Errors are one sentence, exit code 2.

One grammar: an option means the same thing in every command that takes it (the shared options below, defined
once; tests/test_cli.py walks every command to hold that). `stainmil --help` answers without importing the
library: every command imports what it needs when it runs.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from stainmil.cli_modes import drop_option, mode_group, option_given, refuse, rename_option, without_parameter
from stainmil.errors import ConfigError, StainmilError, output_error
from stainmil.stopping import Terminated, stop_cleanly_on_sigterm

app = typer.Typer(help="stainmil: hierarchical multiple-instance learning on multi-stain pathology patches.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  rich_markup_mode=None)


class _LazyConsole:
    """A rich Console made on first use, so that `--help` never imports rich's console."""

    def __init__(self, **options) -> None:
        self._options, self._console = options, None

    def __getattr__(self, name: str):
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return getattr(self._console, name)


console = _LazyConsole(soft_wrap=True)  # never break paths across lines
err = _LazyConsole(stderr=True)

# The shared options: one spelling, one type, one help text in every command that takes one (every `...Opt`
# alias here; tests/test_cli.py walks the commands to check).
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override: section.key=value (repeatable).")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Output folder.")]
ResumeOpt = Annotated[Path | None, typer.Option(
    "--resume", help="Folder of an interrupted run or experiment to continue (finished parts are skipped).")]
SeedsOpt = Annotated[str, typer.Option("--seeds", help="Comma-separated training seeds, e.g. 0,1,2 (default: "
                                                      "train.seed).")]
FoldsOpt = Annotated[int, typer.Option("--folds", help="Number of stratified folds by case.")]
WorkersOpt = Annotated[int, typer.Option(
    "--workers", help="How many jobs run at once (folds; register: pairs; tune: Optuna workers on one study), each "
                      "its own process or SLURM task; bound each one's memory with features.cache_mb.")]
ShardsOpt = Annotated[int, typer.Option("--shards", help="Split the slices into this many shards (array tasks).")]
LauncherOpt = Annotated[str, typer.Option("--launcher", help="local | slurm (through submitit, settings in slurm.*)")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
WeightsOpt = Annotated[str, typer.Option("--weights", help="Backbone weights: pretrained | random | a path; demo also "
                                                           "auto (pretrained, else random with a warning).")]
ClassesOpt = Annotated[int, typer.Option("--classes", help="2 (benign, high_grade) or 3 (benign, intermediate, "
                                                           "high_grade).")]
SerialOpt = Annotated[bool, typer.Option(
    "--serial", help="Serial sections: a case's stains cut from one block, each moved/flipped/stretched with known "
                     "landmarks (for `stainmil register`).")]
SlideRouteOpt = Annotated[bool, typer.Option(
    "--slides", help="The slide route: the slices written as pyramidal TIFF slides, tiled, and features extracted "
                     "from the slides.")]
SplitOpt = Annotated[str, typer.Option("--split", help="The run's cases to use: train | val | test, or all (analyze, "
                                                       "export qupath).")]
BenchPreset = Annotated[str, typer.Option("--preset", help="Synthetic cohort: demo | tiny | real-shape.")]
ImageSizeOpt = Annotated[int, typer.Option("--image-size", help="Backbone input side (0 = patch size).")]
WideOpt = Annotated[bool, typer.Option("--wide", help="Every column (wider than 80 characters).")]
MarkdownOpt = Annotated[bool, typer.Option("--markdown", help="A markdown table.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON, one object per row.")]


def deprecated(old: str, new: str) -> None:
    """The one deprecation notice: an old spelling still works for this release; one line on stderr says what
    to write instead."""
    typer.echo(f"deprecated: {old}; write {new} instead (the old form goes in the next release).", err=True)


def renamed(old: str, old_value, new: str, new_value, *, counted_from_1: bool = False):
    """The value of an option that has a new name: the new one's, or the old one's with the one deprecation line
    (``counted_from_1``: the old one counted from 1, the new from 0); both given is refused."""
    if old_value is None:
        return new_value
    if new_value is not None:
        raise ConfigError(f"{old} is the old spelling of {new}; give only {new}"
                          f"{' (counted from 0)' if counted_from_1 else ''}.")
    value = old_value - 1 if counted_from_1 else old_value
    deprecated(f"{old} {old_value}{' (counted from 1)' if counted_from_1 else ''}",
               f"{new} {value}{' (counted from 0)' if counted_from_1 else ''}")
    return value


def effective_config(config: Path | None, overrides: list[str] | None):
    """Defaults + the YAML file + the --set overrides (the config module is imported here, not at start-up)."""
    from stainmil.config import load_config

    return load_config(config, overrides)


def seed_list(text: str) -> list[int]:
    """`--seeds 0,1,2` -> [0, 1, 2]; empty -> []."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise ConfigError(f"--seeds '{text}' must be comma-separated integers, e.g. 0,1,2.") from exc


def friendly(fn):
    """Turn a StainmilError into one red sentence and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        stop_cleanly_on_sigterm()
        try:
            return fn(*args, **kwargs)
        except Terminated:
            err.print("stopped by SIGTERM (a time limit, `scancel`, `kill`): what was finished is kept and no "
                      "half-written file is left; run the same command again to resume.", soft_wrap=True)
            raise typer.Exit(143) from None
        except StainmilError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as exc:  # a write outside the atomic writers that met a full or read-only disk
            found = output_error(exc, Path(exc.filename).parent if exc.filename else "an output folder",
                                 creating=False)
            if found is None:
                raise
            err.print(f"[bold red]error:[/] {found}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _synth_route(args: list[str]) -> tuple[str, list[str]]:
    """An old `stainmil synth ...` (one command; the folder could be an argument) -> its mode and arguments."""
    if args and not args[0].startswith("-"):  # `synth FOLDER ...`
        if option_given(args, "--out"):
            refuse(f"'{args[0]}' is not a mode of stainmil synth (patches, slides, serial), and --out is given too; "
                   "write stainmil synth patches --out FOLDER.")
        args = ["--out", *args]
    if option_given(args, "--section-mm"):
        return "serial", drop_option(args, "--serial", takes_value=False)
    if option_given(args, "--slide-format") or option_given(args, "--slides"):
        return "slides", rename_option(args, "--slides", "--slide-format")
    return "patches", args


synth_app = typer.Typer(cls=mode_group("synth", _synth_route, deprecated), no_args_is_help=True,
                        help="Render a synthetic cohort: patches (the patch route), slides (the same slices also as "
                             "whole-slide images), serial (real-size serial sections as a scanner writes them).")
app.add_typer(synth_app, name="synth")


def synth_cohort(out: OutOpt = None,
                 preset: Annotated[str, typer.Option(help="demo | tiny | real-shape | stain-key | stain-key-tiny | "
                                                          "stain-free | serial | serial-tiny")] = "demo",
                 cases: Annotated[int | None, typer.Option(help="Number of cases.")] = None,
                 benign_fraction: Annotated[float | None, typer.Option(help="Share of benign cases.")] = None,
                 slices: Annotated[str | None, typer.Option(help="Slices per stain, 'min-max' (e.g. 1-15).")] = None,
                 patch_size: Annotated[int | None, typer.Option(help="Patch side in pixels.")] = None,
                 slice_size: Annotated[int | None, typer.Option(help="Slice image side in pixels.")] = None,
                 signal: Annotated[float | None, typer.Option(help="Lesion signal strength 0..1 (difficulty).")] = None,
                 missing_stain_prob: Annotated[float | None, typer.Option(
                     help="Chance a case lacks one stain.")] = None,
                 key_stain: Annotated[str | None, typer.Option(
                     help="Stain-keyed cohort: every stain drawn alike, the label shown in this stain only (he | "
                          "melan | sox10).")] = None,
                 classes: ClassesOpt = None,
                 decoy_fraction: Annotated[float | None, typer.Option(
                     help="Stain-keyed cohort: share of cases (both classes) whose other stains show the same "
                          "evidence as decoys.")] = None,
                 stain_free: Annotated[float | None, typer.Option(
                     help="Stain-free cohort: every stain drawn alike, each stain of a non-benign case showing its "
                          "evidence with this probability (at least one does).")] = None,
                 seed: Annotated[int | None, typer.Option(help="Random seed (deterministic output).")] = None,
                 serial: SerialOpt = None,
                 slide_format: Annotated[str, typer.Option(
                     help="The whole-slide format: tiff | svs | dicom.")] = "tiff") -> None:
    """Write the cohort (``stainmil synth patches``) and, with ``slide_format``, its slides (``synth slides``)."""
    import dataclasses

    from stainmil.data.synth import PRESETS, SLIDE_FORMATS, write_cohort, write_slides

    if out is None:
        raise ConfigError("stainmil synth needs an output folder: add --out FOLDER.")
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'; choose one of {sorted(PRESETS)}.")
    if slide_format and slide_format not in SLIDE_FORMATS:
        raise ConfigError(f"--slide-format '{slide_format}' is not one of {', '.join(SLIDE_FORMATS)}.")
    changes = {k: v for k, v in dict(
        cases=cases, benign_fraction=benign_fraction, patch_size=patch_size, slice_size=slice_size, signal=signal,
        missing_stain_prob=missing_stain_prob, key_stain=key_stain, decoy_fraction=decoy_fraction,
        stain_free=stain_free, classes=classes, seed=seed, serial=serial).items() if v is not None}
    if slices:
        try:
            lo, hi = (int(v) for v in slices.split("-"))
        except ValueError as exc:
            raise ConfigError(f"--slices '{slices}' must look like 1-15.") from exc
        changes["slices_per_stain"] = (lo, hi)
    config = dataclasses.replace(PRESETS[preset], **changes)
    path = write_cohort(out, config)
    console.print(f"synthetic cohort written to [bold]{path}[/]; next: stainmil index --config {path / 'cohort.yaml'}")
    if slide_format:
        write_slides(path, mpp=0.5, upsample=2, aperio=slide_format == "svs", dicom=slide_format == "dicom")
        console.print(f"{slide_format} slides in [bold]{path / 'slides'}[/]; slide route: stainmil tile --config "
                      f"{path / 'slides.yaml'}")


synth_app.command("patches", help="A synthetic multi-stain cohort of patches (slices, masks, patches, "
                  "lesion outlines, labels.csv, cohort.yaml) in --out.")(
    friendly(without_parameter(synth_cohort, "slide_format", "")))
synth_app.command("slides", help="The same cohort, its slices also written as whole-slide images (slides/ + "
                  "slides.yaml) for the slide route (`stainmil tile`).")(friendly(synth_cohort))


@synth_app.command("serial")
@friendly
def synth_serial(out: OutOpt = None,
                 section_mm: Annotated[float, typer.Option(help="Section side in mm.")] = 8.0,
                 mpp: Annotated[float, typer.Option(help="Level-0 µm per pixel.")] = 0.5,
                 cases: Annotated[int, typer.Option(help="Number of cases.")] = 2,
                 overlap: Annotated[float, typer.Option(help="Share of each section's nuclei that are the block's "
                                                             "(two sections share about its square: 0.35 -> 12%; "
                                                             "1: the same cells in every section).")] = 0.35,
                 artefacts: Annotated[bool, typer.Option(help="Bubbles and a pen mark on each section.")] = False,
                 seed: Annotated[int, typer.Option(help="Random seed (deterministic output).")] = 0) -> None:
    """Real-size serial sections, streamed tile by tile into pyramidal TIFFs named as a scanner names them
    (C001_HE_S0.tiff), each its own cells on the block's tissue, with landmarks in µm (for `stainmil register`)."""
    from stainmil.data.serial_wsi import write_serial_wsi

    if out is None:
        raise ConfigError("stainmil synth serial needs an output folder: add --out FOLDER.")
    folder = write_serial_wsi(out, section_mm, mpp, cases=cases, seed=seed, overlap=overlap, artefacts=artefacts)
    console.print(f"real-size serial sections in [bold]{folder}[/]; next: stainmil tile --config "
                  f"{folder.parent / 'slides.yaml'} and stainmil register --config {folder.parent / 'slides.yaml'}")


@app.command()
@friendly
def index(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Index and validate a patch folder -> manifest.parquet + index_report.txt/.json."""
    from stainmil.data.cohort import report_text
    from stainmil.pipeline import index_cohort

    cfg = effective_config(config, set_)
    out, report = index_cohort(cfg)
    console.print(report_text(report), highlight=False)
    console.print(f"manifest and report in [bold]{out}[/]")


@app.command()
@friendly
def split(config: ConfigOpt = None, set_: SetOpt = None, out: OutOpt = None) -> None:
    """Case-level stratified splits (holdout 60/20/20, kfold, repeated_kfold) -> data_splits*.npz.

    Written to --out (default <output_dir>/splits).
    """
    from stainmil.data.cohort import case_labels, load_manifest
    from stainmil.data.splits import load_split, split_table
    from stainmil.pipeline import split_cohort

    cfg = effective_config(config, set_)
    paths = split_cohort(cfg, out)
    labels = case_labels(load_manifest(cfg))
    for path in paths:
        console.print(f"[bold]{path}[/]")
        console.print(split_table(load_split(path), labels, cfg.data.class_names).to_string(index=False))


@app.command()
@friendly
def extract(config: ConfigOpt = None, set_: SetOpt = None, launcher: LauncherOpt = "local",
            shards: ShardsOpt = 1,
            shard_index: Annotated[int | None, typer.Option(
                help="Run only the shard with this index, counted from 0 (0 .. --shards - 1), as "
                     "$SLURM_ARRAY_TASK_ID counts.")] = None,
            shard: Annotated[int | None, typer.Option(hidden=True, help="Deprecated: --shard-index.")] = None,
            verify: Annotated[bool, typer.Option(help="On resume, read every finished slice file and compare it "
                                                      "with its checksum (default: a cheap check of shape, dtype "
                                                      "and checksum attribute).")] = False) -> None:
    """Extract backbone features once per patch into the feature store (resumes where it stopped; a damaged file
    found on resume is extracted again)."""
    from stainmil.features.extract import extract_sharded

    shard_index = renamed("--shard", shard, "--shard-index", shard_index)
    cfg = effective_config(config, set_)
    for summary in extract_sharded(cfg, shards=shards, shard=shard_index, verify=verify,
                                   launch=_launch(launcher)):
        for damaged in summary.reextracted:
            console.print(f"[yellow]damaged, extracted again:[/] {damaged}", highlight=False)
        console.print(f"{summary.slices_written} slices written ({summary.slices_done_before} already done), "
                      f"{summary.patches_written} patches in {summary.seconds:.1f} s "
                      f"({summary.patches_per_second:.0f} patches/s); store: [bold]{summary.store_dir}[/]")


@app.command("train")
@friendly
def train_cmd(config: ConfigOpt = None, set_: SetOpt = None,
              resume: ResumeOpt = None,
              evaluate: Annotated[bool, typer.Option(help="Evaluate on the test split afterwards.")] = True) -> None:
    """Train one run on one split -> runs/run_YYYYMMDD_HHMMSS/ (or continue one with --resume)."""
    from stainmil.evaluate.evaluation import evaluate_run
    from stainmil.train.trainer import train

    cfg = effective_config(config, set_)
    result = train(cfg, resume_dir=resume)
    console.print(f"trained {result.epochs_run} epochs (best {result.best_epoch}, val loss "
                  f"{result.best_val_loss:.4f}); run folder: [bold]{result.run_dir}[/]")
    if evaluate:
        _print_evaluation(evaluate_run(result.run_dir), result.run_dir)


def _print_evaluation(evaluation, run_dir: Path) -> None:
    from rich.table import Table

    metrics, classes = evaluation.metrics, evaluation.classes
    split_name = metrics["evaluated_split"]
    m = metrics["splits"][split_name]
    decision = f"threshold {metrics['threshold']:.3f} ({metrics['threshold_rule']})" if classes.binary else \
        metrics["threshold_rule"]
    table = Table(title=f"{split_name}: {m['n_cases']} cases, {decision}")
    for column in ("metric", "value", "95% CI"):
        table.add_column(column)
    for key in classes.shown_metrics:
        lo, hi = m["ci95"][key]
        table.add_row(key, f"{m[key]:.3f}", f"[{lo:.3f}, {hi:.3f}]")
    console.print(table)
    console.print(f"predictions, metrics and figures in [bold]{run_dir}[/]")


@app.command("evaluate")
@friendly
def evaluate_cmd(run: Annotated[Path, typer.Argument(help="Run folder.")],
                 split_name: SplitOpt = "test") -> None:
    """Re-evaluate a finished run (best checkpoint; threshold chosen on val)."""
    from stainmil.evaluate.evaluation import evaluate_run

    _print_evaluation(evaluate_run(run, split_name), run)


@app.command()
@friendly
def predict(checkpoint: Annotated[Path, typer.Option(help="A run's checkpoints/best.pth.")],
            config: ConfigOpt = None, set_: SetOpt = None,
            out: OutOpt = None,
            threshold: Annotated[float | None, typer.Option(help="Override the run's threshold.")] = None,
            explain: Annotated[bool, typer.Option(help="Attention tables, heatmaps and report.html too.")] = True
            ) -> None:
    """Predict (and explain) the unlabelled cases of a patch folder or tiled slides with a trained checkpoint.

    Written to --out (default <output_dir>/predictions).
    """
    from stainmil.analysis.new_cases import predict_unlabelled

    folder = predict_unlabelled(checkpoint, effective_config(config, set_), out, threshold, explain)
    console.print(f"predictions: [bold]{folder / 'predictions.csv'}[/]")
    if explain:
        console.print(f"report: [bold]{folder / 'report.html'}[/]  (heatmaps and tables in {folder / 'attention'})")


export_app = typer.Typer(help="Export a run's or a prediction set's explanations to other tools.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("qupath")
@friendly
def export_qupath_cmd(folder: Annotated[Path, typer.Argument(help="Run folder or `stainmil predict` folder.")],
                      split_name: SplitOpt = None,
                      out: OutOpt = None) -> None:
    """One GeoJSON per slice for QuPath (File > Import objects): a tile per patch with its attention.

    Written to --out (default <folder>/qupath). Run folders: --split defaults to the analysed cases, else test.
    """
    from stainmil.analysis.qupath import export_folder

    result = export_folder(folder, split_name, out)
    console.print(f"{len(result.files)} GeoJSON files (one per slice) in [bold]{result.out_dir}[/]; "
                  f"index.csv names the image each belongs to")
    for what, why in result.skipped.items():
        console.print(f"[yellow]skipped {what}: {why}[/]", highlight=False)


@app.command()
@friendly
def demo(out: OutOpt = Path("demo_out"),
         set_: SetOpt = None,
         weights: WeightsOpt = "auto",
         preset: Annotated[str, typer.Option(help="Synthetic cohort preset: demo | tiny | real-shape | serial | "
                                                  "serial-tiny.")] = "demo",
         slides: SlideRouteOpt = False,
         classes: ClassesOpt = 2,
         serial: SerialOpt = False,
         ) -> None:
    """synth -> index (or tile slides) -> split -> extract -> train -> evaluate -> report on a synthetic cohort.

    --serial runs the slide route on serial sections (default preset: serial), registered after tiling: the
    report maps the IHC attention onto the H&E slices.
    """
    from stainmil.pipeline import run_demo

    if serial and preset == "demo":
        preset = "serial"
    result = run_demo(out, set_, weights, log=lambda msg: console.print(msg, highlight=False), preset=preset,
                      slides=slides, classes=classes, serial=serial)
    _print_evaluation(result.evaluation, result.training.run_dir)
    console.print(result.analysis_summary, highlight=False)
    console.print(f"report: [bold]{result.report}[/]  (open it in a browser)")
    console.print(f"the test cases predicted as new cases (labels withheld): [bold]{result.predictions / 'report.html'}"
                  "[/]")
    if result.weights_note:
        console.print(f"[bold yellow]{result.weights_note}[/]")


@app.command()
@friendly
def analyze(run: Annotated[Path, typer.Argument(help="Run folder.")],
            split_name: SplitOpt = "test",
            top_k: Annotated[int | None, typer.Option(help="Top-k patches counted per case.")] = None,
            set_: SetOpt = None) -> None:
    """Attention tables, figures and heatmaps of a run -> <run>/attention/; scored against a pathologist's lesion
    outlines with --set analysis.truth=FOLDER (QuPath GeoJSON per slide)."""
    from stainmil.analysis.analyze import summary_text, write_analysis

    result = write_analysis(run, split_name, top_k, settings=set_)
    console.print(summary_text(result.tables.summary), highlight=False)
    console.print(f"{len(result.heatmaps)} slices mapped; tables and figures in [bold]{result.out_dir}[/]")


@app.command()
@friendly
def report(run: Annotated[Path, typer.Argument(help="Run folder.")], set_: SetOpt = None) -> None:
    """Write <run>/report.html: one self-contained page (runs `analyze` first, with its --set analysis.…)."""
    from stainmil.analysis.report import build_report

    page = build_report(run, settings=set_)
    console.print(f"report: [bold]{page}[/]\nthe slides at full resolution, every stain of a case "
                  f"side by side: [bold]stainmil view {run}[/]")


@app.command()
@friendly
def check(folder: Annotated[Path, typer.Argument(help="A store, tiles, registration or run folder, or a whole "
                                                      "output_dir (everything under it).")],
          repair: Annotated[bool, typer.Option(help="Remove what is damaged and rerun only that (extract, tile, "
                                                    "register).")] = False,
          config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Verify what stainmil wrote (store checksums, coordinates, transforms, checkpoints) and list each damaged or
    missing file with what to rerun; exit code 1 when anything is. --repair mends it."""
    from stainmil.check import check_folder
    from stainmil.check import repair as repair_folder

    result = check_folder(folder)
    if repair and not result.ok:
        console.print(result.text(), highlight=False, markup=False)
        result = repair_folder(result, effective_config(config, set_) if config else None, log=plain_log)
    console.print(result.text(), highlight=False, markup=False)
    if not result.ok:
        raise typer.Exit(1)


@app.command()
@friendly
def view(folder: Annotated[Path, typer.Argument(help="A run, CV fold, `predict` or `compare-models` folder.")],
         port: Annotated[int, typer.Option(help="Port to serve on (the next free one when it is taken).")] = 8765,
         host: Annotated[str, typer.Option(help="Address to listen on; 127.0.0.1 keeps the slides on this "
                                                "machine.")] = "127.0.0.1",
         open_browser: Annotated[bool, typer.Option("--open/--no-open", help="Open the browser.")] = True,
         slides_dir: Annotated[Path | None, typer.Option(help="Where the slides are now, if they moved since the "
                                                              "run (found there by file name).")] = None,
         analyze: Annotated[bool, typer.Option(help="First analyse every trained run under FOLDER that has no "
                                                    "analysis yet (CV folds, compare-models runs): its test "
                                                    "cases.")] = False,
         review: Annotated[str | None, typer.Option(help="Review as NAME: draw polygons, mark the top-k patches, "
                                                         "note and grade each case; saved under "
                                                         "<output_dir>/reviews/NAME.")] = None) -> None:
    """A local web app: the case list, and each case's slides of every stain side by side at full resolution, with
    attention overlays, moving together through the registration (Ctrl-C stops it). With --review NAME a
    pathologist also draws and saves a review."""
    from stainmil.view.server import ViewerServer

    if review is not None:
        from stainmil.view.reviews import check_review_name

        check_review_name(review)                     # before any analysis or port is taken
    if analyze:
        from stainmil.analysis.analyze import write_analyses
        from stainmil.view.folder import unanalysed_runs

        write_analyses(unanalysed_runs(folder.resolve()), "test", log=console.print)

    server = ViewerServer(folder, host=host, port=port, slides_dir=slides_dir, review=review)
    if server.port != port:
        console.print(f"port {port} is in use; serving on {server.port}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]warning:[/] listening on {host}: anyone who can reach this machine can see these slides.")
    console.print(f"stainmil view: [bold]{server.url}[/] ({len(server.catalog.sources)} result folder(s) of "
                  f"{server.catalog.folder}); Ctrl-C stops it")
    if server.review is not None and server.catalog.sources:
        console.print(f"reviewing as [bold]{review}[/]: saved in {server.review.folder(server.catalog.sources[0])}")
    server.run(open_browser=open_browser)


@app.command()
@friendly
def tile(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Slides -> tissue masks -> patch coordinates at tile.mpp / tile.magnification (CLAM/TRIDENT HDF5).

    data.source=slides (the slide route) also writes the index, so `extract` reads straight from the slides;
    data.source=patches writes PNG patches for `stainmil index`.
    """
    from stainmil.data.slide_route import tile_cohort

    cfg = effective_config(config, set_)
    result, index_dir = tile_cohort(cfg)
    console.print((Path(result.out_dir) / "tile_report.txt").read_text(), highlight=False)
    console.print(f"{len(result.slides)} slides -> {len(result.table)} patches in [bold]{result.out_dir}[/]"
                  + (f"; index in [bold]{index_dir}[/] (next: stainmil extract)" if index_dir else
                     "; PNG patches written (next: stainmil index with data.patches_dir set to that folder)"))


@app.command()
@friendly
def register(config: ConfigOpt = None, set_: SetOpt = None, workers: WorkersOpt = 0) -> None:
    """Register every IHC slice of a case to an H&E slice of the same case (after `tile`): transforms in µm both
    ways, and a verdict (aligned | doubtful | failed) with its reason per pair. Resumable. --workers N: N pairs at
    once, each in its own process (0, the default: register.workers); the transforms are the same for any N."""
    from stainmil.data.register_cohort import register_cohort

    settings = effective_config(config, set_)
    if workers:
        settings = settings.with_overrides({"register.workers": workers})
    result = register_cohort(settings)
    console.print((result.out_dir / "register_report.txt").read_text(), highlight=False)
    console.print(f"{len(result.table)} slices registered; transforms and report in [bold]{result.out_dir}[/]")


@app.command("review-summary")
@friendly
def review_summary(config: ConfigOpt = None, set_: SetOpt = None,
                   reviews: Annotated[Path | None, typer.Option(
                       help="The reviews folder (default: <output_dir>/reviews of --config).")] = None,
                   markdown: MarkdownOpt = False, json_: JsonOpt = False) -> None:
    """How far reviewers agree: Cohen's kappa on the patches two reviewers both marked, Dice of their lesion outlines
    per slide (from `stainmil view --review NAME`). Writes review_agreement.csv and review_slides.csv there."""
    from stainmil.analysis.agreement import review_agreement
    from stainmil.io import atomic_write
    from stainmil.tables import render_table

    settings = effective_config(config, set_)
    folder = reviews or settings.paths.reviews_dir
    result = review_agreement(folder, settings.analysis.lesion_classes)
    for name, frame in (("review_agreement", result.pairs), ("review_slides", result.slides)):
        atomic_write(folder / f"{name}.csv", lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
    rows = result.pairs.round(3).to_dict("records")
    typer.echo(render_table(rows, None, _table_format(markdown, json_)), nl=False)
    for problem in result.problems:
        console.print(f"[yellow]{problem}[/]", highlight=False)


@app.command("import-features")
@friendly
def import_features_cmd(
        folder: Annotated[Path, typer.Argument(help="TRIDENT job or features_<encoder> folder; CLAM feature folder.")],
        config: ConfigOpt = None, set_: SetOpt = None,
        format_: Annotated[str, typer.Option("--format", help="auto | trident | clam.")] = "auto",
        encoder: Annotated[str, typer.Option(help="TRIDENT: which features_<encoder> folder when there are several; "
                                                  "CLAM: the encoder's name (default: the folder's).")] = "",
        unlabelled: Annotated[bool, typer.Option(help="New cases for `stainmil predict`: no labels CSV.")] = False,
) -> None:
    """Features made by TRIDENT or CLAM -> a stainmil store and index, without re-extracting.

    Slide names map to case/stain/slice through tile.filename_pattern; heatmaps draw on the slides when
    tile.slices_dir holds them. Next: stainmil split / train / cv with the same config.
    """
    from stainmil.data.cohort import write_index
    from stainmil.features.external import import_features

    cfg = effective_config(config, set_)
    result = import_features(cfg, folder, format_, encoder, require_labels=not unlabelled)
    index_dir = write_index(result.index, cfg)
    console.print((result.store_dir / "import_report.txt").read_text(), highlight=False)
    console.print(f"{len(result.slides)} slides, {len(result.index.manifest)} patches of {result.meta.backbone} "
                  f"features in [bold]{result.store_dir}[/]; index in [bold]{index_dir}[/] (next: stainmil split)")


@app.command()
@friendly
def cv(config: ConfigOpt = None, set_: SetOpt = None,
       folds: FoldsOpt = 5,
       repeats: Annotated[int, typer.Option(help="Repeats of the k-fold (reshuffled).")] = 1,
       splits_dir: Annotated[Path | None, typer.Option(help="Use these data_splits_*.npz instead.")] = None,
       launcher: LauncherOpt = "local",
       resume: ResumeOpt = None,
       fold_index: Annotated[int | None, typer.Option(
           help="Run only the fold with this index of --resume's experiment, counted from 0 (fold_01 is 0), as "
                "$SLURM_ARRAY_TASK_ID counts.")] = None,
       fold: Annotated[int | None, typer.Option(hidden=True, help="Deprecated: --fold-index (from 0).")] = None,
       tune: Annotated[int, typer.Option(help="Nested CV: this many Optuna trials per outer fold, tuned on its "
                                              "non-test cases only (0 = off).")] = 0,
       seeds: SeedsOpt = "",
       workers: WorkersOpt = 1,
       ) -> None:
    """Cross-validation by case -> cv_summary.csv, cv_report.txt, pooled out-of-fold metrics with CIs.

    --seeds 0,1,2: the whole CV once per seed on the same folds, the spread over seeds next to the spread over
    folds (one seed: a plain CV with that train.seed). --tune N: nested CV beside the optimistic non-nested
    estimate.
    """
    from stainmil.experiments.cv import run_cv

    fold_index = renamed("--fold", fold, "--fold-index", fold_index, counted_from_1=True)
    cfg = effective_config(config, set_)
    seed_values = cv_seed_list(seeds, cfg.train.seed)
    if len(seed_values) == 1:
        cfg = cfg.with_overrides({"train.seed": seed_values[0]})
    several_seeds = len(seed_values) > 1
    if tune and several_seeds:
        raise ConfigError("--tune and several --seeds are separate experiments; run one, then the other.")
    if fold_index is not None and (tune or several_seeds):
        raise ConfigError("--fold-index runs one fold of a plain CV experiment, not of --tune or several --seeds.")
    if tune:
        from stainmil.experiments.nested import run_nested_cv

        if workers > 1:
            raise ConfigError("--tune trains one outer fold at a time; drop --workers (or use --launcher slurm).")
        out = Path(run_nested_cv(cfg, trials=tune, folds=folds, splits_dir=splits_dir, out_dir=resume,
                                 launch=_launch(launcher))["out_dir"])
        console.print((out / "nested_report.txt").read_text(), highlight=False, markup=False)
        console.print(f"experiment folder: [bold]{out}[/]")
        return
    if several_seeds:
        from stainmil.experiments.seeds import run_cv_seeds

        out = run_cv_seeds(cfg, seeds=seed_values, folds=folds, repeats=repeats, splits_dir=splits_dir, out_dir=resume,
                           launch=_launch(launcher, workers))[1]
        console.print((out / "seeds_report.txt").read_text(), highlight=False, markup=False)
        console.print(f"experiment folder: [bold]{out}[/]")
        return
    result = run_cv(cfg, folds=folds, repeats=repeats, splits_dir=splits_dir, out_dir=resume, only_fold=fold_index,
                    launch=_launch(launcher, workers))
    if result is not None:
        console.print((result.out_dir / "cv_report.txt").read_text(), highlight=False, markup=False)
        console.print(f"experiment folder: [bold]{result.out_dir}[/]")


def cv_seed_list(text: str, base_seed: int) -> list[int]:
    """cv's --seeds: a list like every command's; a bare integer N is, for this release, the old count (the
    seeds base_seed .. base_seed + N - 1, as before), with a deprecation line."""
    if not text.strip().isdigit():
        return seed_list(text)
    count = int(text)
    if count < 1:
        raise ConfigError(f"--seeds {count} as a count must be at least 1; write the seeds, e.g. --seeds 0,1,2.")
    seeds = list(range(base_seed, base_seed + count))
    deprecated(f"cv --seeds {count} (a count of seeds)", f"--seeds {','.join(map(str, seeds))}" if count > 1
               else "no --seeds (one seed: train.seed)")
    return seeds


@app.command("compare-encoders")
@friendly
def compare_encoders_cmd(
        config: ConfigOpt = None, set_: SetOpt = None,
        backbones: Annotated[str, typer.Option(help="Comma-separated encoder names (see `stainmil backbones`).")] = "",
        folds: FoldsOpt = 5,
        launcher: LauncherOpt = "local",
        out: OutOpt = None,
        resume: ResumeOpt = None) -> None:
    """Extract + cross-validate several encoders on the same folds and seeds -> one table with CIs and img/s.

    Written to --out (default <output_dir>/runs/encoders_YYYYMMDD_HHMMSS/); --resume FOLDER continues an
    interrupted comparison (finished folds are skipped).
    """
    from stainmil.experiments.compare import compare_encoders
    from stainmil.tables import render_table

    cfg = effective_config(config, set_)
    names = [n.strip() for n in backbones.split(",") if n.strip()]
    table = compare_encoders(cfg, backbones=names, folds=folds, out_dir=out_or_resume(out, resume),
                             launch=_launch(launcher))
    shown = ["encoder", "dim", "extraction_img_s", "auc", "auc_ci95", "balanced_accuracy"]
    typer.echo(render_table(table[shown].to_dict("records"), shown), nl=False)
    typer.echo("every column: encoders.csv and encoders.md in the comparison folder")


@app.command("compare-models")
@friendly
def compare_models_cmd(
        config: ConfigOpt = None, set_: SetOpt = None,
        models: Annotated[str, typer.Option(
            help="Comma-separated architectures, each optionally with a stain identity: "
                 "hierarchical,hierarchical:embedding,abmil,transmil,clam_sb,clam_mb,dsmil,dtfd_mil,mean,max "
                 "(`stainmil models`).")] = "hierarchical,abmil,transmil,clam_sb,clam_mb,dsmil,dtfd_mil,mean,max",
        folds: FoldsOpt = 5,
        seeds: SeedsOpt = "",
        stain_sets: Annotated[str, typer.Option(
            help="Comma-separated stain sets, stains joined by '+', e.g. he,he+melan+sox10 (default data.stains).")
        ] = "",
        launcher: LauncherOpt = "local",
        workers: WorkersOpt = 1,
        out: OutOpt = None,
        resume: ResumeOpt = None,
        preset: Annotated[str, typer.Option(
            help="A named comparison instead of --models/--stain-sets: multistain = hierarchical, "
                 "hierarchical:none, abmil, late_fusion, mustang, biox_cpath, cross_attention, on every stain "
                 "together and on each stain alone.")] = "") -> None:
    """Cross-validate MIL architectures (x stain sets) on the same folds and seeds -> models.csv/.md/.html.

    Written to --out (default <output_dir>/runs/models_YYYYMMDD_HHMMSS/); --resume FOLDER continues an
    interrupted comparison (finished folds are skipped).
    """
    from stainmil.experiments.compare_models import auc_by_stain_set, compare_models, preset_models
    from stainmil.tables import render_table

    cfg = effective_config(config, set_)
    chosen = [m for m in models.split(",") if m.strip()]
    sets = [s for s in stain_sets.split(",") if s.strip()] or None
    if preset:
        chosen, sets = preset_models(preset, cfg.data.stains)
    table = compare_models(cfg, models=chosen, folds=folds, seeds=seed_list(seeds) or None, stain_sets=sets,
                           out_dir=out_or_resume(out, resume), launch=_launch(launcher, workers))
    shown = ["model", "n_cases", "auc", "auc_ci95", "delta_auc", "delta_auc_ci95"]
    typer.echo(render_table(table[shown].to_dict("records"), shown), nl=False)
    by_stains = auc_by_stain_set(table)
    if by_stains is not None:
        typer.echo("\n" + render_table(by_stains.to_dict("records")), nl=False)
    typer.echo("every column (balanced accuracy, recall per class, Brier, parameters, s/epoch): models.csv, "
               "models.md, models.html in the comparison folder")


def out_or_resume(out: Path | None, resume: Path | None) -> Path | None:
    """The comparison folder: a new one (--out, or a dated one when None) or an interrupted one (--resume)."""
    if resume is None:
        return out
    if out is not None:
        raise ConfigError("--out starts a new comparison and --resume continues one; give only one of them.")
    if not (resume / "splits").is_dir():
        raise ConfigError(f"{resume} is not a comparison folder (no splits/); pass the folder an earlier "
                          "compare-encoders or compare-models printed.")
    return resume


@app.command()
@friendly
def tune(config: ConfigOpt = None, set_: SetOpt = None,
         trials: Annotated[int | None, typer.Option(help="Trials to add (default tune.trials).")] = None,
         storage: Annotated[str | None, typer.Option(help="Journal file or Optuna URL (default "
                                                          "<output_dir>/tune/<study>/study.journal).")] = None,
         workers: WorkersOpt = 1,
         launcher: LauncherOpt = "local",
         resume: ResumeOpt = None) -> None:
    """Optuna search (TPE + median pruning) -> trials.csv, best_config.yaml, plots; re-run to continue.

    Written to <output_dir>/tune/<study>/; re-running the same command, or --resume with that folder (its own
    config.yaml), adds trials to the same study.
    """
    from stainmil.experiments.tune import run_tune

    if resume is not None:
        if config is not None:
            raise ConfigError("--resume continues a study with its own config.yaml; drop --config.")
        if not (resume / "config.yaml").is_file():
            raise ConfigError(f"{resume} is not a tune folder (no config.yaml); pass <output_dir>/tune/<study>/.")
        config = resume / "config.yaml"
    cfg = effective_config(config, set_)
    if resume is not None:
        cfg = cfg.with_overrides({"tune.dir": str(resume)})  # its journal, even if the folder was moved
    if storage:
        cfg = cfg.with_overrides({"tune.storage": storage})
    result = run_tune(cfg, trials=trials, launch=_launch(launcher, workers))
    console.print(f"{result.n_trials} trials in the study; best {cfg.tune.metric} {result.best_value:.4f} with "
                  f"{result.best_params}; outputs in [bold]{result.out_dir}[/] (best_config.yaml is ready to train)")


@app.command("slurm-script")
@friendly
def slurm_script(task: Annotated[str, typer.Argument(help="extract | cv | tune")],
                 config: ConfigOpt = None, set_: SetOpt = None,
                 out: OutOpt = Path("."),
                 shards: ShardsOpt = 8,
                 folds: FoldsOpt = 5,
                 workers: WorkersOpt = 4,
                 experiment: Annotated[Path | None, typer.Option(help="cv: experiment folder made by `stainmil cv "
                                                                      "--launcher local` or prepared before.")] = None
                 ) -> None:
    """Write the equivalent sbatch script, for users who prefer to submit by hand.

    Written to --out/stainmil-TASK.sbatch, with the config it runs with beside it (stainmil-TASK.yaml). One array
    task per shard (extract: --shards), per fold (cv: --folds) or per worker (tune: --workers).
    """
    from stainmil.experiments.scripts import write_sbatch

    script = out / f"stainmil-{task}.sbatch"
    if out.suffix in (".sbatch", ".sh", ".slurm") or out.is_file():
        deprecated(f"--out {out} (the script's file name)", f"--out {out.parent} (a folder; the script is named "
                                                           f"{script.name})")
        script = out
    path = write_sbatch(task, effective_config(config, set_), config, script, shards, folds, workers, experiment)
    console.print(f"sbatch script: [bold]{path}[/]  (submit with: sbatch {path})")


def _bench_route(args: list[str]) -> tuple[str, list[str]]:
    """An old `stainmil bench ...` (one command, the modes behind --preset scale and --feed-only) -> its mode."""
    for i, a in enumerate(args):
        if a == "--preset=scale" or (a == "--preset" and args[i + 1:i + 2] == ["scale"]):
            return "scale", drop_option(args, "--preset", takes_value=True)
    if option_given(args, "--feed-only"):
        return "feed", drop_option(args, "--feed-only", takes_value=False)
    return "training", args


bench_app = typer.Typer(cls=mode_group("bench", _bench_route, deprecated), no_args_is_help=False,  # old: the demo
                        help="Measure and print figures: training (extraction, epochs, memory), scale (stores "
                             "many times the real cohort), feed (the data path alone: will a GPU be fed?).")
app.add_typer(bench_app, name="bench")
BENCH_OUT = Path("demo_out/bench")


@bench_app.command("training")
@friendly
def bench_training(preset: BenchPreset = "demo",
                   device: DeviceOpt = "auto",
                   out: OutOpt = BENCH_OUT,
                   image_size: ImageSizeOpt = 0,
                   old_cases: Annotated[int, typer.Option(help="Time the old way on this many cases (0 = all).")] = 0,
                   weights: WeightsOpt = "random",
                   rounds: Annotated[int, typer.Option(help="Forward/extraction rounds, best of each.")] = 2,
                   backbone: Annotated[str, typer.Option(help="Encoder (see `stainmil backbones`).")] = "densenet121",
                   slides: SlideRouteOpt = False,
                   extraction_only: Annotated[bool, typer.Option(help="Only forward vs extraction.")] = False,
                   compile_head: Annotated[bool, typer.Option(
                       "--compile", help="Also time the head under torch.compile (compiles first).")] = False) -> None:
    """Extraction, an epoch (store vs the old way), vectorised vs loop, and memory on a synthetic cohort; one
    table. The cohort, store and JSON figures go to --out."""
    from rich.table import Table

    from stainmil.bench.training import run_bench

    figures = run_bench(out, preset, device, image_size, old_cases, weights, rounds, backbone, slides,
                        extraction_only, compile_head, log=plain_log)
    table = Table(title="stainmil bench")
    table.add_column("figure")
    table.add_column("value")
    for key, value in figures.items():
        table.add_row(key, str(value))
    console.print(table)


@bench_app.command("scale")
@friendly
def bench_scale(scales: Annotated[str, typer.Option(help="Sizes as multiples of the real-shape cohort.")] = "1,10,30",
                cache_mb: Annotated[float, typer.Option(help="features.cache_mb of the bounded runs.")] = 256,
                epochs: Annotated[int, typer.Option(help="Epochs per training run.")] = 2,
                memory_up_to: Annotated[int, typer.Option(help="Also train with the whole store in memory up to "
                                                               "this size.")] = 10,
                scale_cases: Annotated[int, typer.Option(help="Cases at 1x (86 = the real-shape cohort).")] = 86,
                device: DeviceOpt = "auto",
                out: OutOpt = BENCH_OUT) -> None:
    """Random-feature stores at several sizes of the real-shape cohort: epoch time and peak memory, bounded
    store vs in memory; one markdown table (the stores go to --out/scale)."""
    from stainmil.bench.scale import run_scale, scale_markdown

    try:
        sizes = tuple(int(v) for v in scales.split(","))
    except ValueError as exc:
        raise ConfigError(f"--scales '{scales}' must be comma-separated integers, e.g. 1,10,30.") from exc
    table = run_scale(out / "scale", sizes, cache_mb, epochs, memory_up_to, scale_cases, device, log=plain_log)
    console.print(scale_markdown(table), highlight=False, markup=False)


@bench_app.command("feed")
@friendly
def bench_feed(preset: BenchPreset = "demo",
               device: DeviceOpt = "auto",
               out: OutOpt = BENCH_OUT,
               image_size: ImageSizeOpt = 0,
               slides: SlideRouteOpt = False) -> None:
    """The data path alone (decode, collate, copies; no encoder) by decode workers: will a GPU node be fed?"""
    from stainmil.bench.feed import run_feed
    from stainmil.tables import render_table

    figures = run_feed(out, preset, device, image_size, slides, log=plain_log)
    console.print(render_table(figures["rows"], fmt="markdown"), highlight=False, markup=False)


@app.command("config")
@friendly
def config_cmd(config: ConfigOpt = None, set_: SetOpt = None,
               reference: Annotated[bool, typer.Option(help="Print the config reference table.")] = False) -> None:
    """Print the effective config as YAML (defaults + file + overrides), or the reference tables (every
    architecture's model.options.<name> included)."""
    import yaml

    from stainmil.config import config_reference_markdown, config_to_dict
    from stainmil.model.registry import options_reference_markdown

    if reference:
        typer.echo(config_reference_markdown() + "\n## Architecture options\n\n" + options_reference_markdown())
        return
    typer.echo(yaml.safe_dump(config_to_dict(effective_config(config, set_)), sort_keys=False, allow_unicode=True))


@app.command()
@friendly
def backbones(wide: WideOpt = False, markdown: MarkdownOpt = False, json_: JsonOpt = False) -> None:
    """List the registered patch encoders (features.backbone): architecture, input, dimension, size, precision."""
    from stainmil.features.encoders import encoder_table
    from stainmil.tables import render_table

    columns = None if wide or markdown or json_ else ["name", "architecture", "input", "dim", "params_M", "precision"]
    typer.echo(render_table(encoder_table(), columns, _table_format(markdown, json_)), nl=False)


@app.command()
@friendly
def models(wide: WideOpt = False, markdown: MarkdownOpt = False, json_: JsonOpt = False) -> None:
    """List the MIL architectures (model.architecture): patch attention or not and its options
    (model.options.<name>.<key>; `stainmil config --reference` explains them); --wide adds the stain identities each
    takes, what it needs and the paper it follows."""
    from stainmil.model.registry import architecture_rows
    from stainmil.tables import render_table

    columns = None if wide or markdown or json_ else ["name", "attention", "options"]
    typer.echo(render_table(architecture_rows(), columns, _table_format(markdown, json_)), nl=False)


def plain_log(message: str) -> None:
    """Progress lines of long commands, printed as they are (a model name like 'abmil [he]' is not markup)."""
    console.print(message, markup=False, highlight=False)


def _launch(launcher: str, workers: int = 1):
    """How an experiment command runs its jobs (``--launcher``, ``--workers``), its progress lines printed plainly."""
    from stainmil.launch import Launch

    return Launch(launcher, workers, plain_log)


def _table_format(markdown: bool, json_: bool) -> str:
    if markdown and json_:
        raise typer.BadParameter("choose one of --markdown and --json.")
    return "markdown" if markdown else "json" if json_ else "text"
