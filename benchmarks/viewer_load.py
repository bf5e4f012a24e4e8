"""`stainmil view` shared by a lab: N browsers panning at once. Prints a markdown table (docs/performance.md).

    python benchmarks/viewer_load.py [--folder RUN] [--work /tmp/viewer_load_demo] [--clients 1,5,20] [--seconds 10]
                                     [--big 8192 [--copies 5]]

The folder: ``--folder`` (any folder `stainmil view` opens), else a run of the slide route built once in WORK
(``stainmil demo --slides --weights random --set train.max_epochs=2``: pyramidal TIFF slides, random weights —
the attention values do not matter here, the slides do) and reused afterwards. Its slides are 768 px: every tile
fits the tile cache at once, so ``--big PX`` serves the run's cases ``--copies`` times under other names with slides
of PX px (see :func:`big_folder`) — many slides open at once, reads that are not free.

For each N a fresh server runs as its own process (the real :class:`stainmil.view.server.ViewerServer` on a free
port; its tile cache starts empty) and N clients (asyncio, one ``httpx.AsyncClient`` each: one browser) do what a
pathologist's browser does: GET the case list, GET one case at random, GET the ``.dzi`` of each of its slides,
then for ``--seconds`` pan: one tile after another from a random slide of that case, at a random deep-zoom level
weighted towards the deep ones (level ``top - k`` for k = 0..6 with weight ``2 ** -k``: most of a pan is at
high magnification) and a random column/row inside that level. One request at a time per client (a browser opens
up to six: this is the gentler load). Tile latency is measured from the request to the last byte; a request
that fails (non-200 status, or no answer within 60 s) counts as an error. The server's peak RSS is the kernel's
(``VmHWM`` of /proc/PID/status), its CPU the process's user + system seconds over the pan.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

SERVER = """
import sys
from stainmil.view.server import ViewerServer
server = ViewerServer(sys.argv[1], port=0)
print(server.url, flush=True)
server.run()
"""
LEVELS_DEEP = 7          # levels top-6 .. top are panned
TIMEOUT_S = 60.0


def demo_run(work: Path) -> Path:
    """The run folder of a slide-route demo in ``work`` (built once: several minutes on 2 cores)."""
    runs = sorted((work / "out").glob("**/runs/run_*/attention/patches.csv"))
    if not runs:
        print(f"building the demo run in {work / 'out'} (slide route, random weights, 2 epochs) …", file=sys.stderr)
        result = subprocess.run([sys.executable, "-m", "stainmil", "demo", "--slides", "--out", str(work / "out"),
                                 "--weights", "random", "--set", "train.max_epochs=2"], capture_output=True,
                                text=True, env={**os.environ, "STAINMIL_PROGRESS": "0"})
        if result.returncode:
            sys.exit(f"stainmil demo failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        runs = sorted((work / "out").glob("**/runs/run_*/attention/patches.csv"))
    if not runs:
        sys.exit(f"no analysed run (attention/patches.csv) under {work / 'out'}; pass --folder.")
    return runs[-1].parent.parent


def big_folder(run: Path, work: Path, px: int, copies: int) -> Path:
    """A copy of ``run``'s tables whose slides are ``px`` px square, its cases served ``copies`` times under other
    names (a lab's cohort, not a test split): one pyramidal TIFF per stain (the run's first slide of that stain
    enlarged, with a little noise so it does not compress to nothing), every slide a link to its stain's file — the
    same bytes opened under many names, as benchmarks/viewer.py does (made once)."""
    import pandas as pd
    from PIL import Image

    from stainmil.slides.write import write_pyramidal_tiff

    folder = work / f"big{px}x{copies}"
    if (folder / "attention" / "patches.csv").is_file():
        return folder
    read = {"dtype": {"case": str, "stain": str, "slice": str}}
    patches = pd.read_csv(run / "attention" / "patches.csv", **read)
    rng = np.random.default_rng(0)
    links = {}
    for stain, rows in patches.groupby("stain"):
        target = work / "big_slides" / f"{stain}_{px}.tiff"
        if not target.is_file():
            print(f"writing a {px} px {stain} slide …", file=sys.stderr)
            with Image.open(rows["path"].iloc[0]) as small:
                rgb = np.asarray(small.convert("RGB").resize((px, px), Image.BILINEAR)).astype(np.int16)
            rgb = np.clip(rgb + rng.integers(-6, 7, rgb.shape, dtype=np.int16), 0, 255).astype(np.uint8)
            target.parent.mkdir(parents=True, exist_ok=True)
            write_pyramidal_tiff(target, rgb, mpp=0.5, max_levels=8)
            del rgb
        links.update({path: target for path in rows["path"].unique()})
    (folder / "attention").mkdir(parents=True, exist_ok=True)
    if (run / "config.yaml").is_file():
        (folder / "config.yaml").write_bytes((run / "config.yaml").read_bytes())
    for name in ("attention/patches.csv", "attention/cases.csv", "attention/slices.csv", "predictions.csv"):
        if not (run / name).is_file():
            continue
        table = pd.read_csv(run / name, **read)
        parts = []
        for k in range(copies):
            part = table.assign(case=table["case"] + (f"-copy{k}" if k else ""))
            if "path" in part.columns and name == "attention/patches.csv":
                paths = {}
                for path, target in links.items():
                    link = folder / "slides" / f"copy{k}" / Path(path).relative_to(Path(path).parents[2])
                    link.parent.mkdir(parents=True, exist_ok=True)
                    if not link.is_symlink():
                        link.symlink_to(target)
                    paths[path] = str(link)
                part["path"] = part["path"].map(paths)
            parts.append(part)
        pd.concat(parts, ignore_index=True).to_csv(folder / name, index=False)
    return folder


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as handle:
        return dict(line.rstrip("\n").split(":\t", 1) for line in handle if ":\t" in line)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime


class Tally:
    def __init__(self) -> None:
        self.requests = self.errors = 0
        self.tile_seconds: list[float] = []
        self.error_kinds: dict[str, int] = {}

    def failed(self, what: str) -> None:
        self.errors += 1
        self.error_kinds[what] = self.error_kinds.get(what, 0) + 1


async def get(client, tally: Tally, url: str, **params):
    """The response of a GET (None when it failed: counted as an error)."""
    import httpx

    tally.requests += 1
    try:
        response = await client.get(url, params=params or None)
    except httpx.HTTPError as exc:
        tally.failed(type(exc).__name__)
        return None
    if response.status_code != 200:
        tally.failed(f"{response.status_code} {response.text[:120]}")
        return None
    return response


def tile_grid(dzi: str) -> tuple[int, list[tuple[int, int, int]]]:
    """(top level, [(level, columns, rows)] of the panned levels) from a .dzi descriptor."""
    root = ET.fromstring(dzi)
    size, tile = root[0].attrib, int(root.attrib["TileSize"])
    width, height = int(size["Width"]), int(size["Height"])
    top = max(0, int(np.ceil(np.log2(max(width, height, 1)))))
    levels = []
    for level in range(max(0, top - LEVELS_DEEP + 1), top + 1):
        scale = 2 ** (top - level)
        w, h = max(1, -(-width // scale)), max(1, -(-height // scale))
        levels.append((level, -(-w // tile), -(-h // tile)))
    return top, levels


async def opened_case(client, tally: Tally, rng: random.Random) -> list:
    """[(slide number, tile_grid)] of a random case, as its page opens it (case list, case, each .dzi)."""
    listing = await get(client, tally, "/api/cases")
    if listing is None:
        return []
    case = rng.choice(listing.json()["cases"])["case"]
    page = await get(client, tally, "/api/case", case=case)
    if page is None:
        return []
    grids = []
    for s in page.json()["slices"]:
        if s["kind"] != "none" and not s["problem"]:
            dzi = await get(client, tally, f"/slides/{s['id']}.dzi")
            if dzi is not None:
                grids.append((s["id"], tile_grid(dzi.text)))
    return grids


async def browser(base: str, seed: int, seconds: float, tally: Tally, ready: list, start: asyncio.Event) -> None:
    import httpx

    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as client:
        try:
            grids = await opened_case(client, tally, rng)
        finally:
            ready.append(seed)
        if not grids:
            return
        await start.wait()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            slide, (top, levels) = rng.choice(grids)
            level, cols, rows = rng.choices(levels, weights=[2.0 ** (lv - top) for lv, _, _ in levels])[0]
            started = time.perf_counter()
            if await get(client, tally, f"/slides/{slide}_files/{level}/{rng.randrange(cols)}_"
                                        f"{rng.randrange(rows)}.jpeg") is not None:
                tally.tile_seconds.append(time.perf_counter() - started)


async def load(base: str, clients: int, seconds: float, seed: int, pid: int) -> dict:
    tallies = [Tally() for _ in range(clients)]
    start, ready = asyncio.Event(), []
    tasks = [asyncio.create_task(browser(base, seed * 1000 + k, seconds, tallies[k], ready, start))
             for k in range(clients)]
    while len(ready) < clients:         # every browser has its case page and .dzi files: the pans start together
        await asyncio.sleep(0.05)
    cpu_before, began, own_before = cpu_seconds(pid), time.perf_counter(), time.process_time()
    start.set()
    await asyncio.gather(*tasks)
    elapsed, cpu = time.perf_counter() - began, cpu_seconds(pid) - cpu_before
    own = time.process_time() - own_before
    latency = np.array([s for t in tallies for s in t.tile_seconds]) * 1000
    kinds: dict[str, int] = {}
    for t in tallies:
        for what, n in t.error_kinds.items():
            kinds[what] = kinds.get(what, 0) + n
    return {"N": clients, "requests": sum(t.requests for t in tallies), "errors": sum(t.errors for t in tallies),
            "tiles/s": len(latency) / elapsed,
            **{f"p{q}": float(np.percentile(latency, q)) if len(latency) else float("nan") for q in (50, 95, 99)},
            "cpu": cpu / elapsed, "client_cpu": own / elapsed, "error_kinds": kinds}


def serve(folder: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(folder)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "STAINMIL_PROGRESS": "0"})
    url = process.stdout.readline().strip()
    if not url:
        process.wait()
        sys.exit(f"the viewer did not start on {folder} (exit {process.returncode}).")
    return process, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="A folder `stainmil view` opens (default: the demo run in WORK).")
    parser.add_argument("--work", type=Path, default=Path("/tmp/viewer_load_demo"))
    parser.add_argument("--clients", default="1,5,20", help="Comma-separated numbers of browsers.")
    parser.add_argument("--seconds", type=float, default=10.0, help="Panning time per N.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--big", type=int, default=0, metavar="PX",
                        help="Serve the run's cases with slides of PX px (made once in WORK; 0: its own slides).")
    parser.add_argument("--copies", type=int, default=5,
                        help="With --big: serve the run's cases this many times under other names.")
    args = parser.parse_args()
    run = (args.folder or demo_run(args.work.resolve())).resolve()
    folder = big_folder(run, args.work.resolve(), args.big, args.copies) if args.big else run
    rows = []
    for clients in (int(c) for c in args.clients.split(",")):
        process, url = serve(folder)
        try:
            row = asyncio.run(load(url, clients, args.seconds, args.seed, process.pid))
            row["rss"] = float("nan")
            if process.poll() is None:
                row["rss"] = int(proc_status(process.pid)["VmHWM"].split()[0]) / 1024
            else:
                row["error_kinds"][f"server died (exit {process.returncode})"] = 1
        finally:
            process.terminate()
            process.wait(20)
        rows.append(row)
        print(f"N={clients}: {row['tiles/s']:.1f} tiles/s, {row['errors']} errors {row['error_kinds'] or ''}",
              file=sys.stderr)
    print(f"`python benchmarks/viewer_load.py --folder {run} --clients {args.clients} --seconds {args.seconds:g}"
          f"{f' --big {args.big} --copies {args.copies}' if args.big else ''}` "
          f"({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f})\n")
    print("| N | requests | errors | tiles/s | p50 ms | p95 ms | p99 ms | server CPU (cores) | clients' CPU (cores) "
          "| server peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['N']} | {r['requests']} | {r['errors']} | {r['tiles/s']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} "
              f"| {r['p99']:.0f} | {r['cpu']:.2f} | {r['client_cpu']:.2f} | {r['rss']:.0f} |")
    for r in rows:
        if r["error_kinds"]:
            print(f"\nN={r['N']} errors: {r['error_kinds']}")


if __name__ == "__main__":
    main()
