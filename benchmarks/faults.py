"""Fault injection against a tiny cohort: each fault, what the user saw, whether the outputs verify afterwards
(`stainmil check`), whether a rerun finished the job, and how many files were lost or silently wrong. Prints a
markdown table (docs/faults.md).

    python benchmarks/faults.py WORK [--points 20] [--seed 0] [--only extract,train]

Every command is a real ``stainmil`` process. For each command, a reference run uninterrupted, then:

* **SIGKILL** and **SIGTERM** at ``--points`` random moments (a fixed seed; drawn over the reference run's
  duration) on one folder, each run resumed by the next; then one last run to the end. The outputs are compared
  with the reference's: ``lost`` counts the reference's files that are missing or differ (features, coordinates,
  verdicts, predictions).
* **two writers**: the same command started twice on one folder (the first paused while it holds its lock, so
  that the second meets it however short the command): the second must be refused with one sentence.
* **damage** (the feature store): one slice file truncated, one with a flipped byte; ``stainmil check`` must name
  both, ``--repair`` must mend them.
* **full disk** (extract): the store on a tmpfs too small for it (root); then space is freed and the same command
  finishes. Without root the row says it was not run.
* **read-only folder** (extract): the store's folder on a read-only tmpfs (root), else without write permission —
  said which; then made writable and the same command finishes.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import yaml

from stainmil.locks import LOCK_NAME
from stainmil.tables import render_table

ENV = {**os.environ, "STAINMIL_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
TINY = {"features": {"weights": "random", "image_size": 32, "num_workers": 0, "batch_size": 64},
        "model": {"embed_dim": 64, "attention_hidden_dim": 32},
        "train": {"max_epochs": 6, "cases_per_batch": 2, "early_stopping_patience": 50},
        "data": {"per_slice_cap": 8}, "eval": {"bootstrap": 50}}
TRIDENT_NAMES = r"case(?P<case>[^_]+)_(?P<stain>[^_]+)_slice(?P<slice>[^_.]+)"


def stainmil(*args, timeout: float | None = None) -> tuple[int, str, float]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "stainmil", *map(str, args)], capture_output=True, text=True,
                            env=ENV, timeout=timeout)
    return result.returncode, (result.stdout + result.stderr).strip(), time.perf_counter() - started


def killed_at(args: list, seconds: float, sig: int) -> tuple[int, str]:
    """Start ``stainmil args``, send ``sig`` after ``seconds`` (if it still runs); (exit code, output)."""
    process = subprocess.Popen([sys.executable, "-m", "stainmil", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        out, _ = process.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.send_signal(sig)
        out, _ = process.communicate()
    return process.returncode, out


def first_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:") or "Error" in line]
    return (lines[0] if lines else (output.splitlines() or [""])[-1])[:160]


@dataclass
class Job:
    """One command on its own folder: ``args(folder)``, the folder its outputs go to, how to compare them."""

    name: str
    args: callable
    outputs: callable
    compare: callable   # (folder, reference folder) -> files lost or differing


def prepared_with_tmpfs(folder: Path, prepare, target: Path, options: str) -> bool:
    """``folder`` made afresh and prepared, then a tmpfs mounted on ``target`` in it; False if mounting failed."""
    shutil.rmtree(folder, ignore_errors=True)
    prepare(folder)
    target.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                          capture_output=True).returncode == 0


def read_only_fault(job: Job, prepare, work: Path, reference: Path) -> dict:
    """The output folder on a read-only mount (root), else a folder without write permission; then made writable."""
    folder = work / f"{job.name}_read_only"
    target = folder / "features"
    mounted = prepared_with_tmpfs(folder, prepare, target, "ro,size=64k")
    how = "read-only tmpfs" if mounted else "chmod 555"
    if not mounted:
        target.chmod(0o555)
    try:
        code, out, _ = stainmil(*job.args(folder))
        saw = first_error(out) if code else "(finished: nothing refused the write)"
    finally:
        if mounted:
            subprocess.run(["umount", str(target)], check=True)
        target.chmod(0o755)
    rerun, _, _ = stainmil(*job.args(folder))
    checked, _, _ = stainmil("check", job.outputs(folder))
    return {"fault": f"read-only folder ({how})", "command": job.name, "user saw": saw,
            "check after": "ok" if checked == 0 else "failed", "rerun finished": rerun == 0,
            "lost": job.compare(folder, reference)}


def setup(work: Path) -> Path:
    """The tiny cohort (patch images) and serial-tiny slides, with a config for each (made once)."""
    if not (work / "tiny" / "cohort.yaml").is_file():
        assert stainmil("synth", "patches", "--out", work / "tiny", "--preset", "tiny")[0] == 0
    if not (work / "serial" / "cohort.yaml").is_file():
        assert stainmil("synth", "slides", "--out", work / "serial", "--preset", "serial-tiny")[0] == 0
    if not (work / "trident" / ".done").is_file():
        write_trident_job(work)
    return work


def write_trident_job(work: Path) -> None:
    """A TRIDENT job folder of the tiny cohort's cases (one slide per case and stain, seeded random features),
    in the layout tests/features/layouts.py writes (read from TRIDENT's own code), for `import-features`."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.features.layouts import write_trident

    rng = np.random.default_rng(0)
    cases = pd.read_csv(work / "tiny" / "labels.csv", dtype=str).iloc[:, 0]
    slides = {f"case{case}_{stain}_slice0": (rng.normal(size=(40, 64)).astype(np.float32),
                                             np.stack(np.meshgrid(np.arange(8), np.arange(5)), -1).reshape(-1, 2) * 512)
              for case in cases for stain in ("he", "melan", "sox10")}
    write_trident(work / "trident", slides, "conch_v15", mag=20, patch_px=256)
    (work / "trident" / ".done").write_text("")


def config_for(work: Path, folder: Path, route: str) -> Path:
    """A config writing everything under ``folder`` (patch route: the tiny cohort; slides: serial-tiny)."""
    base = yaml.safe_load((work / ("serial" if route == "slides" else "tiny") / "cohort.yaml").read_text())
    base = {**base, **{k: {**base.get(k, {}), **v} for k, v in TINY.items()}, "output_dir": str(folder)}
    if route == "slides":
        slides = yaml.safe_load((work / "serial" / "slides.yaml").read_text()) \
            if (work / "serial" / "slides.yaml").is_file() else {}
        base["data"] = {**base["data"], "source": "slides"}
        base["tile"] = {**slides.get("tile", {}), "slices_dir": str(work / "serial" / "slides"),
                        "out_dir": str(folder / "tiles"), "mpp": 0.5, "patch_size": 32, "mask_downsample": 1}
        base["register"] = {"max_side": 192}
    if route == "trident":  # the tiny cohort's labels; slides named as the TRIDENT job names them
        base["tile"] = {**base.get("tile", {}), "filename_pattern": TRIDENT_NAMES}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def store_arrays(store: Path) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(store.rglob("*.h5")):
        with h5py.File(path, "r") as h5:
            out[path.name] = h5["features"][()]
    return out


def compare_store(folder: Path, reference: Path) -> int:
    """Reference slices missing or different beyond float16 rounding (a slice extracted again in another batch
    composition differs in the last bits on CPU: not a wrong file)."""
    a, b = store_arrays(folder / "features"), store_arrays(reference / "features")
    return sum(1 for name, arr in b.items() if name not in a or a[name].shape != arr.shape
               or not np.allclose(a[name].astype(np.float32), arr.astype(np.float32), rtol=1e-2, atol=1e-2))


def compare_table(name: str, key: list[str], columns: list[str]):
    def compare(folder: Path, reference: Path) -> int:
        found, wanted = sorted(folder.rglob(name)), sorted(reference.rglob(name))
        if len(found) != len(wanted):
            return abs(len(wanted) - len(found))
        lost = 0
        for a, b in zip(found, wanted):
            x, y = pd.read_csv(a, dtype=str), pd.read_csv(b, dtype=str)
            keep = [c for c in columns if c in y.columns]
            x, y = (t.sort_values(key)[keep].reset_index(drop=True) for t in (x, y))
            lost += int(not x.equals(y))
        return lost
    return compare


def latest_run(folder: Path) -> Path | None:
    """The newest run that began (wrote its config); a run killed before that is only an empty folder."""
    runs = sorted(r for r in (folder / "runs").glob("run_*") if (r / "config.yaml").is_file())
    return runs[-1] if runs else None


def jobs(work: Path) -> tuple[list[Job], dict]:
    """The commands, and for each how its folder is prepared (the steps before it)."""
    def prepared(folder: Path, route: str, steps: tuple[str, ...]) -> Path:
        config = config_for(work, folder, route)
        for step in steps:
            assert stainmil(step, "--config", config)[0] == 0, step
        return config

    def train_args(folder: Path) -> list:
        run = latest_run(folder)
        return ["train", "--resume", run] if run else ["train", "--config", folder / "config.yaml"]

    return [
        Job("tile", lambda f: ["tile", "--config", config_for(work, f, "slides")],
            lambda f: f / "tiles", compare_table("tiles.csv", ["stain", "case", "slice", "patch"],
                                                 ["case", "stain", "slice", "patch", "x", "y"])),
        Job("extract", lambda f: ["extract", "--config", f / "config.yaml"], lambda f: f / "features",
            compare_store),
        Job("register", lambda f: ["register", "--config", f / "config.yaml"], lambda f: f / "tiles",
            compare_table("registrations.csv", ["case", "stain", "slice"], ["case", "stain", "slice", "verdict"])),
        Job("train", train_args, lambda f: f / "runs",
            compare_table("predictions.csv", ["case"], ["case", "split", "label", "pred"])),
        Job("cv", lambda f: ["cv", "--config", f / "config.yaml", "--folds", 2, "--resume", f / "cv"],
            lambda f: f / "cv", compare_table("oof_predictions.csv", ["case"], ["case", "label", "pred"])),
        Job("import-features", lambda f: ["import-features", work / "trident", "--config", f / "config.yaml"],
            lambda f: f / "features", compare_store),
        Job("compare-models", lambda f: ["compare-models", "--config", f / "config.yaml", "--models",
                                         "hierarchical,abmil", "--folds", 2,
                                         *(["--resume", f / "cmp"] if (f / "cmp" / "splits").is_dir()
                                           else ["--out", f / "cmp"])],
            lambda f: f / "cmp", compare_table("oof_predictions.csv", ["case"], ["case", "label", "pred"])),
    ], {"tile": lambda f: config_for(work, f, "slides"),
        "extract": lambda f: prepared(f, "patches", ("index", "split")),
        "register": lambda f: prepared(f, "slides", ("tile",)),
        "train": lambda f: prepared(f, "patches", ("index", "split", "extract")),
        "cv": lambda f: prepared(f, "patches", ("index", "extract")),
        "import-features": lambda f: config_for(work, f, "trident"),
        "compare-models": lambda f: prepared(f, "patches", ("index", "extract"))}


def run_to_end(job: Job, folder: Path) -> tuple[int, str]:
    code, out, _ = stainmil(*job.args(folder))
    return code, out


def kill_fault(job: Job, prepare, work: Path, reference: Path, seconds: float, sig: int, points: int,
               rng: random.Random) -> dict:
    folder = work / f"{job.name}_{signal.Signals(sig).name.lower()}"
    shutil.rmtree(folder, ignore_errors=True)
    prepare(folder)
    seen = ""
    for _ in range(points):
        code, out = killed_at(job.args(folder), rng.uniform(0.5, max(1.0, seconds)), sig)
        seen = seen or (first_error(out) if code not in (0, -sig) else "")
    code, out = run_to_end(job, folder)
    checked, check_out, _ = stainmil("check", job.outputs(folder))
    return {"fault": f"{signal.Signals(sig).name} x{points}", "command": job.name,
            "user saw": seen or f"(killed; rerun: exit {code})", "check after": "ok" if checked == 0 else
            first_error(check_out), "rerun finished": code == 0, "lost": job.compare(folder, reference)}


def held_lock(folder: Path) -> bool:
    """Whether a process holds a stainmil lock anywhere under ``folder`` now."""
    for lock in folder.rglob(LOCK_NAME):
        with open(lock) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def concurrency_fault(job: Job, prepare, work: Path) -> dict:
    """The command started twice: the first is paused (SIGSTOP) once it holds its folder's lock — a process
    stalled on a slow disk — so that the second always meets it whatever the command's length; then resumed."""
    folder = work / f"{job.name}_twice"
    shutil.rmtree(folder, ignore_errors=True)
    prepare(folder)
    first = subprocess.Popen([sys.executable, "-m", "stainmil", *map(str, job.args(folder))], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=ENV)
    # train: the second must find the first's run folder (`train --resume`); a second `train --config` is a new run
    while first.poll() is None and not (held_lock(folder) and (job.name != "train" or latest_run(folder))):
        time.sleep(0.02)
    paused = first.poll() is None
    if paused:
        first.send_signal(signal.SIGSTOP)
    try:
        code, out, _ = stainmil(*job.args(folder))
    finally:
        if paused:
            first.send_signal(signal.SIGCONT)
    first_out, _ = first.communicate()
    checked, check_out, _ = stainmil("check", job.outputs(folder))
    return {"fault": "started twice", "command": job.name,
            "user saw": first_error(out) if code else "(second ran: the first had finished before it held a lock)",
            "check after": "ok" if checked == 0 else first_error(check_out),
            "rerun finished": first.returncode == 0, "lost": 0 if first.returncode == 0 else "first failed"}


def damage_fault(work: Path, reference: Path) -> dict:
    folder = work / "extract_damaged"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(reference, folder)
    store = next((folder / "features").iterdir())
    files = sorted(store.rglob("*.h5"))
    with open(files[0], "r+b") as handle:
        handle.truncate(files[0].stat().st_size // 2)
    with h5py.File(files[1], "r") as h5:
        offset = h5["features"].id.get_offset()
    with open(files[1], "r+b") as handle:
        handle.seek(offset + 64)
        byte = handle.read(1)
        handle.seek(offset + 64)
        handle.write(bytes([byte[0] ^ 0xFF]))
    code, out, _ = stainmil("check", store)
    named = sum(str(f) in out for f in files[:2])
    repaired, _, _ = stainmil("check", store, "--repair")
    after, _, _ = stainmil("check", store)
    return {"fault": "truncated + flipped byte", "command": "extract (store)",
            "user saw": f"check: exit {code}, {named}/2 files named", "check after": "ok" if after == 0 else "failed",
            "rerun finished": repaired == 0, "lost": compare_store(folder, reference)}


def full_disk_fault(job: Job, prepare, work: Path, reference: Path) -> dict:
    folder = work / "extract_full"
    store = folder / "features"
    mounted = prepared_with_tmpfs(folder, prepare, store, "size=48k")
    if not mounted:
        return {"fault": "full disk", "command": job.name, "user saw": "not run: mounting a tmpfs needs root",
                "check after": "-", "rerun finished": False, "lost": "-"}
    try:
        code, out, _ = stainmil(*job.args(folder))
        saw = first_error(out) if code else "(finished: the store fit)"
        subprocess.run(["mount", "-o", "remount,size=64m", str(store)], check=True)   # space freed
        rerun, _, _ = stainmil(*job.args(folder))
        checked, _, _ = stainmil("check", store)
        lost = compare_store(folder, reference)
    finally:
        kept = folder / "features_kept"
        shutil.copytree(store, kept)
        subprocess.run(["umount", str(store)], check=True)
        shutil.rmtree(store)
        kept.rename(store)
    return {"fault": "full disk (tmpfs 48 KiB)", "command": job.name, "user saw": saw,
            "check after": "ok" if checked == 0 else "failed", "rerun finished": rerun == 0, "lost": lost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    work = setup(args.work.resolve())
    rng = random.Random(args.seed)
    all_jobs, preparers = jobs(work)
    wanted = [j for j in all_jobs if not args.only or j.name in args.only.split(",")]
    rows = []
    for job in wanted:
        reference = work / f"{job.name}_reference"
        if not (reference / ".done").is_file():
            shutil.rmtree(reference, ignore_errors=True)
            preparers[job.name](reference)
            started = time.perf_counter()
            code, out = run_to_end(job, reference)
            assert code == 0, out[-2000:]
            (reference / ".done").write_text(f"{time.perf_counter() - started}\n")
        seconds = float((reference / ".done").read_text())
        for sig in (signal.SIGKILL, signal.SIGTERM):
            rows.append(kill_fault(job, preparers[job.name], work, reference, seconds, sig, args.points, rng))
        rows.append(concurrency_fault(job, preparers[job.name], work))
        if job.name == "extract":
            rows.append(damage_fault(work, reference))
            rows.append(full_disk_fault(job, preparers[job.name], work, reference))
            rows.append(read_only_fault(job, preparers[job.name], work, reference))
        print(pd.DataFrame(rows[-3:]).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    print(f"\n`python benchmarks/faults.py WORK --points {args.points} --seed {args.seed}`\n")
    print(render_table(table.to_dict("records"), fmt="markdown"))


if __name__ == "__main__":
    main()
