"""report.html in a real browser: Debian's Chromium (installed by the test setup) driven by Playwright."""

from contextlib import contextmanager

import pytest

from stainmil.analysis.analyze import write_analysis
from stainmil.analysis.report import build_report
from tests.conftest import trained_run
from tests.system_deps import ensure_debian_packages

HOSTILE = '<img src=x onerror="document.title=1">&"'
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextmanager
def opened(path, viewport=(1280, 900)):
    """A file (report.html) or URL loaded in Debian's headless Chromium (installed by the test setup):
    (page, console errors)."""
    chromium = ensure_debian_packages("chromium", ["chromium"])
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=FLAGS)  # playwright uses a fresh profile
        page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        errors = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        try:
            page.goto(path if isinstance(path, str) else path.as_uri())
            page.wait_for_load_state("load")
            yield page, errors
        finally:
            browser.close()


@pytest.fixture(scope="module")
def report(prepared, tmp_path_factory):
    run = trained_run(prepared, tmp_path_factory.mktemp("runs"), 4, top_slices=2)
    analysis = write_analysis(run, "test")
    # text from file names and CSVs may hold markup: rename one case everywhere; it must be escaped, not run
    tables = analysis.tables
    victim = tables.cases["case"].iloc[0]
    for frame in (tables.cases, tables.slices, tables.patches, tables.stains):
        frame.loc[frame["case"] == victim, "case"] = HOSTILE
    tables.patches.loc[tables.patches["case"] == HOSTILE, "patch"] = HOSTILE + "p"  # and a patch id (tooltips)
    analysis.grids = {HOSTILE if k == victim else k: v for k, v in analysis.grids.items()}
    analysis.views = {(HOSTILE, *k[1:]) if k[0] == victim else k: v for k, v in analysis.views.items()}
    return build_report(run, analysis), run


def test_report_is_self_contained_and_escaped(report):
    path, _ = report
    html = path.read_text()
    assert 'src="data:image/' in html
    assert "src=\"http" not in html and "src=\"/" not in html and "src=\"file:" not in html
    assert "RANDOM weights" in html
    assert HOSTILE not in html
    assert "&lt;img src=x onerror=" in html


def test_report_in_headless_chromium(report):
    path, run = report
    with opened(path) as (page, errors):
        assert errors == []
        assert page.title().startswith("stainmil report")  # the hostile case name did not run
        n_images = page.evaluate("document.images.length")
        broken = page.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
                               ".map(i => i.alt)")
        assert n_images > 5 and broken == []
        link = page.locator("a.case-link").first
        case_id, anchor = link.inner_text(), link.get_attribute("href")
        link.click()
        assert page.evaluate("location.hash") == anchor
        heading = page.locator(f"section{anchor} h2")
        assert heading.is_visible() and heading.inner_text().startswith(f"Case {case_id}")
        assert page.evaluate(f"document.querySelector('{anchor}').getBoundingClientRect().top") < 100
        first_before = page.locator("#case-table tbody tr td").first.inner_text()
        page.locator("#case-table th", has_text="p(high-grade)").click()
        probs = page.locator("#case-table tbody tr td:nth-child(5)").all_inner_texts()
        assert probs == sorted(probs, key=float)
        page.screenshot(path=str(run / "report_screenshot.png"), full_page=False)
    assert first_before
    assert (run / "report_screenshot.png").stat().st_size > 10_000


def test_slice_viewer_zooms_pans_fades_and_explains_patches(report):
    """The first case section's first slice viewer, driven like a user: wheel, buttons, slider, hover."""
    path, run = report
    with opened(path) as (page, errors):
        viewer = page.locator("figure.viewer").first
        viewer.scroll_into_view_if_needed()
        stage, canvas, viewport = viewer.locator(".stage"), viewer.locator("canvas"), viewer.locator(".viewport")
        data = page.evaluate("JSON.parse(document.querySelector('figure.viewer script.viewer-data').textContent)")
        assert data["patches"] and viewer.locator("img").evaluate("i => i.complete && i.naturalWidth > 0")

        # zoom: the wheel and the buttons change the transform; fit returns to the start
        before = stage.evaluate("s => s.style.transform")
        box = viewport.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.wheel(0, -300)
        assert float(stage.get_attribute("data-zoom")) > 1 and stage.evaluate("s => s.style.transform") != before
        viewer.locator(".zoom-in").click()
        zoomed = float(stage.get_attribute("data-zoom"))
        # pan: a drag moves the zoomed slice
        moved_from = stage.evaluate("s => s.style.transform")
        page.mouse.move(box["x"] + 200, box["y"] + 200)
        page.mouse.down()
        page.mouse.move(box["x"] + 120, box["y"] + 150, steps=5)
        page.mouse.up()
        assert stage.evaluate("s => s.style.transform") != moved_from and float(stage.get_attribute("data-zoom")) \
            == zoomed
        viewer.locator(".zoom-reset").click()
        assert stage.get_attribute("data-zoom") == "1.000" and stage.evaluate("s => s.style.transform") == before

        # opacity slider
        viewer.locator("input.opacity").fill("0.9")
        assert canvas.evaluate("c => getComputedStyle(c).opacity") == "0.9"

        # hover a patch: its numbers from the patch table
        patch = max(data["patches"], key=lambda q: q[2])  # the most attended patch of the slice
        scale = box["width"] / max(data["width"], data["height"]) if data["width"] >= data["height"] else \
            box["height"] / data["height"]
        offset_x = (box["width"] - data["width"] * scale) / 2
        offset_y = (box["height"] - data["height"] * scale) / 2
        page.mouse.move(box["x"] + offset_x + (patch[0] + data["side"] / 2) * scale,
                        box["y"] + offset_y + (patch[1] + data["side"] / 2) * scale)
        tip = viewer.locator(".tip")
        assert tip.is_visible()
        text = tip.inner_text()
        assert f"patch {patch[6]}" in text and f"{patch[2]:.2f}×" in text and f"{patch[3]:.3f}" in text

        # switching overlays redraws the canvas with the other scale
        pixels = "c => c.getContext('2d').getImageData(0, 0, c.width, c.height).data.reduce((a, b) => a + b, 0)"
        attention_sum = canvas.evaluate(pixels)
        viewer.locator("input[value=probability]").check()
        assert canvas.evaluate(pixels) != attention_sum
        assert "P(high-grade)" in viewer.locator(".legend-label").inner_text()
        viewer.screenshot(path=str(run / "viewer_screenshot.png"))
        assert errors == []
