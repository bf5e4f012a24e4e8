"""`stainmil view` in a real browser (Debian's Chromium through Playwright, installed by the test setup): the case
list, a linked case page — the IHC viewer's centre is the H&E centre through the pair's transform, within one
screen pixel —, every overlay, the unlink toggle, and a patch-folder run's mosaic."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stainmil.data.registration import read_pair
from stainmil.view.server import ViewerServer
from tests.analysis.test_report import opened

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(serial_demo):
    return json.loads((serial_demo / "demo_result.json").read_text())


def ready(page, url: str) -> None:
    page.goto(url)
    page.wait_for_function("document.body.dataset.ready === '1'", timeout=60_000)


# The page's test hook, window.stainmil (static/case.js, docs/viewer.md), is the only way these tests reach in.

def views(page) -> list[dict]:
    return page.evaluate("() => window.stainmil.viewers()")


def settle(page) -> None:
    """Until no viewer animates any more, then one frame."""
    page.wait_for_function("window.stainmil.settled()", timeout=20_000)
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => r()))")


def move(page, index: int, x: float, y: float, zoom: float, animate: bool = True) -> None:
    """Lead with viewer ``index`` and move it to level-0 (x, y) at ``zoom`` screen px per image px."""
    page.evaluate("(a) => window.stainmil.moveTo(...a)", [index, x, y, zoom, animate])
    settle(page)



def canvas_hash(page, index: int) -> str:
    return page.evaluate("i => window.stainmil.overlayImage(i)", index)


def test_case_list_and_a_linked_case_page(demo, tmp_path):
    with ViewerServer(demo["run"], port=8870) as server, opened(server.url, (1500, 1000)) as (page, errors):
        page.wait_for_selector("#cases tbody tr")
        cases = pd.read_csv(Path(demo["run"]) / "attention" / "cases.csv", dtype={"case": str})
        assert page.locator("#cases tbody tr").count() == len(cases)
        page.click("th[data-key='prob']")                              # sortable
        shown = [float(t) for t in page.locator("#cases tbody tr td:nth-child(4)").all_inner_texts()]
        assert shown == sorted(shown)
        page.click("#fn-first")                                        # errors only, false negatives on top
        kinds = page.locator("#cases tbody tr td:nth-child(5)").all_inner_texts()
        wrong = cases[cases["label"] != cases["pred"]]
        assert len(kinds) == len(wrong) and kinds == sorted(kinds, key=lambda k: k != "false negative")
        page.screenshot(path=str(tmp_path / "case_list.png"))

        case = next(c for c in cases["case"]                            # a case with an aligned pair
                    if any(s["link"] and s["link"]["linked"] for s in server.catalog.case_page(0, c)["slices"]))
        ready(page, f"{server.url}case?source=0&case={case}")
        shown = views(page)
        assert all(v["opened"] for v in shown) and {v["stain"] for v in shown} == {"he", "melan", "sox10"}
        he_index = next(i for i, v in enumerate(shown) if v["reference"])
        ihc_index = next(i for i, v in enumerate(shown) if v["linked"] and v["fixed"] == shown[he_index]["id"])
        transform, attrs = read_pair(server.catalog.transforms[shown[ihc_index]["transform"]])
        assert np.abs(transform.u).max() > 0                           # a non-rigid field, not only the affine
        fixed_mpp, moving_mpp = float(attrs["fixed_mpp"]), float(attrs["moving_mpp"])

        patches = pd.read_csv(Path(demo["run"]) / "attention" / "patches.csv", dtype={"case": str})
        tissue = patches[(patches["case"] == case) & (patches["stain"] == "he")][["x", "y"]].to_numpy(float)
        for target, zoom in ((tissue[len(tissue) // 2] + 20, 2.0), (tissue[0] + 40, 0.7)):  # pan and zoom the H&E
            move(page, he_index, *target, zoom)
            now = views(page)
            he, ihc = now[he_index], now[ihc_index]
            assert np.allclose(he["centre"], target, atol=1e-6)
            expected = transform.fixed_to_moving(np.array([he["centre"]]) * fixed_mpp)[0] / moving_mpp
            one_pixel = 1 / ihc["zoom"]                                # one screen pixel in IHC image px
            assert np.linalg.norm(np.array(ihc["centre"]) - expected) <= one_pixel, (ihc["centre"], expected)
            assert ihc["zoom"] == pytest.approx(zoom * moving_mpp / fixed_mpp / np.sqrt(abs(
                np.linalg.det(transform.affine[:2, :2]))), rel=1e-6)
        page.screenshot(path=str(tmp_path / "linked_case.png"))

        # the other way round: the IHC viewer leads, the H&E follows through the inverse field
        move(page, ihc_index, *(np.array(views(page)[ihc_index]["centre"]) + 30), 1.5)
        now = views(page)
        expected = transform.moving_to_fixed(np.array([now[ihc_index]["centre"]]) * moving_mpp)[0] / fixed_mpp
        assert np.linalg.norm(np.array(now[he_index]["centre"]) - expected) <= 1 / now[he_index]["zoom"]

        # a real mouse drag on the H&E viewer moves the IHC viewer with it
        box = page.locator(f".panel[data-slide='{shown[he_index]['id']}'] .osd").bounding_box()
        before = views(page)[ihc_index]["centre"]
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] / 2 - 80, box["y"] + box["height"] / 2 - 40, steps=8)
        page.mouse.up()
        settle(page)
        now = views(page)
        expected = transform.fixed_to_moving(np.array([now[he_index]["centre"]]) * fixed_mpp)[0] / moving_mpp
        assert np.linalg.norm(np.array(now[ihc_index]["centre"]) - before) > 10
        assert np.linalg.norm(np.array(now[ihc_index]["centre"]) - expected) <= 1 / now[ihc_index]["zoom"]

        # every overlay, for all viewers at once: each one changes what the overlay canvas holds
        for name in ["attention", "prob", "mask", "topk"]:
            before = canvas_hash(page, he_index)
            page.locator(f"input[data-all='{name}']").set_checked(name != "attention")
            page.evaluate("() => new Promise(r => requestAnimationFrame(() => r()))")
            state = [v["on"][name] for v in views(page)]
            assert state == [name != "attention"] * len(state), name
            page.wait_for_timeout(200)                                  # the mask image loads
            page.evaluate("() => window.stainmil.redraw()")
            settle(page)
            assert canvas_hash(page, he_index) != before, name
        # one viewer's own toggle
        page.locator(f".panel[data-slide='{shown[ihc_index]['id']}'] input[data-overlay='prob']").uncheck()
        assert views(page)[ihc_index]["on"]["prob"] is False and views(page)[he_index]["on"]["prob"] is True

        # unlinked: the H&E moves alone
        page.locator("#linked").uncheck()
        still = views(page)[ihc_index]["centre"]
        move(page, he_index, *(tissue[0] + 10), 1.0)
        assert views(page)[ihc_index]["centre"] == pytest.approx(still)
        page.locator("#linked").check()                                 # linked again: it catches up
        settle(page)
        now = views(page)
        expected = transform.fixed_to_moving(np.array([now[he_index]["centre"]]) * fixed_mpp)[0] / moving_mpp
        assert np.linalg.norm(np.array(now[ihc_index]["centre"]) - expected) <= 1 / now[ihc_index]["zoom"]

        # clicking a patch shows its numbers
        first = tissue[0]
        move(page, he_index, first[0] + 5, first[1] + 5, 1.0, animate=False)
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.wait_for_selector("#info:not([hidden])")
        assert "relative attention" in page.inner_text("#info") and "stain weight" in page.inner_text("#info")
        assert not errors, errors


def with_every_case(run: Path, out: Path) -> Path:
    """A copy of ``run``'s tables whose patches.csv also holds the cases analysis left out (those not in its test
    split), placed from the cohort's index with uniform attention: their slides and registrations are real."""
    import shutil

    from stainmil.config import load_config
    from stainmil.data.cohort import load_manifest

    shutil.copytree(run, out, ignore=shutil.ignore_patterns("checkpoints", "heatmaps", "patches", "qupath", "*.png"))
    patches = pd.read_csv(out / "attention" / "patches.csv", dtype={"case": str, "slice": str})
    index = load_manifest(load_config(out / "config.yaml"))
    extra = index[~index["case"].isin(patches["case"])].copy()
    extra["rank_in_case"] = extra.groupby("case").cumcount() + 1
    for column, value in (("relative_attention", 1.0), ("patch_prob", 0.5), ("effective_attention", 0.01)):
        extra[column] = value
    keep = [c for c in patches.columns if c in extra.columns]
    pd.concat([patches, extra[keep]]).to_csv(out / "attention" / "patches.csv", index=False)
    return out


def test_unaligned_pairs_are_not_linked_and_say_why(demo, tmp_path):
    # the serial demo's non-aligned pairs (deterministic since registration is) may lie outside its test split
    with ViewerServer(with_every_case(Path(demo["run"]), tmp_path / "run"), port=8880) as server:
        registrations = pd.read_csv(Path(demo["tiles"]) / "registration" / "registrations.csv", dtype=str)
        doubtful = registrations[registrations["verdict"] != "aligned"]
        if doubtful.empty:
            pytest.fail("the serial demo has no doubtful or failed pair to show")
        row = doubtful.iloc[0]
        page_data = server.catalog.case_page(0, row["case"])
        slice_ = next(s for s in page_data["slices"] if s["stain"] == row["stain"] and s["slice"] == row["slice"])
        assert not slice_["link"]["linked"] and row["verdict"] in slice_["link"]["why"]
        with opened(f"{server.url}case?source=0&case={row['case']}") as (page, errors):
            page.wait_for_function("document.body.dataset.ready === '1'", timeout=60_000)
            text = page.inner_text(f".panel[data-slide='{slice_['id']}'] .link")
            assert text.startswith("not linked") and row["verdict"] in text
            assert not errors, errors


def test_a_patch_folder_run_shows_its_mosaic(tiny_cohort, tmp_path):
    """A patch-folder cohort (no slides): each slice a mosaic of its patch files at their own resolution."""
    from PIL import Image

    files = sorted((tiny_cohort / "patches").rglob("*.png"))
    rows = []
    for index, path in enumerate(files):
        case, stain, slice_ = path.parts[-4][4:], path.parts[-3], path.parts[-2][5:]
        x, y = (int(part[1:]) for part in path.stem.split("_")[-2:])
        rows.append({"case": case, "stain": stain, "slice": slice_, "patch": index, "patch_index": index, "x": x,
                     "y": y, "path": str(path), "effective_attention": 0.01, "relative_attention": 1.0 + index % 3,
                     "patch_prob": 0.5, "rank_in_case": index % 7 + 1})
    run = tmp_path / "run"
    (run / "attention").mkdir(parents=True)
    patches = pd.DataFrame(rows)
    patches.to_csv(run / "attention" / "patches.csv", index=False)
    case = patches["case"].iloc[0]
    part = patches[(patches["case"] == case) & (patches["stain"] == patches["stain"].iloc[0])
                   & (patches["slice"] == patches["slice"].iloc[0])]
    with ViewerServer(run, port=8890) as server, opened(f"{server.url}case?source=0&case={case}") as (page, errors):
        page.wait_for_function("document.body.dataset.ready === '1'", timeout=60_000)
        shown = views(page)
        assert all(v["opened"] for v in shown)
        slide = server.catalog.entry(shown[0]["id"])
        assert slide.kind == "mosaic" and slide.path.is_file() and slide.path.is_relative_to(run)
        side = Image.open(part["path"].iloc[0]).size[0]
        from stainmil.slides.reader import Slide

        mosaic = Slide(slide.path)
        first = part.iloc[0]
        assert mosaic.dimensions == (part["x"].max() + side, part["y"].max() + side)
        pasted = mosaic.read_region(int(first["x"]), int(first["y"]), 0, side)
        assert np.array_equal(pasted, np.asarray(Image.open(first["path"]).convert("RGB")))
        mosaic.close()
        assert not errors, errors


NOTE = 'nests at the junction, "007" too\nsecond line'


def review_copy(run: Path, tmp_path: Path) -> Path:
    """A copy of ``run`` whose config puts outputs (reviews/) under ``tmp_path``: the shared demo stays unwritten."""
    import shutil

    import yaml

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "heatmaps", "qupath", "*.png"))
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["output_dir"] = str(tmp_path / "out")
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    return copy


def test_review_draw_mark_note_grade_save_and_reload(demo, tmp_path):
    """Review mode: a polygon drawn by real clicks on the H&E viewer is saved as drawn (level-0 px, through
    OpenSeadragon's own conversion of the clicked pixels), carried onto a linked IHC viewer through the
    registration, and back after a reload with the marks, note and grade; a save over another tab's is refused."""
    import shapely
    from shapely.geometry import Polygon

    from stainmil.data.registration import carry_geometry
    from stainmil.slides.annotations import read_region

    run = review_copy(Path(demo["run"]), tmp_path)
    with ViewerServer(run, port=8895, review="ana") as server, opened(server.url, (1500, 1000)) as (page, errors):
        case = next(c for c in server.catalog.case_list(0)["cases"]
                    if any(s["link"] and s["link"]["linked"] for s in server.catalog.case_page(0, c["case"])["slices"]))
        case = case["case"]
        ready(page, f"{server.url}case?source=0&case={case}")
        shown = views(page)
        he = next(i for i, v in enumerate(shown) if v["reference"])
        ihc = next(i for i, v in enumerate(shown) if v["linked"] and v["fixed"] == shown[he]["id"])
        he_id = shown[he]["id"]
        canvas = page.evaluate(f"() => window.stainmil.canvasBox({he})")

        # three top-k patches of the H&E marked: each clicked at the viewer's centre, then a button
        page.locator("input[data-all='topk']").check()
        patches = page.evaluate(f"""() => {{ const p = window.stainmil.patches({he});
            return p.x.map((x, j) => [x, p.y[j], p.size[j], p.rank_in_case[j], String(p.patch[j])]); }}""")
        top = sorted(patches, key=lambda p: p[3])[:3]
        marks = dict(zip((p[4] for p in top), ["agree", "disagree", "unsure"]))
        for x, y, size, _, patch in top:
            move(page, he, x + size / 2, y + size / 2, 1.0, animate=False)
            page.mouse.click(round(canvas[0] + canvas[2] / 2), round(canvas[1] + canvas[3] / 2))
            page.click(f"#info .marks button[data-mark='{marks[patch]}']")
        grades = server.catalog.state(0).class_names
        page.fill("#note", NOTE)
        page.select_option("#grade", grades[-1])

        # a polygon drawn by clicks around the H&E tissue (zoom 2: a whole screen px is ½ level-0 px)
        centre = np.array(top[0][:2]) + top[0][2] / 2                      # on the tissue: the best patch
        move(page, he, *centre, 2.0, animate=False)
        targets = centre + np.array([[-45, -40], [50, -35], [55, 45], [-25, 55], [-50, 10]])  # clear of the navigator
        clicks = []
        for tx, ty in targets:
            s = page.evaluate(f"(point) => window.stainmil.toScreen({he}, point)", [tx, ty])
            clicks.append((round(canvas[0] + s[0]), round(canvas[1] + s[1])))
        page.click(f".panel[data-slide='{he_id}'] .rev [data-act=draw]")
        for cx, cy in clicks[:-1]:
            page.mouse.click(cx, cy)
        page.mouse.dblclick(*clicks[-1])
        drawn = page.evaluate(f"() => window.stainmil.polygons({he}).map(p => p.rings)")
        assert len(drawn) == 1 and len(drawn[0][0]) == len(targets) + 1, (drawn, clicks)
        expected = np.array(page.evaluate(f"""(clicks) => clicks.map(([x, y]) => window.stainmil.toImage(
            {he}, [x - {canvas[0]}, y - {canvas[1]}]))""", clicks))
        assert np.abs(expected - targets).max() <= 0.5                    # where the clicks landed
        assert page.evaluate("window.stainmil.dirty()")
        assert "unsaved" in page.inner_text("#review-status")
        page.keyboard.press("Control+s")
        page.wait_for_function("document.getElementById('review-status').textContent.includes('saved ') && "
                               "!window.stainmil.dirty()", timeout=20_000)

        # what was saved: the drawn vertices (0.01 px), the marks, the note and grade
        folder = tmp_path / "out" / "reviews" / "ana"
        entry = server.catalog.entry(he_id)
        from stainmil.slides.annotations import slide_key_name

        geojson = folder / f"{slide_key_name((entry.case, entry.stain, entry.slice))}.geojson"
        saved = Polygon(json.loads(geojson.read_text())["features"][0]["geometry"]["coordinates"][0])
        assert np.abs(np.asarray(saved.exterior.coords)[:-1] - expected).max() <= 0.006
        region = read_region(geojson, ["Lesion"])
        assert shapely.normalize(region.geometry).equals_exact(shapely.normalize(saved), 1e-9)
        table = pd.read_csv(folder / "patch_marks.csv", dtype=str, keep_default_na=False)
        assert dict(zip(table["patch"], table["mark"])) == marks and set(table["case"]) == {case}
        cases = pd.read_csv(folder / "cases.csv", dtype=str, keep_default_na=False)
        assert cases[["case", "grade", "note"]].values.tolist() == [[case, grades[-1], NOTE]]

        # carried onto the linked IHC viewer: carry_geometry of the saved polygon, within 1 px
        page.wait_for_function(f"(() => {{ const c = window.stainmil.carried({ihc}); "
                               "return c && c.outlines.length > 0; })()", timeout=20_000)
        carried = page.evaluate(f"() => window.stainmil.carried({ihc})")
        transform = server.catalog.transforms[shown[ihc]["transform"]]
        want = carry_geometry(saved, transform)
        assert carried["outlines"][0]["class"] == "Lesion" and carried["from"].startswith(shown[he]["stain"])
        got = np.asarray(carried["outlines"][0]["rings"][0])
        assert got.shape == np.asarray(want.exterior.coords).shape
        assert np.abs(got - np.asarray(want.exterior.coords)).max() <= 1.0
        assert "carried from" in page.inner_text(f".panel[data-slide='{shown[ihc]['id']}'] .rev .hint")
        page.screenshot(path=str(tmp_path / "review.png"))

        # reopened: polygon, marks, note and grade are back
        ready(page, page.url)
        back = page.evaluate(f"() => window.stainmil.polygons({he})")
        assert len(back) == 1 and np.abs(np.asarray(back[0]["rings"][0])[:-1] - expected).max() <= 0.006
        assert {key.split("|")[2]: mark for key, mark in page.evaluate("() => window.stainmil.marks()").items()} \
            == marks
        assert page.input_value("#note") == NOTE and page.input_value("#grade") == grades[-1]

        # another tab saves this slide meanwhile: this tab's save is refused, said, and its drawing kept
        other = server.review.slide(he_id)
        page.request.put(f"{server.url}api/review/{he_id}", data=json.dumps(
            {"base_version": other["version"], "polygons": []}))
        page.click(f".panel[data-slide='{he_id}'] .rev [data-act=draw]")
        for cx, cy in clicks[:2]:
            page.mouse.click(cx + 40, cy + 40)
        page.mouse.dblclick(clicks[2][0] + 40, clicks[2][1] + 40)
        page.click("#save")
        page.wait_for_function("document.getElementById('review-status').textContent.includes('another tab')",
                               timeout=20_000)
        assert page.evaluate(f"() => window.stainmil.polygons({he}).length") == 2
        assert page.evaluate("window.stainmil.dirty()") and not geojson.exists()
        assert [e for e in errors if "409 (Conflict)" not in e] == [], errors  # the refused save is the only one


def test_lesion_outline_overlay_own_on_the_he_carried_on_the_ihc(serial_demo, demo, tmp_path):
    """The lesion-outline overlay: the H&E's own analysis.truth outline, carried dashed onto the aligned IHC viewers
    that have none of their own (H&E-only truth folder); a doubtful pair's panel says why it is not carried."""
    from tests.view.test_outlines import he_only

    run, _ = he_only(serial_demo, demo, tmp_path)
    registrations = pd.read_csv(Path(demo["tiles"]) / "registration" / "registrations.csv", dtype=str)
    doubtful = registrations[registrations["verdict"] == "doubtful"].iloc[0]
    with ViewerServer(run, port=8905) as server, opened(server.url, (1500, 1000)) as (page, errors):
        for case in sorted(set(registrations["case"])):
            ready(page, f"{server.url}case?source=0&case={case}")
            before = [canvas_hash(page, i) for i in range(len(views(page)))]
            page.locator("input[data-all='outline']").check()
            page.wait_for_function("window.stainmil.viewers().every((v, i) => !v.outline || "
                                   "window.stainmil.loaded(i, 'outline'))", timeout=20_000)
            page.evaluate("() => window.stainmil.redraw()")
            settle(page)
            shown = page.evaluate("() => window.stainmil.viewers().map((v, i) => { "
                                  "const o = window.stainmil.loaded(i, 'outline') || {outlines: []}; "
                                  "return {kind: v.outline, stain: v.stain, slice: v.slice, "
                                  "note: window.stainmil.note(i), carried: o.outlines.filter(o => o.carried).length, "
                                  "own: o.outlines.filter(o => !o.carried).length}; })")
            for index, view in enumerate(shown):
                if view["kind"] == "own":
                    assert view["own"] and not view["carried"] and ".geojson" in view["note"]
                elif view["kind"] == "carried":
                    assert view["carried"] and "carried from" in view["note"]
                else:
                    assert view["kind"] == "not carried" and not view["carried"] and "not carried" in view["note"]
                assert (canvas_hash(page, index) != before[index]) == bool(view["own"] or view["carried"])
            if case == doubtful["case"]:
                view = next(v for v in shown if (v["stain"], v["slice"]) == (doubtful["stain"], doubtful["slice"]))
                assert "doubtful" in view["note"]
        assert not errors, errors
