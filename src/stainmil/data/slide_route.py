"""``stainmil tile`` as a user runs it: tile the slides and, on the slide route, index them.

Kept in the data layer (no torch, no model imports) so tiling a cohort costs the memory of tiling, not of
loading the deep-learning stack: ~170 MB of imports instead of ~950 MB.
"""

from __future__ import annotations

from pathlib import Path

from stainmil.config import Config
from stainmil.data.cohort import build_index, write_index
from stainmil.data.tiling import TileResult, tile_folder
from stainmil.locks import folder_lock


def tile_cohort(config: Config) -> tuple[TileResult, Path | None]:
    """Tile the slides; on the slide route also index them (labels when data.labels_csv is set)."""
    with folder_lock(config.tile.out_dir, "tile"):
        result = tile_folder(config)
    if config.data.source != "slides":
        return result, None
    index = build_index(config, require_labels=bool(config.data.labels_csv))
    return result, write_index(index, config)
