"""QuPath export: per slice one GeoJSON FeatureCollection (File › Import objects in QuPath 0.4+), named
``case<id>_<stain>_slice<id>[__<slide file name>].geojson``; ``index.csv`` names the image each belongs to.

One square tile per patch, in the pixel coordinates of the image QuPath opens:

* slide route: the whole-slide file, level-0 pixels (``x``, ``y``, ``size0`` of the patch table);
* patch folders: the slice image the patches were cut from, ``x``, ``y`` from the file names and the
  patch side from the patch file (slices whose patches carry no x, y cannot be placed and are listed).

Each feature has ``objectType: tile``, ``measurements`` (effective attention, relative attention, patch-alone
P(high-grade), patch/slice/stain weights) and a classification: the relative-attention band on the same
fixed log scale as the heatmaps (⅛× … 8× a uniform share), coloured as they are.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from stainmil.analysis.analyze import write_analysis
from stainmil.analysis.heatmaps import ATTENTION_NORM, patch_colours, patch_side
from stainmil.config import load_config
from stainmil.data.registration import read_pair, read_registrations, reference_stain
from stainmil.errors import DataError
from stainmil.io import atomic_write, atomic_write_json, safe_name
from stainmil.run_files import RunFiles

MEASUREMENTS = {"effective_attention": "effective attention", "relative_attention": "relative attention",
                "patch_prob": "patch-alone P(high-grade)", "patch_weight": "patch attention (within slice)",
                "slice_weight": "slice attention (within stain)", "stain_weight": "stain attention"}
BAND_EDGES = ATTENTION_NORM.vmin * 2.0 ** np.arange(7)  # 1/8 … 8 x a uniform share: the heatmaps' log scale
_NAMESPACE = uuid.UUID("6a1f3c52-55d5-4a8e-9a3c-2f1b6f9f0e11")


@dataclass
class QuPathExport:
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # slice -> why it was not exported


def _fraction(value: float) -> str:
    return f"1/{round(1 / value)}" if value < 1 else f"{value:g}"


def attention_band(relative: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Band name (e.g. 'attention 2-4x') and RGB 0..255 (P, 3) of each relative attention value."""
    relative = np.asarray(relative, float)
    index = np.searchsorted(BAND_EDGES, relative, side="right")  # 0: below 1/8 … 7: 8 and above
    names, centres = [], []
    for k in range(len(BAND_EDGES) + 1):
        if k == 0:
            names.append(f"attention <{_fraction(BAND_EDGES[0])}x")
            centres.append(BAND_EDGES[0])
        elif k == len(BAND_EDGES):
            names.append(f"attention >={_fraction(BAND_EDGES[-1])}x")
            centres.append(BAND_EDGES[-1])
        else:
            names.append(f"attention {_fraction(BAND_EDGES[k - 1])}-{_fraction(BAND_EDGES[k])}x")
            centres.append(float(np.sqrt(BAND_EDGES[k - 1] * BAND_EDGES[k])))
    colours = np.round(patch_colours(np.array(centres), "relative_attention")[:, :3] * 255).astype(int)
    return [names[k] for k in index], colours[index]


def slice_features(part: pd.DataFrame, to_reference=None) -> dict:
    """The FeatureCollection of one slice (``part``: its rows of the patch table, in any order); with
    ``to_reference`` (level-0 px (N, 2) -> px of another slide) each square is drawn where it lands there."""
    if "size0" in part.columns and part["size0"].notna().all():
        xs, ys, sides = part["x"].to_numpy(float), part["y"].to_numpy(float), part["size0"].to_numpy(float)
    else:
        if (part["x"] < 0).any() or (part["y"] < 0).any():
            raise DataError("its patch file names carry no x, y (add x and y groups to data.filename_pattern)")
        xs, ys = part["x"].to_numpy(float), part["y"].to_numpy(float)
        sides = np.full(len(part), float(patch_side(part["path"].iloc[0])))
    names, colours = attention_band(part["relative_attention"].to_numpy())
    features = []
    for i, row in enumerate(part.itertuples(index=False)):
        x, y, s = xs[i], ys[i], sides[i]
        ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        if to_reference is not None:
            ring = [[round(float(a), 2), round(float(b), 2)] for a, b in to_reference(np.array(ring, float))]
        key = f"{row.case}/{row.stain}/{row.slice}/{row.patch}"
        features.append({
            "type": "Feature", "id": str(uuid.uuid5(_NAMESPACE, key)),
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "tile", "name": f"patch {row.patch}",
                "classification": {"name": names[i], "color": [int(c) for c in colours[i]]},
                "measurements": {label: float(getattr(row, column)) for column, label in MEASUREMENTS.items()},
                "case": str(row.case), "stain": str(row.stain), "slice": str(row.slice), "patch": str(row.patch),
            },
        })
    return {"type": "FeatureCollection", "features": features}


def export_qupath(patches: pd.DataFrame, out_dir: str | Path, registrations: pd.DataFrame | None = None,
                  reference: str = "he") -> QuPathExport:
    """One ``.geojson`` per slice of ``patches`` (an attention patch table) plus ``index.csv`` naming, per file,
    the image to open it on; with ``registrations`` (``stainmil register``'s table) also each aligned IHC slice's
    patches drawn where they land on its H&E slide (``…__on_<reference>_slice<id>__<slide>.geojson``)."""
    out = QuPathExport(Path(out_dir))
    rows = []
    for (case, stain, slice_id), part in patches.groupby(["case", "stain", "slice"], sort=False):
        on_slide = "size0" in part.columns and part["size0"].notna().all()
        # unique per slice (slides of different cases may share a file name); the slide's name after "__"
        name = f"case{safe_name(case)}_{safe_name(stain)}_slice{safe_name(slice_id)}" + (
            f"__{safe_name(Path(part['path'].iloc[0]).stem)}" if on_slide else "") + ".geojson"
        try:
            collection = slice_features(part)
        except DataError as exc:
            out.skipped[f"case {case} {stain} slice {slice_id}"] = str(exc)
            continue
        path = atomic_write_json(out.out_dir / name, collection)
        out.files.append(path)
        rows.append({"file": name, "case": case, "stain": stain, "slice": slice_id, "patches": len(part),
                     "image": part["path"].iloc[0] if on_slide else "slice image the patches were cut from",
                     "coordinates": "level-0 pixels of the slide" if on_slide else "slice image pixels (x, y)"})
    if registrations is not None:
        rows += _on_reference(patches, registrations, reference, out)
    if not rows:
        raise DataError(f"no slice could be exported to {out.out_dir}: " + "; ".join(
            f"{k}: {v}" for k, v in list(out.skipped.items())[:3]) + ".")
    atomic_write(out.out_dir / "index.csv", lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))
    return out


def _on_reference(patches: pd.DataFrame, registrations: pd.DataFrame, reference: str, out: QuPathExport
                  ) -> list[dict]:
    """Files of the aligned IHC slices' attention in their H&E slide's level-0 pixels; their index rows."""
    rows = []
    keyed = dict(tuple(patches.groupby(["case", "stain", "slice"], sort=False)))
    for reg in registrations[registrations["verdict"] == "aligned"].itertuples(index=False):
        part = keyed.get((str(reg.case), str(reg.stain), str(reg.slice)))
        if part is None or "size0" not in part.columns:
            continue
        transform, attrs = read_pair(reg.transform)
        moving_mpp, fixed_mpp = float(attrs["moving_mpp"]), float(attrs["fixed_mpp"])

        def to_reference(points, transform=transform, moving_mpp=moving_mpp, fixed_mpp=fixed_mpp):
            return transform.moving_to_fixed(points * moving_mpp) / fixed_mpp

        fixed_slide = str(attrs["fixed_slide"])
        name = (f"case{safe_name(reg.case)}_{safe_name(reg.stain)}_slice{safe_name(reg.slice)}__on_{reference}_slice"
                f"{safe_name(reg.fixed_slice)}__{safe_name(Path(fixed_slide).stem)}.geojson")
        out.files.append(atomic_write_json(out.out_dir / name, slice_features(part, to_reference)))
        rows.append({"file": name, "case": reg.case, "stain": reg.stain, "slice": reg.slice, "patches": len(part),
                     "image": fixed_slide, "coordinates": f"level-0 pixels of the {reference} slide (registered)"})
    return rows


def export_folder(folder: str | Path, split_name: str | None = None, out_dir: str | Path | None = None
                  ) -> QuPathExport:
    """Export a run folder (its ``split_name`` cases, analysed first when needed) or a prediction folder
    (``stainmil predict``'s, already analysed) to ``<folder>/qupath/`` (or ``out_dir``)."""
    import json


    folder = Path(folder)
    table = RunFiles.of(folder).patches
    is_run = RunFiles.of(folder).best.is_file()
    if not is_run and not table.is_file():
        raise DataError(f"{folder} is neither a run folder (no checkpoints/best.pth) nor a prediction folder "
                        "(no attention/patches.csv); pass one made by `stainmil train` or `stainmil predict`.")
    if is_run:
        summary = RunFiles.of(folder).attention / "summary.json"
        analysed = json.loads(summary.read_text())["split"] if summary.is_file() and table.is_file() else None
        wanted = split_name or analysed or "test"
        if analysed != wanted:
            write_analysis(folder, wanted)
    elif split_name:
        raise DataError(f"{folder} is a prediction folder (no splits); leave out --split.")
    patches = pd.read_csv(table, dtype={"case": str, "stain": str, "slice": str, "patch": str})
    registrations, reference = None, "he"
    if is_run:  # `stainmil register` ran on this cohort: IHC attention on the H&E slides too
        config = load_config(folder / "config.yaml")
        if config.tile.out_dir and (registrations := read_registrations(config)) is not None:
            reference = reference_stain(config)
    return export_qupath(patches, Path(out_dir) if out_dir else folder / "qupath", registrations, reference)
