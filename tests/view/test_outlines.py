"""`stainmil view`'s lesion-outline overlay (`/api/outline/N`): a slide's own analysis.truth outline as the file holds
it, an IHC slide without one given its H&E slide's carried through an aligned registration (carry_geometry), a pair
that is not aligned saying why, an unreadable outline file answered in its one sentence with nothing else broken."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
import yaml
from starlette.testclient import TestClient

from stainmil.analysis.truth import read_outline
from stainmil.data.registration import carry_geometry
from stainmil.data.synth import TRUTH_TEMPLATE
from stainmil.slides.annotations import BadAnnotations
from stainmil.view.app import create_app
from stainmil.view.catalog import Catalog
from stainmil.view.outlines import slide_outline
from tests.view.test_reviews import mosaic_run


def polygons(geometry) -> list[shapely.Polygon]:
    parts = [geometry] if geometry.geom_type == "Polygon" else list(getattr(geometry, "geoms", []))
    return [p for part in parts for p in ([part] if part.geom_type == "Polygon" else polygons(part))]


def assert_rings(served: list[dict], geometry, tolerance: float) -> None:
    """The served outlines (one per polygon: exterior, then holes) are ``geometry``'s, vertex for vertex."""
    want = polygons(geometry)
    assert len(served) == len(want) > 0
    for item, polygon in zip(served, want):
        rings = [polygon.exterior, *polygon.interiors]
        assert len(item["rings"]) == len(rings)
        for got, ring in zip(item["rings"], rings):
            expected = np.asarray(ring.coords)[:, :2]
            assert np.asarray(got).shape == expected.shape
            assert np.abs(np.asarray(got) - expected).max() <= tolerance


def unreadable_sentence(config, path: Path) -> str:
    with pytest.raises(BadAnnotations) as caught:
        read_outline(config, path)
    return str(caught.value)


# ---- a patch-folder run (mosaics, no registration): fast ---------------------------------------------------------
def mosaic_with_truth(tiny_cohort: Path, tmp_path: Path, truth: str | None) -> Path:
    run = mosaic_run(tiny_cohort, tmp_path / "run")
    settings = {"output_dir": str(tmp_path / "out")}
    if truth is not None:
        settings["analysis"] = {"truth": truth}
    (run / "config.yaml").write_text(yaml.safe_dump(settings))
    return run


def test_a_mosaic_slide_shows_its_own_outline_and_says_why_an_ihc_one_is_not_carried(tiny_cohort, tmp_path):
    truth = tmp_path / "truth"
    shutil.copytree(tiny_cohort / "annotations", truth)
    run = mosaic_with_truth(tiny_cohort, tmp_path, str(truth / TRUTH_TEMPLATE))
    catalog = Catalog(run)
    web = TestClient(create_app(catalog))
    case = next(c["case"] for c in web.get("/api/cases").json()["cases"] if c["case"] != "007")
    (truth / f"case{case}" / "melan" / "slice0.geojson").unlink()          # melan: no outline of its own
    page = web.get("/api/case", params={"case": case}).json()
    kinds = {s["stain"]: s["outline"] for s in page["slices"]}
    assert kinds == {"he": "own", "melan": "not carried", "sox10": "own"}
    config = catalog.state(0).config
    for s in page["slices"]:
        answer = web.get(f"/api/outline/{s['id']}").json()
        if s["stain"] == "melan":                                        # not registered: says so
            assert answer["outlines"] == [] and answer["file"] == "" and answer["problem"] == ""
            assert "not carried" in answer["why"] and "not registered" in answer["why"]
            continue
        path = Path(answer["file"])
        assert path == truth / f"case{case}" / s["stain"] / f"slice{s['slice']}.geojson"
        assert answer["why"] == answer["problem"] == "" and not any(o["carried"] for o in answer["outlines"])
        assert_rings([o for o in answer["outlines"] if o["kind"] == "lesion"], read_outline(config, path).lesion, 0.01)
    he = next(s for s in page["slices"] if s["stain"] == "he")
    assert slide_outline(catalog, he["id"]) is catalog.outlines[he["id"]]     # made once, kept in the catalog
    assert web.get("/api/outline/99999").status_code == 404


def test_an_unreadable_outline_file_is_said_in_one_sentence(tiny_cohort, tmp_path):
    truth = tmp_path / "truth"
    shutil.copytree(tiny_cohort / "annotations", truth)
    run = mosaic_with_truth(tiny_cohort, tmp_path, str(truth / TRUTH_TEMPLATE))
    catalog = Catalog(run)
    web = TestClient(create_app(catalog, review="ana"))                    # review mode serves it too
    case = next(c["case"] for c in web.get("/api/cases").json()["cases"] if c["case"] != "007")
    broken = truth / f"case{case}" / "he" / "slice0.geojson"
    broken.write_text("{not json")
    page = web.get("/api/case", params={"case": case}).json()
    he = next(s for s in page["slices"] if s["stain"] == "he")
    answer = web.get(f"/api/outline/{he['id']}")
    sentence = unreadable_sentence(catalog.state(0).config, broken)
    assert answer.status_code == 200 and answer.json()["problem"] == sentence and answer.json()["outlines"] == []
    assert "\n" not in sentence and str(broken) in sentence
    for s in page["slices"]:                                             # nothing else breaks
        if s["stain"] != "he":
            assert web.get(f"/api/outline/{s['id']}").json()["outlines"]
    assert web.get(f"/slides/{he['id']}.dzi").status_code == 200


def test_without_analysis_truth_no_slide_offers_an_outline(tiny_cohort, tmp_path):
    run = mosaic_with_truth(tiny_cohort, tmp_path, "")
    web = TestClient(create_app(Catalog(run)))
    page = web.get("/api/case", params={"case": "007"}).json()
    assert {s["outline"] for s in page["slices"]} == {""}
    answer = web.get(f"/api/outline/{page['slices'][0]['id']}").json()
    assert answer["outlines"] == [] and "analysis.truth" in answer["why"]


# ---- the serial demo: registered slides ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(serial_demo):
    return json.loads((serial_demo / "demo_result.json").read_text())


def he_only(serial_demo: Path, demo: dict, folder: Path) -> tuple[Path, Path]:
    """A copy of the demo run (every case) whose analysis.truth folder holds only the H&E slides' outlines."""
    from tests.view.test_browser import with_every_case

    run = with_every_case(Path(demo["run"]), folder / "run")
    source = serial_demo / "cohort" / "slide_annotations"
    truth = folder / "truth"
    for path in source.glob("case*/he/*.geojson"):
        (truth / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, truth / path.relative_to(source))
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["analysis"]["truth"] == str(source / TRUTH_TEMPLATE)
    config["analysis"]["truth"] = str(truth / TRUTH_TEMPLATE)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run, truth


@pytest.mark.slow
def test_every_stain_shows_its_own_outline_as_the_file_holds_it(demo):
    catalog = Catalog(demo["run"])
    web = TestClient(create_app(catalog))
    config = catalog.state(0).config
    case = web.get("/api/cases").json()["cases"][0]["case"]
    page = web.get("/api/case", params={"case": case}).json()
    assert {s["stain"] for s in page["slices"]} == {"he", "melan", "sox10"}
    for s in page["slices"]:
        assert s["outline"] == "own"
        answer = web.get(f"/api/outline/{s['id']}").json()
        path = Path(config.analysis.truth.format(case=case, stain=s["stain"], slice=s["slice"]))
        assert answer["file"] == str(path) and answer["why"] == answer["problem"] == ""
        assert not any(o["carried"] for o in answer["outlines"])
        assert_rings([o for o in answer["outlines"] if o["kind"] == "lesion"], read_outline(config, path).lesion, 0.01)


@pytest.mark.slow
def test_an_ihc_slide_without_an_outline_gets_the_he_one_carried_or_says_why_not(serial_demo, demo, tmp_path):
    run, truth = he_only(serial_demo, demo, tmp_path)
    catalog = Catalog(run)
    web = TestClient(create_app(catalog))
    config = catalog.state(0).config
    registrations = pd.read_csv(Path(demo["tiles"]) / "registration" / "registrations.csv", dtype=str)
    for verdict in ["aligned", "doubtful"]:
        row = registrations[registrations["verdict"] == verdict].iloc[0]
        page = web.get("/api/case", params={"case": row["case"]}).json()
        he = next(s for s in page["slices"] if s["reference"])
        ihc = next(s for s in page["slices"] if s["stain"] == row["stain"] and s["slice"] == row["slice"])
        assert he["outline"] == "own" and ihc["outline"] == ("carried" if verdict == "aligned" else "not carried")
        answer = web.get(f"/api/outline/{ihc['id']}").json()
        assert answer["file"] == "" and answer["problem"] == ""
        assert answer["from"] == f"{he['stain']} slice {he['slice']}" and answer["fixed"] == he["id"]
        if verdict == "aligned":
            he_file = truth / f"case{row['case']}" / "he" / f"slice{he['slice']}.geojson"
            want = carry_geometry(read_outline(config, he_file).lesion, catalog.transforms[ihc["link"]["transform"]])
            assert answer["why"] == "" and all(o["carried"] for o in answer["outlines"])
            assert_rings(answer["outlines"], want, 1.0)
        else:
            assert answer["outlines"] == [] and "not carried" in answer["why"]
            assert verdict in answer["why"] and row["reason"] in answer["why"]
        own = web.get(f"/api/outline/{he['id']}").json()                 # the H&E: its own, solid
        assert own["outlines"] and not any(o["carried"] for o in own["outlines"])


@pytest.mark.slow
def test_an_unreadable_he_outline_is_said_on_the_ihc_slide_too(serial_demo, demo, tmp_path):
    run, truth = he_only(serial_demo, demo, tmp_path)
    registrations = pd.read_csv(Path(demo["tiles"]) / "registration" / "registrations.csv", dtype=str)
    row = registrations[registrations["verdict"] == "aligned"].iloc[0]
    broken = truth / f"case{row['case']}" / "he" / f"slice{row['fixed_slice']}.geojson"
    broken.write_text(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {
        "type": "Polygon", "coordinates": [[[0, 0], ["x", 1], [1, 1]]]}}]}))    # a malformed polygon
    catalog = Catalog(run)
    web = TestClient(create_app(catalog))
    sentence = unreadable_sentence(catalog.state(0).config, broken)
    page = web.get("/api/case", params={"case": row["case"]}).json()
    ihc = next(s for s in page["slices"] if s["stain"] == row["stain"] and s["slice"] == row["slice"])
    for slide in (next(s for s in page["slices"] if s["reference"]), ihc):
        answer = web.get(f"/api/outline/{slide['id']}").json()
        assert answer["problem"] == sentence and answer["outlines"] == []
    assert web.get(f"/api/transform/{ihc['link']['transform']}").status_code == 200   # nothing else breaks
