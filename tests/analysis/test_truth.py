"""analysis.truth: a pathologist's QuPath outlines (or a patch table) as the lesion fraction of every patch — the
names real users have, and each bad input named in one sentence with nothing else lost."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
from shapely.geometry import Polygon, box

from stainmil.analysis.truth import patch_truth
from stainmil.config import load_config
from stainmil.errors import ConfigError, DataError
from stainmil.slides.annotations import annotation_feature, write_annotations
from stainmil.slides.write import write_pyramidal_tiff

SRC = Path(__file__).resolve().parents[2] / "src"


def grid_patches(case="007", stain="he", slice_id="0", path="/x/slice0.png", side=32, n=4) -> pd.DataFrame:
    xs, ys = np.meshgrid(np.arange(n) * side, np.arange(n) * side)
    return pd.DataFrame({"case": case, "stain": stain, "slice": slice_id, "patch": [str(i) for i in range(n * n)],
                         "x": xs.ravel(), "y": ys.ravel(), "path": path, "size0": side})


def config_for(truth, *overrides):
    return load_config(None, [f"analysis.truth={truth}", *overrides])


def outline_file(path: Path, *features) -> Path:
    write_annotations(path, list(features))
    return path


def test_a_qupath_export_with_its_own_class_names_and_a_hole(tmp_path):
    lesion = Polygon([(0, 0), (96, 0), (96, 96), (0, 96)], holes=[[(32, 32), (64, 32), (64, 64), (32, 64)]])
    outline_file(tmp_path / "case007_he_slice0.geojson", annotation_feature(lesion, "Tumor"),
                 annotation_feature(box(96, 96, 128, 128), "Other"))
    truth = patch_truth(config_for(tmp_path), grid_patches())
    fractions = truth.table.set_index("patch")["lesion_fraction"]
    assert fractions["0"] == 1.0 and fractions["1"] == 1.0 and fractions["4"] == 1.0   # inside
    assert fractions["5"] == 0.0                                                       # the hole
    assert fractions["15"] == 0.0                                                      # "Other" is not lesion
    assert truth.table["case"].iloc[0] == "007" and truth.slides == 1


def test_half_covered_patches_and_ignored_regions(tmp_path):
    outline_file(tmp_path / "case007_he_slice0.geojson", annotation_feature(box(0, 0, 16, 32), "Lesion"),
                 annotation_feature(box(64, 0, 128, 32), "Artefact"))
    table = patch_truth(config_for(tmp_path), grid_patches()).table.set_index("patch")
    assert table.loc["0", "lesion_fraction"] == pytest.approx(0.5)
    assert table.loc["2", "ignored"] and table.loc["3", "ignored"] and not table.loc["0", "ignored"]


def test_a_template_finds_files_named_with_the_users_stain_spelling(tmp_path):
    outline_file(tmp_path / "007_HE.geojson", annotation_feature(box(0, 0, 32, 32), "Lesion"))
    truth = patch_truth(config_for(tmp_path / "{case}_{stain}.geojson"), grid_patches())
    assert truth.table["lesion_fraction"].sum() == 1.0


def test_a_patch_table_with_other_stain_names_and_leading_zeros(tmp_path):
    table = pd.DataFrame({"case": ["007", "007"], "stain": ["H&E", "H&E"], "slice": ["0", "0"], "patch": ["0", "1"],
                          "lesion_fraction": [0.7, 0.0]})
    table.to_csv(tmp_path / "truth.csv", index=False)
    truth = patch_truth(config_for(tmp_path / "truth.csv"), grid_patches())
    assert truth.table.set_index("patch")["lesion_fraction"].to_dict() == {"0": 0.7, "1": 0.0}
    assert "14 of 16 analysed patches have no row" in truth.notes[0]
    pd.DataFrame({"case": ["7"], "stain": ["he"], "slice": ["0"], "patch": ["0"]}).to_csv(tmp_path / "bad.csv")
    with pytest.raises(DataError, match="lacks the columns \\['lesion_fraction'\\]"):
        patch_truth(config_for(tmp_path / "bad.csv"), grid_patches())


def test_classes_that_match_nothing_list_the_classes_found(tmp_path):
    outline_file(tmp_path / "case007_he_slice0.geojson", annotation_feature(box(0, 0, 32, 32), "Melanoma in situ"))
    with pytest.raises(ConfigError, match=r"match no polygon.*\['Melanoma in situ'\]"):
        patch_truth(config_for(tmp_path), grid_patches())
    truth = patch_truth(config_for(tmp_path, "analysis.lesion_classes=['Melanoma*']"), grid_patches())
    assert truth.table["lesion_fraction"].sum() == 1.0


def test_not_geojson_is_named_and_its_slide_left_out_while_others_are_scored(tmp_path):
    (tmp_path / "case007_he_slice0.geojson").write_text(json.dumps({"name": "not a feature"}))
    (tmp_path / "case007_sox10_slice0.geojson").write_text("{ broken")
    outline_file(tmp_path / "case007_melan_slice0.geojson", annotation_feature(box(0, 0, 32, 32), "Lesion"))
    patches = pd.concat([grid_patches(stain=s) for s in ("he", "sox10", "melan")], ignore_index=True)
    truth = patch_truth(config_for(tmp_path), patches)
    assert set(truth.table["stain"]) == {"melan"}
    assert any("case007_he_slice0.geojson is JSON but not GeoJSON" in n and "left out" in n for n in truth.notes)
    assert any("case007_sox10_slice0.geojson is not readable GeoJSON" in n for n in truth.notes)


def test_outlines_beyond_the_slide_name_the_likely_scale(tmp_path):
    slide = tmp_path / "slides" / "S1.tiff"
    write_pyramidal_tiff(slide, np.full((256, 256, 3), 200, np.uint8), mpp=0.5, tile=64)
    outlines = tmp_path / "outlines"
    outline_file(outlines / "S1.geojson", annotation_feature(box(0, 0, 1000, 1000), "Lesion"))  # 4x the slide
    patches = grid_patches(path=str(slide)).assign(level=0)
    with pytest.raises(DataError, match="holds no outline"):
        patch_truth(config_for(outlines), patches)
    outline_file(outlines / "S2.geojson", annotation_feature(box(0, 0, 64, 64), "Lesion"))
    other = grid_patches(case="8", path=str(tmp_path / "slides" / "S2.tiff")).assign(level=0)
    write_pyramidal_tiff(tmp_path / "slides" / "S2.tiff", np.full((256, 256, 3), 200, np.uint8), mpp=0.5, tile=64)
    truth = patch_truth(config_for(outlines), pd.concat([patches, other], ignore_index=True))
    note = next(n for n in truth.notes if "S1.geojson" in n)
    assert "beyond case 007 he slice 0's level-0 size 256 x 256" in note and "about 3.9x too large" in note
    assert set(truth.table["case"]) == {"8"}


def test_self_intersecting_outlines_are_repaired_and_counted(tmp_path):
    bow_tie = Polygon([(0, 0), (64, 64), (64, 0), (0, 64)])
    assert not bow_tie.is_valid
    outline_file(tmp_path / "case007_he_slice0.geojson", annotation_feature(bow_tie, "Lesion"))
    truth = patch_truth(config_for(tmp_path), grid_patches())
    assert truth.repaired == 1 and any("1 self-intersecting" in n for n in truth.notes)
    assert truth.table["lesion_fraction"].sum() == pytest.approx(shapely.make_valid(bow_tie).area / 32 ** 2)


def test_outlines_of_slides_not_in_the_cohort_are_named(tmp_path):
    outline_file(tmp_path / "case007_he_slice0.geojson", annotation_feature(box(0, 0, 32, 32), "Lesion"))
    outline_file(tmp_path / "case999_he_slice0.geojson", annotation_feature(box(0, 0, 32, 32), "Lesion"))
    patches = grid_patches()
    truth = patch_truth(config_for(tmp_path), patches, cohort=patches)
    assert any("1 outline files" in n and "case999_he_slice0.geojson" in n for n in truth.notes)


def test_no_hidden_truth_file_is_read_anywhere():
    """One path for real and synthetic cohorts: nothing in the package looks for the old patch_truth.csv."""
    offenders = [str(p) for p in SRC.rglob("*.py") if "patch_truth.csv" in p.read_text()]
    assert not offenders
