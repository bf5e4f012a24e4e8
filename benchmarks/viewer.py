"""`stainmil view` at a real slide size: tile latency (cold and warm), the first case page, the linked move of three
viewers, and the server's memory with ten slides open. Prints a markdown table (docs/viewer.md).

    python benchmarks/viewer.py WORK [--px 16384] [--tiles 200]

Once (kept in WORK, resumable): one case of three serial sections (H&E, Melan-A, SOX10; ``stainmil synth serial``,
0.5 µm/px, ``--px`` px square), tiled and registered by the real commands. The viewer's folder is then made from
the tiles: ``attention/patches.csv`` with a made-up attention per patch (the viewer only reads the table), and three
more cases for the memory figure (the three sections under other names: the same bytes opened as twelve slides).

The server runs as its own process (its peak RSS from the kernel, ``os.wait4``). Tile latency: ``--tiles`` tiles
at random across every deep-zoom level of the H&E slide requested one after another over HTTP — cold (the server
has not read them; the OS file cache may hold the file) and warm (the same again, from the server's tile cache).
Case page and linked move: Debian's Chromium through Playwright. The first case page is usable when every
viewer has drawn its first view completely. The linked move: the H&E viewer animates a pan and zoom; on each
animation frame the IHC viewers' centres are compared with the H&E centre mapped through their transforms — the
figure is the number of frames after the H&E viewer's animation ends until both are within one screen pixel.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parents[1]


def stainmil(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "stainmil", *args], capture_output=True, text=True,
                            env={**os.environ, "STAINMIL_PROGRESS": "0"})
    if result.returncode:
        sys.exit(f"stainmil {' '.join(args)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def cohort(work: Path, px: int) -> tuple[Path, Path]:
    """(slides.yaml, tiles folder) of one serial case at ``px`` px (made once)."""
    config = work / "cohort" / "slides.yaml"
    if not config.is_file():
        stainmil("synth", "serial", "--out", str(work / "cohort"), "--section-mm", str(px * 0.5 / 1000),
                 "--mpp", "0.5", "--cases", "1")
    tiles = work / "cohort_work" / "tiles"
    if not (tiles / "tiles.csv").is_file():
        stainmil("tile", "--config", str(config))
    if not (tiles / "registration" / "registrations.csv").is_file():
        stainmil("register", "--config", str(config))
    return config, tiles


def viewer_folder(work: Path, config: Path, tiles: Path) -> Path:
    """A source folder the viewer reads: the tiles as the patch table of one analysed case, plus 10 slides."""
    folder = work / "view"
    (folder / "attention").mkdir(parents=True, exist_ok=True)
    table = pd.read_csv(tiles / "tiles.csv", dtype={"case": str, "stain": str, "slice": str})
    rng = np.random.default_rng(0)
    table["path"] = table["slide"]
    table["patch_index"] = table["patch"]
    table["effective_attention"] = rng.dirichlet(np.ones(len(table)))
    table["relative_attention"] = table["effective_attention"] * len(table)
    table["patch_prob"] = rng.uniform(size=len(table))
    table["rank_in_case"] = table["effective_attention"].rank(ascending=False, method="first").astype(int)
    copies = []
    for k in range(1, 4):  # cases 2-4: the same three sections under other names (ten slides in all with case 1)
        extra = table.copy()
        extra["case"] = f"{table['case'].iloc[0]}-copy{k}"
        for slide in extra["slide"].unique():
            alias = Path(slide).with_name(f"copy{k}_{Path(slide).name}")
            if not alias.exists():
                alias.symlink_to(Path(slide).name)
            extra.loc[extra["slide"] == slide, "path"] = str(alias)
        copies.append(extra)
    patches = pd.concat([table, *copies], ignore_index=True)
    patches.to_csv(folder / "attention" / "patches.csv", index=False)
    cases = pd.DataFrame({"case": patches["case"].unique(), "label": 1, "pred": 1, "prob": 0.9, "split": "test"})
    cases.to_csv(folder / "attention" / "cases.csv", index=False)
    (folder / "config.yaml").write_text(config.read_text())
    return folder


SERVER = """
import sys
from stainmil.view.server import ViewerServer
server = ViewerServer(sys.argv[1], port=int(sys.argv[2]))
print(server.url, flush=True)
server.run()
"""


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q))


def tile_latency(url: str, case: str, count: int, slide: int = 0) -> dict:
    import httpx

    client = httpx.Client(base_url=url, timeout=60)
    client.get("/api/case", params={"case": case})
    import xml.etree.ElementTree as ET

    size = ET.fromstring(client.get(f"/slides/{slide}.dzi").text)[0].attrib
    width, height = int(size["Width"]), int(size["Height"])
    top = int(np.ceil(np.log2(max(width, height))))
    rng = random.Random(0)
    addresses = set()
    while len(addresses) < count:
        level = rng.randint(max(0, top - 7), top)
        scale = 2 ** (top - level)
        cols, rows = -(-width // scale // 256) or 1, -(-height // scale // 256) or 1
        addresses.add((level, rng.randrange(cols), rng.randrange(rows)))
    figures = {}
    for name in ("cold", "warm"):
        seconds = []
        for level, col, row in sorted(addresses, key=lambda a: rng.random()):
            started = time.perf_counter()
            response = client.get(f"/slides/{slide}_files/{level}/{col}_{row}.jpeg")
            seconds.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
        figures[name] = {"p50": percentile(seconds, 50), "p95": percentile(seconds, 95)}
    return figures


def browser_figures(url: str, case: str, screenshot: Path | None) -> dict:
    sys.path.insert(0, str(HERE))
    from tests.analysis.test_report import opened

    out = {}
    with opened(f"{url}case?source=0&case={case}", (1500, 1000)) as (page, errors):
        started = time.perf_counter()
        page.wait_for_function("document.body.dataset.ready === '1' && window.stainmil.viewers().every(v => v.tiles)",
                               timeout=120_000, polling=10)
        out["case page"] = time.perf_counter() - started + page.evaluate(
            "performance.timing.responseStart - performance.timing.navigationStart") / 1000
        frames = page.evaluate("""() => new Promise(resolve => {
            const s = window.stainmil, shown = s.viewers(), he = shown.findIndex(v => v.reference);
            const [width, height] = shown[he].size;
            let ended = null, frame = 0;
            s.whenStill(he).then(() => { ended = frame; });
            const tick = () => { frame += 1;
                if (ended !== null && s.aligned()) return resolve({after: frame - ended - 1, frames: frame});
                if (frame > 600) return resolve({after: -1, frames: frame});
                requestAnimationFrame(tick); };
            s.moveTo(he, width * 0.45, height * 0.55, 0.5);
            requestAnimationFrame(tick); })""")
        out["linked"] = frames
        out["errors"] = errors
        if screenshot:
            page.wait_for_timeout(1000)
            page.screenshot(path=str(screenshot))
            # and at a pathologist's zoom (2 screen px per level-0 px: 0.25 µm a screen px), overlays off, on a patch
            # in the middle of the H&E tissue: the linked IHC viewers should show the same cells
            page.locator("input[data-all='attention']").uncheck()
            page.evaluate("""() => { const s = window.stainmil, he = s.viewers().findIndex(v => v.reference);
                const p = s.patches(he), i = Math.floor(p.x.length / 2);
                s.moveTo(he, p.x[i] + p.size[i] / 2, p.y[i] + p.size[i] / 2, 2, false); }""")
            page.wait_for_function("window.stainmil.settled() && window.stainmil.aligned() && "
                                   "window.stainmil.viewers().every(v => v.tiles)", timeout=120_000, polling=100)
            page.wait_for_timeout(500)
            page.screenshot(path=str(screenshot.with_name(f"{screenshot.stem}_cells{screenshot.suffix}")))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--px", type=int, default=16384)
    parser.add_argument("--tiles", type=int, default=200)
    parser.add_argument("--port", type=int, default=8990)
    parser.add_argument("--screenshot", type=Path, help="Save the case page after the linked move here, and at full "
                                                          "zoom beside it (<name>_cells.png).")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    config, tiles = cohort(work, args.px)
    folder = viewer_folder(work, config, tiles)
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(folder), str(args.port)], stdout=subprocess.PIPE,
                               text=True, env={**os.environ, "STAINMIL_PROGRESS": "0"})
    url = process.stdout.readline().strip()
    try:
        cases = pd.read_csv(folder / "attention" / "cases.csv", dtype={"case": str})["case"].tolist()
        latency = tile_latency(url, cases[0], args.tiles)
        browser = browser_figures(url, cases[0], args.screenshot)
        import httpx

        client = httpx.Client(base_url=url, timeout=60)
        for case in cases:  # ten slides open (twelve), a view of each drawn
            page = client.get("/api/case", params={"case": case}).json()
            for s in page["slices"]:
                for level in range(8, 12):
                    client.get(f"/slides/{s['id']}_files/{level}/0_0.jpeg")
    finally:
        process.terminate()
        _, _, usage = os.wait4(process.pid, 0)
    rss = usage.ru_maxrss / 1024
    rows = [("tile latency, cold (p50 / p95)", f"{latency['cold']['p50']:.0f} / {latency['cold']['p95']:.0f} ms",
             "p95 ≤ 300 ms"),
            ("tile latency, warm (p50 / p95)", f"{latency['warm']['p50']:.1f} / {latency['warm']['p95']:.1f} ms",
             "p95 ≤ 100 ms"),
            ("first case page usable (3 viewers drawn)", f"{browser['case page']:.2f} s", "≤ 2 s"),
            ("linked move: frames after the H&E animation ends", str(browser["linked"]["after"]), "≤ 1 frame"),
            (f"server peak RSS, {3 * len(cases)} slides open", f"{rss:.0f} MB", "≤ 500 MB")]
    print(f"`python benchmarks/viewer.py WORK --px {args.px} --tiles {args.tiles}` ({os.cpu_count()} cores)\n")
    print("| figure | measured | goal |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if browser["errors"]:
        print("\nbrowser errors:", json.dumps(browser["errors"]))


if __name__ == "__main__":
    main()
