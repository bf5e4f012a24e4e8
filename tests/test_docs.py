"""The documentation site builds with --strict (as `make docs` and CI do): a broken link, a missing page or a
page the nav forgets fails the build; the reference pages are generated from the code at every build."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"),
                           "-d", str(site)], capture_output=True, text=True, cwd=root, env=ENV)


def test_site_builds_strict_with_generated_reference_pages(tmp_path):
    result = build(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "stainmil compare-models" in cli and "--stain-sets" in cli
    encoders = (tmp_path / "site" / "reference" / "encoders" / "index.html").read_text()
    assert "uni_v1" in encoders and "licence" in encoders
    config = (tmp_path / "site" / "reference" / "configuration" / "index.html").read_text()
    assert "model.architecture" in config and "model.stain_identity" in config
    api = (tmp_path / "site" / "api" / "index.html").read_text()  # mkdocstrings: rendered from the docstrings
    assert 'id="stainmil.train.run.open_run"' in api and 'id="stainmil.analysis.heatmaps.draw_heatmap"' in api
    assert ":func:" not in api and "(B, C)" in api  # docs/griffe_docstrings.py: roles gone, shape comments shown
    assert not (tmp_path / "site" / "griffe_docstrings.py").exists()
    assert not (tmp_path / "site" / "gen_reference.py").exists()


def test_a_broken_link_fails_the_build(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    page = copy / "docs" / "commands.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    result = build(copy, tmp_path / "site")
    assert result.returncode != 0 and "no-such-page.md" in result.stderr


def test_readme_is_a_short_front_page_linking_into_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024
    for command in ("make demo", "make test", "make docs"):
        assert command in readme
    for link in [part.split(")")[0] for part in readme.split("](")[1:]]:
        if not link.startswith("http"):
            assert (ROOT / link.split("#")[0]).is_file(), link
