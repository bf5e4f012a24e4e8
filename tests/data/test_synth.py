import hashlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from stainmil.data.synth import PRESETS, SynthConfig, _style, render_slice, write_cohort
from stainmil.slides.annotations import read_polygons, square_fractions
from tests.conftest import synth_patches


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.png")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_deterministic_for_a_seed(tmp_path):
    config = SynthConfig(cases=3, slices_per_stain=(1, 1), slice_size=96, patch_size=32, seed=5)
    a = write_cohort(tmp_path / "a", config, workers=1)
    b = write_cohort(tmp_path / "b", config, workers=1)
    assert _digest(a) == _digest(b)
    assert (a / "labels.csv").read_text() == (b / "labels.csv").read_text()
    c = write_cohort(tmp_path / "c", SynthConfig(cases=3, slices_per_stain=(1, 1), slice_size=96, patch_size=32,
                                                 seed=6), workers=1)
    assert _digest(a) != _digest(c)


def test_label_balance_and_layout(tiny_cohort):
    labels = pd.read_csv(tiny_cohort / "labels.csv")
    assert len(labels) == PRESETS["tiny"].cases
    assert (labels["label"] == "benign").sum() == round(PRESETS["tiny"].cases / 3)
    assert set(labels["label"]) == {"benign", "high_grade"}
    assert (tiny_cohort / "cohort.yaml").is_file()
    assert set(synth_patches(tiny_cohort)["stain"]) == {"he", "melan", "sox10"}
    assert not (tiny_cohort / "patch_truth.csv").exists()  # the truth is the outlines, read as a user's would be


def test_masks_align_with_patches_and_the_outline_is_the_mask(tiny_cohort):
    """The QuPath outline a synthetic slice ships with covers exactly its lesion mask: a patch's lesion fraction
    read through the outline is the mask's mean over the patch (so attention-vs-lesion is what it was)."""
    patches = synth_patches(tiny_cohort)
    p = PRESETS["tiny"].patch_size
    for _, row in patches.sample(20, random_state=0).iterrows():
        folder = tiny_cohort / "slices" / f"case{row['case']}" / row["stain"]
        slice_image = np.asarray(Image.open(folder / f"slice{row['slice']}.png"))
        lesion = np.asarray(Image.open(folder / f"slice{row['slice']}_lesion.png")) > 0
        tissue = np.asarray(Image.open(folder / f"slice{row['slice']}_tissue.png")) > 0
        patch = np.asarray(Image.open(tiny_cohort / "patches" / f"case{row['case']}" / row["stain"]
                                      / f"slice{row['slice']}" / row["file"]))
        x, y = int(row["x"]), int(row["y"])
        assert np.array_equal(patch, slice_image[y:y + p, x:x + p])
        outline = read_polygons(tiny_cohort / "annotations" / f"case{row['case']}" / row["stain"]
                                / f"slice{row['slice']}.geojson").union(["Lesion"])
        assert square_fractions(outline, [x], [y], p)[0] == pytest.approx(lesion[y:y + p, x:x + p].mean(), abs=1e-12)
        assert tissue[y:y + p, x:x + p].mean() >= PRESETS["tiny"].min_tissue
        assert not (lesion & ~tissue).any()


def test_colour_statistic_separates_lesion_patches():
    """DAB optical density (brown) of IHC patches: lesion patches vs the rest — the signal is really there."""
    from skimage.color import rgb2hed

    scores, is_lesion = [], []
    for seed in range(3):
        for stain in ("melan", "sox10"):
            rng = np.random.default_rng(seed)
            rgb, tissue, lesion = render_slice(rng, stain, 192, _style(1, 1.0))
            dab = rgb2hed(rgb)[..., 2]
            for y in range(0, 192, 32):
                for x in range(0, 192, 32):
                    if tissue[y:y + 32, x:x + 32].mean() < 0.5:
                        continue
                    scores.append(dab[y:y + 32, x:x + 32].mean())
                    is_lesion.append(lesion[y:y + 32, x:x + 32].mean() > 0.25)
    assert 0 < sum(is_lesion) < len(is_lesion)
    assert roc_auc_score(is_lesion, scores) > 0.9


def test_high_grade_lesions_are_larger_and_darker():
    benign_area, high_area, benign_h, high_h = [], [], [], []
    from skimage.color import rgb2hed

    for seed in range(4):
        for label, area, hema in ((0, benign_area, benign_h), (1, high_area, high_h)):
            rgb, tissue, lesion = render_slice(np.random.default_rng(seed), "he", 192, _style(label, 1.0))
            area.append(lesion.mean())
            hema.append(rgb2hed(rgb)[..., 0][lesion].mean())
    assert np.mean(high_area) > 2 * np.mean(benign_area)
    assert np.mean(high_h) > np.mean(benign_h)


def test_signal_zero_makes_classes_identical():
    assert _style(1, 0.0) == _style(0, 1.0)


def test_stain_free_cohort_draws_the_stains_alike_and_puts_the_evidence_in_chance_stains(tmp_path):
    """`--stain-free`: every stain has SOX10's look, benign cases show no high-grade lesion anywhere, and a
    high-grade case shows it in a random, non-empty subset of its stains, so the stain name says nothing."""
    from stainmil.errors import ConfigError

    def cohort(rate):
        config = SynthConfig(cases=16, benign_fraction=0.5, slices_per_stain=(1, 1), slice_size=160, patch_size=32,
                             missing_stain_prob=0.0, stain_free=rate, seed=3)
        folder = write_cohort(tmp_path / str(rate), config, workers=1)
        labels = pd.read_csv(folder / "labels.csv", dtype=str).set_index("case_id")["label"]

        def read(case, stain, name):
            return np.asarray(Image.open(folder / "slices" / f"case{case}" / stain / f"slice0{name}.png"), float)

        colours = [read(case, stain, "").reshape(-1, 3).mean(0) for case in labels.index for stain in ("he", "sox10")]
        assert np.ptp(np.array(colours)[:, 1]) < 25   # no pink H&E: one look for every stain
        areas = {(case, stain): (read(case, stain, "_lesion") > 0).mean() for case in labels.index
                 for stain in ("he", "melan", "sox10")}
        benign = [areas[c, s] for c in labels.index[labels == "benign"] for s in ("he", "melan", "sox10")]
        return [[areas[c, s] > 2 * max(benign) for s in ("he", "melan", "sox10")]
                for c in labels.index[labels == "high_grade"]]

    chance, every = cohort(0.5), cohort(1.0)
    assert all(any(stains) for stains in chance)                        # the evidence is somewhere
    assert np.mean(chance) < 0.8 * np.mean(every), (np.mean(chance), np.mean(every))  # ... in fewer stains
    with pytest.raises(ConfigError, match="opposite cohorts"):
        SynthConfig(stain_free=0.5, key_stain="sox10")
