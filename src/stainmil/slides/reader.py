"""Reading slides: whole-slide files through OpenSlide (tiffslide where OpenSlide cannot), plain slice
images through Pillow — one :class:`Slide` interface for both, plus the scale read from the metadata.

A patch in a slide is a :class:`PatchRef`: the slide, the top-left corner at level 0, the pyramid level
read and the side read there (resized to the encoder's input afterwards). A reader that reads many patches
(an extraction dataset, the online encoder, a tiling loop) owns a :class:`SlideHandles` of open slides; there is
no process-wide cache, and a DataLoader worker starts with handles of its own.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from stainmil.errors import DataError

WSI_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".tif", ".tiff", ".svslide", ".dcm"}
PLAIN_SUFFIXES = {".png", ".jpg", ".jpeg"}
MICRONS_X_MAGNIFICATION = 10.0  # the convention 40x = 0.25 um/px used when only one of the two is recorded


class UnreadableSlide(DataError):
    """The file could not be opened or read as a slide."""


class Slide:
    """A slide with pyramid levels. Coordinates are level-0 pixels unless named otherwise."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._handle = None
        self._image: np.ndarray | None = None
        suffix = self.path.suffix.lower()
        if suffix not in PLAIN_SUFFIXES:
            try:
                self._handle = _open_wsi(self.path)
            except UnreadableSlide:
                if suffix not in (".tif", ".tiff"):  # a plain (strip) TIFF slice image is read by Pillow
                    raise
        if self._handle is not None:
            self.level_dimensions: tuple[tuple[int, int], ...] = tuple(self._handle.level_dimensions)
            self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in self._handle.level_downsamples)
            self.properties: dict[str, str] = dict(self._handle.properties)
            return
        try:
            with Image.open(self.path) as image:
                self._image = np.asarray(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise UnreadableSlide(f"{self.path} is neither a slide OpenSlide reads nor a readable image ({exc}).") \
                from exc
        height, width = self._image.shape[:2]
        self.level_dimensions = ((width, height),)
        self.level_downsamples = (1.0,)
        self.properties = {}

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def mpp(self) -> float | None:
        """Microns per level-0 pixel from the metadata (OpenSlide's / tiffslide's normalised property)."""
        return self._first_positive("mpp-x")

    @property
    def magnification(self) -> float | None:
        """Objective power of level 0 from the metadata (e.g. Aperio's AppMag)."""
        return self._first_positive("objective-power")

    def _first_positive(self, name: str) -> float | None:
        values = (_positive_float(self.properties.get(f"{lib}.{name}")) for lib in ("openslide", "tiffslide"))
        return next((v for v in values if v), None)

    def read_region(self, x: int, y: int, level: int, size: int) -> np.ndarray:
        """RGB uint8 (size, size, 3) at ``level`` whose top-left is level-0 pixel (x, y); outside = white."""
        return self.read_box(x, y, level, size, size)

    @property
    def concurrent_reads(self) -> bool:
        """Whether several threads may read this slide at once: an image in memory or an OpenSlide handle (thread-safe
        by its documentation); not a tiffslide one."""
        return self._handle is None or type(self._handle).__module__.split(".")[0] == "openslide"

    def read_box(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) at ``level`` whose top-left is level-0 pixel (x, y); outside = white."""
        if self._handle is None:
            out = np.full((height, width, 3), 255, np.uint8)
            crop = self._image[max(y, 0):y + height, max(x, 0):x + width]
            out[max(-y, 0):max(-y, 0) + crop.shape[0], max(-x, 0):max(-x, 0) + crop.shape[1]] = crop
            return out
        try:
            region = self._handle.read_region((int(x), int(y)), int(level), (int(width), int(height)))
        except Exception as exc:  # OpenSlideError on a truncated tile, …
            raise UnreadableSlide(f"{self.path}: reading {width}x{height} px at level {level}, ({x}, {y}) failed "
                                  f"({type(exc).__name__}: {exc}); the file is damaged — re-export it.") from exc
        return _rgb_on_white(region)

    def thumbnail(self, downsample: float, band_pixels: int = 2**26) -> np.ndarray:
        """RGB uint8 of the whole slide shrunk ``downsample`` times from level 0: the coarsest level no coarser
        than needed is read and resized with Pillow (bilinear) — in horizontal bands of at most ``band_pixels``
        level pixels, so a slide without a pyramid never has its full resolution in memory."""
        width, height = self.dimensions
        size = (max(1, int(round(width / downsample))), max(1, int(round(height / downsample))))
        if self._handle is None:
            source = Image.fromarray(self._image)
            return np.asarray(source if source.size == size else source.resize(size, Image.BILINEAR))
        level = best_level(self.level_downsamples, downsample)
        level_w, level_h = self.level_dimensions[level]
        scale = self.level_downsamples[level]
        rows_per_band = max(1, band_pixels // level_w)
        bands, done = [], 0
        for top in range(0, level_h, rows_per_band):
            rows = min(rows_per_band, level_h - top)
            try:  # the location is in level-0 pixels
                region = self._handle.read_region((0, int(round(top * scale))), level, (level_w, rows))
            except Exception as exc:
                raise UnreadableSlide(f"{self.path}: reading level {level} failed ({type(exc).__name__}: {exc}); "
                                      "the file is damaged — re-export it.") from exc
            out_rows = int(round((top + rows) * size[1] / level_h)) - done  # band heights add up to the target
            band = Image.fromarray(_rgb_on_white(region))
            if out_rows > 0:
                bands.append(np.asarray(band if band.size == (size[0], out_rows) else
                                        band.resize((size[0], out_rows), Image.BILINEAR)))
                done += out_rows
        return np.concatenate(bands, axis=0)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def _positive_float(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _rgb_on_white(region: Image.Image) -> np.ndarray:
    """OpenSlide returns premultiplied RGBA with transparent pixels outside the scanned area: put it on white."""
    if region.mode != "RGBA":
        return np.asarray(region.convert("RGB"))
    pixels = np.asarray(region)
    if pixels[..., 3].min() == 255:  # fully scanned (the usual case): drop alpha, no compositing
        return np.ascontiguousarray(pixels[..., :3])
    white = Image.new("RGBA", region.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, region).convert("RGB"))


def slide_name(path: str | Path) -> str:
    """A slide's name as TRIDENT and CLAM name their files: the file name without its extension (``.ome.tif(f)``
    whole); a DICOM slide (a folder of .dcm instances) is named by its folder."""
    name = Path(path).name
    for double in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(double):
            return name[: -len(double)]
    return name if Path(path).is_dir() else Path(name).stem


def slide_paths(files: list[Path]) -> list[Path]:
    """The slides among ``files`` (a folder walk): each file, except that a DICOM slide's .dcm instances count
    once, as their folder. Order kept."""
    out, seen = [], set()
    for path in files:
        if path.suffix.lower() == ".dcm":
            path = path.parent
        if path not in seen:
            seen.add(path)
            out.append(path)
    return out


def dicom_instance(folder: Path) -> Path:
    """One .dcm file of a DICOM slide folder (OpenSlide opens the whole series from any of its instances)."""
    instances = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".dcm" and p.is_file())
    if not instances:
        raise UnreadableSlide(f"{folder} is a folder without .dcm files; a DICOM slide is a folder of its instances.")
    _check_dicom_base(folder, instances)
    return instances[0]


def _check_dicom_base(folder: Path, instances: list[Path]) -> None:
    """A DICOM slide whose full-resolution level is missing (an incomplete copy) would open as a smaller slide at
    a coarser µm/px, silently: refuse it by name. The base is the VOLUME instance not resampled from another
    (ImageType ORIGINAL, or flavour NONE); the levels resampled from it say RESAMPLED."""
    import pydicom

    volumes = []
    for path in instances:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ImageType",
                                                                                  "TotalPixelMatrixColumns"])
        except Exception:  # noqa: BLE001 - an unreadable instance is OpenSlide's to name when it opens the series
            continue
        kind = [str(v).upper() for v in header.get("ImageType", [])]
        if len(kind) >= 3 and kind[2] == "VOLUME":
            volumes.append((kind, int(header.get("TotalPixelMatrixColumns", 0))))
    if volumes and not any(kind[0] == "ORIGINAL" or kind[3:4] == ["NONE"] for kind, _ in volumes):
        widths = ", ".join(f"{w} px" for w in sorted({w for _, w in volumes}, reverse=True))
        raise UnreadableSlide(f"{folder}: the DICOM slide's full-resolution level is missing (only levels resampled "
                              f"from it are here: {widths} wide); copy the slide's folder again, every .dcm file.")


def _open_wsi(path: Path):
    if path.is_dir():
        path = dicom_instance(path)
    errors = []
    try:
        import openslide

        try:
            return openslide.OpenSlide(str(path))
        except Exception as exc:  # OpenSlideUnsupportedFormatError, OpenSlideError
            errors.append(f"OpenSlide: {type(exc).__name__}: {exc}")
    except ImportError:
        errors.append("openslide-python is not installed")
    try:
        import tiffslide

        try:
            return tiffslide.TiffSlide(str(path))
        except Exception as exc:
            errors.append(f"tiffslide: {type(exc).__name__}: {exc}")
    except ImportError:
        pass
    raise UnreadableSlide(f"{path} could not be opened as a slide ({'; '.join(errors)}).")


def best_level(downsamples: tuple[float, ...], target: float, tolerance: float = 0.01) -> int:
    """The coarsest level whose downsample does not exceed ``target`` (within ``tolerance``): read there and
    shrink, never enlarge."""
    fitting = [i for i, d in enumerate(downsamples) if d <= target * (1 + tolerance)]
    return max(fitting, key=lambda i: downsamples[i]) if fitting else 0


@dataclass(frozen=True)
class PatchRef:
    """One patch inside a slide: level-0 top-left (x, y), the level read and the side read there."""

    path: str
    x: int
    y: int
    level: int
    read_size: int


class SlideHandles:
    """Open slides by path for one reader, at most ``limit`` kept open (the least recently used idle one is closed
    first) — but never one that a thread is reading: closing an OpenSlide handle during another thread's read aborts
    the process (``tc->outstanding == 0``), so while more than ``limit`` are read at once, more stay open until their
    reads end (found by ``benchmarks/viewer_load.py``: 20 clients panning ~75 slides).

    Thread-safe (a thread pool of decoders, the viewer's request threads share one); never shared across processes:
    a pickled copy starts empty, and :meth:`forget` drops the handles a forked DataLoader worker inherited without
    closing them.
    """

    def __init__(self, limit: int = 32) -> None:
        self.limit = limit
        self._open: OrderedDict[str, Slide] = OrderedDict()
        self._reading: Counter[str] = Counter()
        self._lock = threading.Lock()

    @contextmanager
    def reading(self, path: str) -> Iterator[Slide]:
        """The open slide at ``path`` (opened if need be), not closed before the ``with`` block ends."""
        with self._lock:
            slide = self._open.pop(path, None) or Slide(path)
            self._open[path] = slide                                     # most recently used last
            self._reading[path] += 1
        try:
            yield slide
        finally:
            with self._lock:
                self._reading[path] -= 1
                if not self._reading[path]:
                    del self._reading[path]
                idle = [p for p in self._open if p not in self._reading]  # least recently used first
                for stale in idle[:max(0, len(self._open) - self.limit)]:
                    self._open.pop(stale).close()

    def close(self) -> None:
        with self._lock:
            while self._open:
                self._open.popitem()[1].close()

    def forget(self) -> None:
        """Drop every handle without closing it (a forked child must not close its parent's files)."""
        with self._lock:
            self._open = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def __getstate__(self) -> dict:
        return {"limit": self.limit}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["limit"])


def read_patch(ref: PatchRef | str, image_size: int, slides: SlideHandles | None = None) -> np.ndarray:
    """RGB uint8 (image_size, image_size, 3) of a patch: a PNG/JPEG file path, or a :class:`PatchRef` read
    through ``slides`` (the reader's open handles; None: the slide is opened for this read and closed)."""
    if isinstance(ref, PatchRef):
        if slides is not None:
            with slides.reading(ref.path) as slide:
                region = slide.read_region(ref.x, ref.y, ref.level, ref.read_size)
        else:
            slide = Slide(ref.path)
            try:
                region = slide.read_region(ref.x, ref.y, ref.level, ref.read_size)
            finally:
                slide.close()
        image = Image.fromarray(region)
    else:
        with Image.open(ref) as opened:
            image = opened.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
    return np.array(image)  # a writable copy


def patch_refs(manifest) -> np.ndarray:
    """What to read for each manifest row: its file path (patch folders) or a :class:`PatchRef` (slides)."""
    if "level" not in manifest.columns:
        return manifest["path"].to_numpy()
    refs = [PatchRef(p, int(x), int(y), int(level), int(size)) for p, x, y, level, size in
            zip(manifest["path"], manifest["x"], manifest["y"], manifest["level"], manifest["read_size"])]
    return np.array(refs, dtype=object)
