"""Synthetic multi-stain melanocytic-lesion cohort, rendered through Beer–Lambert optics.

Each slice is built as stain *concentration* maps (optical density per stain) and turned into
RGB with the standard Ruifrok–Johnston stain vectors (``skimage.color.rgb_from_hed``)::

    I_rgb = 255 * exp(-(c_H * v_H + c_E * v_E + c_DAB * v_DAB) * ln 10)

* H&E: hematoxylin nuclei on eosin stroma.
* Melan-A (IHC): pale hematoxylin counterstain; **cytoplasmic** DAB around melanocytes.
* SOX10 (IHC): pale hematoxylin counterstain; **nuclear** DAB in melanocytes.

Every case, benign or high-grade, has melanocytic lesion regions. Benign lesions are a few small,
orderly nests of small uniform nuclei; high-grade lesions are larger, confluent, with big,
pleomorphic, hyperchromatic nuclei and more positive cells. ``signal`` (0..1) interpolates the
high-grade parameters between benign (0: classes indistinguishable) and fully high-grade (1).

On-disk layout written by :func:`write_cohort`::

    OUT/labels.csv                                     case_id,label (benign | high_grade)
    OUT/cohort.yaml                                    a ready stainmil config for this folder
    OUT/annotations/case7/he/slice0.geojson            the lesion outline (QuPath GeoJSON, class "Lesion", slice px):
                                                       the ground truth, read through ``analysis.truth`` as a
                                                       pathologist's export is
    OUT/slices/case7/he/slice0.png                     slice image
    OUT/slices/case7/he/slice0_tissue.png              tissue mask (0/255)
    OUT/slices/case7/he/slice0_lesion.png              lesion mask (0/255)
    OUT/slices/case7/he/slice0_landmarks.csv           serial sections only: landmark id, x, y (stainmil.data.serial)
    OUT/patches/case7/he/slice0/case7_he_slice0_patch12_x64_y128.png
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image
from scipy import ndimage
from skimage.color import rgb_from_hed
from skimage.draw import ellipse

from stainmil.config import STAINS
from stainmil.cores import available_cores
from stainmil.data.serial import block_landmarks, random_warp, torn_piece, warp_to_section
from stainmil.errors import ConfigError
from stainmil.io import atomic_write_text, save_image
from stainmil.progress import progress_bar
from stainmil.slides.annotations import annotation_feature, mask_polygons, write_annotations
from stainmil.slides.write import write_dicom_slide, write_pyramidal_tiff

STAIN_VECTORS = {"H": rgb_from_hed[0], "E": rgb_from_hed[1], "DAB": rgb_from_hed[2]}
CLASS_WORDS = ("benign", "high_grade")
CLASS_WORDS_3 = ("benign", "intermediate", "high_grade")  # --classes 3: lesions drawn halfway between


@dataclass
class SynthConfig:
    """Knobs of the synthetic cohort (``stainmil synth patches --help`` lists them)."""

    cases: int = 40
    benign_fraction: float = 1 / 3
    slices_per_stain: tuple[int, int] = (1, 2)
    slice_size: int = 384
    patch_size: int = 48
    min_tissue: float = 0.5
    signal: float = 1.0
    missing_stain_prob: float = 0.1
    seed: int = 0
    # stain-keyed cohort: every stain drawn alike (with this stain's look), the class evidence in this stain
    # only; in ``decoy_fraction`` of the cases of both classes the other stains carry the same evidence
    key_stain: str = ""
    decoy_fraction: float = 0.5
    # stain-free cohort (0 = off): every stain drawn alike (SOX10's look), and each stain of a case that is not
    # benign shows the case's evidence with this probability (at least one stain does): the stain name tells nothing
    stain_free: float = 0.0
    # 2: benign | high_grade; 3: benign | intermediate (lesions halfway) | high_grade
    classes: int = 2
    # serial sections: a case's stains cut from one block, each with its own known deformation (registration)
    serial: bool = False

    @property
    def class_words(self) -> tuple[str, ...]:
        return CLASS_WORDS if self.classes == 2 else CLASS_WORDS_3

    def __post_init__(self) -> None:
        lo, hi = self.slices_per_stain
        if self.cases < 2:
            raise ConfigError(f"synth: --cases must be at least 2 (one per class), got {self.cases}.")
        if not 0 < self.benign_fraction < 1:
            raise ConfigError(f"synth: benign fraction must be in (0, 1), got {self.benign_fraction}.")
        if not 1 <= lo <= hi:
            raise ConfigError(f"synth: slices per stain must be 1 <= min <= max, got {lo}..{hi}.")
        if self.slice_size < 2 * self.patch_size:
            raise ConfigError(f"synth: slice size {self.slice_size} must be at least twice the patch size "
                              f"{self.patch_size}.")
        if not 0 <= self.signal <= 1:
            raise ConfigError(f"synth: signal must be in [0, 1], got {self.signal}.")
        if self.key_stain and self.key_stain not in STAINS:
            raise ConfigError(f"synth: key stain '{self.key_stain}' is not one of {list(STAINS)}.")
        if self.classes not in (2, 3):
            raise ConfigError(f"synth: --classes must be 2 or 3, got {self.classes}.")
        if not 0 <= self.decoy_fraction <= 1:
            raise ConfigError(f"synth: decoy fraction must be in [0, 1], got {self.decoy_fraction}.")
        if not 0 <= self.stain_free <= 1:
            raise ConfigError(f"synth: --stain-free must be a probability in [0, 1], got {self.stain_free}.")
        if self.stain_free and self.key_stain:
            raise ConfigError("synth: --stain-free and --key-stain ask for opposite cohorts (the stain meaningless, "
                              "the stain the key); give one.")


PRESETS: dict[str, SynthConfig] = {
    # ~40 cases x ~5 slices x ~35 patches: extraction + training in a few minutes on 2 CPU cores.
    "demo": SynthConfig(),
    # tiny: for tests.
    "tiny": SynthConfig(cases=8, slices_per_stain=(1, 1), slice_size=160, patch_size=32, missing_stain_prob=0.0),
    # the real cohort's shape: ~86 cases, 1/3 benign, 1-15 slices per stain, ~100-1,600 patches/case.
    "real-shape": SynthConfig(cases=86, slices_per_stain=(1, 15), slice_size=448, patch_size=32,
                              missing_stain_prob=0.05),
    # stain identity: stains drawn alike, the label in SOX10 only, decoys in the others (figures in docs/baselines.md)
    "stain-key": SynthConfig(cases=240, benign_fraction=0.5, slices_per_stain=(1, 1), slice_size=288,
                             key_stain="sox10", missing_stain_prob=0.0),
    # the stain says nothing: stains drawn alike, the evidence in a random subset of a case's stains
    "stain-free": SynthConfig(cases=240, benign_fraction=0.5, slices_per_stain=(1, 1), slice_size=288,
                              stain_free=0.5, missing_stain_prob=0.0),
    # its small version, for tests
    "stain-key-tiny": SynthConfig(cases=12, benign_fraction=0.5, slices_per_stain=(1, 1), slice_size=160,
                                  patch_size=32, key_stain="sox10", missing_stain_prob=0.0),
    # serial sections (registration): every stain of a case from one block, each section moved, some flipped
    "serial": SynthConfig(cases=24, slices_per_stain=(1, 1), missing_stain_prob=0.0, serial=True),
    "serial-tiny": SynthConfig(cases=6, slices_per_stain=(1, 1), slice_size=256, patch_size=32,
                               missing_stain_prob=0.0, serial=True),
}


@dataclass
class LesionStyle:
    nests: tuple[int, int]          # number of lesion blobs
    nest_radius: tuple[float, float]  # blob radius as a fraction of the slice side
    cell_density: float             # melanocytes per px^2 inside the lesion
    nucleus_radius: tuple[float, float]
    pleomorphism: float             # std of radius multipliers / eccentricity
    hyperchromasia: float           # hematoxylin concentration of melanocyte nuclei
    positive_fraction: float        # share of melanocytes that are DAB-positive


BENIGN = LesionStyle(nests=(2, 4), nest_radius=(0.035, 0.055), cell_density=0.018,
                     nucleus_radius=(1.6, 2.0), pleomorphism=0.05, hyperchromasia=0.55, positive_fraction=0.55)
HIGH_GRADE = LesionStyle(nests=(3, 6), nest_radius=(0.07, 0.12), cell_density=0.02,
                         nucleus_radius=(2.4, 3.6), pleomorphism=0.35, hyperchromasia=1.05, positive_fraction=0.95)


def _style(label: int, signal: float, classes: int = 2) -> LesionStyle:
    """Class ``label`` of ``classes``: benign (0) to high-grade (classes - 1), interpolated by ``signal``."""
    if label == 0:
        return BENIGN
    step = signal * label / (classes - 1)
    mix = {}
    for f in dataclasses.fields(LesionStyle):
        b, h = getattr(BENIGN, f.name), getattr(HIGH_GRADE, f.name)
        if isinstance(b, tuple):
            mix[f.name] = tuple(type(x)(x + step * (y - x)) for x, y in zip(b, h))
        else:
            mix[f.name] = b + step * (h - b)
    return LesionStyle(**mix)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
    return (field - field.mean()) / (field.std() + 1e-8)


def tissue_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """An organic blob of tissue: a noisy ellipse, (size, size) bool."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    cy, cx = rng.uniform(0.4, 0.6, 2)
    ry, rx = rng.uniform(0.3, 0.45, 2)
    angle = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
    radial = 1 - np.sqrt(u**2 + v**2)
    mask = radial + 0.18 * _smooth_noise(rng, size, size / 14) > 0
    labels, n = ndimage.label(mask)
    if n > 1:  # keep the largest piece
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(mask)


def lesion_mask(rng: np.random.Generator, tissue: np.ndarray, style: LesionStyle) -> np.ndarray:
    """Union of nests inside the tissue (size, size) bool."""
    size = tissue.shape[0]
    yy, xx = np.mgrid[0:size, 0:size]
    inner = ndimage.binary_erosion(tissue, iterations=max(2, size // 20))
    candidates = np.argwhere(inner if inner.any() else tissue)
    mask = np.zeros_like(tissue)
    n_nests = rng.integers(style.nests[0], style.nests[1] + 1)
    anchor = candidates[rng.integers(len(candidates))]
    for _ in range(n_nests):
        # high-grade nests crowd around one anchor (confluent); benign ones are scattered
        if style.nest_radius[1] > 0.07:
            centre = np.clip(anchor + rng.normal(0, size * style.nest_radius[1] * 0.8, 2), 0.2 * size, 0.8 * size)
        else:
            centre = candidates[rng.integers(len(candidates))]
        radius = rng.uniform(*style.nest_radius) * size
        mask |= (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius**2
    edge_noise = _smooth_noise(rng, size, 3) * 0.3
    mask = ndimage.binary_opening(ndimage.gaussian_filter(mask.astype(float), 2) + edge_noise * 0.2 > 0.5)
    return mask & tissue


def _draw_nuclei(canvas: np.ndarray, rng: np.random.Generator, points: np.ndarray, radius: tuple[float, float],
                 pleomorphism: float, value: np.ndarray | float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Draw ellipses at ``points`` (N, 2) into ``canvas`` (max blend); return their pixel indices."""
    size = canvas.shape[0]
    values = np.broadcast_to(np.asarray(value, dtype=float), (len(points),))
    drawn = []
    for (y, x), v in zip(points, values):
        r = rng.uniform(*radius) * max(0.5, 1 + rng.normal(0, pleomorphism))
        ecc = 1 + abs(rng.normal(0, 0.15 + pleomorphism))
        rr, cc = ellipse(y, x, r, r * ecc, shape=(size, size), rotation=rng.uniform(0, np.pi))
        canvas[rr, cc] = np.maximum(canvas[rr, cc], v)
        drawn.append((rr, cc))
    return drawn


def _sample_points(rng: np.random.Generator, region: np.ndarray, density: float) -> np.ndarray:
    coords = np.argwhere(region)
    if len(coords) == 0:
        return np.zeros((0, 2))
    n = rng.poisson(density * len(coords))
    return coords[rng.integers(len(coords), size=n)] + rng.uniform(-0.5, 0.5, (n, 2))


def render_slice(rng: np.random.Generator, stain: str, size: int, style: LesionStyle,
                 tissue: np.ndarray | None = None, lesion: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one slice (on ``tissue`` and ``lesion`` when given: a serial section of a shared block). Returns
    (rgb uint8 (size, size, 3), tissue bool, lesion bool)."""
    if tissue is None:
        tissue = tissue_mask(rng, size)
        lesion = lesion_mask(rng, tissue, style)
    stroma = ndimage.gaussian_filter(rng.standard_normal((size, size)), (1, 4))  # fibrous texture
    stroma = (stroma - stroma.min()) / (np.ptp(stroma) + 1e-8)

    hema = np.zeros((size, size))
    eosin = np.zeros((size, size))
    dab = np.zeros((size, size))
    ihc = stain != "he"
    counter = 0.45 if ihc else 1.0  # IHC counterstain is paler

    # background cells of the stroma: small, elongated, evenly stained nuclei
    background = _sample_points(rng, tissue & ~lesion, 0.006)
    _draw_nuclei(hema, rng, background, (1.0, 1.6), 0.25, 0.7 * counter)
    # melanocytes in the lesion
    cells = _sample_points(rng, lesion, style.cell_density)
    intensity = style.hyperchromasia * rng.uniform(0.85, 1.15, len(cells))
    nucleus_map = np.zeros((size, size))
    drawn = _draw_nuclei(nucleus_map, rng, cells, style.nucleus_radius, style.pleomorphism, intensity)
    positive = rng.random(len(cells)) < style.positive_fraction

    if stain == "he":
        hema = np.maximum(hema, nucleus_map)
        eosin = tissue * (0.12 + 0.22 * stroma)
        eosin = np.where(lesion, eosin * 0.6 + 0.08, eosin)  # pale cytoplasm of nests
        hema += tissue * 0.05
    elif stain == "sox10":  # nuclear DAB in positive melanocytes, counterstain in the rest
        for (rr, cc), pos in zip(drawn, positive):
            target = dab if pos else hema
            target[rr, cc] = np.maximum(target[rr, cc], nucleus_map[rr, cc] * (0.9 if pos else counter))
        hema += tissue * (0.04 + 0.03 * stroma)
    elif stain == "melan":  # cytoplasmic DAB around positive melanocytes; nuclei stay blue
        hema = np.maximum(hema, nucleus_map * counter)
        cyto = np.zeros((size, size))
        for (rr, cc), pos in zip(drawn, positive):
            if pos:
                cyto[rr, cc] = 1.0
        cyto = ndimage.grey_dilation(cyto, size=(5, 5))
        cyto = ndimage.gaussian_filter(cyto, 1.2) * lesion
        dab = np.maximum(dab, 0.55 * cyto * rng.uniform(0.8, 1.2))
        hema += tissue * (0.04 + 0.03 * stroma)
    else:  # pragma: no cover - guarded by the caller
        raise ConfigError(f"synth: unknown stain {stain!r}.")

    batch = rng.uniform(0.85, 1.15, 3)  # slide-to-slide staining variation
    od = np.stack([hema * batch[0], eosin * batch[1], dab * batch[2]], axis=-1)  # (size, size, 3) OD per stain
    od = ndimage.gaussian_filter(od, (0.6, 0.6, 0))
    od += np.abs(rng.normal(0, 0.012, od.shape)) * tissue[..., None]
    matrix = np.stack([STAIN_VECTORS["H"], STAIN_VECTORS["E"], STAIN_VECTORS["DAB"]])  # (3 stains, 3 RGB)
    rgb = np.exp(-(od @ matrix) * np.log(10))  # Beer–Lambert, OD in log10 units
    rgb = np.clip(rgb * 245 + rng.normal(0, 1.5, rgb.shape), 0, 255).astype(np.uint8)
    return rgb, tissue, lesion


@dataclass
class Block:
    """The tissue block every serial section of a case is cut from (block pixels)."""

    tissue: np.ndarray      # (S, S) bool
    lesion: np.ndarray      # (S, S) bool
    landmarks: np.ndarray   # (L, 2) x, y inside the tissue


def serial_block(rng: np.random.Generator, size: int, style: LesionStyle) -> Block:
    """A case's block: tissue drawn smaller than the canvas (so any rotation keeps it on the glass) and its
    lesion."""
    inner = int(size * 0.68)
    pad = (size - inner) // 2
    tissue = np.zeros((size, size), bool)
    tissue[pad:pad + inner, pad:pad + inner] = tissue_mask(rng, inner)
    return Block(tissue, lesion_mask(rng, tissue, style), block_landmarks(rng, tissue))


def serial_section(rng: np.random.Generator, stain: str, style: LesionStyle, block: Block, flip: bool
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]:
    """One section of ``block`` on its glass: rendered on the block, then rotated, shifted, elastically stretched,
    flipped (IHC sections, sometimes: ``flip``) and sometimes torn. Returns (rgb, tissue, lesion, landmarks in
    section pixels)."""
    size = block.tissue.shape[0]
    rgb_block, _, _ = render_slice(rng, stain, size, style, block.tissue, block.lesion)
    warp = random_warp(rng, size, flip=flip and rng.random() < 0.4)
    rgb = warp_to_section(rgb_block.astype(float), warp, order=1, fill=245.0)
    tissue = warp_to_section(block.tissue.astype(float), warp, order=1, fill=0.0) > 0.5
    lesion = warp_to_section(block.lesion.astype(float), warp, order=1, fill=0.0) > 0.5
    if rng.random() < 0.3:
        lost = torn_piece(rng, tissue)
        tissue, lesion = tissue & ~lost, lesion & ~lost
        rgb[lost] = 245.0
    rgb = np.clip(rgb + rng.normal(0, 1.0, rgb.shape) * ~tissue[..., None], 0, 255).astype(np.uint8)
    points = warp.to_section(block.landmarks)
    inside = np.zeros(len(points), bool)
    xi, yi = np.round(points).astype(int).T
    on_canvas = (xi >= 0) & (yi >= 0) & (xi < size) & (yi < size)
    inside[on_canvas] = tissue[yi[on_canvas], xi[on_canvas]]
    landmarks = pd.DataFrame({"id": np.flatnonzero(inside), "x": points[inside, 0], "y": points[inside, 1]})
    return rgb, tissue, lesion, landmarks


def grid_patches(tissue: np.ndarray, patch_size: int, min_tissue: float) -> list[tuple[int, int]]:
    """Top-left (x, y) of grid patches whose tissue fraction is at least ``min_tissue``."""
    size_y, size_x = tissue.shape
    keep = []
    for y in range(0, size_y - patch_size + 1, patch_size):
        for x in range(0, size_x - patch_size + 1, patch_size):
            if tissue[y:y + patch_size, x:x + patch_size].mean() >= min_tissue:
                keep.append((x, y))
    return keep


def _case_plan(config: SynthConfig) -> list[tuple[str, int]]:
    rng = np.random.default_rng([config.seed, 0])
    n_benign = int(round(config.cases * config.benign_fraction))
    n_benign = min(max(n_benign, 1), config.cases - 1)
    rest = config.cases - n_benign  # the other classes share the rest evenly
    labels = np.array([0] * n_benign + [1 + i * (config.classes - 1) // rest for i in range(rest)])
    rng.shuffle(labels)
    return [(str(i + 1), int(label)) for i, label in enumerate(labels)]


def _stains_showing(rng: np.random.Generator, stains: list[str], rate: float) -> set[str]:
    """Each stain with probability ``rate``, at least one (a stain-free cohort's evidence is somewhere)."""
    shows = {stain for stain in stains if rng.random() < rate}
    return shows or {stains[rng.integers(len(stains))]}


def _n_slices(rng: np.random.Generator, lo: int, hi: int) -> int:
    """Slices per stain, skewed towards few (most real cases have 1-3, some up to 15)."""
    return int(lo + np.floor((hi - lo + 1) * rng.random() ** 2.5))


def render_case(config: SynthConfig, out: Path, case: str, label: int) -> list[dict]:
    """Render every slice and patch of one case (and its lesion outlines); return one row per patch."""
    rng = np.random.default_rng([config.seed, 1, int(case)])
    style = _style(label, config.signal, config.classes)
    stains = list(STAINS)
    if rng.random() < config.missing_stain_prob:
        stains.remove(stains[rng.integers(len(stains))])
    decoy = bool(np.random.default_rng([config.seed, 2, int(case)]).random() < config.decoy_fraction)
    shows = _stains_showing(np.random.default_rng([config.seed, 4, int(case)]), stains, config.stain_free) \
        if config.stain_free else set()
    block = serial_block(np.random.default_rng([config.seed, 3, int(case)]), config.slice_size, style) \
        if config.serial else None
    rows = []
    for stain in stains:
        look, stain_style = stain, style
        if config.key_stain:  # every stain drawn as the key stain; the label speaks in the key stain only
            look = config.key_stain
            stain_style = style if stain == config.key_stain else _style(int(decoy), config.signal)
        elif config.stain_free:  # every stain drawn alike; which of them shows the evidence is chance
            look = "sox10"
            stain_style = style if stain in shows else BENIGN
        for slice_id in range(_n_slices(rng, *config.slices_per_stain)):
            slice_dir = out / "slices" / f"case{case}" / stain
            if block is not None:
                rgb, tissue, lesion, landmarks = serial_section(rng, look, stain_style, block, flip=stain != "he")
                atomic_write_text(slice_dir / f"slice{slice_id}_landmarks.csv", landmarks.to_csv(index=False))
            else:
                rgb, tissue, lesion = render_slice(rng, look, config.slice_size, stain_style)
            save_image(rgb, slice_dir / f"slice{slice_id}.png")
            save_image((tissue * 255).astype(np.uint8), slice_dir / f"slice{slice_id}_tissue.png")
            save_image((lesion * 255).astype(np.uint8), slice_dir / f"slice{slice_id}_lesion.png")
            write_lesion_outline(out / "annotations" / f"case{case}" / stain / f"slice{slice_id}.geojson", lesion)
            patch_dir = out / "patches" / f"case{case}" / stain / f"slice{slice_id}"
            p = config.patch_size
            for index, (x, y) in enumerate(grid_patches(tissue, p, config.min_tissue)):
                name = f"case{case}_{stain}_slice{slice_id}_patch{index}_x{x}_y{y}.png"
                save_image(rgb[y:y + p, x:x + p], patch_dir / name)
                rows.append({"case": case, "stain": stain, "slice": str(slice_id), "patch": str(index)})
    return rows


LESION_CLASS, LESION_COLOUR = "Lesion", (200, 30, 30)
TRUTH_TEMPLATE = "case{case}/{stain}/slice{slice}.geojson"  # under annotations/ (slice px), slide_annotations/


def write_lesion_outline(path: Path, lesion: np.ndarray, scale: float = 1.0) -> None:
    """A slice's lesion mask as the outline a pathologist would export from QuPath (exact pixel edges x scale)."""
    outline = mask_polygons(lesion, scale)
    polygons = list(getattr(outline, "geoms", [outline])) if not outline.is_empty else []
    write_annotations(path, [annotation_feature(poly, LESION_CLASS, LESION_COLOUR) for poly in polygons])


def _render_case_job(args: tuple) -> list[dict]:
    return render_case(*args)


def write_cohort(out: str | Path, config: SynthConfig | None = None, workers: int = 0) -> Path:
    """Write a synthetic cohort under ``out`` (layout in the module docstring); return ``out``.

    Deterministic for ``config.seed``: the same seed gives byte-identical files.
    """
    config = config or SynthConfig()
    out = Path(out).resolve()
    plan = _case_plan(config)
    jobs = [(config, out, case, label) for case, label in plan]
    rows: list[dict] = []
    workers = workers or min(len(jobs), available_cores())
    with progress_bar("synth: rendering cases", total=len(jobs)) as advance:
        if workers <= 1:
            for job in jobs:
                rows.extend(_render_case_job(job))
                advance()
        else:
            with ProcessPoolExecutor(workers) as pool:
                for case_rows in pool.map(_render_case_job, jobs):
                    rows.extend(case_rows)
                    advance()
    labels = pd.DataFrame({"case_id": [c for c, _ in plan], "label": [config.class_words[y] for _, y in plan]})
    atomic_write_text(out / "labels.csv", labels.to_csv(index=False))
    if not rows:
        raise ConfigError(f"the synthetic cohort in {out} has no patch (slices too small for patch_size?)")
    cohort_yaml = {
        "output_dir": str(out.parent / f"{out.name}_work"),
        "data": {"patches_dir": str(out / "patches"), "labels_csv": str(out / "labels.csv"),
                 **({"label_values": {w: i for i, w in enumerate(config.class_words)}} if config.classes != 2 else {})},
        "features": {"image_size": config.patch_size},
        "analysis": {"slice_images": str(out / "slices" / "case{case}" / "{stain}" / "slice{slice}.png"),
                     "truth": str(out / "annotations" / TRUTH_TEMPLATE)},
    }
    atomic_write_text(out / "cohort.yaml", "# stainmil config for this synthetic cohort\n"
                      + yaml.safe_dump(cohort_yaml, sort_keys=False))
    atomic_write_text(out / "synth.yaml", yaml.safe_dump(
        {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}, sort_keys=False))
    return out


SLIDE_FORMATS = ("tiff", "svs", "dicom")


def write_slides(cohort: str | Path, mpp: float = 0.5, upsample: int = 1, aperio: bool = False,
                 tile: int = 128, dicom: bool = False) -> Path:
    """Every slice image of a synthetic cohort as a whole-slide image, plus ``slides.yaml`` for the slide route.

    ``OUT/slides/case7/he/slice0.tiff`` (pyramidal TIFF; ``.svs`` with ``aperio``; with ``dicom`` the folder
    ``slice0/`` of DICOM instances, JPEG tiles) at ``mpp`` µm/px; ``upsample`` > 1 enlarges level 0 by pixel
    repetition (a "40x" scan of the 20x image when 2, so its 2x level is the original).
    """

    cohort = Path(cohort).resolve()
    slices = sorted(p for p in (cohort / "slices").rglob("slice*.png") if "_" not in p.stem)
    suffix = "" if dicom else ".svs" if aperio else ".tiff"
    level0_mpp = mpp / upsample
    with progress_bar("synth: writing slides", total=len(slices)) as advance:
        for png in slices:
            target = cohort / "slides" / png.relative_to(cohort / "slices").with_suffix(suffix)
            if not target.exists():
                rgb = np.asarray(Image.open(png).convert("RGB"))
                if upsample > 1:
                    rgb = rgb.repeat(upsample, 0).repeat(upsample, 1)
                if dicom:
                    write_dicom_slide(target, rgb, mpp=level0_mpp, tile=tile)
                else:
                    write_pyramidal_tiff(target, rgb, mpp=level0_mpp,
                                         magnification=10 / level0_mpp if aperio else None, aperio=aperio, tile=tile)
            outline = cohort / "slide_annotations" / png.relative_to(cohort / "slices").with_suffix(".geojson")
            if not outline.exists():  # the lesion outline in the slide's level-0 px
                lesion = np.asarray(Image.open(png.with_name(f"{png.stem}_lesion.png")).convert("L")) > 127
                write_lesion_outline(outline, lesion, scale=upsample)
            advance()
    synth = yaml.safe_load((cohort / "synth.yaml").read_text())
    slide_yaml = {
        "output_dir": str(cohort.parent / f"{cohort.name}_slides_work"),
        "data": {"source": "slides", "labels_csv": str(cohort / "labels.csv")},
        "tile": {"slices_dir": str(cohort / "slides"), "out_dir": str(cohort.parent / f"{cohort.name}_slides_work"
                                                                      / "tiles"),
                 "mpp": mpp, "patch_size": synth["patch_size"], "min_tissue": synth["min_tissue"],
                 "mask_downsample": 1},
        "features": {"image_size": synth["patch_size"]},
        "analysis": {"truth": str(cohort / "slide_annotations" / TRUTH_TEMPLATE)},
    }
    atomic_write_text(cohort / "slides.yaml", "# stainmil config for the slide route on this synthetic cohort\n"
                      + yaml.safe_dump(slide_yaml, sort_keys=False))
    return cohort / "slides"


