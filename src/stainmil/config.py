"""Typed configuration: dataclasses, YAML in/out, ``--set section.key=value`` overrides.

Every field has a default equal to the team's previous pipeline where one existed
(``per_slice_cap: 500``, ``max_slices_per_stain: 5``, Adam, ReduceLROnPlateau factor 0.3,
``early_stopping_patience: 8``, embed dim 512, attention hidden dim 128). Each field carries a
one-line ``help`` that the docs' configuration reference is generated from
(:func:`config_reference_markdown`), so the documentation cannot drift.

Relative paths in a YAML file are resolved against the current working directory when the
config is loaded; the copy dumped into every output folder holds absolute paths, so a run
folder can be re-evaluated from anywhere.

Configs are frozen: ``config.with_overrides({"train.lr": 1e-3})`` returns a new, validated one,
so no function can change the config it was given. Derived locations (index, store, splits,
runs, registration) are in ``config.paths`` (:class:`Paths`), computed from the config alone.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from stainmil.classes import ClassScheme
from stainmil.errors import ConfigError
from stainmil.io import atomic_write_text

STAINS = ("he", "melan", "sox10")
LEVELS = ("patch", "slice", "stain")

DEFAULT_FILENAME_PATTERN = (
    r"case(?P<case>[^_/]+)_(?P<stain>[^_/]+)_slice(?P<slice>[^_/]+)_patch(?P<patch>\d+)"
    r"_x(?P<x>\d+)_y(?P<y>\d+)\.(?:png|jpe?g|tiff?)$"
)


def stain_key(name: object) -> str:
    """A stain name as compared: lower case, letters and digits only (``Melan-A`` -> ``melana``, ``H&E`` -> ``he``)."""
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


def setting(text: str, **kwargs: Any) -> Any:
    """A dataclass field with a one-line help text (used for the config reference)."""
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class DataConfig:
    patches_dir: str = setting("Folder of patch images, walked recursively.", default="")
    labels_csv: str = setting("CSV with one row per case (case id + label word).", default="")
    filename_pattern: str = setting(
        "Regex with named groups case, stain, slice, patch and optional x, y; searched in each "
        "file's name (or relative path, see match_on).",
        default=DEFAULT_FILENAME_PATTERN,
    )
    match_on: Literal["name", "relpath"] = setting(
        "Apply filename_pattern to the file name or to its path relative to patches_dir.", default="name"
    )
    stain_aliases: dict[str, str] = setting(
        "Spelling -> canonical stain (he, melan, sox10); matched ignoring case, spaces and punctuation (H&E = HE = "
        "h_e); a canonical name always stands for itself.",
        default_factory=lambda: {
            "he": "he", "h&e": "he", "hne": "he", "h_e": "he",
            "melan": "melan", "melana": "melan", "melan-a": "melan", "mart1": "melan",
            "sox10": "sox10", "sox-10": "sox10",
        },
    )
    stains: list[str] = setting("Canonical stains, in model order.", default_factory=lambda: list(STAINS))
    case_column: str = setting("Column of labels_csv holding the case id.", default="case_id")
    label_column: str = setting("Column of labels_csv holding the label word.", default="label")
    label_values: dict[str, int] = setting(
        "Label word -> class index (0 = benign, 1 = high-grade); matched case-insensitively.",
        default_factory=lambda: {"benign": 0, "high_grade": 1, "high grade": 1, "high-grade": 1},
    )
    class_names: list[str] = setting("Display name of each class index (default: benign, high_grade for two "
                                   "classes, else each class's first word in label_values).",
                                   default_factory=lambda: ["benign", "high_grade"])
    exclude_cases: list[str] = setting("Case ids left out everywhere (the old pipeline removed 91).",
                                     default_factory=list)
    include_cases: list[str] = setting("Only these case ids are used (empty = every case), e.g. a set of new cases "
                                     "to predict.", default_factory=list)
    expected_patch_size: int = setting("Patch side in pixels; 0 = the most common size in the folder.",
                                     default=0)
    per_slice_cap: int = setting("Training: random patches per slice drawn fresh each epoch (0 = all).",
                               default=500)
    max_slices_per_stain: int = setting("Training: slices per stain, chosen once per run (0 = all).",
                                      default=5)
    subcases: int = setting("Split each *training* case into this many sub-cases (same label; 1 = off).", default=1)
    subcase_mode: Literal["index", "random"] = setting(
        "Sub-case partition: contiguous patch-index ranges within each slice, or random.", default="index")
    index_workers: int = setting("Processes decoding images during indexing (0 = one per core).", default=0)
    source: Literal["patches", "slides"] = setting(
        "patches: index the PNG patches in patches_dir; slides: read patches straight from the slides tiled by "
        "`stainmil tile` (coordinates in tile.out_dir, no PNG written).", default="patches")

    @property
    def classes(self) -> ClassScheme:
        """The class scheme of ``class_names`` (metric names, probability columns, the decision)."""
        return ClassScheme.of(self.class_names)

    def canonical_stain(self, name: object) -> str | None:
        """The canonical stain (one of ``stains``) a file's, table's or setting's stain name stands for, or None.

        Matched through ``stain_aliases`` ignoring case, spaces and punctuation (``H&E``, ``HE``, ``h_e``;
        ``Melan-A``, ``MelanA``, ``Melan A``); a canonical name stands for itself. The one rule every reader of
        stain names uses: the index, tiles.csv, imported features, registrations, ``register.reference_stain``.
        """
        key = stain_key(name)
        for alias, stain in self.stain_aliases.items():
            if stain_key(alias) == key:
                return stain
        return next((stain for stain in self.stains if stain_key(stain) == key), None)



@dataclass(frozen=True)
class FeaturesConfig:
    backbone: str = setting("Registered encoder name (`stainmil backbones` lists them: densenet121, resnet50_trunc, "
                          "uni_v1, virchow2, hoptimus0, …) or file:/path/encoder.py:build.", default="densenet121")
    weights: str = setting("pretrained (the encoder's published weights: torchvision ImageNet or its Hugging Face "
                         "repo; 'imagenet' is a synonym for torchvision encoders) | random | path to a "
                         ".pth/.bin/.safetensors state dict.", default="pretrained")
    image_size: int = setting("Patches are resized to this side before the backbone (ViTs: a multiple of their "
                            "token size).", default=224)
    mean: list[float] = setting("Normalisation mean (RGB); empty = the encoder's own.", default_factory=list)
    std: list[float] = setting("Normalisation std (RGB); empty = the encoder's own.", default_factory=list)
    batch_size: int = setting("Patches per backbone forward pass; 0 = chosen for the device (256 on a GPU, 32 on a "
                            "CPU).", default=0)
    num_workers: int = setting("DataLoader workers decoding patches; -1 = sized to the machine (all cores but one, at "
                             "most 16, on a GPU; half the cores, at most 4, on a CPU, where the encoder needs the "
                             "rest); 0 = in the main process.", default=-1)
    precision: Literal["auto", "fp32", "fp16", "bf16"] = setting(
        "Encoder arithmetic on a GPU: auto = the precision its model card states (`stainmil backbones`); a CPU "
        "always computes in fp32.", default="auto")
    dtype: Literal["float16", "float32"] = setting("Storage dtype of features.", default="float16")
    store_dir: str = setting("Feature store folder; empty = <output_dir>/features/imported when `stainmil "
                           "import-features` made one there, else <output_dir>/features/<backbone>-<weights>-<size>px.",
                           default="")
    cache_mb: float = setting("0 = read the whole store into memory (fastest while it fits); > 0 = read slices from "
                            "the store when a batch needs them, keeping at most this many MB of them cached "
                            "(memory no longer grows with the cohort; same results).", default=0.0)
    device: str = setting("auto | cpu | cuda | cuda:N.", default="auto")
    seed: int = setting("Seed for `random` weights and for the HED jitter of feature views.", default=0)
    views: int = setting(
        "Views per patch in the store (cached mode): view 0 = the plain image, 1-7 = its other exact "
        "flips/90-degree rotations, 8+ = those again with HED stain jitter. Training samples one per patch per step.",
        default=1)
    view_jitter: float = setting("HED stain jitter strength s of views beyond 8: alpha ~ U(1-s, 1+s), "
                               "beta ~ U(-s, s) per stain.", default=0.05)
    mode: Literal["cached", "online"] = setting(
        "cached: train on the feature store; online: run the backbone on the images inside every training step "
        "(the old pipeline's way, with its augmentations), optionally fine-tuning it.", default="cached")
    trainable_blocks: int = setting("online: unfreeze the last n blocks of the backbone (dense blocks, ResNet layers "
                                  "or transformer blocks, with the final norm; 0 = frozen).", default=0)
    backbone_lr: float = setting("online: learning rate of the unfrozen backbone blocks.", default=1e-5)
    gradient_checkpointing: bool = setting("online: recompute the unfrozen blocks' activations in the backward pass "
                                         "(less memory, more time).", default=False)
    online_augment: bool = setting("online: augment training images (random resized crop, flips/rotations, HED and "
                                 "brightness/contrast jitter), as the old pipeline did.", default=True)
    augment_hed: float = setting("online: HED stain jitter strength of the training augmentation.", default=0.05)

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ConfigError(f"features.views must be at least 1 (1 = plain features), got {self.views}.")
        if self.cache_mb < 0:
            raise ConfigError(f"features.cache_mb must be 0 (whole store in memory) or a size in MB, got "
                              f"{self.cache_mb}.")
        if self.trainable_blocks < 0:
            raise ConfigError(f"features.trainable_blocks must be 0 (frozen) or more, got {self.trainable_blocks}.")
        if len(self.mean) not in (0, 3) or len(self.std) not in (0, 3):
            raise ConfigError("features.mean and features.std take three values (R, G, B) or none (the encoder's).")
        if self.mode == "online" and self.views > 1:
            raise ConfigError("features.views applies to cached mode (the store); online mode augments the images "
                              "themselves — set features.views=1 or features.mode=cached.")


PerLevelFloat = float | list[float]


@dataclass(frozen=True)
class ElasticNetConfig:
    l1: PerLevelFloat = setting("L1 on attention logits: one value or [patch, slice, stain].", default=0.0)
    l2: PerLevelFloat = setting("L2 on attention logits: one value or [patch, slice, stain].", default=0.0)


@dataclass(frozen=True)
class EntropyConfig:
    weight: PerLevelFloat = setting("lambda of -lambda * H(attention): one value or [patch, slice, stain].",
                                  default=0.0)
    normalize: bool = setting("Divide H by log(group size) so big and small groups weigh alike.", default=True)
    schedule: Literal["constant", "linear", "cosine"] = setting("Decay of lambda over the epochs.",
                                                              default="constant")


@dataclass(frozen=True)
class RegConfig:
    elastic: ElasticNetConfig = field(default_factory=ElasticNetConfig)
    entropy: EntropyConfig = field(default_factory=EntropyConfig)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str = setting(
        "hierarchical (patch -> slice -> stain -> case); aligned (the hierarchy with each H&E patch fused with the "
        "IHC patches registered onto it, after `stainmil register`); or a flat baseline over all patches "
        "of a case: abmil | transmil | clam_sb | clam_mb | dsmil | dtfd_mil | mean | max (`stainmil models`).",
        default="hierarchical")
    stain_identity: Literal["none", "embedding", "gated", "attention", "specific"] = setting(
        "What the model knows of which stain it looks at: none; embedding (a learned vector per stain added to each "
        "slice embedding; flat baselines: to each patch); gated (that vector through a learned gate that starts "
        "nearly shut); attention (hierarchical only: a learned vector per stain, from zero, seen only where the "
        "stain pool weighs the stains); specific (hierarchical only: each stain its own projector and patch/slice "
        "pools). A stain no training case had is refused.", default="embedding")
    embed_dim: int = setting("Patch projector output size.", default=512)
    attention_hidden_dim: int = setting("Hidden size of each attention pool.", default=128)
    attention: str | list[str] = setting(
        "Attention pool per level, one name or [patch, slice, stain]: tanh | gated | multihead | transformer.",
        default="tanh")
    attention_heads: int = setting("Heads of the multihead and transformer pools.", default=4)
    transformer_max_group: int = setting("transformer: self-attention runs within chunks of at most this many rows "
                                       "(memory cap for big slices).", default=256)
    dropout: float = setting("Dropout in the projector and attention pools.", default=0.25)
    n_classes: int = setting("Number of classes (follows data.label_values).", default=2)
    standardize_features: bool = setting(
        "Standardise features with training-split statistics (saved in the checkpoint).", default=True)
    reg: RegConfig = field(default_factory=RegConfig)
    options: dict[str, dict] = setting(
        "Each architecture's own settings by its name, e.g. {transmil: {heads: 4}}: model.options.<architecture>.<key> "
        "(listed under Architecture options below and by `stainmil models`).", default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    optimizer: Literal["adam", "adamw", "sgd"] = setting("Optimizer.", default="adam")
    lr: float = setting("Learning rate.", default=1e-4)
    weight_decay: float = setting("Weight decay (lambda0 of the adaptive mode).", default=1e-4)
    weight_decay_mode: Literal["constant", "adaptive"] = setting(
        "constant, or adaptive (AdaDecay, Nakamura & Hong 2019: per-weight decay from layer-normalised |grad|).",
        default="constant")
    adaptive_decay_alpha: float = setting("Steepness alpha of the adaptive decay's sigmoid.", default=1.0)
    decoupled_weight_decay: bool = setting("Adaptive decay applied to the weights after the step (AdamW-style) "
                                         "instead of added to the gradient.", default=False)
    loss: Literal["ce", "focal", "label_smoothing_ce"] = setting("Case loss (class weights apply to all).",
                                                                 default="ce")
    focal_gamma: float = setting("Focal loss gamma.", default=2.0)
    label_smoothing: float = setting("Label smoothing epsilon.", default=0.1)
    sampler: Literal["sequential", "balanced"] = setting(
        "Order of training cases: each once per epoch (shuffled), or class-balanced draws with replacement.",
        default="sequential")
    patch_dropout: float = setting("Share of each slice's patches dropped at random per step (0 = off).",
                                 default=0.0)
    stain_dropout: float = setting("Chance each stain of a training case is dropped whole per step (never all of a "
                                 "case's stains; 0 = off): for models used on cases missing a stain.", default=0.0)
    topk_mask_k: int = setting("Stochastic top-k masking (ACMIL): mask among each slice's k highest-attention "
                             "patches before the softmax (0 = off).", default=0)
    topk_mask_ratio: float = setting("Share of those top-k patches masked per step.", default=0.5)
    class_weights: str | list[float] = setting(
        "'auto' (inverse class frequency of the training split), 'none', or one weight per class.",
        default="auto")
    max_epochs: int = setting("Upper bound on epochs.", default=50)
    cases_per_batch: int = setting("Cases per optimisation step.", default=1)
    scheduler_factor: float = setting("ReduceLROnPlateau factor on val loss.", default=0.3)
    scheduler_patience: int = setting("ReduceLROnPlateau patience (epochs).", default=3)
    early_stopping_patience: int = setting("Stop after this many epochs without val-loss improvement.",
                                         default=8)
    seed: int = setting("Seed for initialisation, shuffling and patch sampling.", default=42)
    device: str = setting("auto | cpu | cuda | cuda:N.", default="auto")
    runs_dir: str = setting("Parent folder of run folders; empty = <output_dir>/runs.", default="")
    split_file: str = setting("data_splits.npz to train on; empty = <output_dir>/splits/data_splits.npz.",
                            default="")


@dataclass(frozen=True)
class SplitConfig:
    method: Literal["holdout", "kfold", "repeated_kfold"] = setting(
        "holdout = the old stratified 60/20/20; kfold / repeated_kfold write one file per fold.",
        default="holdout")
    val_fraction: float = setting("Share of all cases for validation (holdout) or of the training "
                                "part of a fold (k-fold).", default=0.2)
    test_fraction: float = setting("Share of cases for test (holdout only).", default=0.2)
    folds: int = setting("Number of folds (k-fold).", default=5)
    repeats: int = setting("Repeats (repeated_kfold).", default=3)
    seed: int = setting("Seed of the split.", default=42)


@dataclass(frozen=True)
class EvalConfig:
    threshold: float | str = setting(
        "Decision threshold on P(class 1): a number, 'youden', or 'recall_<class>=R' (e.g. 'recall_benign=0.8': the "
        "lowest threshold whose validation recall of that class is at least R) — chosen on "
        "the validation split only.", default=0.5)
    bootstrap: int = setting("Case-level bootstrap resamples for 95% CIs.", default=1000)
    ci: float = setting("Confidence level of the intervals.", default=0.95)
    calibrate: Literal["none", "temperature"] = setting(
        "temperature: fit one temperature on the validation split (never test) and apply it to every split's "
        "probabilities before the threshold; rankings (AUC) do not change.", default="none")


@dataclass(frozen=True)
class AnalysisConfig:
    top_k: int = setting("Top-k patches per case counted by stain and (stain, slice).", default=20)
    top_slices: int = setting("Slices (highest stain x slice attention) plotted and mapped per run.", default=10)
    grid_patches: int = setting("Top and bottom patches shown per case.", default=8)
    slice_images: str = setting(
        "Template of slice image paths, e.g. /data/slices/case{case}/{stain}/slice{slice}.png; empty = rebuild "
        "each slice from its patches and their x, y.", default="")
    thumbnail_px: int = setting("Longest side of heatmap thumbnails.", default=640)
    deletion_k: int = setting("Patches removed in the deletion check (top-k vs random-k).", default=10)
    max_cases_in_report: int = setting("Per-case sections in report.html (misclassified first).", default=40)
    truth: str = setting(
        "The pathologist's lesion outlines every analysis scores attention against: a folder of QuPath GeoJSON per "
        "slide (level-0 px; named as for tile.include_annotations, or a `stainmil view --review` folder), a template "
        "with {stem}, {case}, {stain}, {slice}, or a CSV with columns case, stain, slice, patch, lesion_fraction "
        "(patch-folder cohorts); empty = no attention-vs-lesion measures.", default="")
    lesion_classes: list[str] = setting("QuPath classes that outline the lesion (* wildcards, any case).",
                                      default_factory=lambda: ["Lesion*", "Tumo*r*"])
    ignore_classes: list[str] = setting("QuPath classes whose patches are left out of the lesion measures (artefacts, "
                                      "folds, pen).", default_factory=lambda: ["Artefact*", "Artifact*", "Ignore*"])
    lesion_min_fraction: float = setting("A patch counts as lesion when more than this share of its square lies "
                                       "inside the lesion outline (0 = any overlap).", default=0.0)
    ignore_min_fraction: float = setting("A patch is left out when at least this share of its square lies in an "
                                       "ignored region.", default=0.5)
    truth_from_reference: bool = setting(
        "Score the slides of other stains against the reference stain's outline carried through `stainmil "
        "register` (aligned pairs only), so one H&E annotation scores every stain.", default=False)
    review_classes: list[str] = setting("The classes a reviewer draws in `stainmil view --review`.",
                                      default_factory=lambda: ["Lesion", "Not lesion", "Artefact"])


@dataclass(frozen=True)
class TileConfig:
    slices_dir: str = setting("Folder of whole-slide files (.svs/.ndpi/.tiff/.mrxs/.scn/… through OpenSlide) or plain "
                            "slice images (PNG/JPEG), walked recursively.", default="")
    out_dir: str = setting("Where tiling goes: coords/ (CLAM/TRIDENT HDF5), masks/, thumbnails/, tiles.csv, "
                         "tile_report.txt; with data.source=patches also the PNG patches.", default="")
    filename_pattern: str = setting(
        "Regex with named groups case, stain, slice, searched in each slide's path relative to slices_dir (a "
        "DICOM slide is its folder of .dcm files, matched without an extension).",
        default=r"case(?P<case>[^/_]+)/(?P<stain>[^/_]+)/slice(?P<slice>[^/_.]+)"
                r"(?:\.(?:png|jpe?g|tiff?|svs|ndpi|mrxs|scn|bif|vms|dcm))?$")
    patch_size: int = setting("Patch side in pixels at the target scale (tile.mpp / tile.magnification).", default=224)
    stride: int = setting("Grid step in target pixels; 0 = patch_size (no overlap).", default=0)
    min_tissue: float = setting("Keep patches whose tissue fraction is at least this.", default=0.5)
    mpp: float = setting("Target microns per pixel of the patches (e.g. 0.5); 0 = use tile.magnification.",
                       default=0.0)
    magnification: float = setting("Target objective magnification (e.g. 20); 0 with mpp 0 = pixels of tile.level "
                                 "as they are.", default=0.0)
    slide_mpp: float = setting("Level-0 microns per pixel of slides whose metadata lacks it (0 = read it from the "
                             "slide; such a slide is skipped and named when a scale is asked for).", default=0.0)
    level: int = setting("Pyramid level read when neither tile.mpp nor tile.magnification is set.", default=0)
    mask_downsample: int = setting("Tissue detection runs on the slide shrunk at least this much.", default=4)
    mask_max_side: int = setting("... and at most this many pixels on its longest side.", default=2048)
    thumbnail_px: int = setting("Longest side of the saved slide thumbnail (heatmaps are drawn on it).", default=1024)
    include_annotations: str = setting(
        "QuPath GeoJSON of each slide to tile inside (level-0 px): a folder holding <slide stem>.geojson (or "
        "stainmil's own QuPath export) or a template with {stem}, {case}, {stain}, {slice}; empty = the whole "
        "tissue. Slides without a file fall back to the tissue mask (named in the tile report).", default="")
    exclude_annotations: str = setting("The same, for regions never tiled (pen marks, folds, bubbles); may be the "
                                     "same files as tile.include_annotations with other classes.", default="")
    include_classes: list[str] = setting("Only included annotations of these QuPath classes (e.g. ['Tumor']; * "
                                       "wildcards); empty = every annotation in the file.", default_factory=list)
    exclude_classes: list[str] = setting("Only excluded annotations of these classes (e.g. ['Ignore*', 'Pen']); "
                                       "empty = every annotation in the file.", default_factory=list)
    max_annotation_vertices: int = setting("An annotation file with more polygon vertices than this is refused (named "
                                         "in the tile report) rather than read: a file exported with every cell "
                                         "outline, or not an annotation at all.", default=2_000_000)


@dataclass(frozen=True)
class SlurmConfig:
    partition: str = setting("SLURM partition (empty = the cluster default).", default="")
    time: int = setting("Time limit per job in minutes; jobs that hit it are requeued and resume.", default=120)
    gpus: int = setting("GPUs per job.", default=0)
    mem: int = setting("Memory per job in GB.", default=16)
    cpus: int = setting("CPUs per job.", default=4)
    account: str = setting("SLURM account (empty = none).", default="")
    array_parallelism: int = setting("Array tasks running at once.", default=8)
    extra: list[str] = setting("Extra #SBATCH options, e.g. ['--qos=short'].", default_factory=list)
    setup: list[str] = setting("Shell lines run before each job, e.g. ['source .venv/bin/activate'].",
                             default_factory=list)
    max_requeues: int = setting("Requeues allowed after time limits / preemption.", default=3)


@dataclass(frozen=True)
class RegisterConfig:
    reference_stain: str = setting("Stain every other stain of a case is registered to (a canonical name or an "
                                 "alias: HE, H&E).", default="he")
    spacing_um: float = setting("Resolution (µm per pixel) of the affine and non-rigid stages, whatever the section's "
                              "size: 8 µm/px is 1,000 px across an 8 mm section, 2,500 px across 20 mm.", default=8.0)
    min_side: int = setting("A small section is registered at least this many pixels across (finer than spacing_um), "
                          "never finer than its level 0.", default=384)
    max_side: int = setting("Cap on the pixels across a section (time and memory; old configs' 384 keeps their "
                          "thumbnails).", default=4096)
    mesh_um: float = setting("Spacing (µm) of the non-rigid B-spline mesh's nodes (6 to 24 nodes across a section).",
                           default=1000.0)
    nonrigid: bool = setting("After the affine fit, a smooth B-spline stage (the sections' elastic stretch; left "
                           "out where the cell-scale refinement follows and searches +-150 µm or more).",
                           default=True)
    refine: bool = setting("Cell-scale refinement after the coarse stages: block matching of ~300 tissue windows "
                         "(256 µm) read region by region at refine_um, a smooth field through the shifts that agree; "
                         "its evidence feeds the verdict. Sections under 4 windows across are left to the coarse "
                         "stages.", default=True)
    refine_um: float = setting("µm per pixel of the refinement's finest pass (its first pass runs at twice this).",
                             default=2.0)
    refine_windows: int = setting("About this many windows on the reference section's tissue.", default=300)
    out_dir: str = setting("Where transforms and register_report go; empty = <tile.out_dir>/registration.",
                         default="")
    workers: int = setting("Pairs registered at once, each in a process of its own (`register --workers`). Every "
                           "pair runs on one thread, so its transform is the same for any number.", default=1)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"register.workers must be at least 1 (pairs registered at once), got {self.workers}.")


@dataclass(frozen=True)
class TuneConfig:
    trials: int = setting("Trials to add to the study.", default=50)
    study_name: str = setting("Optuna study name.", default="stainmil")
    dir: str = setting("Folder of the study's outputs (trials, best_config.yaml, plots); empty = "
                     "<output_dir>/tune/<study_name>.", default="")
    storage: str = setting("Optuna storage: a journal file path or a URL (sqlite:///…, postgresql://…); empty = "
                         "<output_dir>/tune/<study_name>/study.journal.", default="")
    metric: Literal["val_loss", "auc", "balanced_accuracy"] = setting("Objective: mean over inner folds.",
                                                                     default="val_loss")
    inner_folds: int = setting("Inner stratified folds on the non-test cases.", default=3)
    seed: int = setting("Sampler seed (TPE).", default=0)
    space: dict[str, dict] = setting(
        "Search space: config key -> {type: float|int|categorical, low, high, log, choices}; empty = the "
        "default space (lr, weight_decay, dropout, attention, entropy weight, per_slice_cap).",
        default_factory=dict)


@dataclass(frozen=True)
class Config:
    output_dir: str = setting("Where index, features, splits and runs go by default.", default="stainmil_out")
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    tile: TileConfig = field(default_factory=TileConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)

    @property
    def paths(self) -> Paths:
        """Every derived location (index, store, splits, runs, registration), computed from this config alone."""
        return Paths.of(self)

    def with_overrides(self, changes: Mapping[str, Any] | Iterable[str]) -> Config:
        """A new config: this one with ``{"train.lr": 1e-3}`` (or ``["train.lr=1e-3"]``) applied, validated like
        the YAML and its paths made absolute. The config itself never changes (it is frozen)."""
        return with_overrides(self, changes)


@dataclass(frozen=True)
class Paths:
    """The locations a config implies, in one place; nothing here looks at the disk.

    ``store`` is ``features.store_dir`` when set (:func:`load_config` sets it to an imported store the output folder
    holds, so a run's ``config.yaml`` records which store it read), else the encoder's own folder
    ``<output_dir>/features/<backbone>-<weights>-<size>px``.
    """

    index_dir: Path
    manifest: Path
    store: Path
    imported_store: Path
    splits_dir: Path
    split_file: Path
    runs_dir: Path
    registration_dir: Path
    reviews_dir: Path        # <output_dir>/reviews/<reviewer>/ (stainmil view --review)

    @classmethod
    def of(cls, config: Config) -> Paths:
        out = Path(config.output_dir)
        weights = config.features.weights
        tag = weights if weights in NAMED_OR_PATH[("features", "weights")] else Path(weights).stem  # a name or a file
        store = Path(config.features.store_dir) if config.features.store_dir \
            else out / "features" / f"{config.features.backbone}-{tag}-{config.features.image_size}px"
        return cls(
            index_dir=out / "index", manifest=out / "index" / "manifest.parquet", store=store,
            imported_store=out / "features" / "imported", splits_dir=out / "splits",
            split_file=Path(config.train.split_file) if config.train.split_file else out / "splits" / "data_splits.npz",
            runs_dir=Path(config.train.runs_dir) if config.train.runs_dir else out / "runs",
            registration_dir=Path(config.register.out_dir) if config.register.out_dir
            else Path(config.tile.out_dir) / "registration",
            reviews_dir=out / "reviews")


PATH_FIELDS = {
    ("output_dir",), ("data", "patches_dir"), ("data", "labels_csv"), ("features", "store_dir"),
    ("train", "runs_dir"), ("train", "split_file"), ("tile", "slices_dir"), ("tile", "out_dir"), ("tune", "dir"),
    ("tile", "include_annotations"), ("tile", "exclude_annotations"), ("register", "out_dir"), ("analysis", "truth"),
}
# settings that are a path only in some of their forms (a name, a URL or a path)
NAMED_OR_PATH = {("features", "weights"): ("pretrained", "imagenet", "random"), ("tune", "storage"): ()}


# ---- conversion ----------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float allowed)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of settings, got {value!r}.")
        return _from_dict(tp, value, key + ".")
    if origin in (Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"config key '{key}' must be {' or '.join(_type_name(a) for a in args)}, "
                          f"got {value!r}.")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}' must be one of {list(args)}, got {value!r}.")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}.")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}.")
        return {_coerce(k, args[0], f"{key} key"): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}.")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}.")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}.")
        return value
    if tp is str:
        if isinstance(value, bool) or value is None:
            raise ConfigError(f"config key '{key}' must be text, got {value!r}.")
        if isinstance(value, (int, float)):
            return str(value)  # case ids such as 91 written without quotes
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be text, got {value!r}.")
        return value
    raise ConfigError(f"config key '{key}' has an unsupported type {tp!r}.")  # pragma: no cover


def _from_dict(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys here are: {', '.join(sorted(names))}.")
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in values.items()}
    return cls(**kwargs)


def settings_from_dict(cls: type, values: dict, prefix: str = "") -> Any:
    """An instance of the settings dataclass ``cls`` from ``values``, validated like the config (an unknown key or
    a wrong type is named with ``prefix``, e.g. ``model.options.transmil.``); what the architectures' options use."""
    return _from_dict(cls, values, prefix)


def config_from_dict(values: dict | None) -> Config:
    """Build a :class:`Config` from a nested dict, naming any unknown key or wrong type (old spellings read through
    :data:`RENAMED_MODEL_KEYS`)."""
    return _reconcile_classes(_from_dict(Config, _renamed_model_keys(values or {})))


# the old spelling model.baseline.<key> (one flat bag of every model's settings) -> model.options.<arch>.<key>
RENAMED_MODEL_KEYS: dict[str, tuple[tuple[str, ...], str]] = {
    "clam_k_sample": (("clam_sb", "clam_mb"), "k_sample"),
    "clam_bag_weight": (("clam_sb", "clam_mb"), "bag_weight"),
    "clam_instance_loss": (("clam_sb", "clam_mb"), "instance_loss"),
    "clam_attention_dim": (("clam_sb", "clam_mb"), "attention_dim"),
    "dtfd_pseudo_bags": (("dtfd_mil",), "pseudo_bags"),
    "transmil_heads": (("transmil",), "heads"),
    "transmil_dropout": (("transmil",), "dropout"),
    "late_fusion_base": (("late_fusion",), "base"),
    "late_fusion_combine": (("late_fusion",), "combine"),
    "cross_attention_heads": (("cross_attention",), "heads"),
    "graph_k": (("mustang",), "k"),
    "graph_heads": (("mustang", "biox_cpath"), "heads"),
    "graph_layers": (("mustang", "biox_cpath"), "layers"),
    "graph_pool_ratio": (("mustang", "biox_cpath"), "pool_ratio"),
    "biox_k": (("biox_cpath",), "k"),
}


def _renamed_model_keys(values: dict) -> dict:
    """``values`` with an old ``model.baseline`` section moved into ``model.options``, saying so once in a
    FutureWarning; an unknown old key is named. The old spelling wins over ``model.options``: a loaded config's
    options always hold every value, so ``--set model.baseline.transmil_heads=4`` (or an old tune space) on it
    must still take effect."""
    model = values.get("model")
    if not isinstance(model, dict) or "baseline" not in model:
        return values
    model = dict(model)
    old = model.pop("baseline") or {}
    if not isinstance(old, dict):
        raise ConfigError(f"config key 'model.baseline' must be a mapping of settings, got {old!r}.")
    options = {name: dict(given) for name, given in (model.get("options") or {}).items()}
    for key, value in old.items():
        if key not in RENAMED_MODEL_KEYS:
            raise ConfigError(f"unknown config key 'model.baseline.{key}'; model settings are now "
                              "model.options.<architecture>.<key> (`stainmil models` lists them).")
        names, new = RENAMED_MODEL_KEYS[key]
        for name in names:
            options.setdefault(name, {})[new] = value
    if old:
        moved = ", ".join(f"{k} -> model.options.{RENAMED_MODEL_KEYS[k][0][0]}.{RENAMED_MODEL_KEYS[k][1]}"
                          for k in list(old)[:3])
        warnings.warn(f"model.baseline is renamed: each architecture's settings are model.options.<architecture>.<key>"
                      f" ({moved}{', …' if len(old) > 3 else ''}); read as such, rewrite the config to silence this.",
                      FutureWarning, stacklevel=3)
    model["options"] = options
    return {**values, "model": model}


DEFAULT_CLASS_NAMES = ["benign", "high_grade"]


def _reconcile_classes(config: Config) -> Config:
    """Classes come from ``data.label_values`` (indices 0..k-1): with k != 2 and the default class names, each
    class is named by its first label word; ``model.n_classes`` follows (an explicit mismatch is an error)."""
    data = config.data
    indices = sorted(set(data.label_values.values()))
    k = len(indices)
    if k < 2 or indices != list(range(k)):
        raise ConfigError(f"data.label_values must map label words to class indices 0..k-1 with k >= 2, got "
                          f"indices {indices}; number the classes from 0.")
    names = data.class_names
    if names == DEFAULT_CLASS_NAMES and k != 2:
        names = [next(w for w, i in data.label_values.items() if i == c).strip().lower().replace(" ", "_")
                 for c in range(k)]
    if len(names) != k:
        raise ConfigError(f"data.class_names has {len(names)} names but data.label_values has {k} classes; "
                          "give one name per class index.")
    if config.model.n_classes != k and config.model.n_classes != 2:  # 2 is the default: it follows the labels
        raise ConfigError(f"model.n_classes is {config.model.n_classes} but data.label_values has {k} classes; "
                          "leave model.n_classes out (it follows the labels).")
    return replaced(replaced(config, ("data", "class_names"), names), ("model", "n_classes"), k)


def replaced(obj: Any, path: tuple[str, ...], value: Any) -> Any:
    """A copy of the frozen dataclass ``obj`` with the setting at ``path`` (``("train", "lr")``) set to ``value``
    (not validated: for values this module computed; users' values go through :func:`with_overrides`)."""
    head, *rest = path
    return dataclasses.replace(obj, **{head: replaced(getattr(obj, head), tuple(rest), value) if rest else value})


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def _resolve_paths(config: Config) -> Config:
    """Every path-valued setting made absolute: a config read back elsewhere (a run folder's config.yaml, a SLURM
    job in another working directory) points at the same files. Names (``pretrained``), URLs (``sqlite:///…``)
    and ``file:`` encoders keep their form, with the path inside made absolute."""
    def absolute(value: str) -> str:
        return str(Path(value).expanduser().resolve())

    for path in sorted(PATH_FIELDS | set(NAMED_OR_PATH)):
        obj = config
        for part in path:
            obj = getattr(obj, part)
        if obj and obj not in NAMED_OR_PATH.get(path, ()) and "://" not in obj and absolute(obj) != obj:
            config = replaced(config, path, absolute(obj))
    backbone = config.features.backbone
    if backbone.startswith("file:"):  # file:/path/encoder.py:build
        file, sep, factory = backbone[5:].rpartition(":")
        if sep and file:
            config = replaced(config, ("features", "backbone"), f"file:{absolute(file)}:{factory}")
    return config


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-3"`` -> (["train", "lr"], 0.001). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. train.lr=0.001).")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads "1e-3" as text
    return [part for part in key.strip().split(".") if part], value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _set_keys(values: dict, changes: Iterable[tuple[list[str], Any]]) -> dict:
    """``values`` (a nested dict) with each ``(["train", "lr"], 0.001)`` set; validated later by the dataclasses."""
    values = dict(values)
    for keys, value in changes:
        node = values
        for part in keys[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[keys[-1]] = value
    return values


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides to a nested dict (validated later by the dataclasses)."""
    return _set_keys(values, (parse_override(text) for text in overrides))


def with_overrides(config: Config, changes: Mapping[str, Any] | Iterable[str]) -> Config:
    """A new config: ``config`` with ``{"train.lr": 1e-3}`` or ``["train.lr=1e-3"]`` applied, validated like the
    YAML (an unknown key or a wrong type is named), its paths absolute. ``config`` itself is left as it was."""
    pairs = ([key.split("."), value] for key, value in changes.items()) if isinstance(changes, Mapping) \
        else (parse_override(text) for text in changes)
    return _resolve_paths(config_from_dict(_set_keys(config_to_dict(config), pairs)))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults), apply overrides, validate, resolve paths.

    An empty ``features.store_dir`` becomes the store ``stainmil import-features`` made in the output folder, when
    there is one: decided once, here, and recorded in the config (and so in every run's ``config.yaml``); the
    loaded config never changes its mind.
    """
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config.")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML ({exc}); fix the syntax.") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(values).__name__}.")
    config = _resolve_paths(config_from_dict(apply_overrides(values, overrides or [])))
    imported = config.paths.imported_store
    if not config.features.store_dir and (imported / "store.json").is_file():  # features made elsewhere
        config = replaced(config, ("features", "store_dir"), str(imported))
    return config


def dump_config(config: Config, path: str | Path) -> Path:
    """Write ``config`` as YAML atomically, every path-valued setting absolute, and return the path."""
    text = yaml.safe_dump(config_to_dict(_resolve_paths(config)), sort_keys=False, allow_unicode=True)
    return atomic_write_text(Path(path), text)


def config_reference_markdown() -> str:
    """The configuration reference (docs): one table row per key, from the dataclasses."""
    return settings_reference(Config)


def settings_reference(cls: type, prefix: str = "") -> str:
    """A markdown table of the settings dataclass ``cls`` (nested ones flattened), keys shown after ``prefix``."""
    lines = ["| key | default | meaning |", "|---|---|---|"]

    def walk(cls: type, prefix: str) -> None:
        instance = cls()
        for f in dataclasses.fields(cls):
            value = getattr(instance, f.name)
            if dataclasses.is_dataclass(value):
                walk(type(value), f"{prefix}{f.name}.")
                continue
            shown = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
            shown = shown.removesuffix("...").strip().replace("|", "\\|")
            if len(shown) > 60:
                shown = shown[:57] + "..."
            lines.append(f"| `{prefix}{f.name}` | `{shown}` | {f.metadata.get('help', '')} |")

    walk(cls, prefix)
    return "\n".join(lines) + "\n"
