"""The example on the Python API page (docs/api.md) runs: its ```python cells, executed in order on a tiny trained
and evaluated run, with only the first cell's ``run_dir = Path(...)`` pointed at that run. A renamed function,
a moved module or a changed return value breaks the page, and this test with it; so does a name the page's
reference lists under ``members:`` that no longer exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import trained_run

PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"
CELL = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
RUN_DIR = re.compile(r"^run_dir = Path\(.*\)$", re.M)
REFERENCE = re.compile(r"^::: ([\w.]+)\n((?:    .*\n)*)", re.M)  # a mkdocstrings block and its indented options


def page_cells() -> list[str]:
    return CELL.findall(PAGE.read_text(encoding="utf-8"))


def test_the_page_has_an_example_that_starts_from_a_run_folder():
    cells = page_cells()
    assert len(cells) >= 5
    assert len(RUN_DIR.findall(cells[0])) == 1, "the first cell sets run_dir = Path(...) on one line"
    assert not any(RUN_DIR.search(cell) for cell in cells[1:])


def test_every_name_the_reference_lists_exists():
    """mkdocs --strict fails on a missing module, but skips a missing name in ``members: [...]`` silently."""
    blocks = REFERENCE.findall(PAGE.read_text(encoding="utf-8"))
    assert len(blocks) >= 8
    for module_name, options in blocks:
        module = importlib.import_module(module_name)
        listed = re.search(r"members: \[(.*)\]", options)
        for name in [name.strip() for name in listed.group(1).split(",")] if listed else []:
            assert hasattr(module, name), f"docs/api.md lists {module_name}.{name}, which does not exist"


def test_the_python_api_example_runs_on_a_trained_run(prepared, tmp_path, monkeypatch):
    plt = pytest.importorskip("matplotlib.pyplot")
    run = trained_run(prepared, tmp_path / "runs", max_epochs=2)
    cells = page_cells()
    cells[0] = RUN_DIR.sub(lambda _: f"run_dir = Path({str(run)!r})", cells[0])
    monkeypatch.chdir(tmp_path)  # the example writes heatmap_patchprob.jpg in the working directory
    namespace: dict = {}
    try:
        for number, cell in enumerate(cells, 1):
            exec(compile(cell, f"{PAGE.name}, python cell {number}", "exec"), namespace)
    finally:
        plt.close("all")
    tables, patches, top = namespace["tables"], namespace["patches"], namespace["top"]
    assert set(tables.patches["case"]) == set(namespace["run"].split.test) == set(patches["case"])
    assert pd.api.types.is_numeric_dtype(patches["relative_attention"]) and len(patches) == len(tables.patches)
    assert (top["case"] == namespace["case"]).all() and top["rank_in_case"].iloc[0] == 1
    assert len(namespace["predicted"]) == len(namespace["run"].split.test)
    assert namespace["view"].image.ndim == 3 and len(namespace["view"].xs) == len(namespace["part"])
    assert Path(namespace["saved"]).is_file() and (run / "attention" / "patches.csv").is_file()
