"""Registration to the cell: block matching around the tissue at 1-8 µm/px, after the coarse chain of
:mod:`stainmil.slides.register`.

Neighbouring serial sections do not show the same cells (a nucleus spans one or two 4 µm sections); what they share
is the tissue's architecture — where cells crowd or thin out, the fibres, some of the nuclei, the nests. So the
refinement compares *windows* of a few hundred µm:

1. **Windows on the fixed tissue**: a regular grid of about ``windows`` centres on the fixed section's tissue (its
   thumbnail mask, away from the edge).
2. **Read region by region**: each window of the fixed slide is read at the pyramid level just finer than the
   pass's spacing and resampled to it; the moving slide's window is read around where the current transform sends
   it and resampled *through* the transform's local affine map (rotation, flip, shear: the two windows then differ
   by a small shift only). A whole level 0 is never read.
3. **What every stain shows**: inverted grey (:func:`darkness`), smoothed over about a nucleus and less its trend
   over ~20 µm (:func:`_band`): the cells' scale, not the tissue's edge or the lesion's outline.
4. **Normalised cross-correlation** of the fixed window inside the larger moving one
   (:func:`normalised_correlation`, as ``skimage.feature.match_template`` with a third of its FFT work), its peak
   refined to sub-pixel by a parabola through its neighbours.
5. **Outliers out**: a window counts when its peak stands :data:`MIN_Z` robust deviations above its map (the right
   peak between two neighbouring sections is often low, NCC ~0.2, but stands out), is not on the search's border,
   and agrees with its neighbours' shifts (within 3 robust deviations of the median of its 8 nearest accepted
   neighbours, or one pixel).
6. **A smooth field** through the accepted shifts (thin-plate spline, ``scipy.interpolate.RBFInterpolator``)
   corrects the transform everywhere: ``T'(p) = T(p + d(p))``. The passes chain their corrections point by point;
   the result is written once into the same (affine, u, v) form, so a transform file is read by ``read_pair`` as
   before.

The passes (:data:`PASSES`) go from 512 µm windows searched +-192 µm at 4x the finest spacing (the coarse chain can
be 300 µm off on a torn or folded section) to 256 µm windows +-48 µm at the finest (``spacing_um``, 2 µm/px by
default). Evidence (:class:`Refinement`): the share of windows accepted, their median peak, the residual scatter
about the fitted field and the share of the tissue the agreeing windows cover; :func:`judge` turns it into the
verdict. Too little support leaves the transform as it was and says so (the verdict is then at best ``doubtful``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from scipy import ndimage
from scipy.interpolate import RBFInterpolator
from scipy.spatial import cKDTree

from stainmil.slides.reader import Slide, best_level
from stainmil.slides.transform import PairTransform, invert_field

T = TypeVar("T")

# the passes: (µm/px as a multiple of the finest, window px, search radius px, smoothing µm): 512 µm windows searched
# +-192 µm twice at 4x the finest spacing (the coarse chain can be 300 µm off on a torn or folded section), then
# 256 µm windows +-96 µm at 2x, then twice +-48 µm at the finest
PASSES = ((4, 64, 24, 12.0), (4, 64, 24, 12.0), (2, 64, 24, 6.0), (1, 128, 24, 3.0), (1, 128, 24, 3.0))
MIN_Z = 3.5                   # an accepted window's NCC peak stands this many robust deviations above its map
MIN_SHARE = 0.15              # accepted share of the windows below which the refinement is not applied
MIN_ACCEPTED = 12
HIGH_PASS_UM = 20.0           # windows are compared less their trend over this, or 4 x the smoothing (_band)
COMPOSE_UM = 64.0             # the final correction is evaluated exactly this far apart, bilinear between
SMOOTHING = 0.02              # thin-plate spline smoothing (windows' shifts in µm, places in mm)
# the verdict (judge)
MAX_SCATTER = 2.0  # fine-pass pixels: accepted shifts further than this from the fitted field (median) are doubtful
COVER_WINDOWS = 2.0  # tissue further than this many (finest) windows from an agreeing one is not covered,
COVER_STEPS = 1.5    # or than this many steps of the windows' grid where that is coarser (large sections: the same
#                      ~300 windows lie further apart; 1.5 steps is what 2 windows are at 8 mm)
MIN_COVERAGE = 0.9   # ... and a refinement covering less of the tissue is doubtful
SUPPORTED_SHARE = 0.5  # a refinement with at least this share of the windows agreeing supports an aligned verdict
                       # (well-aligned neighbouring pairs: 61-95%; a pair with a p90 of 78 µm in its holes: 34%)


@dataclass
class Refinement:
    """What the cell-scale refinement found (the transform is ``None`` when it was not applied)."""

    transform: PairTransform | None  # refined, or None
    windows: int              # tissue windows tried (finest pass)
    accepted: int             # ... accepted
    peak: float               # median NCC peak of the accepted windows
    scatter_um: float         # median distance of the accepted shifts from the fitted field
    shift_um: float           # median correction applied at the accepted windows (all passes)
    seconds: float
    reason: str               # why it was not applied; "" when it was
    coverage: float = 0.0     # share of the fixed tissue near an accepted window (COVER_WINDOWS, COVER_STEPS)
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # (A, 2) accepted windows' centres, µm

    @property
    def share(self) -> float:
        return self.accepted / self.windows if self.windows else 0.0

    def attrs(self) -> dict:
        """The evidence as transform-file attributes (``refine_*``)."""
        return {"refine_windows": self.windows, "refine_accepted": self.accepted,
                "refine_peak": round(self.peak, 3), "refine_scatter_um": round(self.scatter_um, 2),
                "refine_shift_um": round(self.shift_um, 2), "refine_seconds": round(self.seconds, 2),
                "refine_coverage": round(self.coverage, 3), "refine_applied": self.transform is not None,
                "refine_reason": self.reason}


def darkness(rgb: np.ndarray) -> np.ndarray:
    """(H, W) float32 inverted grey of an RGB uint8 image: whatever is stained, in any stain, is dark. Measured
    against the nuclear stain alone (hematoxylin + DAB by colour deconvolution) on neighbouring synthetic sections:
    H&E against Melan-A (cytoplasmic DAB rings where H&E has nuclei) 5 x more windows matched, and within 2.7 µm
    instead of 4 µm (median); the normalised cross-correlation takes out a section's stronger or weaker stain."""
    return (255.0 - rgb.mean(axis=-1)).astype(np.float32)


class _Reader:
    """Windows of one slide resampled onto a fixed-frame grid: output pixel (r, c) of a window shows level-0 µm
    ``matrix @ (x, y) + offset`` with (x, y) = (c, r) in output pixels."""

    def __init__(self, slide: Slide, mpp: float) -> None:
        self.slide, self.mpp = slide, mpp

    def window(self, matrix: np.ndarray, offset: np.ndarray, side: int, spacing: float) -> np.ndarray:
        """(side, side) :func:`darkness`; ``spacing`` µm/px of the output (chooses the level read)."""
        corners = np.array([[0, 0], [side, 0], [0, side], [side, side]], float) @ matrix.T + offset
        level = best_level(self.slide.level_downsamples, spacing / self.mpp)
        scale = self.mpp * self.slide.level_downsamples[level]  # µm per level pixel
        lo = np.floor(corners.min(axis=0) / scale) - 2
        hi = np.ceil(corners.max(axis=0) / scale) + 2
        width, height = (hi - lo).astype(int)
        x0, y0 = (lo * scale / self.mpp).astype(int)
        density = darkness(self.slide.read_box(int(x0), int(y0), level, int(width), int(height)))
        ratio = spacing / scale
        if ratio > 1.2:  # shrinking: smooth first (no aliasing)
            density = ndimage.gaussian_filter(density, 0.4 * ratio)
        # output (row, col) -> level pixel (row, col): level px = (matrix @ (c, r) + offset) / scale - lo - 0.5
        m = matrix[::-1, ::-1] / scale
        start = (offset / scale - lo - 0.5)[::-1] + m @ np.array([0.5, 0.5])
        return ndimage.affine_transform(density, m, start, output_shape=(side, side), order=1, mode="nearest")


def _peak(score: np.ndarray) -> tuple[np.ndarray, float, float]:
    """((row, col) sub-pixel place, value, how many robust deviations it stands above the map) of an NCC map.
    Neighbouring sections share a fraction of their nuclei: the right peak is often low (NCC ~0.15) but stands
    out of the map; a strong peak from structure only one section has (an edge) does not."""
    r, c = np.unravel_index(int(np.argmax(score)), score.shape)
    value = float(score[r, c])
    place = np.array([r, c], float)
    for axis, (i, n) in enumerate(((r, score.shape[0]), (c, score.shape[1]))):
        if 0 < i < n - 1:
            before = score[i - 1, c] if axis == 0 else score[r, i - 1]
            after = score[i + 1, c] if axis == 0 else score[r, i + 1]
            curve = before - 2 * value + after
            if curve < 0:
                place[axis] += np.clip(0.5 * (before - after) / curve, -0.5, 0.5)
    middle = np.median(score)
    spread = 1.4826 * np.median(np.abs(score - middle))
    return place, value, (value - middle) / spread if spread > 0 else 0.0


def window_centres(tissue: np.ndarray, tissue_spacing: float, count: int, inset_um: float) -> np.ndarray:
    """(N, 2) x, y µm: a regular grid of about ``count`` points on ``tissue`` (a mask at ``tissue_spacing``
    µm/px), at least ``inset_um`` inside its edge (or anywhere on it when too little is)."""
    inner = ndimage.binary_erosion(tissue, iterations=max(1, int(inset_um / tissue_spacing)))
    if inner.sum() < count:
        inner = tissue
    step = max(1, int(np.sqrt(inner.sum() / max(count, 1))))
    rows, cols = np.mgrid[step // 2:tissue.shape[0]:step, step // 2:tissue.shape[1]:step]
    keep = inner[rows, cols]
    return (np.stack([cols[keep], rows[keep]], axis=1) + 0.5) * tissue_spacing


def _filters(spacing: float, smooth_um: float) -> tuple[float, float]:
    """(sigma, wide) px of a pass's :func:`_band`."""
    return max(0.7, smooth_um / spacing), max(HIGH_PASS_UM, 4 * smooth_um) / spacing


def _each(work: Callable[[int], T], count: int, threads: int) -> list[T]:
    """``work(k)`` for k = 0 .. count - 1, in that order; ``threads`` > 1 runs that many side by side (each window
    is read and matched on its own — OpenSlide and the FFTs release the GIL — so the results are those of one by
    one, whatever the thread count)."""
    if threads <= 1:
        return [work(k) for k in range(count)]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(work, range(count)))


def _templates(fixed: _Reader, centres: np.ndarray, spacing: float, side: int, smooth_um: float, threads: int = 1
               ) -> list[np.ndarray | None]:
    """The fixed windows of a pass, band-passed (float64), None where blank (glass, a bubble). They depend on
    nothing the passes change: two passes at the same spacing, size and smoothing read them once."""
    sigma, wide = _filters(spacing, smooth_um)

    def template(k: int) -> np.ndarray | None:
        window = fixed.window(np.eye(2) * spacing, centres[k] - side * spacing / 2, side, spacing)
        return None if window.std() < 1e-3 else _band(window, sigma, wide).astype(np.float64)

    return _each(template, len(centres), threads)


def _match(moving: _Reader, transform, centres: np.ndarray, templates: list[np.ndarray | None], spacing: float,
           side: int, radius: int, smooth_um: float, threads: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per window centre (µm), its band-passed fixed window in ``templates``: (shift (N, 2) µm in the fixed
    frame, NCC peak (N,), accepted (N,) bool before the neighbour check)."""
    big = side + 2 * radius
    sigma, wide = _filters(spacing, smooth_um)
    # the transform's local affine map at every centre (one call: the chain's fields are evaluated once)
    here = transform.fixed_to_moving(np.concatenate([centres, centres + [spacing, 0], centres + [0, spacing]]))
    here = here.reshape(3, len(centres), 2)

    def match(k: int) -> tuple[np.ndarray, float, bool]:
        template = templates[k]
        if template is None:
            return np.zeros(2), 0.0, False  # blank (glass, a bubble)
        # the moving window through the local affine map at this centre
        jacobian = np.stack([here[1, k] - here[0, k], here[2, k] - here[0, k]], axis=1)  # µm moving per fixed px
        start = here[0, k] - jacobian @ np.full(2, side / 2 + radius)
        search = moving.window(jacobian, start, big, spacing)
        if search.std() < 1e-3:
            return np.zeros(2), 0.0, False
        score = normalised_correlation(_band(search, sigma, wide).astype(np.float64), template)
        place, value, z = _peak(score)
        ok = z >= MIN_Z and bool(np.all((place > 0.5) & (place < 2 * radius - 0.5)))  # not on the search's border
        return (place[::-1] - radius) * spacing, value, ok  # (x, y) µm: F(p) ~ M'(p + d)

    found = _each(match, len(centres), threads)
    shifts = np.array([f[0] for f in found]).reshape(len(centres), 2)
    return shifts, np.array([f[1] for f in found], float), np.array([f[2] for f in found], bool)


def normalised_correlation(search: np.ndarray, template: np.ndarray) -> np.ndarray:
    """(S - T + 1, S - T + 1) normalised cross-correlation of ``template`` (T, T) at every place inside ``search``
    (S, S) — what ``skimage.feature.match_template`` gives, with one FFT the size of ``search`` (a circular
    correlation is exact at the places where the template fits) instead of its padded full size."""
    n = template.shape[0]
    valid = search.shape[0] - n + 1
    centred = template - template.mean()
    spectrum = np.fft.rfft2(search) * np.conj(np.fft.rfft2(centred, s=search.shape))
    numerator = np.fft.irfft2(spectrum, s=search.shape)[:valid, :valid]
    sums = [np.pad(np.cumsum(np.cumsum(a, 0), 1), ((1, 0), (1, 0))) for a in (search, search * search)]
    window = [(c[n:, n:] - c[:-n, n:] - c[n:, :-n] + c[:-n, :-n])[:valid, :valid] for c in sums]
    variance = window[1] - window[0] ** 2 / (n * n)  # sum over the window of (x - its mean)^2
    denominator = np.sqrt(np.maximum(variance, 0) * (centred**2).sum())
    flat = denominator <= 1e-9 * max(1.0, float(denominator.max()))  # a flat stretch of the search: no match
    return np.where(flat, 0.0, numerator / np.where(flat, 1.0, denominator))


def _band(image: np.ndarray, sigma: float, wide: float) -> np.ndarray:
    """``image`` smoothed over ``sigma`` px less its trend over ``wide`` px: the cells' scale, not the tissue's edge
    or the lesion's outline (whose broad correlation would drown the cells' sharp one)."""
    return ndimage.gaussian_filter(image, sigma) - ndimage.gaussian_filter(image, wide)


def _consistent(points: np.ndarray, shifts: np.ndarray, floor_um: float) -> np.ndarray:
    """Which shifts agree with their 8 nearest neighbours' median (within 3 robust deviations or ``floor_um``)."""
    if len(points) < 4:
        return np.ones(len(points), bool)
    k = min(9, len(points))
    _, near = cKDTree(points).query(points, k)
    local = np.median(shifts[near[:, 1:]], axis=1)
    residual = np.linalg.norm(shifts - local, axis=1)
    spread = 1.4826 * np.median(residual)
    return residual <= max(3 * spread, floor_um)


@dataclass
class _Shifted:
    """``T0(p + d1(...(p + dk(p))))``: the coarse transform with the passes' fitted corrections in front (the newest
    first), mapped point by point — the passes need only their windows' places; the grids are built once, at the
    end, by :func:`_compose`."""

    root: object                        # PairTransform: the coarse chain's
    shifts: tuple = ()                  # RBFInterpolator, ... (fixed mm -> (x, y) µm), oldest first

    def then(self, shift: RBFInterpolator) -> _Shifted:
        return _Shifted(self.root, (*self.shifts, shift))

    def displaced(self, points_um: np.ndarray) -> np.ndarray:
        for shift in reversed(self.shifts):
            points_um = points_um + shift(points_um / 1000.0)
        return points_um

    def fixed_to_moving(self, points_um: np.ndarray) -> np.ndarray:
        return self.root.fixed_to_moving(self.displaced(points_um))


def _compose(chain: _Shifted):
    """``chain`` as one transform of its root's form: T0(q) = A (q + u(q)) with q = displaced(p), so
    u'(p) = q - p + u(q) on T0's grid, v' its inverse."""
    transform = chain.root
    h, w = transform.u.shape[1:]
    rows, cols = np.mgrid[0:h, 0:w].astype(float)
    grid = (np.stack([cols.ravel(), rows.ravel()], axis=1) + 0.5) * transform.spacing  # µm
    # the corrections are smooth (windows 100s of µm apart): evaluated every COMPOSE_UM, then bilinear
    step = max(1, int(COMPOSE_UM / transform.spacing))
    at_r, at_c = (np.unique(np.r_[np.arange(0, n, step), n - 1]).astype(float) for n in (h, w))
    coarse = np.stack(np.meshgrid(at_c, at_r), axis=-1).reshape(-1, 2)
    coarse_um = (coarse + 0.5) * transform.spacing
    shift = (chain.displaced(coarse_um) - coarse_um).reshape(len(at_r), len(at_c), 2)
    index = [np.interp(rows.ravel(), at_r, np.arange(len(at_r))), np.interp(cols.ravel(), at_c, np.arange(len(at_c)))]
    moved = grid + np.stack([ndimage.map_coordinates(shift[..., k], index, order=1) for k in (0, 1)], axis=1)
    u = (moved - grid + transform._sample(transform.u, moved)).T.reshape(2, h, w)
    return PairTransform(transform.affine, u, invert_field(u, transform.spacing), transform.spacing,
                         transform.flipped)


def refine_transform(fixed: Slide, moving: Slide, fixed_mpp: float, moving_mpp: float, transform,
                     tissue: np.ndarray, tissue_spacing: float, spacing_um: float = 2.0, windows: int = 300,
                     threads: int = 1) -> Refinement:
    """Refine ``transform`` (fixed µm -> moving µm) by block matching on windows of the fixed ``tissue`` (a mask
    at ``tissue_spacing`` µm/px), two passes down to ``spacing_um`` µm/px (see the module doc); ``threads``
    windows read and matched side by side (the same result for any number)."""
    started = time.perf_counter()
    threads = threads if fixed.concurrent_reads and moving.concurrent_reads else 1
    readers = _Reader(fixed, fixed_mpp), _Reader(moving, moving_mpp)
    passes = refine_passes(max(tissue.shape) * tissue_spacing, spacing_um)
    centres = window_centres(tissue, tissue_spacing, windows, passes[0][0] * passes[0][1] / 2)
    current, corrections = _Shifted(transform), []
    accepted = np.zeros(0, bool)
    peaks = np.zeros(0)
    scatter = float("nan")
    templates: dict[tuple, list] = {}
    for spacing, side, radius, smooth_um in passes:
        key = (spacing, side, smooth_um)
        if key not in templates:  # passes that share them are consecutive: only the current pass's kept
            templates = {key: _templates(readers[0], centres, spacing, side, smooth_um, threads)}
        shifts, peaks, accepted = _match(readers[1], current, centres, templates[key], spacing, side, radius,
                                         smooth_um, threads)
        if accepted.sum() >= MIN_ACCEPTED:
            accepted[accepted] = _consistent(centres[accepted], shifts[accepted], spacing)
        share = accepted.mean() if len(accepted) else 0.0
        if accepted.sum() < MIN_ACCEPTED or share < MIN_SHARE:
            why = (f"the cell-scale refinement found support in {int(accepted.sum())} of {len(centres)} tissue "
                   f"windows at {spacing:g} µm/px (needs {MIN_SHARE:.0%} and {MIN_ACCEPTED}): the sections share "
                   "too little structure, or the coarse fit is too far off")
            return Refinement(None, len(centres), int(accepted.sum()), _median(peaks[accepted]), float("nan"),
                              0.0, time.perf_counter() - started, why)
        fitted = RBFInterpolator(centres[accepted] / 1000.0, shifts[accepted], kernel="thin_plate_spline",
                                smoothing=SMOOTHING * accepted.sum() / 100)
        scatter = float(np.median(np.linalg.norm(shifts[accepted] - fitted(centres[accepted] / 1000.0), axis=1)))
        corrections.append(shifts[accepted])
        current = current.then(fitted)
    shift = float(np.median(np.linalg.norm(np.concatenate(corrections), axis=1)))
    cover = cover_radius(centres, passes[-1][0] * passes[-1][1])
    return Refinement(_compose(current), len(centres), int(accepted.sum()), _median(peaks[accepted]), scatter,
                      shift, time.perf_counter() - started, "", coverage(tissue, tissue_spacing, centres[accepted],
                                                                         cover), centres[accepted])


def cover_radius(centres: np.ndarray, window_um: float) -> float:
    """How near an agreeing window a place of tissue must lie to count as measured (µm): ``COVER_WINDOWS`` finest
    windows, or ``COVER_STEPS`` steps of the windows' grid (``centres`` (N, 2) µm) where that is further — so that
    a section whose every window agrees is covered whole at any size."""
    step = float(np.median(cKDTree(centres).query(centres, k=2)[0][:, 1])) if len(centres) > 1 else 0.0
    return max(COVER_WINDOWS * window_um, COVER_STEPS * step)


def coverage(tissue: np.ndarray, spacing: float, points_um: np.ndarray, within_um: float) -> float:
    """Share of ``tissue`` (a mask at ``spacing`` µm/px) within ``within_um`` of one of ``points_um``: where the
    refinement's field is measured, not extrapolated."""
    if not tissue.any() or not len(points_um):
        return 0.0
    near = np.ones(tissue.shape, bool)
    cols, rows = np.clip((points_um / spacing).astype(int), 0, np.array(tissue.shape[::-1]) - 1).T
    near[rows, cols] = False
    distance = ndimage.distance_transform_edt(near) * spacing
    return float((distance[tissue] <= within_um).mean())


def _median(values: np.ndarray) -> float:
    return float(np.median(values)) if len(values) else float("nan")




MIN_EXTENT_UM = 800.0  # smaller sections (the small serial preset's 0.2 mm) are left to the coarse stages
WINDOWS_ACROSS = 6     # a section at least this many windows across: a smaller one is refined at a finer spacing,
                       # without the passes whose windows are larger


def refine_passes(extent_um: float, spacing_um: float) -> list[tuple[float, int, int, float]]:
    """The passes (µm/px, window px, search radius px, smoothing µm) down to ``spacing_um`` on a section
    ``extent_um`` across: those whose windows are wider than a :data:`WINDOWS_ACROSS`-th of it left out."""
    passes = [(spacing_um * factor, *rest) for factor, *rest in PASSES]
    largest = extent_um / WINDOWS_ACROSS
    return [one for one in passes[:-1] if one[0] * one[1] <= largest] + passes[-1:]


def reach_um(extent_um: float, spacing_um: float) -> float:
    """How far (µm) around the coarse fit the refinement's first pass searches."""
    spacing, _, radius, _ = refine_passes(extent_um, spacing_um)[0]
    return spacing * radius


def refine_spacing(extent_um: float, mpp: float, refine_um: float) -> float | None:
    """µm per pixel of the finest pass for a section ``extent_um`` across whose level 0 is ``mpp``:
    ``refine_um``, finer for a section under :data:`WINDOWS_ACROSS` windows across (a 1 mm section: 1.3 µm/px),
    never finer than level 0; None (no refinement) under :data:`MIN_EXTENT_UM`."""
    if extent_um < MIN_EXTENT_UM:
        return None
    factor, window = PASSES[-1][:2]
    return max(mpp, min(refine_um, extent_um / (WINDOWS_ACROSS * factor * window)))


def refine_pair(fixed_path, moving_path, fixed_mpp: float, moving_mpp: float, transform, tissue: np.ndarray,
                tissue_spacing: float, spacing_um: float = 2.0, windows: int = 300, threads: int = 1) -> Refinement:
    """:func:`refine_transform` on two slide files (opened and closed here)."""
    fixed, moving = Slide(fixed_path), Slide(moving_path)
    try:
        return refine_transform(fixed, moving, fixed_mpp, moving_mpp, transform, tissue, tissue_spacing,
                                spacing_um, windows, threads)
    finally:
        fixed.close()
        moving.close()


def judge(quality, refinement: Refinement, spacing_um: float):
    """The pair's quality with the refinement's evidence in its verdict: no support -> at best ``doubtful``; a
    large residual scatter -> ``doubtful``; strong support (a third of the windows, small scatter) -> ``aligned``
    even where the coarse measures doubted (a torn or folded outline), unless its scale is off."""
    from dataclasses import replace

    if quality.verdict == "failed":
        return quality
    if refinement.transform is None:
        return replace(quality, verdict="doubtful", reason=_joined(quality, refinement.reason))
    scatter_limit = MAX_SCATTER * spacing_um
    if refinement.scatter_um > scatter_limit:
        return replace(quality, verdict="doubtful", reason=_joined(
            quality, f"the cell-scale windows scatter {refinement.scatter_um:.1f} µm about the fitted field "
                     f"(> {scatter_limit:g} µm)"))
    if refinement.coverage < MIN_COVERAGE:
        return replace(quality, verdict="doubtful", reason=_joined(
            quality, f"the cell-scale windows that agree cover {refinement.coverage:.0%} of the tissue "
                     f"(< {MIN_COVERAGE:.0%}): the rest is extrapolated"))
    evidence = (f"cell-scale refinement: {refinement.accepted} of {refinement.windows} windows agree, "
                f"scatter {refinement.scatter_um:.1f} µm")
    if refinement.share < SUPPORTED_SHARE:
        return replace(quality, verdict="doubtful", reason=_joined(
            quality, f"{evidence} (fewer than {SUPPORTED_SHARE:.0%})"))
    if quality.verdict == "doubtful" and "scale change" not in quality.reason:
        return replace(quality, verdict="aligned", reason=f"{evidence}; coarse: {quality.reason}")
    return replace(quality, reason=f"{evidence}; {quality.reason}")


def _joined(quality, why: str) -> str:
    return why if quality.verdict == "aligned" else f"{why}; {quality.reason}"
