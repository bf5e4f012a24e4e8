"""`stainmil view`'s server without a browser: what it serves, what it refuses, moved slides, ports."""

import io
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest
from PIL import Image
from starlette.testclient import TestClient

from stainmil.view.app import create_app, openseadragon_dir
from stainmil.view.catalog import Catalog
from stainmil.view.server import ViewerServer, bind_socket

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(serial_demo):
    return json.loads((serial_demo / "demo_result.json").read_text())


def client(folder, **kwargs) -> TestClient:
    return TestClient(create_app(Catalog(folder, **kwargs)))


def linked_case(web: TestClient) -> tuple[str, dict]:
    """A case of the run with at least one IHC slice linked to its H&E slice."""
    for row in web.get("/api/cases").json()["cases"]:
        page = web.get("/api/case", params={"case": row["case"]}).json()
        if any(s["link"] and s["link"]["linked"] for s in page["slices"]):
            return row["case"], page
    raise AssertionError("no case with an aligned registration")


def test_case_list_and_case_page(demo):
    web = client(demo["run"])
    listing = web.get("/api/cases").json()
    cases = pd.read_csv(Path(demo["run"]) / "attention" / "cases.csv", dtype={"case": str})
    assert [r["case"] for r in listing["cases"]] == list(cases["case"])
    assert listing["prob_label"] == "P(high-grade)" and listing["sources"] == ["."]
    assert all(r["registration"] for r in listing["cases"])           # every case's verdicts are listed
    assert {r["error"] for r in listing["cases"]} <= {"right", "false negative", "false positive"}
    case, page = linked_case(web)
    stains = {s["stain"] for s in page["slices"]}
    assert stains == {"he", "melan", "sox10"} and sum(s["reference"] for s in page["slices"]) >= 1
    for s in page["slices"]:
        assert not s["problem"] and s["kind"] == "slide" and s["mask"]
        assert len(s["patches"]["x"]) == len(s["patches"]["colour"]["relative_attention"]) > 0
        if not s["reference"]:
            assert s["link"]["linked"] or s["link"]["why"]             # not linked: says why
    linked = next(s for s in page["slices"] if s["link"] and s["link"]["linked"])
    transform = web.get(f"/api/transform/{linked['link']['transform']}").json()
    assert np.array(transform["affine"]).shape == (3, 3) and len(transform["shape"]) == 2
    assert web.get("/api/case", params={"case": "no such case"}).status_code == 404


def test_tiles_come_from_the_run_slides(demo):
    web = client(demo["run"])
    case, page = linked_case(web)
    slide = page["slices"][0]
    dzi = web.get(f"/slides/{slide['id']}.dzi")
    assert dzi.status_code == 200 and dzi.headers["content-type"].startswith("application/xml")
    path = pd.read_csv(Path(demo["run"]) / "attention" / "patches.csv", dtype={"case": str, "slice": str})
    path = path[(path["case"] == case) & (path["stain"] == slide["stain"]) & (path["slice"] == slide["slice"])]
    reference = openslide.OpenSlide(path["path"].iloc[0])
    width, height = reference.dimensions
    assert f'Width="{width}" Height="{height}"' in dzi.text
    top = int(np.ceil(np.log2(max(width, height))))
    tile = web.get(f"/slides/{slide['id']}_files/{top}/0_0.png")
    pixels = np.asarray(Image.open(io.BytesIO(tile.content)).convert("RGB"))
    expected = np.asarray(reference.read_region((0, 0), 0, pixels.shape[1::-1]).convert("RGB"))
    assert np.array_equal(pixels, expected)
    jpeg = web.get(f"/slides/{slide['id']}_files/{top}/0_0.jpeg")
    assert jpeg.headers["content-type"] == "image/jpeg"
    assert web.get(f"/slides/{slide['id']}/mask.png").headers["content-type"] == "image/png"
    assert web.get(f"/slides/{slide['id']}_files/{top + 1}/0_0.jpeg").status_code == 404
    assert web.get(f"/slides/{slide['id']}_files/{top}/0_0.gif").status_code == 404
    reference.close()


def test_no_url_reaches_another_file(demo, tmp_path, monkeypatch):
    osd = tmp_path / "osd"
    shutil.copytree(openseadragon_dir(), osd)
    (osd / "secret.js").symlink_to(Path(demo["run"]) / "config.yaml")    # a link out of the served folder
    monkeypatch.setenv("STAINMIL_OPENSEADRAGON", str(osd))
    web = client(demo["run"])
    assert web.get("/osd/openseadragon.min.js").status_code == 200
    for url in ["/osd/secret.js", "/static/..%2f..%2fview%2fapp.py", "/static/../catalog.py",
                "/osd/..%2f..%2f..%2fpackage.json", "/slides/..%2f..%2fconfig.yaml.dzi",
                "/slides/%2fetc%2fpasswd.dzi", "//etc/passwd", "/slides/99999.dzi", "/slides/-1.dzi",
                "/slides/0_files/0/0_0.jpeg%2f..%2f..%2fconfig.yaml", "/api/transform/99", "/api/regions/99999",
                f"/static/{os.sep}etc{os.sep}passwd"]:
        response = web.get(url)
        assert response.status_code == 404, url
        assert "stainmil" not in response.text or "error" in response.text, url


def test_a_moved_slide_is_named_and_the_others_still_shown(demo, tmp_path):
    run = Path(demo["run"])
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    patches = pd.read_csv(copy / "attention" / "patches.csv", dtype={"case": str, "slice": str})
    case = patches["case"].iloc[0]
    moved = tmp_path / "moved"
    originals = {}
    for path in patches.loc[(patches["case"] == case) & (patches["stain"] == "sox10"), "path"].unique():
        target = moved / Path(path).relative_to(Path(path).parents[2])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
        originals[path] = target
    gone = {p: p.replace(str(Path(p).parents[2]), str(tmp_path / "old_place")) for p in originals}
    patches["path"] = patches["path"].replace(gone)                 # the run recorded a place the slides left
    patches.to_csv(copy / "attention" / "patches.csv", index=False)
    page = client(copy).get("/api/case", params={"case": case}).json()
    problems = {s["stain"]: s["problem"] for s in page["slices"]}
    assert problems["he"] == "" and problems["melan"] == ""
    assert "--slides-dir" in problems["sox10"] and "old_place" in problems["sox10"]
    assert problems["sox10"].count(".") >= 1 and "\n" not in problems["sox10"]
    found = client(copy, slides_dir=moved).get("/api/case", params={"case": case}).json()
    assert all(not s["problem"] for s in found["slices"])
    sox10 = next(s for s in found["slices"] if s["stain"] == "sox10")
    web = client(copy, slides_dir=moved)
    web.get("/api/case", params={"case": case})
    assert web.get(f"/slides/{sox10['id']}.dzi").status_code == 200


def test_busy_port_takes_the_next_and_stopping_frees_it(demo):
    taken = bind_socket("127.0.0.1", 0)
    port = taken.getsockname()[1]
    try:
        server = ViewerServer(demo["run"], port=port).start()
        try:
            assert server.port != port and server.port > port
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as connection:
                connection.sendall(b"GET /api/cases HTTP/1.0\r\n\r\n")
                assert b"200 OK" in connection.recv(200)
        finally:
            server.stop()
        again = socket.socket()
        again.bind(("127.0.0.1", server.port))                      # nothing left bound
        again.close()
    finally:
        taken.close()


def test_view_command_refuses_a_folder_without_results(tmp_path):
    from typer.testing import CliRunner

    from stainmil.cli import app

    result = CliRunner().invoke(app, ["view", str(tmp_path), "--no-open"])
    assert result.exit_code == 2 and "attention/patches.csv" in result.output and "stainmil analyze" in result.output


def test_trained_runs_without_analysis_are_named_then_analysed(demo, tmp_path):
    """A CV folder's folds are not analysed by default: the viewer says how, and --analyze does it."""
    from typer.testing import CliRunner

    from stainmil.analysis.analyze import write_analyses
    from stainmil.cli import app
    from stainmil.view.folder import unanalysed_runs

    cv = tmp_path / "cv"
    shutil.copytree(demo["run"], cv / "folds" / "fold_00", ignore=shutil.ignore_patterns("attention", "qupath"))
    result = CliRunner().invoke(app, ["view", str(cv), "--no-open"])
    assert result.exit_code == 2 and "1 trained run(s)" in result.output and "--analyze" in result.output
    shutil.copytree(demo["run"], cv / "folds" / "fold_01", ignore=shutil.ignore_patterns("attention", "qupath"))
    assert unanalysed_runs(cv) == [cv / "folds" / "fold_00", cv / "folds" / "fold_01"]
    write_analyses(unanalysed_runs(cv / "folds" / "fold_01"), log=lambda *_: None)
    listing = Catalog(cv).case_list(0)                       # one fold shown; the other named, with the option
    assert listing["sources"] == ["folds/fold_01"] and listing["cases"]
    assert any("fold_00" in note and "--analyze" in note for note in listing["notes"])


def test_qupath_regions_of_a_slide_are_served_as_polygons(demo, tmp_path):
    """The include/exclude annotations used for tiling (found as `tile` finds them), in level-0 px."""
    import yaml

    run = tmp_path / "run"
    shutil.copytree(demo["run"], run, ignore=shutil.ignore_patterns("checkpoints"))
    patches = pd.read_csv(run / "attention" / "patches.csv", dtype={"case": str, "slice": str})
    first = patches.iloc[0]
    regions = tmp_path / "qupath"
    regions.mkdir()
    ring = [[10, 10], [300, 12], [280, 290], [10, 10]]
    name = f"case{first['case']}_{first['stain']}_slice{first['slice']}__{Path(first['path']).stem}.geojson"
    (regions / name).write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}}]}))
    (regions / f"{Path(first['path']).stem}.geojson").write_text("{}")   # a bare shared name: never used
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["tile"]["include_annotations"] = str(regions)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    web = client(run)
    page = web.get("/api/case", params={"case": first["case"]}).json()
    with_regions = [s for s in page["slices"] if s["annotations"]]
    assert [(s["stain"], s["slice"]) for s in with_regions] == [(first["stain"], first["slice"])]
    served = web.get(f"/api/regions/{with_regions[0]['id']}").json()
    assert served["include"] == [[[float(x), float(y)] for x, y in ring]] and served["exclude"] == []

    from tests.analysis.test_report import opened  # and drawn, in the browser

    with ViewerServer(run, port=8860) as server, opened(f"{server.url}case?source=0&case={first['case']}") \
            as (page, errors):
        page.wait_for_function("document.body.dataset.ready === '1'", timeout=60_000)
        index = page.evaluate(f"window.stainmil.viewers().findIndex(v => v.id === {with_regions[0]['id']})")
        box = page.locator(f".panel[data-slide='{with_regions[0]['id']}'] input[data-overlay='regions']")
        assert box.is_enabled()
        before = page.evaluate(f"window.stainmil.overlayImage({index})")
        box.check()
        page.wait_for_function(f"window.stainmil.loaded({index}, 'regions') !== null")
        page.evaluate("window.stainmil.redraw()")
        page.wait_for_timeout(300)
        assert page.evaluate(f"window.stainmil.overlayImage({index})") != before
        assert not errors, errors
