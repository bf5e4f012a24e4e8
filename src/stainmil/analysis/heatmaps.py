"""Heatmaps on the slices: each patch's square shaded by its relative effective attention
(effective attention x patches in the case; 1 = uniform share, fixed log colour scale 1/8..8 for every
slice and case) or by its patch-alone P(high-grade) (0..1).

On the slide route the heatmap is drawn on the slide's thumbnail saved by ``stainmil tile`` (patch
squares scaled from level-0 coordinates); features imported from TRIDENT/CLAM draw on the slide's thumbnail when
the slide was found, else on a plain canvas of their patch squares. Otherwise the slice image comes from
``analysis.slice_images`` (a path template with {case}, {stain}, {slice}); when there is none, the slice is
rebuilt from its patch files and their x, y.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import colors
from PIL import Image

from stainmil.io import save_figure, subplots
from stainmil.slides.reader import PatchRef, SlideHandles, read_patch

ATTENTION_NORM = colors.LogNorm(vmin=1 / 8, vmax=8)
PROB_NORM = colors.Normalize(vmin=0, vmax=1)


def patch_pixels(row: pd.Series, size: int = 128, slides: SlideHandles | None = None) -> np.ndarray | None:
    """RGB (size, size, 3) of one patch of a patch table: read from its slide on the slide route (through
    ``slides``, the caller's open handles), from its file on the patch route; None when the cohort has no pixels
    (features imported without their slides: level -1)."""
    if "level" in row.index and pd.notna(row["level"]):
        if int(row["level"]) < 0:
            return None
        return read_patch(PatchRef(str(row["path"]), int(row["x"]), int(row["y"]), int(row["level"]),
                                   int(row["read_size"])), size, slides)
    return read_patch(str(row["path"]), size)


def patch_side(path: str) -> int:
    with Image.open(path) as image:
        return max(image.size)


def patch_positions(part: pd.DataFrame, side: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Top-left (x, y) of each patch; patches without coordinates are laid out in index order."""
    xs, ys = part["x"].to_numpy(), part["y"].to_numpy()
    if (xs >= 0).all() and (ys >= 0).all():
        return xs, ys, "rebuilt from patches"
    columns = int(np.ceil(np.sqrt(len(part))))
    order = np.argsort(part["patch_index"].to_numpy())
    xs, ys = np.empty(len(part), int), np.empty(len(part), int)
    xs[order] = (np.arange(len(part)) % columns) * side
    ys[order] = (np.arange(len(part)) // columns) * side
    return xs, ys, "patches in index order (no x, y in the file names)"


def slice_canvas(part: pd.DataFrame, template: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, str]:
    """(RGB image of the slice, x and y of each patch in image pixels, patch side in image pixels, source)."""
    if "thumbnail" in part.columns:  # slide route: the slide's thumbnail, coordinates at level 0
        first = part.iloc[0]
        with Image.open(first["thumbnail"]) as image:
            canvas = np.asarray(image.convert("RGB"))
        scale = float(first["thumb_scale"])
        source = "patch squares on a plain canvas (features imported without the slide)" \
            if "level" in part.columns and int(first["level"]) < 0 else f"slide thumbnail, {1 / scale:.0f}x down"
        return (canvas, part["x"].to_numpy() * scale, part["y"].to_numpy() * scale, float(first["size0"]) * scale,
                source)
    side = patch_side(part["path"].iloc[0])
    xs, ys, source = patch_positions(part, side)
    if template:
        first = part.iloc[0]
        path = Path(template.format(case=first["case"], stain=first["stain"], slice=first["slice"]))
        if path.is_file():
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB")), xs, ys, side, f"slice image {path.name}"
    return patch_mosaic(part["path"], xs, ys, side), xs, ys, side, source


def patch_mosaic(paths, xs: np.ndarray, ys: np.ndarray, side: int) -> np.ndarray:
    """RGB (H, W, 3) uint8: each patch file pasted at its (x, y), ``side`` px square, on white."""
    canvas = np.full((int(ys.max()) + side, int(xs.max()) + side, 3), 255, dtype=np.uint8)
    for path, x, y in zip(paths, xs, ys):
        with Image.open(path) as image:
            canvas[y:y + side, x:x + side] = np.asarray(image.convert("RGB").resize((side, side)))
    return canvas


@dataclass
class SliceView:
    """One slice at display size: the image and each patch's square on it (image pixels)."""

    image: np.ndarray  # (H, W, 3) uint8, longest side <= the thumbnail size
    xs: np.ndarray     # (P,) left edge of each patch (rows of the slice's patch table, same order)
    ys: np.ndarray     # (P,) top edge
    side: float        # patch side
    source: str        # where the image came from, for the caption


def slice_view(part: pd.DataFrame, template: str, thumbnail_px: int) -> SliceView:
    """The slice of ``part`` (its rows of the patch table) scaled so its longest side is <= ``thumbnail_px``."""
    image, xs, ys, side, source = slice_canvas(part, template)
    scale = min(1.0, thumbnail_px / max(image.shape[:2]))
    if scale < 1:
        image = np.asarray(Image.fromarray(image).resize((int(image.shape[1] * scale), int(image.shape[0] * scale)),
                                                         Image.BILINEAR))
    return SliceView(image, np.asarray(xs, float) * scale, np.asarray(ys, float) * scale, float(side) * scale, source)


def colour_scale(value: str) -> tuple[colors.Normalize, str, str]:
    """(norm, colormap, label) of a heatmap value: the same fixed scales in every figure, viewer and export."""
    if value == "relative_attention":
        return ATTENTION_NORM, "inferno", "relative attention (x uniform share, log scale)"
    return PROB_NORM, "coolwarm", "patch-alone P(high-grade)"


def patch_colours(values: np.ndarray, value: str) -> np.ndarray:
    """RGBA (P, 4) in 0..1 of each patch's ``value`` on its fixed scale."""
    norm, cmap, _ = colour_scale(value)
    return matplotlib.colormaps[cmap](norm(np.clip(np.asarray(values, float), 1e-6, None)))


def draw_heatmap(part: pd.DataFrame, template: str, path: str | Path, value: str = "relative_attention",
                 title: str = "", thumbnail_px: int = 640, view: SliceView | None = None) -> Path:
    """Save a heatmap of ``value`` over one slice (``part``: that slice's rows of the patch table)."""
    view = view or slice_view(part, template, thumbnail_px)
    image = view.image
    norm, cmap, label = colour_scale(value)
    rgba = patch_colours(part[value].to_numpy(), value)
    colour = np.zeros((*image.shape[:2], 3))                       # each patch's colour on its square (H, W, 3)
    covered = np.zeros(image.shape[:2], bool)
    s = max(1, int(round(view.side)))
    for x, y, rgb in zip(view.xs, view.ys, rgba[:, :3]):
        x0, y0 = int(x), int(y)
        colour[y0:y0 + s, x0:x0 + s] = rgb
        covered[y0:y0 + s, x0:x0 + s] = True
    # the squares laid over the slice at half opacity here, not by a second image in the figure (half the drawing)
    shown = image / 255.0
    shown[covered] = 0.5 * shown[covered] + 0.5 * colour[covered]
    aspect = image.shape[0] / image.shape[1]
    fig, (left, right) = subplots(1, 2, figsize=(10, 5 * aspect + 0.6))
    left.imshow(image)
    left.set_title("slice", fontsize=9)
    right.imshow(shown)
    right.set_title(label, fontsize=9)
    for ax in (left, right):
        ax.set_axis_off()
    fig.suptitle(title + f"  ({view.source})", fontsize=10)
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=right, fraction=0.04, pad=0.02)
    return save_figure(fig, path, dpi=100)


def colour_legends(prob_label: str = "P(high-grade)") -> dict[str, dict]:
    """CSS gradients and tick labels of the two fixed heatmap scales (the viewer's legend)."""
    legends = {}
    for value, ticks in (("relative_attention", [(1 / 8, "⅛×"), (1, "1×"), (8, "8×")]),
                         ("patch_prob", [(0, "0"), (0.5, "0.5"), (1, "1")])):
        norm, cmap, label = colour_scale(value)
        stops = np.linspace(0, 1, 11)
        colours = [hex_colour(c) for c in matplotlib.colormaps[cmap](stops)]
        label = label.replace("P(high-grade)", prob_label)
        legends[value] = {"gradient": "linear-gradient(to right, " + ", ".join(colours) + ")", "label": label,
                          "ticks": [{"at": float(norm(v)) * 100, "text": t} for v, t in ticks]}
    return legends


def hex_colour(rgba) -> str:
    return "#" + "".join(f"{int(round(c * 255)):02x}" for c in rgba[:3])
