"""`stainmil view --review NAME`'s storage and endpoints: polygons saved as drawn (QuPath GeoJSON, level-0 px) and read
back by the analysis's reader, marks / note / grade in CSVs keeping case ids as text, stale saves refused with the
file untouched, bad input answered in one sentence, a killed save leaving the old file, reviewers apart."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
from shapely.geometry import Polygon
from starlette.testclient import TestClient

from stainmil.errors import ConfigError, OutputError
from stainmil.slides.annotations import read_region, slide_key_name
from stainmil.view.app import create_app
from stainmil.view.catalog import Catalog
from stainmil.view.reviews import (
    BadReview,
    Reviews,
    StaleReview,
    check_review_name,
    class_colours,
    parse_polygons,
)

CLASSES = ["Lesion", "Not lesion", "Artefact"]
KEY = ("007", "he", "0")
RING = [[10.5, 20.25], [300.13, 22.0], [280.0, 290.0], [15.0, 250.0], [10.5, 20.25]]


def polygon(ring=RING, cls="Lesion", ident="3f1c2a9e-0000-4000-8000-000000000001", kind="Polygon") -> dict:
    return {"id": ident, "class": cls, "geometry": {"type": kind, "coordinates": [ring]}}


def one_sentence(text: str) -> bool:
    return text.endswith(".") and "\n" not in text and ". " not in text[:-1]


def test_review_names_are_safe_folder_names():
    for name in ["ana", "j.smith", "rev-2_b"]:
        assert check_review_name(name) == name
    for name in ["", ".", "..", "../x", "a b", "x/y", "ana!", "é"]:
        with pytest.raises(ConfigError, match="letters, digits"):
            check_review_name(name)


def test_slide_polygons_round_trip_and_read_back_by_the_analysis_reader(tmp_path):
    reviews = Reviews(tmp_path / "ana")
    assert reviews.load_slide(KEY) == {"polygons": [], "version": ""}
    parsed, repaired = parse_polygons([polygon()], CLASSES, (1000, 800), "slide")
    saved = reviews.save_slide(KEY, parsed, "", class_colours(CLASSES))
    path = tmp_path / "ana" / f"{slide_key_name(KEY)}.geojson"
    assert path.name == "case007_he_slice0.geojson" and repaired == 0
    assert saved == reviews.load_slide(KEY) and saved["version"]
    assert saved["polygons"] == [{"id": polygon()["id"], "class": "Lesion", "rings": [RING]}]    # as drawn
    finer = parse_polygons([polygon([[x + 0.004, y] for x, y in RING])], CLASSES, (1000, 800), "slide")[0]
    assert np.array_equal(np.asarray(finer[0][2].exterior.coords), RING)                    # to 0.01 px
    feature = json.loads(path.read_text())["features"][0]
    assert feature["id"] == polygon()["id"] and feature["properties"]["objectType"] == "annotation"
    colour = list(class_colours(CLASSES)["Lesion"])
    assert feature["properties"]["classification"] == {"name": "Lesion", "color": colour}
    region = read_region(path, ["Lesion"])                             # as the analysis reads a review folder
    drawn = Polygon(RING)
    assert region.geometry.equals(drawn)
    assert shapely.normalize(region.geometry).equals_exact(shapely.normalize(drawn), 0)    # vertex for vertex
    again = reviews.save_slide(KEY, parsed, saved["version"], class_colours(CLASSES))       # same id kept
    assert again["polygons"][0]["id"] == polygon()["id"]
    reviews.save_slide(KEY, [], again["version"], {})                  # all deleted: no file, no version
    assert not path.exists() and reviews.load_slide(KEY)["version"] == ""


def test_a_stale_save_is_refused_and_the_file_left_as_it_was(tmp_path):
    reviews = Reviews(tmp_path / "ana")
    parsed, _ = parse_polygons([polygon()], CLASSES, (1000, 800), "slide")
    first = reviews.save_slide(KEY, parsed, "", {})
    moved = parse_polygons([polygon(ring=[[x + 1, y] for x, y in RING])], CLASSES, (1000, 800), "slide")[0]
    other = Reviews(tmp_path / "ana").save_slide(KEY, moved, first["version"], {})   # another tab saves
    before = reviews.slide_file(KEY).read_bytes()
    for base in (first["version"], ""):                                # read before that save, or before any
        with pytest.raises(StaleReview, match="another tab or window") as caught:
            reviews.save_slide(KEY, [], base, {})
        assert reviews.slide_file(KEY).read_bytes() == before
    assert reviews.load_slide(KEY)["version"] == other["version"] != first["version"]
    assert one_sentence(str(caught.value)), str(caught.value)


@pytest.mark.parametrize("bad, words", [
    ([polygon(kind="LineString")], "not a Polygon"),
    ([{"id": "a", "class": "Lesion", "geometry": "POLYGON((0 0, 1 0, 1 1))"}], "not a Polygon"),
    ([polygon(cls="Tumour")], "not one of the review classes"),
    ([polygon(ring=[[10, 10], [2000, 10], [10, 50], [10, 10]])], "outside the slide"),
    ([polygon(ring=[[-1, 10], [20, 10], [10, 50], [-1, 10]])], "outside the slide"),
    ([polygon(ring=[[10, 10], [20, 10], [10, 10]])], "fewer than 3"),
    ([polygon(ring=[[10, "x"], [20, 10], [10, 50]])], "not rings of"),
    ([polygon(ident="../x")], "no usable id"),
    ({"not": "a list"}, "no list of polygons"),
])
def test_bad_polygons_are_refused_in_one_sentence(bad, words):
    with pytest.raises(BadReview, match=words) as caught:
        parse_polygons(bad, CLASSES, (1000, 800), "slide case007_he_slice0")
    assert one_sentence(str(caught.value)), str(caught.value)


def test_a_self_crossing_polygon_is_repaired_and_counted():
    bowtie = [[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]
    parsed, repaired = parse_polygons([polygon(ring=bowtie), polygon(ident="b")], CLASSES, (1000, 800), "slide")
    assert repaired == 1 and [p[0] for p in parsed] == [polygon()["id"], polygon()["id"] + ".1", "b"]
    assert all(p[2].is_valid for p in parsed) and sum(p[2].area for p in parsed[:2]) == pytest.approx(5000)


def test_case_marks_note_and_grade_replace_only_their_rows(tmp_path):
    reviews = Reviews(tmp_path / "ana")
    marks = [{"stain": "he", "slice": "0", "patch": "12", "rank_in_case": "1", "mark": "agree"},
             {"stain": "sox10", "slice": "1", "patch": "3", "rank_in_case": "2", "mark": "unsure"}]
    reviews.save_case("runs/a", "007", marks, "high_grade", 'dense, "nested"\nsecond line', "")
    other = reviews.save_case("runs/a", "7", marks[:1], "benign", "", "")
    reviews.save_case("runs/b", "007", marks[1:], "", "another run", "")
    case = reviews.load_case("runs/a", "007")
    assert case["marks"] == [{k: m[k] for k in ("stain", "slice", "patch", "rank_in_case", "mark")} for m in marks]
    assert case["grade"] == "high_grade" and case["note"] == 'dense, "nested"\nsecond line'
    again = reviews.save_case("runs/a", "007", [{**marks[0], "mark": "disagree"}], "benign", "", case["version"])
    assert again["version"] != case["version"] and reviews.load_case("runs/a", "7") == other  # others untouched
    table = pd.read_csv(tmp_path / "ana" / "patch_marks.csv", dtype=str, keep_default_na=False)
    assert list(table.columns) == ["run", "case", "stain", "slice", "patch", "rank_in_case", "mark", "saved"]
    assert sorted(map(tuple, table[["run", "case", "mark"]].values)) == [
        ("runs/a", "007", "disagree"), ("runs/a", "7", "agree"), ("runs/b", "007", "unsure")]
    assert table["saved"].str.endswith("Z").all()
    cases = pd.read_csv(tmp_path / "ana" / "cases.csv", dtype=str, keep_default_na=False)
    assert list(cases.columns) == ["run", "case", "grade", "note", "saved"]
    assert sorted(map(tuple, cases[["run", "case", "grade"]].values)) == [
        ("runs/a", "007", "benign"), ("runs/a", "7", "benign"), ("runs/b", "007", "")]
    with pytest.raises(StaleReview):
        reviews.save_case("runs/a", "007", [], "", "", case["version"])
    assert reviews.load_case("runs/a", "007") == again


def test_two_reviewers_keep_their_own_folders(tmp_path):
    ana, bob = Reviews(tmp_path / "ana"), Reviews(tmp_path / "bob")
    parsed, _ = parse_polygons([polygon()], CLASSES, (1000, 800), "slide")
    ana.save_slide(KEY, parsed, "", {})
    bob.save_case("runs/a", "007", [], "benign", "bob's", "")
    assert bob.load_slide(KEY)["polygons"] == [] and ana.load_case("runs/a", "007")["note"] == ""
    assert sorted(p.name for p in (tmp_path / "ana").iterdir()) == ["case007_he_slice0.geojson"]
    assert sorted(p.name for p in (tmp_path / "bob").iterdir()) == ["cases.csv"]


def test_a_killed_save_leaves_the_old_files(tmp_path, monkeypatch):
    import stainmil.io

    reviews = Reviews(tmp_path / "ana")
    parsed, _ = parse_polygons([polygon()], CLASSES, (1000, 800), "slide")
    saved = reviews.save_slide(KEY, parsed, "", {})
    reviews.save_case("runs/a", "007", [], "benign", "first", "")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ana").iterdir()}
    case_version = reviews.load_case("runs/a", "007")["version"]

    real_write = Path.write_text

    def dies_half_way(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(Path, "write_text", dies_half_way)           # the temporary file half written
    moved = parse_polygons([polygon([[x + 5, y] for x, y in RING])], CLASSES, (1000, 800), "slide")[0]
    with pytest.raises(OutputError, match="nothing there changed"):
        reviews.save_slide(KEY, moved, saved["version"], {})
    monkeypatch.undo()

    def killed(src, dst):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(stainmil.io.os, "replace", killed)           # the write dies before the rename
    with pytest.raises(OutputError, match="nothing there changed") as caught:
        reviews.save_case("runs/a", "007", [], "high_grade", "second", case_version)
    assert one_sentence(str(caught.value)), str(caught.value)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "ana").iterdir()} == before     # no temporary litter
    assert reviews.load_slide(KEY) == saved


# ---- the endpoints, on a patch-folder run (mosaic slides, no config: reviews under the viewed folder) ----------------
def mosaic_run(cohort: Path, out: Path) -> Path:
    """A run folder over the tiny cohort's patch files, its first case renamed 007."""
    files = sorted((cohort / "patches").rglob("*.png"))
    rows = []
    for index, path in enumerate(files):
        case, stain, slice_ = path.parts[-4][4:], path.parts[-3], path.parts[-2][5:]
        x, y = (int(part[1:]) for part in path.stem.split("_")[-2:])
        rows.append({"case": case, "stain": stain, "slice": slice_, "patch": index, "patch_index": index, "x": x,
                     "y": y, "path": str(path), "effective_attention": 0.01, "relative_attention": 1.0,
                     "patch_prob": 0.5, "rank_in_case": index % 7 + 1})
    patches = pd.DataFrame(rows)
    patches["case"] = patches["case"].astype(str).replace({patches["case"].iloc[0]: "007"})
    (out / "attention").mkdir(parents=True)
    patches.to_csv(out / "attention" / "patches.csv", index=False)
    return out


@pytest.fixture
def served(tiny_cohort, tmp_path):
    run = mosaic_run(tiny_cohort, tmp_path / "run")
    catalog = Catalog(run)
    web = TestClient(create_app(catalog, review="ana"))
    page = web.get("/api/case", params={"case": "007"}).json()
    return run, catalog, web, page


def test_the_endpoints_save_load_and_refuse(served):
    run, catalog, web, page = served
    assert page["review"]["name"] == "ana" and [c["name"] for c in page["review"]["classes"]] == CLASSES
    assert page["review"]["grades"] == ["benign", "high_grade"] and page["review"]["run"] == "."
    slide = page["slices"][0]
    url = f"/api/review/{slide['id']}"
    zoom = catalog.zoom(slide["id"])                                  # the mosaic's level-0 px
    ring = [[1.25, 2.5], [zoom.width - 1.0, 3.0], [zoom.width / 2, zoom.height - 0.5], [1.25, 2.5]]
    assert web.get(url).json() == {"polygons": [], "version": ""}
    saved = web.put(url, json={"base_version": "", "polygons": [polygon(ring)]})
    assert saved.status_code == 200 and saved.json()["repaired"] == 0
    path = run / "reviews" / "ana" / f"{slide_key_name(('007', slide['stain'], slide['slice']))}.geojson"
    assert shapely.normalize(read_region(path, ["Lesion"]).geometry).equals_exact(shapely.normalize(Polygon(ring)), 0)
    assert web.get(url).json()["version"] == saved.json()["version"]
    before = path.read_bytes()
    stale = web.put(url, json={"base_version": "", "polygons": []})
    assert stale.status_code == 409 and "another tab or window" in stale.json()["error"]
    assert path.read_bytes() == before
    current = saved.json()["version"]
    outside = [[0, 0], [zoom.width + 5, 0], [0, 10], [0, 0]]
    for body, words in [(b"{not json", "not JSON"), (b"[1, 2]", "not a JSON object"),
                        (json.dumps({"base_version": current, "polygons": [polygon(kind="Point")]}), "not a Polygon"),
                        (json.dumps({"base_version": current, "polygons": [polygon(cls="Tumour")]}), "review classes"),
                        (json.dumps({"base_version": current, "polygons": [polygon(outside)]}), "outside the slide")]:
        answer = web.put(url, content=body)
        assert answer.status_code == 400 and words in answer.json()["error"], answer.json()
        assert one_sentence(answer.json()["error"])
    assert path.read_bytes() == before
    bowtie = [[0, 0], [40, 40], [40, 0], [0, 40], [0, 0]]
    repaired = web.put(url, json={"base_version": current, "polygons": [polygon(bowtie)]}).json()
    assert repaired["repaired"] == 1 and len(repaired["polygons"]) == 2

    patches = slide["patches"]
    marks_url, params = "/api/marks", {"case": "007"}
    assert web.get(marks_url, params=params).json() == {"marks": [], "grade": "", "note": "", "version": ""}
    first = {"stain": slide["stain"], "slice": slide["slice"], "patch": patches["patch"][0], "mark": "agree"}
    body = {"base_version": "", "grade": "high_grade", "note": "looks benign to me", "marks": [first]}
    case = web.put(marks_url, params=params, json=body)
    assert case.status_code == 200 and case.json()["marks"][0]["patch"] == str(patches["patch"][0])
    table = pd.read_csv(run / "reviews" / "ana" / "patch_marks.csv", dtype=str)
    assert table["case"].tolist() == ["007"] and table["run"].tolist() == ["."]
    assert table["rank_in_case"].tolist() == [str(patches["rank_in_case"][0])]
    assert pd.read_csv(run / "reviews" / "ana" / "cases.csv", dtype=str)["case"].tolist() == ["007"]
    assert web.put(marks_url, params=params, json=body).status_code == 409          # the old base_version
    version = case.json()["version"]
    for change, words in [({"marks": [{**body["marks"][0], "mark": "maybe"}]}, "agree, disagree, unsure"),
                          ({"marks": [{**body["marks"][0], "patch": "99999"}]}, "not a patch of case 007"),
                          ({"grade": "malignant"}, "not one of this run's classes")]:
        answer = web.put(marks_url, params=params, json={**body, "base_version": version, **change})
        assert answer.status_code == 400 and words in answer.json()["error"], answer.json()
    reopened = TestClient(create_app(Catalog(run), review="ana"))       # a restarted server
    reopened.get("/api/case", params={"case": "007"})
    assert reopened.get(marks_url, params=params).json() == case.json()
    assert reopened.get(url).json()["polygons"] == repaired["polygons"]


def test_read_only_without_review_and_a_bad_name_refused_at_start(served, tmp_path):
    run, catalog, _, _ = served
    web = TestClient(create_app(Catalog(run)))
    page = web.get("/api/case", params={"case": "007"}).json()
    assert page["review"] is None
    for url in [f"/api/review/{page['slices'][0]['id']}", "/api/marks?case=007", "/api/carried/0"]:
        answer = web.get(url)
        assert answer.status_code == 404 and "--review" in answer.json()["error"]
    assert web.put(f"/api/review/{page['slices'][0]['id']}", json={"polygons": []}).status_code == 404
    assert not (run / "reviews").exists()
    with pytest.raises(ConfigError, match="not a usable folder name"):
        create_app(Catalog(run), review="../elsewhere")

    from typer.testing import CliRunner

    from stainmil.cli import app

    result = CliRunner().invoke(app, ["view", str(run), "--no-open", "--review", "a b"])
    assert result.exit_code != 0 and "not a usable folder name" in result.output


@pytest.mark.slow
def test_reviews_go_under_the_cohort_output_dir_and_carry_only_through_aligned_links(serial_demo, tmp_path):
    """A run with a config: <output_dir>/reviews/NAME; the H&E polygons carried onto an aligned IHC slide
    (carry_geometry), and an IHC slide of a doubtful or failed pair says why they are not."""
    from stainmil.data.registration import carry_geometry
    from tests.view.test_browser import review_copy, with_every_case

    demo = json.loads((serial_demo / "demo_result.json").read_text())
    run = review_copy(with_every_case(Path(demo["run"]), tmp_path / "every"), tmp_path / "copy")
    catalog = Catalog(run)
    web = TestClient(create_app(catalog, review="ana"))
    registrations = pd.read_csv(Path(demo["tiles"]) / "registration" / "registrations.csv", dtype=str)
    for verdict in ["aligned", "doubtful"]:
        row = registrations[registrations["verdict"] == verdict].iloc[0]
        page = web.get("/api/case", params={"case": row["case"]}).json()
        assert page["review"]["folder"] == str(tmp_path / "copy" / "out" / "reviews" / "ana")
        he = next(s for s in page["slices"] if s["reference"])
        ihc = next(s for s in page["slices"] if s["stain"] == row["stain"] and s["slice"] == row["slice"])
        width, height = catalog.zoom(he["id"]).width, catalog.zoom(he["id"]).height
        ring = [[width * 0.2, height * 0.2], [width * 0.7, height * 0.25], [width * 0.6, height * 0.8],
                [width * 0.2, height * 0.2]]
        ring = [[round(x, 2), round(y, 2)] for x, y in ring]
        assert web.put(f"/api/review/{he['id']}", json={"base_version": "", "polygons": [polygon(ring)]}).is_success
        carried = web.get(f"/api/carried/{ihc['id']}").json()
        if verdict == "aligned":
            want = carry_geometry(Polygon(ring), catalog.transforms[ihc["link"]["transform"]])
            got = np.asarray(carried["outlines"][0]["rings"][0])
            assert carried["why"] == "" and carried["from"] == f"{he['stain']} slice {he['slice']}"
            assert np.abs(got - np.asarray(want.exterior.coords)).max() <= 0.01
        else:
            assert carried["outlines"] == [] and verdict in carried["why"]
        assert web.get(f"/api/carried/{he['id']}").json()["outlines"] == []
    assert (tmp_path / "copy" / "out" / "reviews" / "ana").is_dir() and not (run / "reviews").exists()


def test_lesion_measures_of_the_analysis_are_case_list_columns(served):
    run, _, _, _ = served
    cases = pd.DataFrame({"case": ["007", "2"], "label": [1, 0], "pred": [1, 1], "attention_lesion_auc": [0.91, None],
                          "attention_topk_precision": [0.6, 0.1], "stain_weight_he": [0.5, 0.4]})
    cases.to_csv(run / "attention" / "cases.csv", index=False)
    listing = TestClient(create_app(Catalog(run))).get("/api/cases").json()
    assert listing["lesion_columns"] == ["attention_lesion_auc", "attention_topk_precision"]   # those present
    assert [(r["case"], r["attention_lesion_auc"], r["attention_topk_precision"]) for r in listing["cases"]] == [
        ("007", 0.91, 0.6), ("2", None, 0.1)]
    assert "attention_pointing" not in listing["cases"][0]
