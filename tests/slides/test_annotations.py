"""QuPath GeoJSON regions: holes, multipolygons, classification filters, the file layouts QuPath writes, bad files."""

import json

import numpy as np
import pytest

from stainmil.slides.annotations import BadAnnotations, find_annotation_file, read_region, region_mask

SQUARE = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
HOLE = [[40, 40], [60, 40], [60, 60], [40, 60], [40, 40]]
FAR = [[[200, 200], [260, 200], [260, 260], [200, 260], [200, 200]]]


def feature(geometry, name=None):
    props = {"objectType": "annotation"}
    if name:
        props["classification"] = {"name": name, "color": [255, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": props}


def write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_polygon_with_hole_and_multipolygon(tmp_path):
    path = write(tmp_path / "s.geojson", {"type": "FeatureCollection", "features": [
        feature({"type": "Polygon", "coordinates": [SQUARE, HOLE]}, "Tumor"),
        feature({"type": "MultiPolygon", "coordinates": [FAR, [[[300, 0], [320, 0], [320, 20], [300, 0]]]]}, "Tumor"),
        feature({"type": "LineString", "coordinates": [[0, 0], [500, 500]]}, "Tumor"),  # a line is no region
    ]})
    region = read_region(path, [])
    inside = region.contains(np.array([10, 50, 230, 315, 150, 400]), np.array([10, 50, 230, 5, 150, 400]))
    assert inside.tolist() == [True, False, True, True, False, False]  # the hole is outside
    assert region.polygons == 3 and region.classes == ["Tumor"]


def test_classification_filter_and_bare_feature_lists(tmp_path):
    path = write(tmp_path / "s.json", [  # older QuPath exports: a list of features, classes as strings
        feature({"type": "Polygon", "coordinates": [SQUARE]}, "Tumor"),
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": FAR},
         "properties": {"classification": "Ignore*"}},
        feature({"type": "Polygon", "coordinates": [[[500, 500], [520, 500], [520, 520], [500, 500]]]}),
    ])
    tumour = read_region(path, ["tumor"])  # case-insensitive
    assert tumour.contains(np.array([50, 230]), np.array([50, 230])).tolist() == [True, False]
    ignore = read_region(path, ["Ignore*"])
    assert ignore.contains(np.array([50, 230]), np.array([50, 230])).tolist() == [False, True]
    assert read_region(path, []).polygons == 3
    with pytest.raises(BadAnnotations, match="no polygon of class"):
        read_region(path, ["Stroma"])


@pytest.mark.parametrize("text", ["{not json", json.dumps({"type": "FeatureCollection", "features": []}),
                                  json.dumps({"type": "Feature", "geometry": {"type": "Polygon",
                                                                               "coordinates": "oops"}})])
def test_bad_files_raise_a_named_error(tmp_path, text):
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(BadAnnotations, match="bad.geojson"):
        read_region(path, [])


def test_region_mask_matches_the_geometry(tmp_path):
    path = write(tmp_path / "s.geojson", feature({"type": "Polygon", "coordinates": [SQUARE, HOLE]}))
    mask = region_mask(read_region(path, []), (40, 40), 4.0)  # 4 level-0 px per mask px: 160 x 160 px
    assert mask[:25, :25].sum() == 25 * 25 - 5 * 5  # the 100-px square minus the 20-px hole
    assert not mask[25:].any() and not mask[:, 25:].any()


def test_files_are_found_by_stem_template_or_stainmil_export_name(tmp_path):
    (tmp_path / "a").mkdir()
    write(tmp_path / "a" / "slide1.geojson", [])
    write(tmp_path / "a" / "case3_he_slice1__slide7.geojson", [])
    key = ("3", "he", "1")
    assert find_annotation_file(str(tmp_path / "a"), "slide1", key).name == "slide1.geojson"
    assert find_annotation_file(str(tmp_path / "a"), "slide7", key).name == "case3_he_slice1__slide7.geojson"
    assert find_annotation_file(str(tmp_path / "a"), "slide9", key) is None
    assert find_annotation_file(str(tmp_path / "a") + "/{stem}.geojson", "slide1", key).is_file()
    with pytest.raises(Exception, match="does not exist"):
        find_annotation_file(str(tmp_path / "missing"), "slide1", key)
    with pytest.raises(Exception, match="unknown field"):
        find_annotation_file(str(tmp_path) + "/{patient}.geojson", "slide1", key)


def test_a_huge_or_self_crossing_outline(tmp_path):
    """A file past tile.max_annotation_vertices is refused before any geometry is built; a bow-tie (a ring that
    crosses itself, as a hurried brush draws it) is read as its two lobes."""
    angles = np.linspace(0, 2 * np.pi, 5001)
    ring = np.stack([500 + 400 * np.cos(angles), 500 + 400 * np.sin(angles)], 1).round(2).tolist()
    huge = write(tmp_path / "huge.geojson", [feature({"type": "Polygon", "coordinates": [ring]})] * 3)
    with pytest.raises(BadAnnotations, match=r"15,003 vertices, more than tile.max_annotation_vertices \(10,000\)"):
        read_region(huge, [], max_vertices=10_000)
    assert read_region(huge, [], max_vertices=20_000).polygons == 3
    bowtie = write(tmp_path / "bowtie.geojson", [feature({"type": "Polygon", "coordinates": [
        [[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]]})])
    region = read_region(bowtie, [])
    assert region.contains(np.array([10, 90, 50]), np.array([50, 50, 10])).tolist() == [True, True, False]
