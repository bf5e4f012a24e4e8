"""``stainmil register``: every IHC slice of a case registered to an H&E slice of the same case (after ``tile``).

For each case, each slice of another stain is registered to each slice of ``register.reference_stain``
(:func:`stainmil.slides.register.register_sections`); the best-matching one is kept (verdict first, then tissue
overlap) and the choice recorded. Output in ``register.out_dir`` (default ``<tile.out_dir>/registration``)::

    transforms/<moving stem>__to__<fixed stem>.h5   one per registered pair (layout below)
    registrations.csv                               one row per IHC slice: its H&E slice, verdict, quality
    register_report.txt/.json                       every pair, its verdict and reason; every failure named

Transform file (level-0 µm of each slide; µm = level-0 px x the slide's µm/px)::

    affine          (3, 3)     fixed µm -> moving µm, before the non-rigid part (a mirror flip included)
    u, v            (2, H, W)  displacement (x, y) in µm on the fixed grid: p_m = affine (p_f + u(p_f));
                               p_f = q + v(q) with q = affine^-1 p_m
    attrs           spacing_um (grid pixel), flipped, fixed_slide, moving_slide, fixed_mpp, moving_mpp, case,
                    fixed_stain/slice, moving_stain/slice, verdict, reason, dice, outline, scale,
                    h_correlation, feature_error_um, seconds; with the cell-scale refinement refine_windows,
                    refine_accepted, refine_peak, refine_scatter_um, refine_shift_um, refine_seconds,
                    refine_applied, refine_reason (stainmil.slides.refine)

A pair whose file exists is done: re-running resumes. A pair that raises (an unreadable slide) is named in the
report with its error; the others go on.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import shapely

from stainmil.config import Config, RegisterConfig
from stainmil.data.tiling import load_tiles
from stainmil.errors import ConfigError, DataError
from stainmil.io import array_digest, atomic_path, atomic_write, atomic_write_json, atomic_write_text
from stainmil.locks import folder_lock
from stainmil.progress import progress_bar
from stainmil.slides.annotations import slide_key_name
from stainmil.slides.coords import grid_step
from stainmil.slides.reader import Slide, UnreadableSlide
from stainmil.slides.refine import Refinement, judge, reach_um, refine_pair, refine_spacing
from stainmil.slides.register import (
    PairResult,
    PairTransform,
    coarse_effort,
    quality_dict,
    read_section,
    register_sections,
)

VERDICT_RANK = {"aligned": 0, "doubtful": 1, "failed": 2}


@dataclass
class SlideRef:
    case: str
    stain: str
    slice: str
    path: str

    @property
    def stem(self) -> str:
        return slide_key_name((self.case, self.stain, self.slice))


@dataclass
class RegisterResult:
    out_dir: Path
    table: pd.DataFrame                  # one row per IHC slice (its chosen H&E slice)
    pairs: list[dict]                    # every pair tried
    errors: dict[str, str] = field(default_factory=dict)  # pair -> why it could not be registered


def transform_file(out: Path, moving: SlideRef, fixed: SlideRef) -> Path:
    return out / "transforms" / f"{moving.stem}__to__{fixed.stem}.h5"


def write_pair(path: Path, transform: PairTransform | None, attrs: dict) -> None:
    """One pair's transform (or only its verdict, when it failed before one existed) atomically."""
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as h5:
            if transform is not None:
                affine, u, v = (transform.affine.astype(np.float64), transform.u.astype(np.float32),
                                transform.v.astype(np.float32))
                h5.create_dataset("affine", data=affine)
                h5.create_dataset("u", data=u, compression="gzip")
                h5.create_dataset("v", data=v, compression="gzip")
                attrs = {**attrs, "spacing_um": transform.spacing, "flipped": transform.flipped,
                         "checksum": array_digest(affine, u, v)}
            for key, value in attrs.items():
                h5.attrs[key] = "" if value is None else value


def read_pair(path: str | Path) -> tuple[PairTransform | None, dict]:
    """(transform or None, attrs) of a transform file."""
    with h5py.File(path, "r") as h5:
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in h5.attrs.items()}
        if "affine" not in h5:
            return None, attrs
        affine, u, v = h5["affine"][()], h5["u"][()], h5["v"][()]
    if attrs.get("checksum") and array_digest(affine, u, v) != attrs["checksum"]:
        raise DataError(f"{path} is damaged (its transform does not match the checksum written with it); run "
                        f"`stainmil check {Path(path).parent.parent} --repair --config <cohort config>`, or delete the "
                        "file and run `stainmil register` again (it registers only what is missing).")
    transform = PairTransform(affine, u.astype(np.float64), v.astype(np.float64), float(attrs["spacing_um"]),
                              bool(attrs["flipped"]))
    return transform, attrs


def carry_geometry(geometry, transform_file: str | Path, step_px: float = 0.0):
    """A region drawn on a pair's fixed (H&E) slide, in its level-0 px, mapped onto the moving (IHC) slide's level-0
    px through the pair's transform. Edges are first cut into pieces of at most ``step_px`` fixed px (0: half the
    displacement grid's spacing) so the mapped outline follows the non-rigid field, not only its vertices.
    ``geometry``: one shapely geometry (-> one), or a list of them (-> a list, the transform file read once)."""
    many = not isinstance(geometry, shapely.Geometry)
    geometries = np.asarray(list(geometry) if many else [geometry], dtype=object)
    transform, attrs = read_pair(transform_file)
    if transform is None:
        raise DataError(f"{transform_file} holds no transform (its pair {attrs.get('verdict', 'failed')}), so no "
                        "region can be carried onto it; outline that slide itself, or register it again.")
    fixed_mpp, moving_mpp = float(attrs["fixed_mpp"]), float(attrs["moving_mpp"])
    step = step_px or transform.spacing / fixed_mpp / 2
    dense = shapely.segmentize(geometries, max(step, 1.0))
    carried = shapely.make_valid(shapely.transform(  # a fold in the field may cross an outline over itself
        dense, lambda xy: transform.fixed_to_moving(xy * fixed_mpp) / moving_mpp))
    return list(carried) if many else carried[0]


def map_patches(ihc: pd.DataFrame, he: pd.DataFrame, transform_file: str | Path) -> np.ndarray:
    """For each IHC patch (rows of a patch table), the row position in ``he`` of the H&E patch its centre lands
    on, or -1 (off the H&E patches)."""
    transform, attrs = read_pair(transform_file)
    size_ihc = ihc["size0"].to_numpy(float)
    centres = (ihc[["x", "y"]].to_numpy(float) + size_ihc[:, None] / 2) * float(attrs["moving_mpp"])  # µm
    landed = transform.moving_to_fixed(centres) / float(attrs["fixed_mpp"])  # H&E level-0 px
    size0 = float(he["size0"].iloc[0])
    step_x = step_y = float(grid_step(he[["x", "y"]].to_numpy()) or size0)
    origin_x, origin_y = he["x"].min() % step_x, he["y"].min() % step_y
    corners = {(int(x), int(y)): i for i, (x, y) in enumerate(he[["x", "y"]].to_numpy())}
    out = np.full(len(ihc), -1, dtype=np.int64)
    for k, (px, py) in enumerate(landed):
        cx = origin_x + np.floor((px - origin_x) / step_x) * step_x
        cy = origin_y + np.floor((py - origin_y) / step_y) * step_y
        hit = corners.get((int(round(cx)), int(round(cy))))
        if hit is not None and px < cx + size0 and py < cy + size0:
            out[k] = hit
    return out


def read_registrations(config: Config) -> pd.DataFrame | None:
    """``registrations.csv`` of ``config``'s cohort (transform paths resolved in its folder), or None before
    ``stainmil register``."""
    out = config.paths.registration_dir
    if not (out / "registrations.csv").is_file():
        return None
    table = pd.read_csv(out / "registrations.csv", dtype={"case": str, "stain": str, "slice": str,
                                                          "fixed_stain": str, "fixed_slice": str})
    for column in ("stain", "fixed_stain"):  # canonical, whatever an older `register` wrote
        table[column] = [config.data.canonical_stain(name) or name for name in table[column]]
    # found where they are now, even when the cohort's folder moved since `register` wrote the table
    table["transform"] = [str(out / "transforms" / Path(p).name) for p in table["transform"]]
    return table


def registrations_digest(config: Config) -> str | None:
    """SHA-256 of the cohort's ``registrations.csv`` (None before ``register``): a run records the one it was
    trained with, so a later ``register`` cannot silently move its patches."""
    found = config.paths.registration_dir / "registrations.csv"
    return hashlib.sha256(found.read_bytes()).hexdigest() if found.is_file() else None


@dataclass
class PatchAlignment:
    """Where each patch of a cohort lies on its case's reference-stain slice (``model.architecture: aligned``).

    ::

        anchor  (N,) int64  manifest row of the reference patch this patch's centre lands on through its slice's
                            ``aligned`` registration; a reference-stain patch: its own row; -1: no place (a slice
                            whose pair is ``doubtful`` or ``failed``, or a patch landing off the reference patches)
    """

    anchor: np.ndarray


def patch_alignment(config: Config, manifest: pd.DataFrame) -> PatchAlignment:
    """Every manifest row's place on its case's reference slice, from ``stainmil register``'s aligned pairs
    (``doubtful`` and ``failed`` pairs leave their slices unplaced: the model pools them as the hierarchy does)."""
    missing = [c for c in ("x", "y", "size0") if c not in manifest.columns]
    if missing:
        raise ConfigError(f"model.architecture 'aligned' needs each patch's place on its slide, but the index has no "
                          f"{missing}; tile whole slides with `stainmil tile` (patch-image cohorts cannot be aligned).")
    found = config.paths.registration_dir / "registrations.csv"
    registrations = read_registrations(config)
    if registrations is None:
        raise ConfigError(f"model.architecture 'aligned' needs this cohort's registered slices, but {found} does not "
                          "exist; run `stainmil register --config <config>` after `stainmil tile`.")
    manifest = manifest.reset_index(drop=True)
    reference = reference_stain(config)
    made_onto = set(registrations["fixed_stain"].astype(str))
    if made_onto - {reference}:
        raise ConfigError(f"the registrations in {found} were made onto {sorted(made_onto)}, but "
                          f"register.reference_stain is '{reference}'; re-run `stainmil register --config <config>`.")
    names = manifest[["case", "stain", "slice"]].astype(str)
    slices = {tuple(key): rows for key, rows in names.groupby(["case", "stain", "slice"], sort=False).indices.items()}
    anchor = np.full(len(manifest), -1, dtype=np.int64)
    for (_, stain, _), rows in slices.items():
        if stain == reference:
            anchor[rows] = rows
    for reg in registrations[registrations["verdict"] == "aligned"].itertuples(index=False):
        he_rows = slices.get((reg.case, reg.fixed_stain, reg.fixed_slice))
        ihc_rows = slices.get((reg.case, reg.stain, reg.slice))
        if he_rows is None or ihc_rows is None:
            continue  # a slice the index left out (a stain subset, an excluded slice)
        hits = map_patches(manifest.iloc[ihc_rows], manifest.iloc[he_rows], reg.transform)
        anchor[ihc_rows] = np.where(hits >= 0, he_rows[np.maximum(hits, 0)], -1)
    return PatchAlignment(anchor)


def reference_stain(config: Config) -> str:
    """``register.reference_stain`` as a canonical stain (``HE`` and ``H&E`` are ``he``), or a ConfigError."""
    reference = config.data.canonical_stain(config.register.reference_stain)
    if reference is None:
        raise ConfigError(f"register.reference_stain '{config.register.reference_stain}' is none of data.stains "
                          f"{config.data.stains} nor an alias of one (data.stain_aliases); set it to one of them.")
    return reference


def _slides(config: Config) -> tuple[dict[str, list[SlideRef]], dict[str, str]]:
    """The tiled slides by case, stains canonical (data.stain_aliases), and the slides left out: name -> why."""
    tiles, _ = load_tiles(config.tile)
    firsts = tiles.drop_duplicates(["case", "stain", "slice"])
    by_case: dict[str, list[SlideRef]] = {}
    unknown: dict[str, str] = {}
    for row in firsts.itertuples(index=False):
        stain = config.data.canonical_stain(row.stain)
        if stain is None:
            unknown[Path(str(row.slide)).name] = (f"stain '{row.stain}' is not in data.stain_aliases (nor one of "
                                                  f"data.stains {config.data.stains})")
            continue
        by_case.setdefault(str(row.case), []).append(SlideRef(str(row.case), stain, str(row.slice), str(row.slide)))
    return by_case, unknown


def _scale(path: str, slide_mpp: float) -> tuple[float, float]:
    """(level-0 µm/px, longest side in µm) of a slide; ``slide_mpp`` stands in for missing metadata."""
    slide = Slide(path)
    try:
        mpp = float(slide.mpp or slide_mpp)
        if not mpp:
            raise DataError(f"{path} records no µm per pixel; registration needs the scale (set tile.slide_mpp)")
        return mpp, max(slide.dimensions) * mpp
    finally:
        slide.close()


# the registration method: a transform file made by another (an older stainmil's) is made again on resume
METHOD = "coarse chain + cell-scale refinement, issue 40"


def _settings(moving: SlideRef, fixed: SlideRef, register: RegisterConfig) -> dict:
    """What a pair's registration depends on: a transform file made under other settings is made again."""
    return {"method": METHOD, "fixed_slide": fixed.path, "moving_slide": moving.path, "max_side": register.max_side,
            "nonrigid": register.nonrigid, "spacing_setting_um": register.spacing_um, "min_side": register.min_side,
            "mesh_um": register.mesh_um, "refine": register.refine, "refine_um": register.refine_um,
            "refine_windows": register.refine_windows}


def registration_scale(register: RegisterConfig, mpp: float, extent_um: float) -> tuple[float, int]:
    """(µm per pixel, B-spline mesh nodes across) for a pair whose coarser level 0 is ``mpp`` and whose larger
    section is ``extent_um`` across: ``register.spacing_um`` (finer for a section under ``min_side`` px at it,
    never finer than level 0, at most ``max_side`` px across); a mesh node every ``mesh_um``, 6 to 24."""
    spacing = max(mpp, extent_um / register.max_side, min(register.spacing_um, extent_um / register.min_side))
    return spacing, int(np.clip(round(extent_um / register.mesh_um), 6, 24))


def register_slides(fixed_path: str | Path, moving_path: str | Path, mpps: tuple[float, float],
                    extents_um: tuple[float, float], register: RegisterConfig) -> tuple[PairResult, Refinement | None]:
    """One pair of slide files registered as ``register`` says: the coarse chain on thumbnails, then (sections
    large enough, a verdict other than ``failed``) the cell-scale refinement, whose evidence joins the verdict.
    ``mpps``, ``extents_um``: (fixed, moving) level-0 µm/px and longest side."""
    started = time.perf_counter()
    spacing, mesh = registration_scale(register, max(mpps), max(extents_um))
    fine = refine_spacing(min(extents_um), max(mpps), register.refine_um) if register.refine else None
    fixed = read_section(fixed_path, spacing, mpps[0])
    effort = coarse_effort(None if fine is None else reach_um(max(fixed.tissue.shape) * fixed.spacing, fine))
    result = register_sections(fixed, read_section(moving_path, spacing, mpps[1]),
                               nonrigid=register.nonrigid, mesh_nodes=mesh, effort=effort)
    if fine is None or result.transform is None or result.quality.verdict == "failed":
        return result, None
    refinement = refine_pair(fixed_path, moving_path, mpps[0], mpps[1], result.transform, fixed.tissue,
                             fixed.spacing, fine, register.refine_windows)
    quality = judge(result.quality, refinement, fine)
    return PairResult(refinement.transform or result.transform, quality, time.perf_counter() - started,
                      result.stages), refinement


def _register_pair(moving: SlideRef, fixed: SlideRef, config: Config, path: Path) -> dict:
    """Register (or read back, when its file exists whole and with the same settings) one pair; its row (with
    ``redone``: why a file found on resume was damaged and registered again)."""
    settings = _settings(moving, fixed, config.register)
    redone = ""
    if path.is_file():
        try:
            before = read_pair(path)[1]
        except (DataError, OSError, KeyError, ValueError) as exc:  # damaged (a crash, a bad copy): do it again
            before, redone = {}, f"{path.name} was damaged ({type(exc).__name__}); registered again"
        if redone or any(before.get(k) != v for k, v in settings.items()):
            path.unlink()  # damaged, or the slides or the registration settings changed since
    if not path.is_file():
        slide_mpp = config.tile.slide_mpp
        (fixed_mpp, fixed_extent), (moving_mpp, moving_extent) = (_scale(fixed.path, slide_mpp),
                                                                  _scale(moving.path, slide_mpp))
        result, refinement = register_slides(fixed.path, moving.path, (fixed_mpp, moving_mpp),
                                             (fixed_extent, moving_extent), config.register)
        write_pair(path, result.transform, {
            "case": moving.case, **settings, "fixed_mpp": fixed_mpp, "moving_mpp": moving_mpp,
            "fixed_stain": fixed.stain, "fixed_slice": fixed.slice, "moving_stain": moving.stain,
            "moving_slice": moving.slice, **quality_dict(result.quality), "seconds": round(result.seconds, 2),
            **(refinement.attrs() if refinement else {})})
    _, attrs = read_pair(path)
    return {"case": moving.case, "stain": moving.stain, "slice": moving.slice, "fixed_stain": fixed.stain,
            "fixed_slice": fixed.slice, **{k: (None if attrs.get(k) == "" else attrs.get(k)) for k in (
                "verdict", "reason", "dice", "outline", "scale", "h_correlation", "feature_error_um",
                "matched_features", "refine_windows", "refine_accepted", "refine_scatter_um", "seconds")},
            "transform": str(path), **({"redone": redone} if redone else {})}


def register_cohort(config: Config) -> RegisterResult:
    """Register every non-reference slice of every case to its best reference slice (see the module doc)."""
    with folder_lock(config.paths.registration_dir, "register"):
        return _register_cohort(config)


def _register_cohort(config: Config) -> RegisterResult:
    reference = reference_stain(config)
    out = config.paths.registration_dir
    by_case, errors = _slides(config)
    jobs = []
    for case, slides in by_case.items():
        fixed = [s for s in slides if s.stain == reference]
        for moving in (s for s in slides if s.stain != reference):
            if not fixed:
                errors[f"case {case} {moving.stain} slice {moving.slice}"] = f"case {case} has no {reference} slice"
                continue
            jobs.append((moving, fixed))
    if not jobs and not errors:
        raise DataError(f"nothing to register in {config.tile.out_dir}: no case has a {reference} slice and another "
                        "stain; run `stainmil tile` first, or set register.reference_stain.")
    pairs, chosen = [], []
    with progress_bar("register: pairs", total=sum(len(f) for _, f in jobs)) as advance:
        for moving, fixed_slides in jobs:
            rows = []
            for fixed in fixed_slides:
                name = f"case {moving.case} {moving.stain} slice {moving.slice} -> {fixed.stain} slice {fixed.slice}"
                try:
                    rows.append(_register_pair(moving, fixed, config, transform_file(out, moving, fixed)))
                except (UnreadableSlide, DataError, OSError, ValueError, RuntimeError) as exc:
                    errors[name] = f"{type(exc).__name__}: {exc}"
                advance()
            pairs.extend(rows)
            if rows:
                best = min(rows, key=lambda r: (VERDICT_RANK.get(r["verdict"], 3), -(r["dice"] or 0)))
                chosen.append({**best, "candidates": len(rows)})
    table = pd.DataFrame(chosen, columns=["case", "stain", "slice", "fixed_stain", "fixed_slice", "verdict",
                                          "reason", "dice", "outline", "scale", "h_correlation",
                                          "feature_error_um", "matched_features", "refine_windows",
                                          "refine_accepted", "refine_scatter_um", "seconds", "transform",
                                          "candidates"])
    result = RegisterResult(out, table, pairs, errors)
    counts = table["verdict"].value_counts().to_dict() if len(table) else {}
    atomic_write_json(out / "register_report.json", {"reference_stain": reference, "verdicts": counts,
                                                     "chosen": chosen, "pairs": pairs, "errors": errors})
    atomic_write_text(out / "register_report.txt", report_text(result, reference))
    if table.empty:  # no registrations.csv: nothing downstream may take an empty table for a finished one
        raise DataError(nothing_registered(by_case, errors, reference, out))
    atomic_write(out / "registrations.csv", lambda tmp: table.to_csv(tmp, index=False))
    return result


def nothing_registered(by_case: dict[str, list[SlideRef]], errors: dict[str, str], reference: str, out: Path) -> str:
    """The sentence for a ``register`` that registered no slice: what it looked for, what it found."""
    found = sorted({s.stain for slides in by_case.values() for s in slides})
    first = next(iter(errors.items()), ("", ""))
    return (f"no slice registered: looked for {reference} slices (register.reference_stain) to register the other "
            f"stains onto and found the stains {found} in {sum(map(len, by_case.values()))} tiled slides, "
            f"{len(errors)} not registered (first: {first[0]}: {first[1]}); check data.stain_aliases and "
            f"register.reference_stain, the whole list is in {out / 'register_report.txt'}.")


def report_text(result: RegisterResult, reference: str) -> str:
    table = result.table
    counts = table["verdict"].value_counts().to_dict() if len(table) else {}
    lines = ["stainmil registration report", f"reference stain : {reference}",
             f"slices registered: {len(table)}  " + "  ".join(f"{k}: {v}" for k, v in sorted(counts.items())),
             f"pairs tried      : {len(result.pairs)}"]
    if result.errors:
        lines.append(f"not registered   : {len(result.errors)}")
        lines += [f"  {name}: {why}" for name, why in result.errors.items()]
    redone = [p["redone"] for p in result.pairs if p.get("redone")]
    if redone:
        lines.append(f"damaged on resume: {len(redone)}")
        lines += [f"  {why}" for why in redone]
    lines += ["", "per slice (case, stain, slice -> reference slice, verdict, overlap, outline, scale, feature error "
              "µm, s; reason):"]
    for r in table.itertuples(index=False):
        error = "-" if r.feature_error_um is None or math.isnan(float(r.feature_error_um)) else \
            f"{float(r.feature_error_um):.0f}"
        lines.append(f"  {r.case} {r.stain} {r.slice} -> {r.fixed_slice}  {r.verdict:<8} {float(r.dice):.2f} "
                     f"{float(r.outline):.3f} {float(r.scale):.2f} {error} {float(r.seconds):.1f}s; {r.reason}")
    return "\n".join(lines) + "\n"
