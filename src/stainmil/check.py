"""``stainmil check FOLDER``: verify what stainmil wrote — a feature store, tiles, registrations, a run, or a whole
``output_dir`` (everything under it) — and list each damaged or missing file with what to rerun.

What is checked, by the file that marks each kind of folder:

====================  ==========================================================================================
``store.json``        a feature store: every slice file opens and its features match the checksum written with
                      them; with the store's ``config.yaml`` and the cohort's index, every indexed slice has a file
``tiles.csv``         tiles: every slide's coordinates file opens and matches its checksum; its mask and
                      thumbnail exist
``registrations.csv`` registrations: every pair's transform file opens and matches its checksum
``status.json``       a run: its checkpoints load, ``metrics.json`` parses, ``predictions.csv`` reads
====================  ==========================================================================================

and, anywhere, temporary files an interrupted write left (``.*.tmp``: listed, not counted as damage — a killed
writer leaves its temporary, never a half file under the real name).

``--repair`` reruns only what is damaged: damaged or missing store files are removed and extracted again (with
the store's own settings), damaged coordinates and transforms removed and the tiling or registration resumed (with
the cohort's config: the store's, or ``--config``), temporary files removed. A run cannot be repaired: it says what
to train again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from stainmil.config import Config, load_config
from stainmil.data.cohort import load_manifest
from stainmil.data.register_cohort import register_cohort
from stainmil.data.registration import read_pair
from stainmil.data.tiling import tile_folder, tissue_mask_of
from stainmil.errors import DataError, StainmilError
from stainmil.features.extract import extract_features
from stainmil.features.store import STORE_META, read_slice, slice_file
from stainmil.run_files import BEST, LAST, RunFiles
from stainmil.slides.coords import read_coords
from stainmil.train.checkpoint import load_checkpoint


@dataclass
class Finding:
    path: Path
    problem: str        # what is wrong, one sentence
    rerun: str          # what to run to mend it
    kind: str           # store | tiles | registration | run


@dataclass
class CheckResult:
    folder: Path
    checked: dict[str, int] = field(default_factory=dict)  # kind -> files verified
    findings: list[Finding] = field(default_factory=list)
    litter: list[Path] = field(default_factory=list)     # temporaries of interrupted writes: nothing lost
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def text(self) -> str:
        lines = [f"stainmil check {self.folder}: " + ", ".join(f"{n} {kind} file(s)" for kind, n in
                                                                self.checked.items())]
        lines += [f"  {f.kind}: {f.path}: {f.problem} -> {f.rerun}" for f in self.findings]
        if self.litter:
            lines.append(f"  {len(self.litter)} temporary file(s) left by interrupted writes (nothing finished is "
                         f"lost; --repair removes them), e.g. {self.litter[0]}")
        lines += [f"  repaired: {r}" for r in self.repaired]
        lines.append("all verified" if self.ok else f"{len(self.findings)} damaged or missing file(s)")
        return "\n".join(lines)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def check_store(store: Path, result: CheckResult) -> None:
    files = sorted(p for p in store.rglob("*.h5") if not p.name.startswith("."))
    rerun = f"stainmil check {store} --repair (or delete it and run `stainmil extract`)"
    for path in files:
        try:
            read_slice(path)
        except StainmilError as exc:
            result.findings.append(Finding(path, f"damaged ({getattr(exc, 'detail', exc)})", rerun, "store"))
    result.checked["store"] = result.checked.get("store", 0) + len(files)
    config = _config(store / "config.yaml")
    if config is None or not config.paths.manifest.is_file():
        return

    keys = load_manifest(config, ["case", "stain", "slice"]).drop_duplicates()
    for case, stain, slice_id in keys.itertuples(index=False):
        path = slice_file(store, case, stain, slice_id)
        if not path.is_file():
            result.findings.append(Finding(path, "missing: indexed but never written (or deleted)", rerun, "store"))


def check_tiles(tiles: Path, result: CheckResult) -> None:
    table = pd.read_csv(tiles / "tiles.csv", usecols=lambda c: c in ("slide", "thumbnail"), dtype=str,
                        keep_default_na=False)
    thumbs = sorted(set(table.get("thumbnail", pd.Series(dtype=str))) - {""})
    rerun = f"stainmil check {tiles} --repair --config <cohort config> (or delete it and run `stainmil tile`)"
    coords = sorted((tiles / "coords").glob("*.h5"))
    for path in coords:
        try:
            read_coords(path)
        except DataError:
            result.findings.append(Finding(path, "damaged (its coordinates do not match their checksum)", rerun,
                                           "tiles"))
        except (OSError, KeyError, ValueError) as exc:
            result.findings.append(Finding(path, f"damaged ({_error(exc)})", rerun, "tiles"))
    for thumb in map(Path, thumbs):
        mask = tissue_mask_of(thumb)
        for path in (thumb, mask):
            if not path.is_file():
                result.findings.append(Finding(path, "missing", rerun, "tiles"))
    result.checked["tiles"] = result.checked.get("tiles", 0) + len(coords)


def check_registrations(folder: Path, result: CheckResult) -> None:
    table = pd.read_csv(folder / "registrations.csv", dtype=str, keep_default_na=False)
    rerun = (f"stainmil check {folder} --repair --config <cohort config> (or delete it and run "
             "`stainmil register`)")
    count = 0
    for name in table.get("transform", pd.Series(dtype=str)):
        path = folder / "transforms" / Path(name).name
        count += 1
        if not path.is_file():
            result.findings.append(Finding(path, "missing", rerun, "registration"))
            continue
        try:
            read_pair(path)
        except DataError:
            result.findings.append(Finding(path, "damaged (its transform does not match its checksum)", rerun,
                                           "registration"))
        except (OSError, KeyError, ValueError) as exc:
            result.findings.append(Finding(path, f"damaged ({_error(exc)})", rerun, "registration"))
    result.checked["registration"] = result.checked.get("registration", 0) + count


def check_run(run: Path, result: CheckResult) -> None:
    retrain = f"stainmil train --resume {run} (from last.pth), else train again"
    count = 0
    for name in (BEST, LAST):
        path = RunFiles.of(run).checkpoint(name)
        if path.is_file():
            count += 1
            try:
                load_checkpoint(path)
            except StainmilError as exc:
                result.findings.append(Finding(path, f"damaged ({_error(exc.__cause__ or exc)})", retrain, "run"))
    for name, reader in (("metrics.json", lambda p: json.loads(p.read_text())),
                         ("predictions.csv", pd.read_csv), ("config.yaml", load_config)):
        path = run / name
        if path.is_file():
            count += 1
            try:
                reader(path)
            except Exception as exc:  # noqa: BLE001 - any way a file fails to parse is damage to report
                result.findings.append(Finding(path, f"damaged ({_error(exc)})",
                                               f"stainmil evaluate {run} (rewrites it)" if name != "config.yaml"
                                               else retrain, "run"))
    result.checked["run"] = result.checked.get("run", 0) + count


def _config(path: Path) -> Config | None:
    try:
        return load_config(path) if path.is_file() else None
    except StainmilError:
        return None


def check_folder(folder: str | Path) -> CheckResult:
    """Verify every store, tiles folder, registration folder and run at or under ``folder``."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise StainmilError(f"{folder} is not a folder; pass a store, tiles, registration, run or output_dir folder.")
    result = CheckResult(folder)
    for marker, check in ((STORE_META, check_store), ("tiles.csv", check_tiles),
                          ("registrations.csv", check_registrations), ("status.json", check_run)):
        for found in sorted(folder.rglob(marker)):
            check(found.parent, result)
    result.litter = sorted(folder.rglob(".*.tmp"))
    if not result.checked and not result.findings:
        raise StainmilError(f"{folder} holds no feature store, tiles, registrations or run (no store.json, "
                            "tiles.csv, registrations.csv or status.json at or under it); pass one of those folders.")
    return result


def repair(result: CheckResult, config: Config | None = None, log=print) -> CheckResult:
    """Remove what is damaged and rerun only that (see the module doc); then check again."""
    stores = {f.path.parents[1] for f in result.findings if f.kind == "store"}
    for finding in result.findings:
        if finding.kind in ("store", "tiles", "registration") and finding.path.is_file():
            finding.path.unlink()
            result.repaired.append(f"removed {finding.path}")
    for temporary in result.litter:
        temporary.unlink(missing_ok=True)
    if result.litter:
        result.repaired.append(f"removed {len(result.litter)} temporary file(s)")
    for store in sorted(stores):
        store_config = _config(store / "config.yaml")
        if store_config is None:
            raise StainmilError(f"cannot repair {store}: its config.yaml is missing or does not load; re-run "
                                "`stainmil extract --config <config>` yourself.")
        log(f"re-extracting the removed slices of {store}")
        store_config = store_config.with_overrides({"features.store_dir": str(store)})  # wherever it was moved
        extract_features(store_config, load_manifest(store_config))
        result.repaired.append(f"re-extracted into {store}")
    for kind, rerun in (("tiles", tile_folder), ("registration", register_cohort)):
        if any(f.kind == kind for f in result.findings):
            if config is None:
                raise StainmilError(f"repairing {kind} needs the cohort's config; pass --config <the config the "
                                    f"folder was made with>.")
            log(f"resuming `stainmil {'tile' if kind == 'tiles' else 'register'}` for what was removed")
            rerun(config)
            result.repaired.append(f"{kind}: resumed")
    after = check_folder(result.folder)
    after.repaired = result.repaired
    return after
