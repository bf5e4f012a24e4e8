"""Serial sections at real size (millimetres at 0.25-0.5 µm/px), written tile by tile: ``stainmil synth serial
--section-mm N``.

The small serial preset (:mod:`stainmil.data.serial`) draws each section as one image in memory; a 20 mm section at
0.25 µm/px is 80,000 px square (19 GB of RGB). Here nothing is ever drawn whole: a case's **block** is a few coarse
maps (tissue, lesion, :data:`GRID` px across the section) plus a rule for its nuclei that can be asked at any point
— one nucleus at most per :data:`CELL_UM` lattice cell of the block, its presence, place, size and stain drawn from a
hash of the cell (so every section of the case cuts the same nuclei). A **section** is the block seen through its
own known motion (:class:`stainmil.data.serial.SectionWarp` on the coarse grid: rotation, shift, flip, elastic
stretch, sometimes a torn-off piece); :meth:`WsiSection.render` draws any level-0 window of it.

A slide is written as a tiled pyramidal TIFF (generic TIFF, µm/px in its resolution tags): level 0 streamed tile by
tile into a temporary file, then each level box-downsampled from it window by window, so peak memory is a few tiles
and the coarse maps whatever the slide's size. Files are named as a scanner's export names them
(``C001_HE_S0.tiff``, ``C001_MelanA_S0.tiff``, ``C001_SOX10_S0.tiff``) with ``C001_HE_S0_landmarks.csv`` beside
each: landmark id and its place in level-0 µm (``x_um``, ``y_um``); two sections of a case share landmark ids.
"""

from __future__ import annotations

import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import ndimage

from stainmil.cores import available_cores
from stainmil.data.registration import read_pair
from stainmil.data.serial import SectionWarp, block_landmarks, random_warp, torn_piece, warp_to_section
from stainmil.data.synth import BENIGN, HIGH_GRADE, STAIN_VECTORS, LesionStyle, lesion_mask, tissue_mask
from stainmil.errors import ConfigError
from stainmil.io import atomic_path, atomic_write, atomic_write_text
from stainmil.progress import progress_bar

GRID = 512          # coarse maps: px across the section (tissue, lesion, elastic field)
CELL_UM = 14.0      # nucleus lattice of the block: one nucleus at most per cell
TILE = 256
GLASS = 245.0
SCANNER_NAMES = {"he": "HE", "melan": "MelanA", "sox10": "SOX10"}
FILENAME_PATTERN = r"C(?P<case>\d+)_(?P<stain>[^_]+)_S(?P<slice>\d+)\.tiff$"
_OD_MATRIX = np.stack([STAIN_VECTORS["H"], STAIN_VECTORS["E"], STAIN_VECTORS["DAB"]])  # (3 stains, 3 RGB)


def _uniform(i: np.ndarray, j: np.ndarray, seed: int, channel: int) -> np.ndarray:
    """A uniform number in [0, 1) per lattice cell (i, j): the same cell and seed give the same number anywhere."""
    with np.errstate(over="ignore"):
        h = (i.astype(np.uint64) * np.uint64(0x9E3779B1) + j.astype(np.uint64) * np.uint64(0x85EBCA77)
             + np.uint64((seed * 0xC2B2AE3D + channel * 0x27D4EB2F) & 0xFFFFFFFF)) & np.uint64(0xFFFFFFFF)
        for shift, factor in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):  # murmur3's finaliser
            h = ((h ^ (h >> np.uint64(shift))) * np.uint64(factor)) & np.uint64(0xFFFFFFFF)
        h ^= h >> np.uint64(16)
    return h.astype(np.float64) / 2.0**32


def _sample(grid: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear value of a coarse map at coarse-pixel coordinates (x, y) (0 off the map)."""
    return ndimage.map_coordinates(grid, [y, x], order=1, mode="constant", cval=0.0)


@dataclass
class WsiBlock:
    """A case's tissue block on the coarse grid (``side_um`` µm square, ``GRID`` px across)."""

    side_um: float
    tissue: np.ndarray      # (GRID, GRID) float32 0/1
    lesion: np.ndarray      # (GRID, GRID) float32 0/1
    landmarks: np.ndarray   # (L, 2) x, y in coarse px, inside the tissue
    style: LesionStyle
    seed: int

    @property
    def cell(self) -> float:
        return self.side_um / GRID  # µm per coarse px


def make_block(seed: int, label: int, side_um: float) -> WsiBlock:
    """Case ``seed``'s block: tissue smaller than the glass (any rotation keeps it on), its lesion, 40 landmarks."""
    rng = np.random.default_rng([seed, 11])
    style = HIGH_GRADE if label else BENIGN
    inner = int(GRID * 0.68)
    pad = (GRID - inner) // 2
    tissue = np.zeros((GRID, GRID), bool)
    tissue[pad:pad + inner, pad:pad + inner] = tissue_mask(rng, inner)
    lesion = lesion_mask(rng, tissue, style)
    return WsiBlock(side_um, tissue.astype(np.float32), lesion.astype(np.float32), block_landmarks(rng, tissue),
                    style, seed)


@dataclass
class Cut:
    """A straight line on a section's coarse grid: the tissue on its far side (signed distance > 0) is gone — folded
    back over the line (``fold``: doubled onto the near side, its mirror image) or cut away (a missing corner)."""

    point: np.ndarray   # (2,) x, y section coarse px on the line
    normal: np.ndarray  # (2,) unit, pointing to the side that is gone
    fold: bool
    depth: float        # how far the tissue reached beyond the line, coarse px

    def distance(self, q: np.ndarray) -> np.ndarray:
        """(N,) signed distance of section points ``q`` (N, 2) from the line, coarse px."""
        return (q - self.point) @ self.normal


@dataclass
class Mark:
    """A bubble (a ring of dark rim, paler inside) or a pen stroke (ink, on glass or tissue), section coarse px."""

    kind: str            # bubble | pen
    points: np.ndarray   # bubble: (1, 2) centre; pen: (K, 2) polyline
    radius: float        # bubble radius / half the pen's width, coarse px


@dataclass
class WsiSection:
    """One section of a block on its glass, ``size`` level-0 px square at ``mpp`` µm/px.

    A **neighbouring** section: its own nuclei on the block's shared architecture — in a share ``overlap`` of
    its lattice cells the nucleus is the block's, drawn for each section on its own: two sections show the same
    nucleus in about ``overlap``² of their cells (0.35: 12%), the rest are each section's own;
    the cell density, the lesion and most of the stroma's fibres are the block's. Its stain is a little stronger
    or weaker (``strength``), and it may be torn (``kept``), folded over or missing a corner (``cuts``), with
    bubbles or pen marks (``marks``)."""

    block: WsiBlock
    stain: str
    warp: SectionWarp       # section coarse px -> block coarse px
    kept: np.ndarray        # (GRID, GRID) float32: 0 where a piece tore off (section coarse px)
    tissue: np.ndarray      # (GRID, GRID) bool: the section's tissue on the coarse grid (to skip glass)
    mpp: float
    seed: int
    overlap: float = 1.0    # share of its cells whose nucleus is the block's (1: every section the same cells)
    strength: float = 1.0   # stain strength of this section (optical density factor)
    cuts: tuple = ()        # Cut, ...
    marks: tuple = ()       # Mark, ...
    torn: np.ndarray | None = None  # ``kept`` before the cuts (tears only: what a fold lays over); None = kept

    @property
    def size(self) -> int:
        return int(round(self.block.side_um / self.mpp))

    def render(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8: the level-0 window at (x0, y0)."""
        cell = self.block.cell
        noise = np.random.default_rng([self.seed, x0, y0])
        glass = np.clip(GLASS + noise.normal(0, 1.0, (height, width, 3)), 0, 255).astype(np.uint8)
        # glass only? the coarse tissue and mark maps around the window (2 coarse px of margin) say so without drawing
        c0, c1 = int(x0 * self.mpp / cell) - 2, int((x0 + width) * self.mpp / cell) + 3
        r0, r1 = int(y0 * self.mpp / cell) - 2, int((y0 + height) * self.mpp / cell) + 3
        near_mark = any(_near(m, (c0, r0, c1, r1)) for m in self.marks)
        if not self.tissue[max(r0, 0):max(r1, 0), max(c0, 0):max(c1, 0)].any() and not near_mark:
            return glass
        ys, xs = np.mgrid[y0:y0 + height, x0:x0 + width]
        q = np.stack([(xs.ravel() + 0.5) * self.mpp / cell - 0.5, (ys.ravel() + 0.5) * self.mpp / cell - 0.5], 1)
        od = self._od(q, self.kept)
        for cut in self.cuts:
            if not cut.fold:
                continue
            s = cut.distance(q)
            under = np.flatnonzero((s <= 0) & (s > -cut.depth - 1))  # the far side lies mirrored over the near
            mirrored = q[under] - 2 * s[under, None] * cut.normal
            od[under] += self._od(mirrored, self.kept if self.torn is None else self.torn) * 0.9
        od, ink = _marked(od, q, self.marks)
        rgb = np.exp(-(od @ _OD_MATRIX + ink) * np.log(10)) * GLASS
        rgb = rgb.reshape(height, width, 3) + noise.normal(0, 1.5, (height, width, 3))
        return np.clip(rgb, 0, 255).astype(np.uint8)

    def _od(self, q: np.ndarray, kept: np.ndarray) -> np.ndarray:
        """(N, 3) optical densities (hematoxylin, eosin, DAB) at section coarse points ``q`` (N, 2)."""
        p = self.warp.to_block(q)  # (N, 2) block coarse px
        tissue = _sample(self.block.tissue, p[:, 0], p[:, 1]) * _sample(kept, q[:, 0], q[:, 1])
        lesion = _sample(self.block.lesion, p[:, 0], p[:, 1])
        hema, eosin, dab = self._stain((p + 0.5) * self.block.cell, lesion)
        return np.stack([hema, eosin, dab], axis=1) * (self.strength * np.clip((tissue - 0.35) / 0.3, 0, 1))[:, None]

    def _stain(self, block_um: np.ndarray, lesion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Optical densities (hematoxylin, eosin, DAB), (N,) each, at block points (µm)."""
        # a point sees the nuclei of its lattice cell and of the three next to it towards its nearest corner: a
        # nucleus near its cell's edge reaches into the next cell whole (not cut off at the cell's border)
        fx, fy = block_um[:, 0] / CELL_UM, block_um[:, 1] / CELL_UM
        i, j = np.floor(fx), np.floor(fy)
        di, dj = np.where(fx - i > 0.5, 1.0, -1.0), np.where(fy - j > 0.5, 1.0, -1.0)
        cells = [self._cell(ci, cj, block_um) for ci, cj in ((i, j), (i + di, j), (i, j + dj), (i + di, j + dj))]
        nucleus, strength, positive, cytoplasm = (np.stack([cell[k] for cell in cells]) for k in range(4))  # (4, N)
        # fibres: the block's on a 20 µm lattice, with some of this section's own
        stroma = (0.7 * _value_noise(block_um, 20.0, self.block.seed, 6)
                  + 0.3 * _value_noise(block_um, 12.0, self.seed, 6))
        if self.stain == "he":
            hema = (nucleus * strength).max(axis=0) + 0.05
            eosin = np.where(lesion > 0.5, 0.1 + 0.1 * stroma, 0.12 + 0.22 * stroma)
            dab = np.zeros_like(hema)
        elif self.stain == "sox10":  # nuclear DAB in positive melanocytes, paler counterstain elsewhere
            hema = (nucleus * strength * np.where(positive, 0.0, 0.45)).max(axis=0) + 0.04 + 0.03 * stroma
            eosin = np.zeros_like(hema)
            dab = (nucleus * 0.9 * positive).max(axis=0)
        else:  # melan: cytoplasmic DAB around positive melanocytes; the nuclei stay blue
            hema = (nucleus * strength * 0.45).max(axis=0) + 0.04 + 0.03 * stroma
            eosin = np.zeros_like(hema)
            dab = 0.55 * (cytoplasm * positive).max(axis=0) * (1 - nucleus.max(axis=0))
        return hema, eosin, dab

    def _cell(self, i: np.ndarray, j: np.ndarray, block_um: np.ndarray) -> tuple[np.ndarray, ...]:
        """(nucleus coverage, stain strength, DAB-positive, cytoplasm coverage), (N,) each, of lattice cells (i, j)
        at block points (µm). A cell's nucleus is the block's (shared with the neighbouring sections) in a share
        ``overlap`` of the cells, this section's own in the others; how densely cells lie is the block's."""
        block, style = self.block, self.block.style
        centre_um = (np.stack([i, j], axis=1) + 0.5) * CELL_UM
        centre_coarse = centre_um / block.cell - 0.5
        in_lesion = _sample(block.lesion, centre_coarse[:, 0], centre_coarse[:, 1]) > 0.5
        seed = np.where(_uniform(i, j, self.seed, 7) < self.overlap, block.seed, self.seed + 7919 * block.seed)
        density = 0.55 + 0.9 * _value_noise(centre_um, DENSITY_UM, block.seed, 8)  # cell-rich and cell-poor areas
        present = _uniform_seeded(i, j, seed, 0) < np.where(in_lesion, 0.8, 0.45) * density
        # anywhere in its cell (a jitter of part of the cell would lay the nuclei out as a lattice: a periodic
        # texture no tissue has, that block matching would lock onto a period away)
        cx = (i + 0.1 + 0.8 * _uniform_seeded(i, j, seed, 1)) * CELL_UM
        cy = (j + 0.1 + 0.8 * _uniform_seeded(i, j, seed, 2)) * CELL_UM
        lesion_radius = np.mean(style.nucleus_radius) * 1.6 * (1 + style.pleomorphism * (
            _uniform_seeded(i, j, seed, 3) - 0.5) * 2)
        radius = np.where(in_lesion, lesion_radius, 2.2)  # µm
        distance = np.hypot(block_um[:, 0] - cx, block_um[:, 1] - cy)
        edge = max(self.mpp, 0.4)
        nucleus = np.clip((radius - distance) / edge, 0, 1) * present
        strength = np.where(in_lesion, style.hyperchromasia, 0.6)
        positive = in_lesion & (_uniform_seeded(i, j, seed, 4) < style.positive_fraction)
        cytoplasm = np.clip((1.9 * radius - distance) / edge, 0, 1) * present
        return nucleus, strength, positive, cytoplasm


DENSITY_UM = 60.0   # the lattice of the block's cell-density variation (shared by its sections)
INK = np.array([1.1, 0.25, 0.9])  # a green marker pen: optical density per RGB channel (red and blue absorbed)


def _uniform_seeded(i: np.ndarray, j: np.ndarray, seeds: np.ndarray, channel: int) -> np.ndarray:
    """:func:`_uniform` with a seed per point (the block's or the section's)."""
    out = np.empty(len(i))
    for seed in np.unique(seeds):
        at = seeds == seed
        out[at] = _uniform(i[at], j[at], int(seed), channel)
    return out


def _value_noise(block_um: np.ndarray, lattice_um: float, seed: int, channel: int) -> np.ndarray:
    """Smooth noise in [0, 1] at block points (µm): bilinear between random values on a ``lattice_um`` lattice."""
    fx, fy = block_um[:, 0] / lattice_um, block_um[:, 1] / lattice_um
    gx, gy = np.floor(fx), np.floor(fy)
    tx, ty = fx - gx, fy - gy
    return sum(_uniform(gx + dx, gy + dy, seed, channel) * (tx if dx else 1 - tx) * (ty if dy else 1 - ty)
               for dx in (0, 1) for dy in (0, 1))


def _near(mark: Mark, box: tuple[int, int, int, int]) -> bool:
    c0, r0, c1, r1 = box
    lo, hi = mark.points.min(axis=0) - mark.radius - 2, mark.points.max(axis=0) + mark.radius + 2
    return lo[0] < c1 and hi[0] > c0 and lo[1] < r1 and hi[1] > r0


def _marked(od: np.ndarray, q: np.ndarray, marks: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(stain optical densities ``od`` (N, 3) with the section's bubbles laid on (pale inside, a dark rim), the
    pen's ink as RGB optical density (N, 3))."""
    ink = np.zeros_like(od)
    for mark in marks:
        if mark.kind == "bubble":
            r = np.linalg.norm(q - mark.points[0], axis=1) / mark.radius
            od = od * np.where(r < 1, 0.35, 1.0)[:, None] + (np.exp(-((r - 1) / 0.02) ** 2) * 0.5)[:, None]
        else:
            a, b = mark.points[:-1], mark.points[1:]
            t = np.clip(((q[:, None] - a) * (b - a)).sum(-1) / ((b - a) ** 2).sum(-1), 0, 1)  # (N, K-1)
            d = np.linalg.norm(q[:, None] - (a + t[..., None] * (b - a)), axis=-1).min(axis=1)
            ink = ink + np.clip((mark.radius - d) / (0.3 * mark.radius), 0, 1)[:, None] * INK
    return od, ink


def make_section(block: WsiBlock, stain: str, mpp: float, seed: int, flip: bool, overlap: float = 0.35,
                 artefacts: bool = False) -> WsiSection:
    """``block`` cut and laid on glass with its own motion (a flip only when ``flip``), sometimes torn, folded or
    missing a corner; a neighbouring section (its own nuclei but a share ``overlap``; 1: the same cells as every
    other section of the block), its stain a little stronger or weaker; with ``artefacts``, bubbles and a pen mark."""
    if not 0 <= overlap <= 1:
        raise ConfigError(f"synth: --overlap ({overlap}) is the share of a section's nuclei that are the block's, "
                          "in [0, 1].")
    rng = np.random.default_rng([block.seed, seed, 13])
    warp = random_warp(rng, GRID, flip=flip)
    strength = float(rng.uniform(0.8, 1.25))
    tissue = warp_to_section(block.tissue, warp, order=1, fill=0.0) > 0.5
    tears = np.ones((GRID, GRID), np.float32)
    if rng.random() < 0.3:
        tears[torn_piece(rng, tissue)] = 0.0
    tissue &= tears > 0.5
    cuts = []
    for fold, chance, depth in ((True, 0.3, (0.03, 0.06)), (False, 0.3, (0.05, 0.1))):  # a fold, a missing corner
        if rng.random() < chance and tissue.any():
            angle = rng.uniform(0, 2 * np.pi)
            normal = np.array([np.cos(angle), np.sin(angle)])
            rows, cols = np.nonzero(tissue)
            far = (np.stack([cols, rows], 1) @ normal).max()
            reach = rng.uniform(*depth) * GRID
            cuts.append(Cut(normal * (far - reach), normal, fold, reach))
    ys, xs = np.mgrid[0:GRID, 0:GRID].astype(float)
    q = np.stack([xs.ravel(), ys.ravel()], axis=1)
    kept = tears.copy()
    for cut in cuts:
        kept.ravel()[cut.distance(q) > 0] = 0.0
    tissue &= kept > 0.5
    marks = []
    if artefacts:
        rows, cols = np.nonzero(tissue)
        for _ in range(rng.integers(1, 4)):
            k = rng.integers(len(rows))
            marks.append(Mark("bubble", np.array([[cols[k], rows[k]]], float), rng.uniform(0.01, 0.03) * GRID))
        start = rng.uniform(0.05, 0.95, 2) * GRID
        stroke = start + np.cumsum(rng.normal(0, 0.03 * GRID, (6, 2)), axis=0)
        marks.append(Mark("pen", np.clip(stroke, 0, GRID - 1), rng.uniform(0.004, 0.008) * GRID))
    section = WsiSection(block, stain, warp, kept, ndimage.binary_dilation(tissue, iterations=2), mpp, seed,
                         overlap=overlap, strength=strength, cuts=tuple(cuts),
                         marks=tuple(marks), torn=tears)
    return section


def section_landmarks(section: WsiSection) -> pd.DataFrame:
    """The block's landmarks on this section, level-0 µm (``id, x_um, y_um``); those on a torn-off piece left out."""
    cell = section.block.cell
    points = section.warp.to_section(section.block.landmarks)  # section coarse px
    xi, yi = np.round(points).astype(int).T
    on = (xi >= 0) & (yi >= 0) & (xi < GRID) & (yi < GRID)
    inside = np.zeros(len(points), bool)
    inside[on] = section.kept[yi[on], xi[on]] > 0.5
    um = (points + 0.5) * cell
    return pd.DataFrame({"id": np.flatnonzero(inside), "x_um": um[inside, 0], "y_um": um[inside, 1]})


_WORKER_SECTION: WsiSection | None = None


def _set_section(section: WsiSection) -> None:
    global _WORKER_SECTION
    _WORKER_SECTION = section


def _render_tile(corner: tuple[int, int]) -> np.ndarray:
    section = _WORKER_SECTION
    x, y = corner
    return section.render(x, y, TILE, TILE)


def write_section_tiff(section: WsiSection, path: str | Path, workers: int = 1, levels: int = 6) -> Path:
    """``section`` as a tiled pyramidal TIFF (zlib): level 0 streamed in tiles (``workers`` processes) into a
    scratch file, each lower level box-halved from the one before in 512 px windows, then all copied into one
    pyramid. Never holds more than a few tiles of the slide."""
    import tifffile

    path = Path(path)
    size = section.size
    corners = [(x, y) for y in range(0, size, TILE) for x in range(0, size, TILE)]
    scratch = Path(tempfile.mkdtemp(prefix=".stainmil-wsi-", dir=path.parent))
    try:
        level0 = scratch / "level0.tiff"
        with progress_bar(f"synth: {path.name} level 0", total=len(corners)) as advance:
            def tiles():
                if workers <= 1:
                    _set_section(section)
                    for corner in corners:
                        yield _render_tile(corner)
                        advance()
                    return
                with ProcessPoolExecutor(workers, initializer=_set_section, initargs=(section,)) as pool:
                    for tile in pool.map(_render_tile, corners, chunksize=8):
                        yield tile
                        advance()

            _write_level(level0, tiles(), size)
        sizes = [size]
        while len(sizes) < levels and sizes[-1] // 2 >= TILE:
            sizes.append(sizes[-1] // 2)
        scratch_levels = [level0]
        for index, side in enumerate(sizes[1:], start=1):  # each level halved from the one before: 512 px windows
            scratch_levels.append(scratch / f"level{index}.tiff")
            _write_level(scratch_levels[-1], _tiles(scratch_levels[-2], side, 2), side)
        with atomic_path(path, suffix=path.suffix) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tiff:
            for index, (side, level) in enumerate(zip(sizes, scratch_levels)):
                per_cm = 1e4 / (section.mpp * 2**index)
                tiff.write(_tiles(level, side, 1), shape=(side, side, 3), dtype=np.uint8, tile=(TILE, TILE),
                           photometric="rgb", compression="zlib", compressionargs={"level": 1}, metadata=None,
                           subfiletype=0 if index == 0 else 1, resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def _write_level(path: Path, tiles, side: int) -> None:
    """A scratch single-level tiled TIFF of ``side`` px from row-major ``tiles``."""
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=True) as tiff:
        tiff.write(tiles, shape=(side, side, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                   compression="zlib", compressionargs={"level": 1}, metadata=None)


def _tiles(source_path: Path, side: int, factor: int):
    """Tiles (row-major) of a ``side`` px level made from ``source_path``'s level 0 shrunk ``factor`` (1 or 2,
    box filter): windows of at most 512 px are read, whatever the slide's size."""
    import openslide

    source = openslide.OpenSlide(str(source_path))
    try:
        window = TILE * factor
        for y in range(0, side, TILE):
            for x in range(0, side, TILE):
                region = np.asarray(source.read_region((x * factor, y * factor), 0, (window, window)))[..., :3]
                if factor > 1:
                    region = region.reshape(TILE, factor, TILE, factor, 3).sum(axis=(1, 3), dtype=np.uint16)
                    region = (region + factor * factor // 2) // (factor * factor)
                yield np.ascontiguousarray(region, dtype=np.uint8)
    finally:
        source.close()


def write_serial_wsi(out: str | Path, section_mm: float, mpp: float = 0.5, cases: int = 2, seed: int = 0,
                     workers: int = 0, overlap: float = 0.35, artefacts: bool = False) -> Path:
    """``cases`` cases of three neighbouring serial sections each (H&E, Melan-A, SOX10; IHC sometimes flipped;
    a share ``overlap`` of nuclei shared, see :class:`WsiSection`) of ``section_mm`` mm at ``mpp`` µm/px, into
    ``out/slides`` (+ landmarks) with ``labels.csv`` and ``slides.yaml``; slides already written are kept
    (resumable). Returns the slide folder."""
    if section_mm <= 0 or mpp <= 0:
        raise ConfigError(f"synth: --section-mm ({section_mm}) and --mpp ({mpp}) must be positive.")
    out = Path(out).resolve()
    slides = out / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    workers = workers or available_cores()
    labels = []
    for number in range(1, cases + 1):
        label = number % 2  # odd cases high-grade
        labels.append({"case_id": f"{number:03d}", "label": "high_grade" if label else "benign"})
        block = make_block(seed * 1000 + number, label, section_mm * 1000)
        for k, stain in enumerate(("he", "melan", "sox10")):
            stem = f"C{number:03d}_{SCANNER_NAMES[stain]}_S0"
            section = make_section(block, stain, mpp, seed=k + 1, flip=stain != "he" and (number + k) % 3 == 0,
                                   overlap=overlap, artefacts=artefacts)
            target = slides / f"{stem}.tiff"
            if not target.is_file():
                write_section_tiff(section, target, workers)
            atomic_write(slides / f"{stem}_landmarks.csv",
                         lambda tmp, s=section: section_landmarks(s).to_csv(tmp, index=False))
    table = pd.DataFrame(labels)
    atomic_write(out / "labels.csv", lambda tmp: table.to_csv(tmp, index=False))
    work = out.parent / f"{out.name}_work"
    slide_yaml = {
        "output_dir": str(work),
        "data": {"source": "slides", "labels_csv": str(out / "labels.csv")},
        "tile": {"slices_dir": str(slides), "out_dir": str(work / "tiles"), "mpp": 1.0, "patch_size": 224,
                 "filename_pattern": FILENAME_PATTERN},
    }
    atomic_write_text(out / "slides.yaml", "# stainmil config for these real-size serial sections (10x patches)\n"
                      + yaml.safe_dump(slide_yaml, sort_keys=False))
    return slides


def landmarks_of(slide: str | Path) -> pd.DataFrame | None:
    """The landmarks beside a slide (``<stem>_landmarks.csv``: id -> x_um, y_um in level-0 µm), or None."""
    path = Path(slide).with_name(f"{Path(slide).stem}_landmarks.csv")
    return pd.read_csv(path).set_index("id")[["x_um", "y_um"]] if path.is_file() else None


def pair_errors(transform, fixed_slide: str | Path, moving_slide: str | Path) -> np.ndarray | None:
    """(L,) µm: how far each landmark the two slides share lands from its place on the fixed slide when the
    moving one's is carried through ``transform`` (``moving_to_fixed``); None when either has no landmarks."""
    fixed, moving = landmarks_of(fixed_slide), landmarks_of(moving_slide)
    if fixed is None or moving is None:
        return None
    ids = fixed.index.intersection(moving.index)
    return np.linalg.norm(transform.moving_to_fixed(moving.loc[ids].to_numpy()) - fixed.loc[ids].to_numpy(), axis=1)


def landmark_errors(registrations: pd.DataFrame) -> pd.DataFrame:
    """One row per shared landmark of every registered pair whose two slides carry landmarks: ``case, stain,
    verdict, error_um`` — how far the IHC landmark lands (through the pair's transform) from the H&E one."""
    frames = []
    for row in registrations.itertuples(index=False):
        transform, attrs = read_pair(row.transform)
        error = None if transform is None else pair_errors(transform, attrs["fixed_slide"], attrs["moving_slide"])
        if error is None:
            continue
        frames.append(pd.DataFrame({"case": row.case, "stain": row.stain, "verdict": row.verdict, "error_um": error}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["case", "stain", "verdict", "error_um"])
