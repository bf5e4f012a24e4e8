"""What the viewer knows of one source (a folder with ``attention/patches.csv``): its settings, classes,
registrations and outline files, each read on first use and kept — the folder does not change while it is served.

A part that does not read (a config that no longer loads, a registrations table that does not parse) is noted in
one sentence for the page and left out; it never stops the viewer.
"""

from __future__ import annotations

import threading
from collections import Counter
from functools import cached_property
from pathlib import Path

import pandas as pd

from stainmil.analysis.truth import outline_file
from stainmil.config import Config, load_config
from stainmil.data.registration import read_registrations, reference_stain
from stainmil.data.tiling import annotation_files, tissue_mask_of
from stainmil.errors import ConfigError, DataError
from stainmil.slides.annotations import slide_key_name
from stainmil.view.folder import SlideEntry, SlideFinder, Source, moved_sentence, patch_positions_of


class SourceState:
    """One source's lazily read settings and tables, shared by every request about it."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.notes: list[str] = []      # sentences for the page: what of this source is not shown, and why
        self._lock = threading.Lock()

    def note(self, text: str) -> None:
        with self._lock:
            if text not in self.notes:
                self.notes.append(text)

    @cached_property
    def config(self) -> Config | None:
        """The source's Config (None without a config.yaml, or when it no longer loads: noted, not fatal)."""
        if self.source.config_file is None:
            return None
        try:
            return load_config(self.source.config_file)
        except (ConfigError, DataError, OSError, ValueError) as exc:
            self.note(f"{self.source.config_file} does not load ({exc}); tissue masks, annotations and "
                      "registrations are not shown.")
            return None

    @cached_property
    def class_names(self) -> list[str]:
        if self.config is not None:
            return list(self.config.data.class_names)
        columns = [c for c in self.source.table("predictions").columns if c.startswith("prob_")]
        return [c[5:] for c in columns] or ["benign", "high_grade"]

    @cached_property
    def registrations(self) -> pd.DataFrame | None:
        if self.config is None:
            return None
        try:
            return read_registrations(self.config)
        except (OSError, ValueError, KeyError) as exc:
            self.note(f"the registrations of this cohort do not read ({exc}); the viewers are not linked — re-run "
                      "`stainmil register`.")
            return None

    @cached_property
    def reference(self) -> str:
        """The registration's reference stain (``he`` without a config or with none named)."""
        try:
            return reference_stain(self.config) if self.config is not None else "he"
        except ConfigError:
            return "he"

    def canonical(self, stain: str) -> str:
        """A stain as the cohort's config names it (``HE``, ``H&E`` -> ``he``: data.stain_aliases)."""
        return (self.config.data.canonical_stain(stain) if self.config is not None else None) or stain

    @cached_property
    def truth_outlines(self) -> bool:
        """Whether analysis.truth is a folder or template of outline files (not a table, not unset)."""
        where = self.config.analysis.truth if self.config is not None else ""
        return bool(where) and not where.lower().endswith(".csv")

    @cached_property
    def _stems(self) -> Counter:
        """slide file stem -> how many slides of the source have it (counted once, not once per slide)."""
        return Counter(Path(p).stem for p in self.source.table("patches")["path"].unique())

    def stem_shared(self, stem: str) -> bool:
        """Whether another slide of the source has a file of this stem (case3/he/slice0.svs, case4/he/slice0.svs)."""
        return self._stems[stem] > 1

    def annotation_files(self, key: tuple[str, str, str], slide: Path) -> tuple:
        """(include, exclude) QuPath files the slide was tiled with, (None, None) when none."""
        config = self.config
        if config is None or not (config.tile.include_annotations or config.tile.exclude_annotations):
            return (None, None)
        try:  # a bare <stem>.geojson only when no other slide has that file name
            return annotation_files(config.tile, slide.stem, key, stem_unique=not self.stem_shared(slide.stem))
        except ConfigError as exc:
            self.note(str(exc))
            return (None, None)

    def truth_file(self, key: tuple[str, str, str], stem: str) -> Path | None:
        """The slide's pathologist outline file under analysis.truth (see stainmil.analysis.truth), or None."""
        if not self.truth_outlines:
            return None
        try:
            return outline_file(self.config, stem, key, stem_unique=not self.stem_shared(stem))
        except ConfigError as exc:
            self.note(str(exc))
            return None

    def slide_entry(self, slide_id: int, key: tuple[str, str, str], rows: pd.DataFrame,
                    finder: SlideFinder) -> SlideEntry:
        """The :class:`SlideEntry` numbered ``slide_id`` of the slice ``key`` (case, stain, slice) whose patch rows
        are ``rows``: its slide file found (or why not), its mask, annotation and outline files; or, for a
        patch-folder cohort, the mosaic of its patch files."""
        entry = SlideEntry(slide_id, self.source.index, *key, kind="slide", path=None)
        first = rows.iloc[0]
        on_slides = "level" in rows.columns and pd.notna(first.get("level"))
        if on_slides and int(first["level"]) >= 0:
            recorded = Path(str(first["path"]))
            entry.path = finder.find(recorded)
            if entry.path is None:
                entry.problem = moved_sentence(recorded, key, finder)
            if "thumbnail" in rows.columns and isinstance(first["thumbnail"], str) and first["thumbnail"]:
                entry.mask = tissue_mask_of(Path(first["thumbnail"]))
            entry.annotations = self.annotation_files(key, entry.path or recorded)
            entry.truth = self.truth_file(key, recorded.stem)
        elif on_slides:  # features imported without their slides
            entry.kind, entry.problem = "none", ("features imported without their slide: no pixels to show "
                                                 "(import them with --slides-dir to see the slides)")
        else:
            entry.kind = "mosaic"
            entry.patches = rows[["path", "x", "y", "patch_index"]].reset_index(drop=True)
            missing = [p for p in entry.patches["path"] if not Path(p).is_file()]
            if missing:
                entry.problem = (f"{len(missing)} patch files of case {key[0]}, {key[1]}, slice {key[2]} are "
                                 f"missing (first: {missing[0]}); put the patch folder back where the run read it.")
            else:
                xs, ys, entry.side = patch_positions_of(entry.patches)
                entry.patches = entry.patches.assign(x=xs, y=ys)
            entry.truth = self.truth_file(key, slide_key_name(key))
        return entry
