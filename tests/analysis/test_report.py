"""report.html in a real browser: Debian's Chromium (installed by the test setup) driven by Playwright."""


import pytest

from stainmil.analysis.analyze import write_analysis
from stainmil.analysis.report import build_report
from tests.conftest import trained_run
from tests.system_deps import ensure_debian_packages

HOSTILE = '<img src=x onerror="document.title=1">&"'
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def report(prepared, tmp_path_factory):
    run = trained_run(prepared, tmp_path_factory.mktemp("runs"), 4, top_slices=2)
    analysis = write_analysis(run, "test")
    # text from file names and CSVs may hold markup: rename one case everywhere; it must be escaped, not run
    tables = analysis.tables
    victim = tables.cases["case"].iloc[0]
    for frame in (tables.cases, tables.slices, tables.patches):
        frame.loc[frame["case"] == victim, "case"] = HOSTILE
    analysis.grids = {HOSTILE if k == victim else k: v for k, v in analysis.grids.items()}
    return build_report(run, analysis), run


def test_report_is_self_contained_and_escaped(report):
    path, _ = report
    html = path.read_text()
    assert 'src="data:image/' in html
    assert "src=\"http" not in html and "src=\"/" not in html and "src=\"file:" not in html
    assert "RANDOM weights" in html
    assert HOSTILE not in html
    assert "&lt;img src=x onerror=" in html


def test_report_in_headless_chromium(report, tmp_path):
    chromium = ensure_debian_packages("chromium", ["chromium"])
    from playwright.sync_api import sync_playwright

    path, run = report
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=FLAGS)  # playwright uses a fresh profile
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(path.as_uri())
        page.wait_for_load_state("load")
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
        browser.close()
    assert first_before
    assert (run / "report_screenshot.png").stat().st_size > 10_000
