"""Attention figures of a run (the old one-off analyses, one function each)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stainmil.analysis.heatmaps import patch_pixels
from stainmil.classes import ClassScheme
from stainmil.io import save_figure, subplots
from stainmil.slides.reader import SlideHandles

CLASS_COLOURS = ("#2b83ba", "#d7191c")  # benign blue, high-grade red
MORE_CLASS_COLOURS = ("#2b83ba", "#fdae61", "#d7191c", "#1a9641", "#7b3294", "#636363")  # k > 2 classes


def class_colour(label: int, classes: ClassScheme) -> str:
    """Two classes: blue class 0 (benign), red class 1 (high-grade); k classes: blue, orange, red, green, purple,
    grey; unlabelled grey."""
    if label < 0:
        return "grey"
    colours = CLASS_COLOURS if classes.binary else MORE_CLASS_COLOURS
    return colours[label % len(colours)]


def _class_legend(classes: ClassScheme) -> str:
    return f"blue {classes.readable[0]}, red {classes.readable[1]}" if classes.binary else "colour = true class"


def effective_attention_distribution(patches: pd.DataFrame, cases: pd.DataFrame, path: Path,
                                     classes: ClassScheme) -> Path:
    """Per case: distribution of relative attention (log scale); misclassified cases hatched."""
    order = cases.sort_values(["label", "prob"])
    data = [patches.loc[patches["case"] == c, "relative_attention"].clip(lower=1e-4).to_numpy() for c in order["case"]]
    fig, ax = subplots(figsize=(max(6, 0.32 * len(order) + 2), 4))
    boxes = ax.boxplot(data, patch_artist=True, showfliers=True, flierprops={"markersize": 2})
    for box, (_, row) in zip(boxes["boxes"], order.iterrows()):
        box.set_facecolor(class_colour(int(row["label"]), classes))
        box.set_alpha(0.6)
        if row["label"] >= 0 and row["pred"] != row["label"]:
            box.set_hatch("///")
    ax.set_yscale("log")
    ax.axhline(1, color="grey", ls=":", lw=1)
    ax.set_xticks(range(1, len(order) + 1), order["case"], rotation=90, fontsize=7)
    ax.set_ylabel("relative attention (1 = uniform)")
    ax.set_xlabel(f"case ({_class_legend(classes)}; hatched = misclassified)")
    ax.set_title("Effective attention distribution per case")
    fig.tight_layout()
    return save_figure(fig, path)


def concentration_vs_error(cases: pd.DataFrame, path: Path, classes: ClassScheme) -> Path:
    """Top-5% attention share and number of top-5% patches vs |p - y| (the old 'hyper-focus' plots)."""
    fig, axes = subplots(1, 2, figsize=(10, 4))
    colours = [class_colour(int(y), classes) for y in cases["label"]]
    axes[0].scatter(cases["top5pct_share"], cases["abs_error"], c=colours, s=25)
    axes[0].set_xlabel("share of effective attention in the top 5% of patches")
    axes[1].scatter(cases["top5pct_n_patches"], cases["abs_error"], c=colours, s=25)
    axes[1].set_xlabel("number of patches in the top 5%")
    for ax in axes:
        ax.set_ylabel("|p - y|")
        ax.set_ylim(-0.02, 1.02)
    fig.suptitle(f"Attention concentration vs prediction error ({_class_legend(classes)})")
    fig.tight_layout()
    return save_figure(fig, path)


def slice_attention_misclassified(slices: pd.DataFrame, cases: pd.DataFrame, path: Path) -> Path | None:
    """Slice-level attention per stain for every misclassified case."""
    wrong = cases[(cases["label"] >= 0) & (cases["pred"] != cases["label"])]
    if wrong.empty:
        return None
    fig, axes = subplots(1, len(wrong), figsize=(3.2 * len(wrong), 3.2), squeeze=False)
    for ax, (_, case) in zip(axes[0], wrong.iterrows()):
        part = slices[slices["case"] == case["case"]]
        labels = [f"{s}\n{sl}" for s, sl in zip(part["stain"], part["slice"])]
        ax.bar(range(len(part)), part["slice_weight"], color="#756bb1")
        ax.set_xticks(range(len(part)), labels, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(f"case {case['case']}: true {case['label']}, pred {case['pred']}", fontsize=9)
    axes[0][0].set_ylabel("slice attention (within stain)")
    fig.tight_layout()
    return save_figure(fig, path)


def top_slices(slices: pd.DataFrame, n: int) -> pd.DataFrame:
    return slices.sort_values("slice_effective", ascending=False).head(n)


def attention_along_slices(patches: pd.DataFrame, selected: pd.DataFrame, path: Path) -> Path:
    """Effective attention vs patch index along each selected slice."""
    n = len(selected)
    columns = min(n, 4)
    rows = int(np.ceil(n / columns))
    fig, axes = subplots(rows, columns, figsize=(3.4 * columns, 2.6 * rows), squeeze=False)
    for ax, (_, s) in zip(axes.flat, selected.iterrows()):
        part = patches[(patches["case"] == s["case"]) & (patches["stain"] == s["stain"])
                       & (patches["slice"] == s["slice"])].sort_values("patch_index")
        ax.plot(part["patch_index"], part["effective_attention"], lw=1)
        ax.set_title(f"case {s['case']} {s['stain']} slice {s['slice']}", fontsize=8)
        ax.set_xlabel("patch index", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_axis_off()
    fig.suptitle("Effective attention along the patches of the most attended slices")
    fig.tight_layout()
    return save_figure(fig, path)


def patch_grid(part: pd.DataFrame, n: int, path: Path, title: str) -> Path:
    """Top and bottom ``n`` patches of one case by effective attention, labelled (stain, slice, weight)."""
    ordered = part.sort_values("effective_attention", ascending=False)
    rows = [("top", ordered.head(n)), ("bottom", ordered.tail(n).iloc[::-1])]
    fig, axes = subplots(2, n, figsize=(1.5 * n, 3.8), squeeze=False)
    slides = SlideHandles()  # a case's patches come from a few slides: each opened once
    for r, (name, chosen) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.set_axis_off()
            if c >= len(chosen):
                continue
            patch = chosen.iloc[c]
            pixels = patch_pixels(patch, slides=slides)
            if pixels is None:  # imported features without their slides
                ax.text(0.5, 0.5, "no image", ha="center", va="center", fontsize=7, transform=ax.transAxes)
            else:
                ax.imshow(pixels)
            ax.set_title(f"{patch['stain']} s{patch['slice']}\n{patch['relative_attention']:.2g}x", fontsize=7)
        axes[r][0].text(-0.15, 0.5, name, transform=axes[r][0].transAxes, rotation=90, va="center", ha="right")
    slides.close()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
