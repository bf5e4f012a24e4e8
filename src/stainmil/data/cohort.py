"""Index a patch folder into a manifest and a validation report; nothing is dropped silently.

Every file under ``data.patches_dir`` ends up either as one manifest row (``used``) or in the
report's ``skipped`` list with a reason. Images are decode-checked in parallel.

Manifest columns (one row per usable patch)::

    path        absolute path of the image
    case        case id (text; numeric ids without leading zeros)
    stain       canonical stain (he | melan | sox10)
    slice       slice id within (case, stain), text
    patch       patch id within the slice, text
    patch_index integer order of the patch within its slice (numeric id when it is one)
    x, y        top-left pixel of the patch in the slice (-1 when the name has none)
    label       class index, or -1 for unlabelled (prediction) cohorts
    width, height, mode   as decoded; mode is the original Pillow mode (RGB after conversion)
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from stainmil.config import Config, DataConfig, dump_config
from stainmil.cores import available_cores
from stainmil.data.labels import Labels, normalize_case_id, read_labels
from stainmil.data.tiling import load_tiles
from stainmil.errors import ConfigError, DataError
from stainmil.io import atomic_write, atomic_write_json, atomic_write_text, walk_files
from stainmil.progress import progress_bar

# reasons a file is not used (keys of the report)
NO_MATCH = "name does not match data.filename_pattern"
UNKNOWN_STAIN = "stain not in data.stain_aliases"
UNREADABLE = "not a readable image (corrupt, truncated or not an image)"
EMPTY = "zero bytes"
TOO_LARGE = "far too large for a patch (more than 8192 x 8192 pixels declared: a slide, or a decompression bomb)"
MAX_PATCH_PIXELS = 8192 * 8192
NO_LABEL = "case has no label in the labels CSV"
UNKNOWN_WORD = "case label word not in data.label_values"
CONFLICT = "case has conflicting labels in the labels CSV"
EXCLUDED = "case listed in data.exclude_cases"
NOT_INCLUDED = "case not in data.include_cases"
BLANK_CASE = "blank case id in the file name"
REQUIRED_GROUPS = ("case", "stain", "slice", "patch")


@dataclass
class IndexResult:
    manifest: pd.DataFrame
    report: dict
    files_total: int
    skipped: dict[str, list[str]] = field(default_factory=dict)


def _compile_pattern(pattern: str) -> re.Pattern:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"data.filename_pattern is not a valid regex ({exc}); fix it in your config.") from exc
    missing = [g for g in REQUIRED_GROUPS if g not in compiled.groupindex]
    if missing:
        raise ConfigError(f"data.filename_pattern lacks the named group(s) {missing}; it needs "
                          "(?P<case>…), (?P<stain>…), (?P<slice>…) and (?P<patch>…).")
    return compiled


def check_image(path: str) -> tuple[str, int, int, str]:
    """Decode one image fully. Returns (status, width, height, mode); status 'ok' | 'empty' | 'unreadable'."""
    try:
        if os.path.getsize(path) == 0:
            return "empty", 0, 0, ""
        with Image.open(path) as image:
            if image.width * image.height > MAX_PATCH_PIXELS:  # read from the header: never decoded
                return "too large", image.width, image.height, ""
            image.load()  # a truncated file raises here
            return "ok", image.width, image.height, image.mode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return "unreadable", 0, 0, ""


def _decode_all(paths: list[str], workers: int) -> list[tuple[str, int, int, str]]:
    results: list[tuple[str, int, int, str]] = []
    with progress_bar("index: decode-checking images", total=len(paths)) as advance:
        if workers <= 1 or len(paths) < 64:
            for p in paths:
                results.append(check_image(p))
                advance()
        else:
            with ProcessPoolExecutor(workers) as pool:
                for result in pool.map(check_image, paths, chunksize=64):
                    results.append(result)
                    advance()
    return results


@dataclass
class CaseRules:
    """Stain aliases, exclusions and labels: what decides whether a file (patch or slide) is used."""

    data: DataConfig  # its canonical_stain: the one stain-naming rule
    excluded: set[str]
    labels: Labels
    require_labels: bool
    included: set[str] = field(default_factory=set)  # empty: every case

    @classmethod
    def from_config(cls, config: Config, require_labels: bool) -> CaseRules:
        data = config.data
        unknown_canonical = sorted(set(data.stain_aliases.values()) - set(data.stains))
        if unknown_canonical:
            raise ConfigError(f"data.stain_aliases maps to {unknown_canonical}, which are not in data.stains "
                              f"{data.stains}; add them there or fix the aliases.")
        labels = read_labels(data) if require_labels else Labels(by_case={})
        return cls(data, {normalize_case_id(c) for c in data.exclude_cases}, labels, require_labels,
                   {normalize_case_id(c) for c in data.include_cases})

    def classify(self, case_text: str | None, stain_text: str | None) -> tuple[str, str | None, str | None]:
        """(case id, canonical stain, reason it is skipped or None)."""
        case = normalize_case_id(case_text or "")
        if not case:
            return case, None, BLANK_CASE
        stain = self.data.canonical_stain(stain_text or "")
        if stain is None:
            return case, None, UNKNOWN_STAIN + f" ('{stain_text}')"
        if case in self.excluded:
            return case, stain, EXCLUDED
        if self.included and case not in self.included:
            return case, stain, NOT_INCLUDED
        if self.require_labels:
            labels = self.labels
            reason = (CONFLICT if case in labels.conflicting else UNKNOWN_WORD if case in labels.unknown_words
                      else NO_LABEL if case not in labels.by_case else None)
            if reason:
                return case, stain, reason
        return case, stain, None


def build_index(config: Config, require_labels: bool = True) -> IndexResult:
    """Walk ``config.data.patches_dir``, parse, decode-check and label every file.

    ``require_labels=False`` indexes an unlabelled cohort (for ``stainmil predict``): every case
    gets label -1 and the labels CSV is not read. With ``data.source: slides`` the patches are those
    ``stainmil tile`` laid on the slides (see :func:`build_slide_index`).
    """
    if config.data.source == "slides":
        return build_slide_index(config, require_labels)
    data = config.data
    root = Path(data.patches_dir)
    if not data.patches_dir or not root.is_dir():
        raise DataError(f"patch folder '{data.patches_dir}' does not exist; set data.patches_dir to the folder "
                        "holding your patch images.")
    pattern = _compile_pattern(data.filename_pattern)
    rules = CaseRules.from_config(config, require_labels)
    labels = rules.labels

    files = walk_files(root)
    skipped: dict[str, list[str]] = defaultdict(list)
    candidates = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        match = pattern.search(path.name if data.match_on == "name" else rel)
        if not match:
            skipped[NO_MATCH].append(rel)
            continue
        groups = match.groupdict()
        case, stain, reason = rules.classify(groups["case"], groups["stain"])
        if reason:
            skipped[reason].append(rel)
            continue
        candidates.append((path, rel, case, stain, groups))

    workers = data.index_workers or min(8, available_cores())
    decoded = _decode_all([str(c[0]) for c in candidates], workers)
    rows = []
    slice_files: Counter = Counter()
    for (path, rel, case, stain, groups), (status, width, height, mode) in zip(candidates, decoded):
        slice_key = (case, stain, str(groups["slice"]))
        slice_files[slice_key] += 1
        if status != "ok":
            skipped[{"empty": EMPTY, "too large": TOO_LARGE}.get(status, UNREADABLE)].append(rel)
            continue
        rows.append({
            "path": str(path), "case": case, "stain": stain, "slice": str(groups["slice"]),
            "patch": str(groups["patch"]), "x": _int_or(groups.get("x"), -1), "y": _int_or(groups.get("y"), -1),
            "label": labels.by_case.get(case, -1), "width": width, "height": height, "mode": mode,
        })
    manifest = _finish_manifest(pd.DataFrame(rows, columns=[
        "path", "case", "stain", "slice", "patch", "x", "y", "label", "width", "height", "mode"]))
    report = _make_report(config.data, manifest, labels, dict(skipped), slice_files, len(files), require_labels)
    if manifest.empty:
        raise DataError(f"no usable patch in {root}: {len(files)} files, "
                        f"{_reason_summary(skipped)}; check data.filename_pattern and data.labels_csv.")
    return IndexResult(manifest=manifest, report=report, files_total=len(files), skipped=dict(skipped))


SLIDE_COLUMNS = ["level", "read_size", "size0", "thumbnail", "thumb_scale"]


def build_slide_index(config: Config, require_labels: bool = True) -> IndexResult:
    """The manifest of the slide route: one row per patch that ``stainmil tile`` kept, read from its slide.

    ``path`` is the slide file, ``x, y`` the level-0 corner, plus ``level``, ``read_size`` (pixels read
    there), ``size0`` (level-0 side), ``thumbnail`` and ``thumb_scale`` (thumbnail px per level-0 px) for
    the heatmaps. Slides the tiling skipped are listed in the report with the tiling's reason.
    """

    tiles, tiling_skipped = load_tiles(config.tile)
    rules = CaseRules.from_config(config, require_labels)
    skipped: dict[str, list[str]] = defaultdict(list)
    for reason, names in tiling_skipped.items():
        skipped[f"tiling: {reason}"].extend(names)
    keep = []
    for (case_text, stain_text, slide_id), part in tiles.groupby(["case", "stain", "slice"], sort=False):
        case, stain, reason = rules.classify(case_text, stain_text)
        if reason:
            skipped[reason].append(Path(part["slide"].iloc[0]).name)
            continue
        keep.append(part.assign(case=case, stain=stain, slice=str(slide_id)))
    rows = pd.concat(keep, ignore_index=True) if keep else tiles.iloc[:0]
    manifest = pd.DataFrame({
        "path": rows["slide"], "case": rows["case"], "stain": rows["stain"], "slice": rows["slice"].astype(str),
        "patch": rows["patch"].astype(str), "x": rows["x"].astype(int), "y": rows["y"].astype(int),
        "label": [rules.labels.by_case.get(c, -1) for c in rows["case"]],
        "width": config.tile.patch_size, "height": config.tile.patch_size, "mode": "RGB",
        **{c: rows[c] for c in SLIDE_COLUMNS}})
    slides_total = int(tiles["slide"].nunique()) + sum(len(v) for v in tiling_skipped.values())
    return slide_index(config, manifest, rules, skipped, slides_total,
                       f"slides in {config.tile.slices_dir} (tiled into {config.tile.out_dir})", "tile_report.txt")


def slide_index(config: Config, manifest: pd.DataFrame, rules: CaseRules, skipped: dict[str, list[str]],
                slides_total: int, source: str, see: str) -> IndexResult:
    """Sort a slide-route manifest, report on it (``source``: where its patches come from) and refuse an empty
    one (``see``: the report that says why)."""
    manifest = _finish_manifest(manifest)
    report = _make_report(config.data, manifest, rules.labels, dict(skipped), Counter(), slides_total,
                          rules.require_labels)
    report["patches_dir"] = source
    if manifest.empty:
        raise DataError(f"no usable patch in {source}: {_reason_summary(skipped)}; check {see}, "
                        "data.stain_aliases and data.labels_csv.")
    return IndexResult(manifest=manifest, report=report, files_total=slides_total, skipped=dict(skipped))


def _int_or(value: str | None, default: int) -> int:
    return int(value) if value is not None and str(value).isdigit() else default


def _finish_manifest(manifest: pd.DataFrame) -> pd.DataFrame:
    """Sort by case/stain/slice/patch (natural order) and add ``patch_index``."""
    if manifest.empty:
        manifest["patch_index"] = pd.Series(dtype="int64")
        return manifest
    numeric = manifest["patch"].str.fullmatch(r"\d+")
    manifest["patch_index"] = -1
    manifest.loc[numeric, "patch_index"] = manifest.loc[numeric, "patch"].astype(int)
    manifest = manifest.sort_values(["case", "stain", "slice", "patch_index", "patch"],
                                    key=_natural_key).reset_index(drop=True)
    # non-numeric patch ids get their order within the slice
    order = manifest.groupby(["case", "stain", "slice"]).cumcount()
    manifest.loc[manifest["patch_index"] < 0, "patch_index"] = order[manifest["patch_index"] < 0]
    return manifest


def _natural_key(column: pd.Series) -> pd.Series:
    if column.dtype == object or str(column.dtype).startswith("str"):
        return column.map(lambda v: (0, int(v), "") if str(v).isdigit() else (1, 0, str(v)))
    return column


def _reason_summary(skipped: dict[str, list[str]]) -> str:
    if not skipped:
        return "none skipped"
    return "; ".join(f"{len(v)} {k}" for k, v in sorted(skipped.items(), key=lambda kv: -len(kv[1])))


def _make_report(data: DataConfig, manifest: pd.DataFrame, labels: Labels, skipped: dict[str, list[str]],
                 slice_files: Counter, files_total: int, require_labels: bool) -> dict:
    warnings: list[str] = []
    modes = Counter(manifest["mode"]) if not manifest.empty else Counter()
    converted = {mode: n for mode, n in modes.items() if mode != "RGB"}
    converted_files = {mode: [_relative(p, data.patches_dir) for p in manifest.loc[manifest["mode"] == mode, "path"]]
                       for mode in sorted(converted)}
    if converted:
        warnings.append("images converted to RGB when read: " + "; ".join(
            f"{n} {mode} ({_examples(manifest.loc[manifest['mode'] == mode, 'path'], 5)}"
            f"{', …' if n > 5 else ''})" for mode, n in sorted(converted.items())))
    sizes = Counter(zip(manifest["width"], manifest["height"])) if not manifest.empty else Counter()
    expected = (data.expected_patch_size,) * 2 if data.expected_patch_size else \
        (sizes.most_common(1)[0][0] if sizes else None)
    odd_size = manifest[(manifest["width"] != (expected or (0, 0))[0]) |
                        (manifest["height"] != (expected or (0, 0))[1])] if expected else manifest.iloc[:0]
    if len(odd_size):
        warnings.append(f"{len(odd_size)} patches are not {expected[0]}x{expected[1]} px (used, resized when "
                        f"features are extracted), e.g. {_examples(odd_size['path'])}")
    used_cases = sorted(manifest["case"].unique(), key=_case_sort) if not manifest.empty else []
    cases_with_files = {c for c in manifest["case"]} if not manifest.empty else set()
    if require_labels:
        wanted = {normalize_case_id(c) for c in data.include_cases} or set(labels.by_case)
        no_patches = sorted(set(labels.by_case) & wanted - cases_with_files
                            - {normalize_case_id(c) for c in data.exclude_cases}, key=_case_sort)
        if no_patches:
            warnings.append(f"{len(no_patches)} labelled case(s) have no usable patches: {no_patches[:20]}")
        if labels.blank_case_rows:
            warnings.append(f"{len(labels.blank_case_rows)} labels CSV row(s) have a blank case id "
                            f"(data rows {labels.blank_case_rows[:10]})")
        for case, words in sorted(labels.conflicting.items()):
            warnings.append(f"case {case} has conflicting labels {words}; its patches are skipped")
        for case, word in sorted(labels.unknown_words.items()):
            warnings.append(f"case {case} has label word '{word}' not in data.label_values "
                            f"{sorted(data.label_values)}; its patches are skipped")
    else:
        no_patches = []
    missing_stain = {}
    per_case = []
    for case in used_cases:
        rows = manifest[manifest["case"] == case]
        stains = sorted(rows["stain"].unique(), key=data.stains.index)
        missing = [s for s in data.stains if s not in stains]
        if missing:
            missing_stain[case] = missing
        per_case.append({"case": case, "label": int(rows["label"].iloc[0]), "patches": int(len(rows)),
                         "slices": int(rows.groupby(["stain", "slice"]).ngroups),
                         "stains": stains, "missing_stains": missing})
    if missing_stain:
        warnings.append(f"{len(missing_stain)} case(s) lack a stain (used; attention runs over the stains "
                        f"present): " + ", ".join(f"{c}: {m}" for c, m in list(missing_stain.items())[:10]))
    used_slices = set(zip(manifest["case"], manifest["stain"], manifest["slice"])) if not manifest.empty else set()
    empty_slices = sorted(k for k in slice_files if k not in used_slices)
    if empty_slices:
        warnings.append(f"{len(empty_slices)} slice(s) have files but zero usable patches: "
                        + ", ".join(f"case {c} {s} slice {sl}" for c, s, sl in empty_slices[:10]))
    class_counts = Counter(int(r["label"]) for r in per_case)
    return {
        "patches_dir": data.patches_dir,
        "labels_csv": data.labels_csv if require_labels else None,
        "files_total": files_total,
        "files_used": int(len(manifest)),
        "files_skipped": int(sum(len(v) for v in skipped.values())),
        "skipped": {reason: {"count": len(paths), "files": paths} for reason, paths in sorted(skipped.items())},
        "converted_to_rgb": converted,
        "converted_to_rgb_files": converted_files,
        "patch_size_expected": list(expected) if expected else None,
        "unexpected_size": {"count": int(len(odd_size)),
                            "files": [str(Path(p).relative_to(data.patches_dir)) for p in odd_size["path"]]},
        "cases_used": len(used_cases),
        "cases_per_class": {data.class_names[k] if 0 <= k < len(data.class_names) else str(k): v
                            for k, v in sorted(class_counts.items())},
        "labelled_cases_without_patches": no_patches,
        "cases_missing_stains": missing_stain,
        "slices_without_usable_patches": [list(k) for k in empty_slices],
        "blank_case_rows": labels.blank_case_rows,
        "conflicting_labels": labels.conflicting,
        "unknown_label_words": labels.unknown_words,
        "warnings": warnings,
        "cases": per_case,
    }


def _case_sort(case: str) -> tuple:
    return (0, int(case), "") if case.isdigit() else (1, 0, case)


def _relative(path: str, root: str) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def _examples(paths: pd.Series, n: int = 3) -> str:
    return ", ".join(Path(p).name for p in list(paths)[:n])


def report_text(report: dict) -> str:
    """Human-readable index report (``index_report.txt``)."""
    lines = [
        "stainmil index report",
        f"patch folder : {report['patches_dir']}",
        f"labels CSV   : {report['labels_csv']}",
        "",
        f"files found  : {report['files_total']}",
        f"used         : {report['files_used']}",
        f"skipped      : {report['files_skipped']}",
    ]
    for reason, entry in report["skipped"].items():
        lines.append(f"  {entry['count']:>7}  {reason}")
        for name in entry["files"][:5]:
            lines.append(f"             e.g. {name}")
        if entry["count"] > 5:
            lines.append(f"             … and {entry['count'] - 5} more (all listed in index_report.json)")
    lines += ["", f"cases used   : {report['cases_used']}  "
              + "  ".join(f"{k}: {v}" for k, v in report["cases_per_class"].items())]
    if report["warnings"]:
        lines += ["", "warnings:"] + [f"  - {w}" for w in report["warnings"]]
    lines += ["", "per case (case, label, stains, slices, patches):"]
    for case in report["cases"]:
        missing = f"  missing {case['missing_stains']}" if case["missing_stains"] else ""
        lines.append(f"  {case['case']:>8}  {case['label']:>2}  {','.join(case['stains']):<16} "
                     f"{case['slices']:>3} {case['patches']:>6}{missing}")
    return "\n".join(lines) + "\n"


def write_index(result: IndexResult, config: Config, out_dir: str | Path | None = None) -> Path:
    """Write manifest.parquet, index_report.txt/.json and config.yaml; return the folder."""
    out = Path(out_dir) if out_dir else config.paths.index_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "manifest.parquet", lambda tmp: result.manifest.to_parquet(tmp, index=False))
    atomic_write_json(out / "index_report.json", result.report)
    atomic_write_text(out / "index_report.txt", report_text(result.report))
    dump_config(config, out / "config.yaml")
    return out


def load_manifest(config: Config, columns: list[str] | None = None) -> pd.DataFrame:
    """The index, one row per patch (``columns``: only those, e.g. what training needs of a huge cohort)."""
    path = config.paths.manifest
    if not path.is_file():
        raise DataError(f"no manifest at {path}; run `stainmil index --config …` first.")
    if columns is not None:  # the columns asked for that this index has (a patch-image index has no slide places)
        present = set(pq.read_schema(path).names)
        columns = [c for c in columns if c in present]
    if columns is None:
        return pd.read_parquet(path)
    # a lean index (a bounded training process): text stays in Arrow buffers, never one Python object a cell —
    # not even for a moment (converting an object column afterwards held both copies at its peak)
    text = pd.StringDtype("pyarrow")
    return pq.read_table(path, columns=columns).to_pandas(
        types_mapper=lambda kind: text if kind in (pa.string(), pa.large_string()) else None)


def keep_stains(manifest: pd.DataFrame, stains: list[str]) -> pd.DataFrame:
    """Only the patches of ``stains`` (``data.stains``: e.g. ``[he]`` to train on H&E alone).

    A case with none of them is left out (it has nothing such a model could read); the manifest is returned
    as it is when every stain is kept.
    """
    kept = manifest["stain"].isin(stains)
    if bool(kept.all()):
        return manifest
    if not bool(kept.any()):
        raise DataError(f"no patch of the cohort has a stain in data.stains {stains} (the manifest has "
                        f"{sorted(manifest['stain'].unique())}); name stains the cohort has.")
    return manifest[kept].reset_index(drop=True)


def case_labels(manifest: pd.DataFrame) -> pd.Series:
    """Case id -> label (one entry per case, cases in manifest order)."""
    return manifest.drop_duplicates("case").set_index("case")["label"]
