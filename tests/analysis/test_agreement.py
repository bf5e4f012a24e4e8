"""Reviewer agreement: kappa on shared patch marks, Dice of lesion outlines per slide, the CLI table."""

import math

import pandas as pd
import pytest
from shapely.geometry import box
from typer.testing import CliRunner

from stainmil.analysis.agreement import dice, review_agreement
from stainmil.cli import app
from stainmil.errors import DataError
from stainmil.slides.annotations import annotation_feature, write_annotations


def reviewer(folder, name, marks, outlines):
    (folder / name).mkdir(parents=True)
    pd.DataFrame([{"run": "run1", "case": "007", "stain": "he", "slice": "0", "patch": str(p), "mark": m,
                   "rank_in_case": i + 1, "saved": "2026-12-07T10:00:00Z"} for i, (p, m) in enumerate(marks)]
                 ).to_csv(folder / name / "patch_marks.csv", index=False)
    for slide, (geometry, cls) in outlines.items():
        write_annotations(folder / name / f"{slide}.geojson", [annotation_feature(geometry, cls)])


def test_kappa_and_dice_between_two_reviewers(tmp_path):
    reviews = tmp_path / "reviews"
    reviewer(reviews, "ana", [(1, "agree"), (2, "agree"), (3, "disagree"), (4, "unsure")],
             {"case007_he_slice0": (box(0, 0, 10, 10), "Lesion"), "case007_sox10_slice0": (box(0, 0, 4, 4), "Lesion")})
    reviewer(reviews, "ben", [(1, "agree"), (2, "disagree"), (3, "disagree"), (9, "agree")],
             {"case007_he_slice0": (box(5, 0, 15, 10), "Lesion")})
    result = review_agreement(reviews, ["Lesion*"])
    pair = result.pairs.iloc[0]
    assert (pair["reviewer_1"], pair["reviewer_2"]) == ("ana", "ben")
    assert pair["shared_marks"] == 3 and pair["marks_agreeing"] == 2
    # by hand: observed 2/3; ana agree 2/3, disagree 1/3; ben agree 1/3, disagree 2/3 -> expected 4/9
    assert pair["kappa"] == pytest.approx((2 / 3 - 4 / 9) / (1 - 4 / 9))
    assert pair["shared_slides"] == 1 and pair["only_one_outlined"] == 1
    assert result.slides.iloc[0]["dice"] == pytest.approx(0.5)  # half of each square overlaps
    assert math.isnan(dice(None, None)) and dice(box(0, 0, 1, 1), None) == 0.0


def test_one_reviewer_is_not_enough_and_the_cli_writes_the_table(tmp_path):
    reviews = tmp_path / "reviews"
    reviewer(reviews, "ana", [(1, "agree")], {})
    with pytest.raises(DataError, match="agreement needs two or more"):
        review_agreement(reviews, ["Lesion"])
    reviewer(reviews, "ben", [(1, "agree")], {})
    (reviews / "ben" / "case007_he_slice0.geojson").write_text("not json")
    result = CliRunner().invoke(app, ["review-summary", "--reviews", str(reviews)])
    assert result.exit_code == 0, result.output
    assert "ana" in result.output and "not readable GeoJSON" in result.output
    assert pd.read_csv(reviews / "review_agreement.csv")["kappa"].iloc[0] == 1.0
