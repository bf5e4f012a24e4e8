
import numpy as np
import pandas as pd
import pytest
import torch

from stainmil.analysis.analyze import write_analysis
from stainmil.classes import ClassScheme
from tests.conftest import trained_run


@pytest.fixture(scope="module")
def analysed_run(prepared, tmp_path_factory):
    run = trained_run(prepared, tmp_path_factory.mktemp("runs"), 8, top_slices=3, deletion_k=3)
    return run, write_analysis(run, "all")


def test_tables_have_every_id_and_consistent_weights(analysed_run):
    run, result = analysed_run
    patches, slices, cases = result.tables.patches, result.tables.slices, result.tables.cases
    for column in ("case", "stain", "slice", "patch", "x", "y", "patch_weight", "slice_weight", "stain_weight",
                   "effective_attention", "rank_in_case", "patch_prob"):
        assert column in patches.columns
    assert np.allclose(patches.groupby("case")["effective_attention"].sum(), 1, atol=1e-5)
    assert np.allclose(patches["effective_attention"],
                       patches["patch_weight"] * patches["slice_weight"] * patches["stain_weight"], atol=1e-6)
    assert np.allclose(patches.groupby("case")["relative_attention"].mean(), 1, atol=1e-5)
    assert (patches.groupby("case")["rank_in_case"].min() == 1).all()
    assert patches["patch_prob"].between(0, 1).all()
    assert (slices.groupby(["case", "stain"])["slice_weight"].sum().round(5) == 1).all()
    assert (slices["patch_entropy_normalised"].dropna().between(0, 1 + 1e-9)).all()
    for column in ("label", "pred", "prob", "abs_error", "n_patches", "n_slices", "top5pct_share",
                   "top5pct_n_patches", "topk_by_stain", "topk_by_stain_slice", "stain_entropy_normalised",
                   "attention_lesion_auc", "delta_top_k", "delta_random_k"):
        assert column in cases.columns, column
    assert len(cases) == 8
    for name in ("patches.csv", "slices.csv", "cases.csv", "summary.json", "summary.txt",
                 "effective_attention_distribution.png", "concentration_vs_error.png", "attention_along_slices.png"):
        assert (result.out_dir / name).is_file(), name
    assert result.heatmaps and all(p.is_file() for files in result.heatmaps.values() for p in files.values())
    assert result.grids and all(p.is_file() for p in result.grids.values())
    summary = result.tables.summary
    assert 0 <= summary["attention_lesion_auc_mean"] <= 1
    assert "deletion_delta_top_k_mean" in summary


def test_late_fusion_over_transmil_is_not_scored_on_its_uniform_weights(prepared, tmp_path):
    """A capability computed from the options reaches the analysis: late fusion whose members are TransMIL has no
    patch attention, so no lesion measure or deletion is computed on its uniform weights (patch-alone ones are)."""
    config = prepared.with_overrides({"model.architecture": "late_fusion", "model.stain_identity": "none",
                                      "model.options": {"late_fusion": {"base": "transmil"}, "transmil": {"heads": 4}}})
    run = trained_run(config, tmp_path, 2)
    tables = write_analysis(run, "all").tables
    assert tables.summary["patch_attention"] is False and "deletion_k" not in tables.summary
    assert tables.cases["attention_lesion_auc"].isna().all() and "delta_top_k" not in tables.cases
    assert tables.cases["patch_prob_lesion_auc"].notna().any()


def test_subset_drops_emptied_slices_and_keeps_structure():
    from tests.model.test_hierarchical import model_for, random_bags

    bags = random_bags()
    batch = bags.batch(["1"])
    keep = np.zeros(len(batch.features), bool)
    keep[batch.patch_slice.numpy() == 0] = True  # only the first slice survives
    small = batch.subset(keep)
    assert len(small.slice_group) == 1 and len(small.group_case) == 1
    with torch.no_grad():
        out = model_for(bags).eval()(small)
    assert float(out.effective_attention.sum()) == pytest.approx(1, abs=1e-5)


def test_stain_weight_table_averages_stain_attention_per_stain_and_class():

    from stainmil.analysis.attention import stain_weight_table

    slices = pd.DataFrame({"case": ["1", "1", "1", "2", "2", "3"], "stain": ["he", "he", "sox10", "he", "sox10", "he"],
                           "stain_weight": [0.2, 0.2, 0.8, 0.6, 0.4, 1.0]})
    cases = pd.DataFrame({"case": ["1", "2", "3"], "label": [1, 1, 0], "pred": [1, 0, 0]})
    classes = ClassScheme.of(["benign", "high_grade"])
    table = stain_weight_table(slices, cases, ["he", "sox10"], classes).set_index(["stain", "class"])
    assert table.loc[("he", "high_grade"), "mean_stain_weight"] == pytest.approx(0.4)   # cases 1 and 2, once each
    assert table.loc[("he", "high_grade"), "cases_with_stain"] == 2
    assert table.loc[("sox10", "high_grade"), "mean_stain_weight"] == pytest.approx(0.6)
    assert table.loc[("he", "benign"), "mean_stain_weight"] == pytest.approx(1.0)
    assert table.loc[("sox10", "benign"), "cases_with_stain"] == 0 and (table["class_is"] == "true").all()


def test_analyze_scores_against_outlines_named_and_classed_as_a_users_export(analysed_run, tiny_cohort, tmp_path):
    """The same outlines as a flat folder of QuPath exports with the class "Tumor" (`--set analysis.truth=…`) give
    the same lesion measures as the cohort's own; a --set of a training key is refused."""
    import json

    from stainmil.errors import ConfigError

    run, result = analysed_run
    flat = tmp_path / "qupath"
    flat.mkdir()
    for path in (tiny_cohort / "annotations").rglob("*.geojson"):
        case, stain = path.parent.parent.name, path.parent.name
        data = json.loads(path.read_text())
        for feature in data["features"]:
            feature["properties"]["classification"] = {"name": "Tumor", "color": [200, 0, 0]}
        (flat / f"{case}_{stain}_{path.stem}.geojson").write_text(json.dumps(data))
    again = write_analysis(run, "all", settings=[f"analysis.truth={flat}", "analysis.lesion_classes=['Tumor']"])
    columns = ["case", "attention_lesion_auc", "attention_topk_precision", "patch_prob_pointing"]
    pd.testing.assert_frame_equal(result.tables.cases[columns], again.tables.cases[columns])
    assert (again.out_dir / "lesion_cases.csv").is_file() and (again.out_dir / "lesion_summary_by_stain.csv").is_file()
    assert "attention: lesion AUC" in (again.out_dir / "summary.txt").read_text()
    with pytest.raises(ConfigError, match="would change how the run was trained"):
        write_analysis(run, "all", settings=["train.lr=0.1"])
