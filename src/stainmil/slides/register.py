"""Register one serial section to another (an IHC slide to an H&E slide of the same case), coarse to fine, and
say honestly how well it worked.

Both slides are read as thumbnails at the same scale (``spacing`` µm per pixel) and turned into what the two
stains share: the **hematoxylin optical density** (colour deconvolution, ``skimage.color.rgb2hed``: IHC
counterstains nuclei with hematoxylin, as H&E does) inside the tissue mask.

1. **Rigid, with flips** — a section may lie rotated anyhow and either way up. Both tissue masks are reduced to
   ~128 px; every rotation in 10° steps, with and without a mirror flip, is tried about the masks' centroids and
   scored by mask overlap and hematoxylin correlation; the four best rotations unflipped and flipped go on to
   step 2, and the one whose tissue outline agrees best after it is kept (a torn piece or a round section can
   make the coarse score prefer a wrong rotation or mirror).
2. **Rigid → affine refinement** (SimpleITK, multi-resolution, Mattes mutual information on the hematoxylin
   images): corrects the angle and shift to sub-pixel, then shear and scale (sections shrink unevenly).
3. **Smooth non-rigid** (SimpleITK B-spline, a coarse 6 x 6 mesh, correlation): the elastic stretch of a
   section on the glass.

SimpleITK was chosen over scikit-image (no mutual-information or B-spline registration of its own) and
itk-elastix (the same ITK underneath, a 10x larger install); measured on the synthetic serial sections, see
docs/registration.md.

The transform is kept in level-0 µm in both directions (:class:`PairTransform`)::

    fixed -> moving:  p_m = A (p_f + u(p_f))        moving -> fixed:  p_f = q + v(q),  q = A^-1 p_m

``A`` (3, 3) affine (with the flip), ``u`` and ``v`` (2, H, W) displacement fields (µm) on a grid over the fixed
section (its thumbnail's, or coarser: at most :data:`FIELD_PX` across), ``v`` the inverse of ``u``.

Quality (:class:`PairQuality`), measured after alignment on the fixed grid: tissue-mask overlap (Dice),
hematoxylin correlation (Pearson, smoothed, over the tissue of both), an error estimate from matched features
(ORB keypoints on both hematoxylin images; median distance of the mutually matched pairs that agree, in µm),
and a verdict ``aligned | doubtful | failed`` with its reason.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.feature import ORB, match_descriptors

from stainmil.slides.reader import Slide
from stainmil.slides.tissue import tissue_mask
from stainmil.slides.transform import PairQuality, PairResult, PairTransform, invert_field

COARSE_PX = 128
COARSE_CANDIDATES = 4  # rotations per mirror hypothesis refined by the rigid stage
SCREEN_PX = 256  # ... on a view about this many pixels across, to choose among them
MIN_TISSUE_PX = 50  # a thumbnail with less tissue than this is empty glass
SAMPLE_BUDGET_PX = 384 * 384  # metric samples per level are drawn from at most this many pixels' worth
# the metric samples are drawn with a fixed seed (and summed on one thread, see register_sections): the same
# sections register to the same transform every run. (Not 0: SimpleITK reads 0 as sitkWallClock, a new draw.)
SAMPLING_SEED = 1
FIELD_PX = 512  # the displacement fields are kept on a grid at most this many pixels across (they are smooth)
# verdict thresholds (see docs/registration.md for how they were chosen)
ALIGNED = {"dice": 0.85, "outline": 0.015, "scale": 1.08, "feature_error_um": 60.0}
FAILED = {"dice": 0.60, "outline": 0.02, "scale": 1.15}


@dataclass
class Section:
    """One slide at the registration scale: RGB thumbnail, hematoxylin OD (0 off tissue), tissue mask."""

    rgb: np.ndarray
    hematoxylin: np.ndarray  # (H, W) float32
    tissue: np.ndarray       # (H, W) bool
    spacing: float           # µm per thumbnail pixel


def read_section(path: str | Path, spacing: float, slide_mpp: float = 0.0) -> Section:
    """A slide's thumbnail at about ``spacing`` µm/px and what registration needs of it. ``slide_mpp``: the
    level-0 µm/px of a slide whose metadata lacks it (``tile.slide_mpp``). The section's spacing is the one the
    thumbnail really has (its size is rounded to whole pixels)."""
    slide = Slide(path)
    try:
        mpp = slide.mpp or slide_mpp
        if not mpp:
            raise ValueError(f"{path} records no µm per pixel; registration needs the scale (set tile.slide_mpp)")
        rgb = slide.thumbnail(spacing / mpp)
        width_um = slide.dimensions[0] * mpp
    finally:
        slide.close()
    tissue = tissue_mask(rgb)
    hed = np.clip(rgb2hed(rgb), 0, None)
    h = (hed[..., 0] + hed[..., 2]).astype(np.float32)  # nuclei are blue (H) or brown (DAB, SOX10-positive)
    h = ndimage.gaussian_filter(h, 1.0) * tissue
    return Section(rgb, h, tissue, width_um / rgb.shape[1])


@dataclass(frozen=True)
class Effort:
    """How hard the SimpleITK stages work after the screening (which always runs in full: fewer of its iterations
    chose a wrong rotation of a torn section): ``samples`` scales :data:`SAMPLE_BUDGET_PX`, ``iterations`` bounds the
    rigid and affine fits per resolution level; ``nonrigid`` False leaves the B-spline stage out."""

    samples: float = 1.0
    iterations: int = 200
    nonrigid: bool = True


# the coarse chain is the result (sections too small for the cell-scale refinement, register.refine=false)
FULL = Effort()
# the cell-scale refinement follows and takes what is finer than its first pass (windows searched +-192 µm) and the
# elastic stretch (its thin-plate spline): a quarter of the samples, half the iterations, no B-spline stage.
# Measured on neighbouring 8 mm sections: the same landmark error after the refinement in half the time
# (docs/registration.md, "Measured at 8 mm")
START = Effort(samples=0.25, iterations=100, nonrigid=False)
# ... but the B-spline stage stays where the refinement's first pass searches less far than this around the coarse
# fit: the elastic stretch an affine fit leaves on a section (a 1 mm section's passes search +-60 µm; without the
# B-spline too few of its windows found their match)
STRETCH_UM = 150.0


def coarse_effort(reach_um: float | None) -> Effort:
    """:data:`FULL` when no cell-scale refinement follows (``reach_um`` None); :data:`START` when one does, with
    the B-spline stage kept where its first pass searches less than :data:`STRETCH_UM` around the coarse fit."""
    if reach_um is None:
        return FULL
    return START if reach_um >= STRETCH_UM else replace(START, nonrigid=True)


def _image(array: np.ndarray, spacing: float) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing((spacing, spacing))
    image.SetOrigin((spacing / 2, spacing / 2))  # physical = level-0 µm of the pixel's centre
    return image


def _rotate_about(mask: np.ndarray, angle: float, flip: bool, centre_from: np.ndarray, centre_to: np.ndarray,
                  shape: tuple[int, int]) -> np.ndarray:
    """Resample ``mask`` rotated by ``angle`` (and mirrored) about its centroid onto the ``centre_to`` point."""
    c, s = np.cos(angle), np.sin(angle)
    matrix = np.array([[c, -s], [s, c]]) @ (np.diag([1.0, -1.0]) if flip else np.eye(2))  # (row, col) order
    offset = centre_from - matrix @ centre_to
    return ndimage.affine_transform(mask.astype(np.float32), matrix, offset, output_shape=shape, order=1)


def _coarse_rigid(fixed: Section, moving: Section, per_flip: int = COARSE_CANDIDATES
                  ) -> list[tuple[bool, float, float]]:
    """(flip, angle, score) of the ``per_flip`` best rotations (10° steps, at least 60° apart) without and with a
    mirror flip, best first."""
    zoom = min(1.0, COARSE_PX / max(*fixed.hematoxylin.shape, *moving.hematoxylin.shape))
    f_mask = ndimage.zoom(fixed.tissue.astype(np.float32), zoom, order=1)
    m_mask = ndimage.zoom(moving.tissue.astype(np.float32), zoom, order=1)
    f_h = ndimage.zoom(fixed.hematoxylin, zoom, order=1)
    m_h = ndimage.zoom(moving.hematoxylin, zoom, order=1)
    centre_f = np.array(ndimage.center_of_mass(f_mask))
    centre_m = np.array(ndimage.center_of_mass(m_mask))
    chosen = []
    for flip in (False, True):
        scored = []
        for degrees in range(0, 360, 10):
            angle = np.deg2rad(degrees)
            mask = _rotate_about(m_mask, angle, flip, centre_m, centre_f, f_mask.shape)
            h = _rotate_about(m_h, angle, flip, centre_m, centre_f, f_mask.shape)
            dice = overlap(mask, f_mask)
            scored.append((float(dice + 0.5 * _correlation(f_h, h, (f_mask > 0.5) | (mask > 0.5))), degrees))
        kept: list[int] = []
        for score, degrees in sorted(scored, reverse=True):
            if len(kept) < per_flip and all(min(abs(degrees - k), 360 - abs(degrees - k)) >= 60 for k in kept):
                kept.append(degrees)
                chosen.append((flip, float(np.deg2rad(degrees)), score))
    return sorted(chosen, key=lambda c: -c[2])


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two masks (bool, or soft in [0, 1])."""
    return float(2 * (a * b).sum() / (a.sum() + b.sum() + 1e-9))


def _correlation(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    if where.sum() < 10:
        return 0.0
    x, y = a[where].astype(np.float64), b[where].astype(np.float64)
    if x.std() < 1e-9 or y.std() < 1e-9:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def structure_correlation(fixed_h: np.ndarray, fixed_tissue: np.ndarray, moved_h: np.ndarray,
                          moved_tissue: np.ndarray, spacing: float, scale_um: float = 10.0) -> float:
    """Pearson correlation of the two hematoxylin maps at ~``scale_um`` (cell clusters, not single nuclei), each
    smoothed within its own tissue (normalised convolution: the tissue's edge does not count), over the tissue
    both share away from its edge."""
    sigma = max(1.0, scale_um / spacing)

    def inside(h, tissue):
        weight = ndimage.gaussian_filter(tissue.astype(np.float32), sigma)
        return ndimage.gaussian_filter(h * tissue, sigma) / np.maximum(weight, 1e-3)

    shared = ndimage.binary_erosion(fixed_tissue & moved_tissue, iterations=int(np.ceil(sigma)))
    return _correlation(inside(fixed_h, fixed_tissue), inside(moved_h, moved_tissue), shared)


def _mirror(section: Section) -> Section:
    """The section mirrored left-right (the flip is then undone in the transform)."""
    return Section(section.rgb[:, ::-1], section.hematoxylin[:, ::-1].copy(), section.tissue[:, ::-1].copy(),
                   section.spacing)


def _register(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, metric: str, shrink: list[int],
              iterations: int, in_place: bool = True, moving_initial: sitk.Transform | None = None,
              sampling: float = 0.5, step_px: float = 2.0, samples: float = 1.0) -> sitk.Transform:
    """One SimpleITK stage: ``metric`` mattes | correlation on a regular sample (``sampling`` of the pixels, at
    most ``sampling`` x ``samples`` x :data:`SAMPLE_BUDGET_PX` at each level: a large section costs no more per
    iteration),
    multi-resolution (``shrink`` per level), regular-step gradient descent."""
    method = sitk.ImageRegistrationMethod()
    if metric == "mattes":
        method.SetMetricAsMattesMutualInformation(32)
    else:
        method.SetMetricAsCorrelation()
    method.SetMetricSamplingStrategy(method.REGULAR)
    pixels = fixed.GetNumberOfPixels()
    method.SetMetricSamplingPercentagePerLevel(
        [sampling * min(1.0, samples * SAMPLE_BUDGET_PX * s * s / pixels) for s in shrink], seed=SAMPLING_SEED)
    method.SetInterpolator(sitk.sitkLinear)
    # first steps of ``step_px`` pixels (in µm, at least 1): the same iterations then move a section as many
    # *pixels* whatever its µm per pixel — the serial preset (0.5 µm/px) keeps its 1 µm steps, an 8 mm section
    # (8 µm/px) is no longer held to ~1 µm steps (its rigid fit has millimetres to cover)
    step = max(1.0, step_px * fixed.GetSpacing()[0])
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=step, minStep=1e-4 * step,
                                                    numberOfIterations=iterations, relaxationFactor=0.6,
                                                    gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel([max(0, s - 1) for s in shrink])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    if moving_initial is not None:
        method.SetMovingInitialTransform(moving_initial)
    method.SetInitialTransform(initial, inPlace=in_place)
    return method.Execute(fixed, moving)


def _field(transform: sitk.Transform, shape: tuple[int, int], spacing: float) -> np.ndarray:
    """(2, H, W) displacement (µm) of ``transform`` on the grid of ``shape`` pixels ``spacing`` µm apart (pixel
    centres at (i + ½) spacing), x then y."""
    displacement = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, (shape[1], shape[0]),
                                                     (spacing / 2, spacing / 2), (spacing, spacing))
    return np.moveaxis(sitk.GetArrayFromImage(displacement), -1, 0)


def field_grid(shape: tuple[int, int], spacing: float) -> tuple[tuple[int, int], float]:
    """(shape, spacing) of the displacement fields of a fixed image of ``shape`` at ``spacing``: the same extent,
    at most :data:`FIELD_PX` across (a smooth field loses nothing; a 2,500 px section's fields stay small)."""
    factor = max(1.0, max(shape) / FIELD_PX)
    return (max(1, int(np.ceil(shape[0] / factor))), max(1, int(np.ceil(shape[1] / factor)))), spacing * factor


def _matrix(transform: sitk.Transform, mirror_width: float | None) -> np.ndarray:
    """(3, 3) fixed µm -> moving µm of a SimpleITK matrix transform, found on the mirrored moving image when
    ``mirror_width`` (µm) is given (x' = width - x undone)."""
    matrix = np.array(transform.GetMatrix()).reshape(2, 2)
    centre, translation = np.array(transform.GetCenter()), np.array(transform.GetTranslation())
    a = np.eye(3)
    a[:2, :2] = matrix
    a[:2, 2] = translation + centre - matrix @ centre
    if mirror_width is not None:
        a = np.array([[-1.0, 0, mirror_width], [0, 1, 0], [0, 0, 1]]) @ a
    return a


def outline_distance(fixed_tissue: np.ndarray, moved_tissue: np.ndarray) -> float:
    """Median distance between the two tissue outlines, as a fraction of the fixed tissue's diameter (robust to
    a torn-off piece: the median ignores a minority of the outline)."""
    def edge(mask):
        return mask & ~ndimage.binary_erosion(mask)

    a, b = edge(fixed_tissue), edge(moved_tissue)
    if not a.any() or not b.any():
        return 1.0
    distances = np.r_[ndimage.distance_transform_edt(~b)[a], ndimage.distance_transform_edt(~a)[b]]
    diameter = 2 * np.sqrt(fixed_tissue.sum() / np.pi)
    return float(np.median(distances) / diameter)




def _warp(section: Section, transform: PairTransform, shape: tuple[int, int], spacing: float
          ) -> tuple[np.ndarray, np.ndarray]:
    """The moving section's hematoxylin and tissue resampled onto the fixed grid (``shape`` at ``spacing``)."""
    h, w = shape
    rows, cols = np.mgrid[0:h, 0:w].astype(float)
    points = (np.stack([cols.ravel(), rows.ravel()], axis=1) + 0.5) * spacing
    moved = transform.fixed_to_moving(points) / section.spacing - 0.5  # moving thumbnail px (x, y)
    at = [moved[:, 1], moved[:, 0]]
    hema = ndimage.map_coordinates(section.hematoxylin, at, order=1, mode="constant").reshape(h, w)
    tissue = ndimage.map_coordinates(section.tissue.astype(np.float32), at, order=1, mode="constant").reshape(h, w)
    return hema, tissue > 0.5


def feature_error(fixed_h: np.ndarray, moved_h: np.ndarray, spacing: float) -> tuple[float, int]:
    """(median distance in µm of mutually matched ORB keypoints that agree, how many) between two aligned
    hematoxylin images; (nan, n) when fewer than 8 agree."""
    def keypoints(image):
        scaled = image / (np.percentile(image[image > 0], 99) if (image > 0).any() else 1.0)
        orb = ORB(n_keypoints=300, fast_threshold=0.05)
        try:
            orb.detect_and_extract(np.clip(scaled, 0, 1))
        except RuntimeError:  # no keypoint at all
            return np.zeros((0, 2)), np.zeros((0, 256), bool)
        return orb.keypoints, orb.descriptors

    (kf, df), (km, dm) = keypoints(fixed_h), keypoints(moved_h)
    if len(kf) < 8 or len(km) < 8:
        return float("nan"), 0
    matches = match_descriptors(df, dm, cross_check=True, max_ratio=0.85)
    if len(matches) == 0:
        return float("nan"), 0
    distance = np.linalg.norm(kf[matches[:, 0]] - km[matches[:, 1]], axis=1) * spacing
    agreeing = distance[distance < 150.0]  # matches further apart than this are wrong matches, not error
    if len(agreeing) < 8:
        return float("nan"), int(len(agreeing))
    return float(np.median(agreeing)), int(len(agreeing))


def verdict(dice: float, outline: float, scale: float, error: float) -> tuple[str, str]:
    """aligned | doubtful | failed, and why (thresholds: ALIGNED, FAILED)."""
    if outline > FAILED["outline"]:
        return "failed", (f"the tissue outlines differ ({outline:.3f} of the diameter apart after a rigid fit, > "
                          f"{FAILED['outline']}): not sections of one block?")
    if abs(np.log(scale)) > np.log(FAILED["scale"]):
        return "failed", f"the fit needs a {scale:.2f}x scale change (sections of one block keep their size)"
    if dice < FAILED["dice"]:
        return "failed", f"tissue overlap {dice:.2f} < {FAILED['dice']} after alignment"
    weak = []
    if outline > ALIGNED["outline"]:
        weak.append(f"outlines {outline:.3f} of the diameter apart > {ALIGNED['outline']}")
    if dice < ALIGNED["dice"]:
        weak.append(f"tissue overlap {dice:.2f} < {ALIGNED['dice']}")
    if abs(np.log(scale)) > np.log(ALIGNED["scale"]):
        weak.append(f"scale change {scale:.2f}x")
    if np.isfinite(error) and error > ALIGNED["feature_error_um"]:
        weak.append(f"matched features {error:.0f} µm apart > {ALIGNED['feature_error_um']:.0f} µm")
    return ("doubtful", "; ".join(weak)) if weak else ("aligned", "outlines, overlap and scale agree")


def _rigid_fit(fixed: Section, moving: Section, f_img: sitk.Image, flip: bool, angle: float,
               grid: tuple[int, int], grid_spacing: float, shrink: list[int], iterations: int, samples: float,
               start: sitk.Transform | None = None, outline_px: int = 0
               ) -> tuple[sitk.Transform, sitk.Image, bool, float, float]:
    """(rigid transform, moving image it was fitted on, flip, outline distance after it, angle) from a coarse
    guess (or from ``start``, a rigid fit of the same guess to refine); ``outline_px`` > 0: the outline measured
    on a view of the fixed tissue at most that many pixels across (a screening)."""
    spacing = fixed.spacing
    source = _mirror(moving) if flip else moving
    m_img = _image(source.hematoxylin, moving.spacing)
    if start is None:
        centre_f = (np.array(ndimage.center_of_mass(fixed.tissue))[::-1] + 0.5) * spacing
        centre_m = (np.array(ndimage.center_of_mass(source.tissue))[::-1] + 0.5) * moving.spacing
        # the coarse search's map, fixed -> moving in (row, col): R(angle) F (o - c_f) + c_m; in (x, y) that
        # rotation is R(-angle), and on the mirrored moving image the mirror conjugates it to R(+angle)
        start = sitk.Euler2DTransform(tuple(centre_f), angle if flip else -angle, tuple(centre_m - centre_f))
    rigid = _register(f_img, m_img, start, "mattes", shrink, iterations, samples=samples)
    mirror_width = moving.tissue.shape[1] * moving.spacing if flip else None
    rigid_only = PairTransform(_matrix(rigid, mirror_width), np.zeros((2, *grid)), np.zeros((2, *grid)),
                               grid_spacing, flip)
    tissue, view_spacing = fixed.tissue, spacing
    if outline_px and max(tissue.shape) > outline_px:
        factor = max(tissue.shape) / outline_px
        tissue = ndimage.zoom(tissue.astype(np.float32), 1 / factor, order=1) > 0.5
        view_spacing = spacing * fixed.tissue.shape[1] / tissue.shape[1]
    outline = outline_distance(tissue, _warp(moving, rigid_only, tissue.shape, view_spacing)[1])
    return rigid, m_img, flip, outline, angle


def register_sections(fixed: Section, moving: Section, nonrigid: bool = True, mesh_nodes: int = 6,
                      effort: Effort = FULL, threads: int = 1) -> PairResult:
    """Register ``moving`` onto ``fixed`` (thumbnails of about the same spacing; ``mesh_nodes`` across the
    B-spline mesh; ``effort``: :func:`coarse_effort`); never raises on bad tissue: the verdict says it. The same
    pair gives the same transform on every run: each ITK fit runs on one thread (its multi-threaded metric sums
    partial results in the order the threads finish); ``threads`` > 1 runs that many of the screening's fits side
    by side (SimpleITK releases the GIL), each still on one thread, so the transform does not depend on it."""
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        return _register_pair(fixed, moving, nonrigid and effort.nonrigid, mesh_nodes, effort, max(1, threads))
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def _register_pair(fixed: Section, moving: Section, nonrigid: bool, mesh_nodes: int, effort: Effort,
                   threads: int) -> PairResult:
    import time

    started = time.perf_counter()
    for name, section in (("fixed", fixed), ("moving", moving)):
        if section.tissue.sum() < MIN_TISSUE_PX:
            return PairResult(None, PairQuality(0.0, 1.0, 1.0, 0.0, float("nan"), 0, "failed",
                                                f"no tissue on the {name} slide (empty glass?)"),
                              time.perf_counter() - started)
    spacing = fixed.spacing  # the grid of the result; each image keeps its own spacing
    h, w = fixed.hematoxylin.shape
    grid, grid_spacing = field_grid((h, w), spacing)
    f_img = _image(fixed.hematoxylin, spacing)
    # several rotations of both mirror hypotheses are refined (a torn piece can make a wrong one win the coarse
    # search); the one whose outline then agrees best is kept: sections of one block are congruent up to a small
    # stretch, so after the *rigid* fit their outlines agree, and another block's outline can only be forced on by
    # scaling and shearing
    # (screened at ~SCREEN_PX across; the winner then refined at half and full resolution)
    guesses = _coarse_rigid(fixed, moving)
    screen = [max(2, int(round(max(h, w) / SCREEN_PX)))]  # one level of about SCREEN_PX across
    def screened(guess: tuple[bool, float, float]):
        return _rigid_fit(fixed, moving, f_img, guess[0], guess[1], grid, grid_spacing, screen, 100, 1.0,
                          outline_px=SCREEN_PX)

    with ThreadPoolExecutor(max(1, min(threads, len(guesses)))) as pool:  # in order: the same fits as one by one
        fits = list(pool.map(screened, guesses))
    best = min(range(len(fits)), key=lambda k: fits[k][3])
    flip, angle, coarse = guesses[best]
    rigid, m_img, flip, outline, _ = _rigid_fit(fixed, moving, f_img, flip, angle, grid, grid_spacing, [2, 1],
                                                effort.iterations, effort.samples, start=fits[best][0])
    mirror_width = moving.tissue.shape[1] * moving.spacing if flip else None
    affine = sitk.AffineTransform(2)
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    affine.SetCenter(rigid.GetCenter())
    affine = _register(f_img, m_img, affine, "mattes", [2, 1], effort.iterations, samples=effort.samples)
    a = _matrix(affine, mirror_width)
    scale = float(np.sqrt(abs(np.linalg.det(a[:2, :2]))))
    u = np.zeros((2, *grid))
    if nonrigid:
        mesh = sitk.BSplineTransformInitializer(f_img, [mesh_nodes, mesh_nodes], order=3)
        try:
            # a fifth of the pixels: the B-spline's cost is its metric derivative (docs/registration.md)
            bspline = _register(f_img, m_img, mesh, "correlation", [2, 1], 60, moving_initial=affine, sampling=0.2,
                                step_px=0.5)
            u = _field(bspline, grid, grid_spacing)
        except RuntimeError:  # the optimiser left the image: keep the affine result
            u = np.zeros((2, *grid))
    transform = PairTransform(a, u, invert_field(u, grid_spacing), grid_spacing, flip)
    moved_h, moved_tissue = _warp(moving, transform, (h, w), spacing)
    dice = overlap(moved_tissue, fixed.tissue)
    correlation = structure_correlation(fixed.hematoxylin, fixed.tissue, moved_h, moved_tissue, spacing)
    error, matched = feature_error(fixed.hematoxylin, moved_h, spacing)
    label, reason = verdict(dice, outline, scale, error)
    quality = PairQuality(round(dice, 4), round(outline, 4), round(scale, 4), round(correlation, 4), error, matched,
                          label, reason)
    return PairResult(transform, quality, time.perf_counter() - started, {"coarse_score": round(coarse, 3)})


