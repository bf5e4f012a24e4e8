"""stainmil's registration next to an open peer, DeeperHistReg (PyPI ``deeperhistreg`` 1.0.1), on the same
synthetic serial pairs: landmark error in µm, seconds per pair, and what each says about a pair from two blocks.

    stainmil synth serial --out WORK --section-mm 2 --mpp 0.5 --cases 2
    python benchmarks/registration_peers.py WORK [--pairs N] [--skip-peer] [--venv DIR]

Pairs: every IHC slide of a case onto its H&E (fixed = H&E; the first ``--pairs`` of them), and, with two cases
or more, case 1's H&E with case 2's SOX10 (two blocks: no right answer exists). stainmil runs in this process
(``register_slides`` with the default ``register`` settings); DeeperHistReg runs on the CPU in a subprocess of its
own virtual environment (``--venv``, default ``~/.cache/stainmil-peers/deeperhistreg-venv``, made with
``python -m venv`` and plain PyPI the first time: it is no dependency of stainmil) with its fast preset
``default_initial_nonrigid_fast`` (rigid feature matching, then a dense nonrigid step), and hands back its
displacement field. That field maps fixed points to moving ones, at its own working resolution (the slides read
at 0.2 x level 0, padded to one shape, its shorter side at most 2048 px); it is scaled back to level-0 µm here and
inverted (nearest sample, then Newton steps) to carry the moving landmarks onto the fixed slide, as stainmil's
transform does. A pair is face down when the best affine fit of its moving landmarks onto the fixed ones has a
negative determinant (a mirrored section).

Prints a markdown table — pair | face down | per tool: median / p90 landmark error (µm), seconds, and stainmil's
verdict (DeeperHistReg gives none) — and one summary line per tool over the same-block pairs. On the two-block
pair the landmarks share ids but no tissue, so its "error" is only the distance to unrelated points: what counts
there is whether the tool says ``failed`` or silently returns a transform.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from stainmil.config import load_config
from stainmil.data.register_cohort import register_slides
from stainmil.data.serial_wsi import landmarks_of
from stainmil.slides.reader import Slide

PEER = "deeperhistreg==1.0.1"
# The 1.0.1 wheel declares no dependencies (its pyproject's dependency table is one hatchling does not read), so
# what it imports is installed by name: pyvips and OpenSlide with their PyPI-built libraries (no system libvips).
PEER_NEEDS = ["numpy", "scipy", "matplotlib", "pillow", "opencv-contrib-python", "SimpleITK", "torch", "torchvision",
              "pyvips[binary]", "openslide-python", "openslide-bin"]
PRESET = "default_initial_nonrigid_fast"
DEFAULT_VENV = Path("~/.cache/stainmil-peers/deeperhistreg-venv")
SLIDE_NAME = re.compile(r"^(C\d+)_([A-Za-z0-9]+)_S(\d+)$")

# Run with the peer's python: register one pair, write its displacement field and the geometry that places it.
RUNNER = r'''
import json, pathlib, sys, time
import numpy as np
job = json.loads(sys.argv[1])
out = pathlib.Path(job["out"])
import deeperhistreg
import SimpleITK as sitk
from deeperhistreg.dhr_input_output.dhr_loaders.tiff_loader import TIFFLoader
params = getattr(deeperhistreg.configs, job["preset"])()
params["device"] = "cpu"
params["initial_registration_params"].update(device="cpu", cuda=False)
params["nonrigid_registration_params"]["device"] = "cpu"
params["save_final_images"] = False  # the field is enough: no full-resolution warped slide
started = time.perf_counter()
deeperhistreg.run_registration(source_path=job["moving"], target_path=job["fixed"], output_path=str(out),
                               registration_parameters=params, case_name="pair", save_displacement_field=True,
                               copy_target=False, delete_temporary_results=True, temporary_path=str(out / "work"))
seconds = time.perf_counter() - started
if not (out / "displacement_field.mha").is_file():
    sys.exit("DeeperHistReg wrote no displacement field")
field = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement_field.mha")))
padding = json.loads((out / "postprocessing_params.json").read_text())
ratio = params["loading_params"]["source_resample_ratio"], params["loading_params"]["target_resample_ratio"]
loaded = [TIFFLoader(job[k]).resample(r).shape[:2] for k, r in zip(("moving", "fixed"), ratio)]
np.savez(out / "field.npz", field=field.astype(np.float32), pad_moving=np.array(padding["pad_1"]),
         pad_fixed=np.array(padding["pad_2"]), loaded_moving=np.array(loaded[0]), loaded_fixed=np.array(loaded[1]),
         seconds=seconds)
'''


class PeerUnavailable(Exception):
    """DeeperHistReg could not be installed or run; the message is one sentence saying why."""


@dataclass
class Pair:
    name: str
    fixed: Path
    moving: Path
    same_block: bool


@dataclass
class Outcome:
    errors: np.ndarray | None  # µm per shared landmark; None: no transform
    seconds: float
    verdict: str = ""
    note: str = ""


def find_pairs(slides: Path, limit: int | None) -> list[Pair]:
    """Every IHC slide of a case onto its H&E (the first ``limit``), then case 1's H&E <- case 2's SOX10."""
    by_case: dict[str, dict[str, Path]] = {}
    for path in sorted(slides.glob("*.tiff")):
        match = SLIDE_NAME.match(path.stem)
        if match:
            by_case.setdefault(match.group(1), {})[match.group(2)] = path
    pairs = [Pair(f"{case} {stain} → HE", stains["HE"], path, True)
             for case, stains in sorted(by_case.items()) if "HE" in stains
             for stain, path in stains.items() if stain != "HE"]
    pairs = pairs[:limit] if limit else pairs
    cases = sorted(by_case)
    if len(cases) >= 2 and "HE" in by_case[cases[0]] and "SOX10" in by_case[cases[1]]:
        pairs.append(Pair(f"{cases[1]} SOX10 → {cases[0]} HE (two blocks)", by_case[cases[0]]["HE"],
                          by_case[cases[1]]["SOX10"], False))
    return pairs


def shared_landmarks(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """(fixed, moving) landmarks of the ids both slides carry, (N, 2) level-0 µm each."""
    fixed, moving = landmarks_of(pair.fixed), landmarks_of(pair.moving)
    if fixed is None or moving is None:
        sys.exit(f"{pair.fixed} or {pair.moving} has no _landmarks.csv beside it: write the slides with stainmil synth")
    ids = fixed.index.intersection(moving.index)
    return fixed.loc[ids].to_numpy(float), moving.loc[ids].to_numpy(float)


def face_down(fixed: np.ndarray, moving: np.ndarray) -> bool:
    """Whether the best affine map of the moving landmarks onto the fixed ones mirrors (negative determinant)."""
    design = np.column_stack([moving, np.ones(len(moving))])
    affine, *_ = np.linalg.lstsq(design, fixed, rcond=None)
    return bool(np.linalg.det(affine[:2].T) < 0)


def geometry(path: Path) -> tuple[float, np.ndarray]:
    """(level-0 µm per px, level-0 (width, height) px) of a slide."""
    slide = Slide(path)
    try:
        if not slide.mpp:
            sys.exit(f"{path} records no µm per pixel")
        return slide.mpp, np.array(slide.dimensions, float)
    finally:
        slide.close()


def run_stainmil(pair: Pair, fixed_lm: np.ndarray, moving_lm: np.ndarray) -> Outcome:
    (fixed_mpp, fixed_size), (moving_mpp, moving_size) = geometry(pair.fixed), geometry(pair.moving)
    started = time.perf_counter()
    result, _ = register_slides(pair.fixed, pair.moving, (fixed_mpp, moving_mpp),
                                (fixed_size.max() * fixed_mpp, moving_size.max() * moving_mpp),
                                load_config(None).register)
    seconds = time.perf_counter() - started
    errors = None if result.transform is None else np.linalg.norm(
        result.transform.moving_to_fixed(moving_lm) - fixed_lm, axis=1)
    return Outcome(errors, seconds, result.quality.verdict)


def pip_environment() -> dict[str, str]:
    """This process's environment without any pip setting: no config file (global constraints, local wheel
    folders, extra indexes) and no PIP_* variable (e.g. PIP_FIND_LINKS), so every wheel comes from PyPI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def peer_python(venv: Path) -> Path:
    """The peer venv's python, the venv made and filled first when it is missing (or never finished)."""
    python, done = venv / "bin" / "python", venv / ".stainmil-installed"
    if done.is_file():
        return python
    print(f"installing {PEER} into {venv} (PyPI only; torch is a large download) ...", file=sys.stderr, flush=True)
    env = pip_environment()
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "--isolated", "--index-url", "https://pypi.org/simple", PEER,
              *PEER_NEEDS],
             [str(python), "-c", "import deeperhistreg"]]
    for step in steps:
        done_step = subprocess.run(step, env=env, capture_output=True, text=True)
        if done_step.returncode != 0:
            last = (done_step.stderr.strip() or done_step.stdout.strip() or "no output").splitlines()[-1]
            raise PeerUnavailable(f"DeeperHistReg could not be installed into {venv}: `{' '.join(step[:4])} ...` "
                                  f"failed ({last}).")
    done.write_text(f"{PEER} {' '.join(PEER_NEEDS)}\n")
    return python


class PeerField:
    """DeeperHistReg's displacement field placed on both slides: its grid is the padded pair at its working
    resolution, a vector per grid pixel (x, y in grid pixels, pixel centres at +0.5) from a fixed point to the
    moving point that the warped moving slide shows there."""

    def __init__(self, saved: Path, fixed: tuple[float, np.ndarray], moving: tuple[float, np.ndarray]) -> None:
        data = np.load(saved)
        self.field = data["field"].astype(float)  # (2, H, W)
        self.seconds = float(data["seconds"])
        grid = np.array(self.field.shape[:0:-1], float)  # (W, H)
        self.frames = {}
        for name, (mpp, size) in (("fixed", fixed), ("moving", moving)):
            pads = data[f"pad_{name}"]  # ((top, bottom), (left, right)) px at the loaded scale
            loaded = data[f"loaded_{name}"][::-1].astype(float)  # (width, height) px read at 0.2 x level 0
            padded = loaded + pads.sum(axis=1)[::-1]
            # µm -> grid px: level-0 px, the read scale, the padding before, the padded frame onto the grid
            self.frames[name] = (loaded / size / mpp * grid / padded, pads[::-1, 0] * grid / padded)
        self.grid_um = float(1 / self.frames["fixed"][0][0])  # µm per grid px on the fixed slide

    def _to_grid(self, points_um: np.ndarray, frame: str) -> np.ndarray:
        scale, offset = self.frames[frame]
        return points_um * scale + offset

    def _from_grid(self, points: np.ndarray, frame: str) -> np.ndarray:
        scale, offset = self.frames[frame]
        return (points - offset) / scale

    def _forward(self, points: np.ndarray) -> np.ndarray:
        """Grid points (N, 2) of the fixed slide -> where the moving slide is sampled for them."""
        rows, cols = points[:, 1] - 0.5, points[:, 0] - 0.5
        shift = [ndimage.map_coordinates(self.field[c], [rows, cols], order=1, mode="nearest") for c in (0, 1)]
        return points + np.stack(shift, axis=1)

    def fixed_to_moving(self, points_um: np.ndarray) -> np.ndarray:
        return self._from_grid(self._forward(self._to_grid(points_um, "fixed")), "moving")

    def moving_to_fixed(self, points_um: np.ndarray, steps: int = 20) -> np.ndarray:
        """The inverse of :meth:`fixed_to_moving`: the nearest grid sample, then Newton steps on the bilinear field."""
        target = self._to_grid(points_um, "moving")
        height, width = self.field.shape[1:]
        ys, xs = np.mgrid[0:height, 0:width] + 0.5
        centres = np.stack([xs.ravel(), ys.ravel()], axis=1)
        _, nearest = cKDTree(self._forward(centres)).query(target)
        points = centres[nearest]
        h = 0.25
        for _ in range(steps):
            residual = target - self._forward(points)
            jacobian = np.stack([(self._forward(points + [h, 0]) - self._forward(points - [h, 0])) / (2 * h),
                                 (self._forward(points + [0, h]) - self._forward(points - [0, h])) / (2 * h)], axis=2)
            step = np.einsum("nij,nj->ni", np.linalg.pinv(jacobian), residual)
            points = points + np.clip(step, -2.0, 2.0)
            if np.abs(step).max() < 1e-3:
                break
        return self._from_grid(points, "fixed")


def run_peer(python: Path, pair: Pair, fixed_lm: np.ndarray, moving_lm: np.ndarray, work: Path) -> Outcome:
    out = work / re.sub(r"[^A-Za-z0-9]+", "_", pair.name)
    out.mkdir(parents=True, exist_ok=True)
    runner = work / "dhr_runner.py"
    runner.write_text(RUNNER)
    job = {"fixed": str(pair.fixed), "moving": str(pair.moving), "out": str(out), "preset": PRESET}
    env = {**pip_environment(), "CUDA_VISIBLE_DEVICES": ""}
    started = time.perf_counter()
    done = subprocess.run([str(python), str(runner), json.dumps(job)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0 or not (out / "field.npz").is_file():
        said = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        reason = next((line for line in said if line.startswith("Exception:")), said[-1] if said else "no output")
        return Outcome(None, wall, note=f"DeeperHistReg failed on {pair.name}: {reason}")
    mapping = PeerField(out / "field.npz", geometry(pair.fixed), geometry(pair.moving))
    errors = np.linalg.norm(mapping.moving_to_fixed(moving_lm) - fixed_lm, axis=1)
    return Outcome(errors, mapping.seconds, note=f"{mapping.grid_um:.1f} µm/px")


def cell(outcome: Outcome | None) -> tuple[str, str]:
    if outcome is None:
        return "not run", "—"
    if outcome.errors is None:
        return ("no transform" if outcome.verdict else "run failed"), f"{outcome.seconds:.1f}"
    return (f"{np.median(outcome.errors):.1f} / {np.percentile(outcome.errors, 90):.1f}", f"{outcome.seconds:.1f}")


def summary(tool: str, outcomes: list[Outcome | None], face: list[bool]) -> str:
    ran = [(o, f) for o, f in zip(outcomes, face) if o is not None]
    mapped = [(o, f) for o, f in ran if o.errors is not None]
    if not mapped:
        return f"{tool}: no same-block pair mapped"
    every = np.concatenate([o.errors for o, _ in mapped])
    line = (f"{tool}: {len(mapped)} of {len(ran)} same-block pairs mapped, {len(every)} landmarks, median "
            f"{np.median(every):.1f} µm, p90 {np.percentile(every, 90):.1f} µm, "
            f"{np.mean([o.seconds for o, _ in ran]):.1f} s per pair")
    for down, label in ((False, "face up"), (True, "face down")):
        part = [o.errors for o, f in mapped if f == down]
        if part:
            line += f"; {label} median {np.median(np.concatenate(part)):.1f} µm"
    verdicts = [o.verdict for o, _ in ran if o.verdict]
    if verdicts:
        line += "; verdicts " + ", ".join(f"{v} {verdicts.count(v)}" for v in sorted(set(verdicts)))
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="folder written by stainmil synth serial (or its slides/)")
    parser.add_argument("--pairs", type=int, default=None, help="only the first N same-block pairs (the "
                        "two-block pair is run too)")
    parser.add_argument("--skip-peer", action="store_true", help="run stainmil only")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="DeeperHistReg's own virtual environment")
    options = parser.parse_args()
    work = options.work.expanduser().resolve()
    slides = work / "slides" if (work / "slides").is_dir() else work
    pairs = find_pairs(slides, options.pairs)
    if not pairs:
        sys.exit(f"no C###_<stain>_S#.tiff pairs with an HE slide in {slides}: write them with stainmil synth serial")
    python, notes = None, []
    if not options.skip_peer:
        try:
            python = peer_python(options.venv.expanduser().resolve())
        except PeerUnavailable as exc:
            notes.append(str(exc))
    rows, ours, theirs, faces = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="stainmil-peers-") as temp:
        for pair in pairs:
            fixed_lm, moving_lm = shared_landmarks(pair)
            down = face_down(fixed_lm, moving_lm) if pair.same_block else None
            print(f"{pair.name}: stainmil ...", file=sys.stderr, flush=True)
            mine = run_stainmil(pair, fixed_lm, moving_lm)
            peer = None
            if python is not None:
                print(f"{pair.name}: DeeperHistReg ...", file=sys.stderr, flush=True)
                peer = run_peer(python, pair, fixed_lm, moving_lm, Path(temp))
                if peer.errors is None:
                    notes.append(peer.note)
            if pair.same_block:
                ours.append(mine)
                theirs.append(peer)
                faces.append(down)
            rows.append((pair, down, mine, peer))
    fixed_mpp, fixed_size = geometry(pairs[0].fixed)
    resolution = next((p.note for *_, p in rows if p is not None and p.errors is not None), "")
    peer = "DeeperHistReg not run" if python is None else (
        f"DeeperHistReg {PEER.split('==')[1]} preset {PRESET} on CPU"
        + (f", registering at {resolution}" if resolution else ""))
    print(f"# {len(pairs)} pairs, slides {int(fixed_size[0]):,} px at {fixed_mpp:g} µm/px; {peer}\n")
    print("| pair | face down | stainmil median / p90 µm | stainmil s | stainmil verdict | "
          "DeeperHistReg median / p90 µm | DeeperHistReg s |\n|---|---|---|---|---|---|---|")
    for pair, down, mine, peer in rows:
        face = "—" if down is None else ("yes" if down else "no")
        print(f"| {pair.name} | {face} | {' | '.join(cell(mine))} | {mine.verdict} | {' | '.join(cell(peer))} |")
    print()
    print(summary("stainmil", ours, faces))
    if python is not None:
        print(summary(f"DeeperHistReg ({PRESET})", theirs, faces))
    for pair, _, mine, peer in rows:
        if not pair.same_block:
            said = "no verdict, returned a transform" if peer is not None and peer.errors is not None else "no result"
            print(f"{pair.name}: stainmil says {mine.verdict}; DeeperHistReg: "
                  + (said if peer is not None else "not run")
                  + " (its landmarks share ids, not tissue: the error there is to unrelated points)")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
