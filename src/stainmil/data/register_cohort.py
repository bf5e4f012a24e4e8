"""``stainmil register``: every IHC slice of a case registered to an H&E slice of the same case (after ``tile``).

For each case, each slice of another stain is registered to each slice of ``register.reference_stain``
(:func:`stainmil.slides.register.register_sections`); the best-matching one is kept (verdict first, then tissue
overlap) and the choice recorded. Output in ``register.out_dir`` (default ``<tile.out_dir>/registration``)::

    transforms/<moving stem>__to__<fixed stem>.h5   one per registered pair (its layout: stainmil.data.registration)
    registrations.csv                               one row per IHC slice: its H&E slice, verdict, quality
    register_report.txt/.json                       every pair, its verdict and reason; every failure named

A pair whose file exists is done: re-running resumes. A pair that raises (an unreadable slide) is named in the
report with its error; the others go on. What reads registrations back (transform files, ``registrations.csv``,
patch places) is :mod:`stainmil.data.registration`, which needs none of the registration stack imported here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from stainmil.config import Config, RegisterConfig
from stainmil.cores import available_cores
from stainmil.data.registration import read_pair, reference_stain, write_pair
from stainmil.data.tiling import load_tiles
from stainmil.errors import DataError
from stainmil.io import atomic_write, atomic_write_json, atomic_write_text
from stainmil.launch import Launch, run_jobs
from stainmil.locks import folder_lock
from stainmil.progress import progress_bar
from stainmil.slides.annotations import slide_key_name
from stainmil.slides.reader import Slide, UnreadableSlide
from stainmil.slides.refine import Refinement, judge, reach_um, refine_pair, refine_spacing
from stainmil.slides.register import coarse_effort, read_section, register_sections
from stainmil.slides.transform import PairResult, quality_dict

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
    threads = max(1, available_cores() // register.workers)  # the pair's share of the cores
    result = register_sections(fixed, read_section(moving_path, spacing, mpps[1]), nonrigid=register.nonrigid,
                               mesh_nodes=mesh, effort=effort, threads=threads)
    if fine is None or result.transform is None or result.quality.verdict == "failed":
        return result, None
    refinement = refine_pair(fixed_path, moving_path, mpps[0], mpps[1], result.transform, fixed.tissue,
                             fixed.spacing, fine, register.refine_windows, threads)
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


def _pair_outcome(moving: SlideRef, fixed: SlideRef, config: Config, path: Path) -> tuple[dict | None, str]:
    """(the pair's row, "") or (None, why it could not be registered): one pair's failure never stops the others."""
    try:
        return _register_pair(moving, fixed, config, path), ""
    except (UnreadableSlide, DataError, OSError, ValueError, RuntimeError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


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
    tasks = [(moving, fixed, config, transform_file(out, moving, fixed)) for moving, fixed_slides in jobs
             for fixed in fixed_slides]
    # pairs are independent and each runs on one thread: in worker processes, the same transforms as one by one;
    # the ones with a file already (resumed: read back, or redone if damaged) stay here
    new = [k for k, task in enumerate(tasks) if not task[3].is_file()]
    workers = min(config.register.workers, len(new))
    done: list = [None] * len(tasks)
    if workers > 1:
        for k, outcome in zip(new, run_jobs(_pair_outcome, [tasks[k] for k in new], Launch("local", workers), out,
                                            config.slurm)):
            done[k] = outcome
    with progress_bar("register: pairs", total=len(tasks)) as advance:
        for k, task in enumerate(tasks):
            if done[k] is None:
                done[k] = _pair_outcome(*task)
            advance()
    outcomes = iter(done)
    pairs, chosen = [], []
    for moving, fixed_slides in jobs:
        rows = []
        for fixed in fixed_slides:
            row, error = next(outcomes)
            if error:
                errors[f"case {moving.case} {moving.stain} slice {moving.slice} -> {fixed.stain} slice "
                       f"{fixed.slice}"] = error
            else:
                rows.append(row)
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
