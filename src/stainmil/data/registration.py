"""Registrations as stored and read back, after ``stainmil register`` (:mod:`stainmil.data.register_cohort`):
transform files, ``registrations.csv``, each IHC patch's place on its case's H&E slice, outlines carried from one
slide to another. NumPy, SciPy, h5py and shapely only: training, analysis and the viewer read registrations without
importing the registration stack (SimpleITK, scikit-image).

Transform file (level-0 µm of each slide; µm = level-0 px x the slide's µm/px)::

    affine          (3, 3)     fixed µm -> moving µm, before the non-rigid part (a mirror flip included)
    u, v            (2, H, W)  displacement (x, y) in µm on the fixed grid: p_m = affine (p_f + u(p_f));
                               p_f = q + v(q) with q = affine^-1 p_m
    attrs           spacing_um (grid pixel), flipped, fixed_slide, moving_slide, fixed_mpp, moving_mpp, case,
                    fixed_stain/slice, moving_stain/slice, verdict, reason, dice, outline, scale,
                    h_correlation, feature_error_um, seconds; with the cell-scale refinement refine_windows,
                    refine_accepted, refine_peak, refine_scatter_um, refine_shift_um, refine_seconds,
                    refine_applied, refine_reason (stainmil.slides.refine)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import shapely

from stainmil.config import Config
from stainmil.errors import ConfigError, DataError
from stainmil.io import array_digest, atomic_path
from stainmil.slides.coords import grid_step
from stainmil.slides.transform import PairTransform


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
