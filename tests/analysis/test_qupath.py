"""QuPath GeoJSON export, read back with the geojson library."""

import geojson
import numpy as np
import pandas as pd
import pytest

from stainmil.analysis.heatmaps import patch_colours
from stainmil.analysis.qupath import BAND_EDGES, MEASUREMENTS, attention_band, export_folder, export_qupath
from stainmil.errors import DataError
from tests.conftest import trained_run


@pytest.fixture(scope="module")
def exported(prepared, tmp_path_factory):
    run = trained_run(prepared, tmp_path_factory.mktemp("runs"), 4)
    return run, export_folder(run, "test")


def test_one_valid_feature_per_patch_on_the_patch_grid(exported):
    run, result = exported
    patches = pd.read_csv(run / "attention" / "patches.csv", dtype={"case": str, "slice": str, "patch": str})
    index = pd.read_csv(result.out_dir / "index.csv", dtype={"case": str, "slice": str})
    assert len(result.files) == patches.groupby(["case", "stain", "slice"]).ngroups == len(index)
    seen = 0
    for path in result.files:
        collection = geojson.loads(path.read_text())
        assert isinstance(collection, geojson.FeatureCollection) and collection.is_valid, collection.errors()
        props = [f["properties"] for f in collection["features"]]
        part = patches[(patches["case"] == props[0]["case"]) & (patches["stain"] == props[0]["stain"])
                       & (patches["slice"] == props[0]["slice"])].set_index("patch")
        assert len(collection["features"]) == len(part)
        for feature in collection["features"]:
            p = feature["properties"]
            row = part.loc[p["patch"]]
            side = 32  # the tiny cohort's patch side (read from the patch files)
            ring = np.array(feature["geometry"]["coordinates"][0])
            assert feature["geometry"]["type"] == "Polygon" and p["objectType"] == "tile"
            assert ring.tolist() == [[row.x, row.y], [row.x + side, row.y], [row.x + side, row.y + side],
                                     [row.x, row.y + side], [row.x, row.y]]
            for column, label in MEASUREMENTS.items():
                assert p["measurements"][label] == pytest.approx(row[column], rel=1e-6)
            names, colours = attention_band(np.array([row.relative_attention]))
            assert p["classification"] == {"name": names[0], "color": colours[0].tolist()}
        seen += len(part)
    assert seen == len(patches)
    assert result.skipped == {}


def test_bands_follow_the_heatmap_log_scale():
    names, colours = attention_band(np.array([0.01, 0.2, 1.0, 1.5, 3.0, 100.0]))
    assert names == ["attention <1/8x", "attention 1/8-1/4x", "attention 1-2x", "attention 1-2x", "attention 2-4x",
                     "attention >=8x"]
    # a band's colour is the heatmaps' colour at its geometric centre: brighter with more attention
    expected = np.round(patch_colours(np.array([np.sqrt(2 * 4)]), "relative_attention")[0, :3] * 255)
    assert colours[4].tolist() == expected.astype(int).tolist()
    assert np.all(np.diff([c.sum() for c in colours[[0, 1, 2, 4, 5]]]) > 0)
    assert BAND_EDGES[0] == pytest.approx(1 / 8) and BAND_EDGES[-1] == pytest.approx(8)


def test_slices_without_coordinates_are_named_not_guessed(exported, tmp_path):
    run, _ = exported
    patches = pd.read_csv(run / "attention" / "patches.csv", dtype={"case": str, "slice": str, "patch": str})
    first = patches[["case", "stain", "slice"]].iloc[0]
    mask = (patches["case"] == first["case"]) & (patches["stain"] == first["stain"]) & \
        (patches["slice"] == first["slice"])
    patches.loc[mask, ["x", "y"]] = -1
    result = export_qupath(patches, tmp_path / "q")
    assert len(result.skipped) == 1 and "no x, y" in next(iter(result.skipped.values()))
    with pytest.raises(DataError, match="no slice could be exported"):
        export_qupath(patches[mask], tmp_path / "none")
    with pytest.raises(DataError, match="neither a run folder"):
        export_folder(tmp_path)
