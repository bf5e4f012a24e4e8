"""Write pyramidal TIFF slides (tiled, lossless) that OpenSlide reads — for synthetic cohorts and tests.

Two TIFF flavours: a generic tiled TIFF whose resolution tags carry the µm per pixel (OpenSlide's
``generic-tiff``), and an Aperio-style file whose ImageDescription carries ``MPP`` and ``AppMag``
(OpenSlide's ``aperio``); and DICOM whole-slide images (a folder of VL Whole Slide Microscopy instances, one per
level, JPEG tiles, pixel spacing in the shared functional groups: OpenSlide's ``dicom``). Levels halve the
previous one (Pillow, box filter) down to the tile size.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from stainmil.io import atomic_path


def pyramid(rgb: np.ndarray, tile: int, max_levels: int = 4) -> list[np.ndarray]:
    """Level 0 and its halvings, (H, W, 3) uint8 each, while the level is larger than one tile."""
    levels = [rgb]
    while len(levels) < max_levels and min(levels[-1].shape[:2]) >= 2 * tile:
        h, w = levels[-1].shape[:2]
        levels.append(np.asarray(Image.fromarray(levels[-1]).resize((w // 2, h // 2), Image.BOX)))
    return levels


def write_pyramidal_tiff(path: str | Path, rgb: np.ndarray, mpp: float | None = None,
                         magnification: float | None = None, aperio: bool = False, tile: int = 256,
                         max_levels: int = 4) -> Path:
    """Write ``rgb`` (H, W, 3) uint8 as a tiled pyramidal TIFF (zlib, lossless) atomically.

    ``mpp`` goes into the resolution tags (generic) or the Aperio description with ``magnification``
    (AppMag); with neither the slide records no scale.
    """
    import tifffile

    path = Path(path)
    levels = pyramid(rgb, tile, max_levels)
    with atomic_path(path, suffix=path.suffix) as tmp, tifffile.TiffWriter(tmp) as tiff:
        for index, level in enumerate(levels):
            downsample = rgb.shape[1] / level.shape[1]
            kwargs: dict = {"tile": (tile, tile), "photometric": "rgb", "compression": "zlib", "metadata": None,
                            "subfiletype": 0 if index == 0 else 1}
            if aperio:
                h, w = level.shape[:2]
                scale = "".join(f"|{k} = {v}" for k, v in (("AppMag", magnification), ("MPP", mpp)) if v)
                kwargs["description"] = (f"Aperio Image Library v12.0.15 stainmil\r\n{w}x{h} [0,0 {w}x{h}] "
                                         f"({tile}x{tile}) RAW/RGB{scale if index == 0 else ''}")
            elif mpp:
                per_cm = 1e4 / (mpp * downsample)
                kwargs.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
            tiff.write(level, **kwargs)
    return path


VL_WHOLE_SLIDE = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def _jpeg(tile: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(tile).save(buffer, format="JPEG", quality=quality, subsampling=1)  # 4:2:2 = YBR_FULL_422
    return buffer.getvalue()


def _dicom_level(level: np.ndarray, index: int, rgb_shape: tuple, mpp: float, tile: int, quality: int,
                 uids: dict) -> Dataset:
    """One pyramid level as a DICOM instance: JPEG baseline tiles in row-major (TILED_FULL) order."""
    h, w = level.shape[:2]
    rows, cols = -(-h // tile), -(-w // tile)
    padded = np.full((rows * tile, cols * tile, 3), 255, np.uint8)  # edge tiles padded with glass
    padded[:h, :w] = level
    frames = [_jpeg(padded[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile], quality)
              for r in range(rows) for c in range(cols)]
    sop = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = VL_WHOLE_SLIDE, sop
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = VL_WHOLE_SLIDE, sop, "SM"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PatientName, ds.PatientID, ds.ContainerIdentifier = "Synthetic^Slide", uids["name"], uids["name"]
    ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = 1, index + 1, "stainmil synth"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if index == 0 else \
        ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]  # readers need VOLUME to find the pyramid
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.Rows = ds.Columns = tile
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    ds.NumberOfFrames, ds.DimensionOrganizationType = len(frames), "TILED_FULL"
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
    ds.TotalPixelMatrixFocalPlanes, ds.NumberOfOpticalPaths = 1, 1
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = rgb_shape[1] * mpp / 1000, rgb_shape[0] * mpp / 1000  # mm
    ds.ImagedVolumeDepth = 1.0
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = origin.YOffsetInSlideCoordinateSystem = 0.0
    ds.TotalPixelMatrixOriginSequence = [origin]
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    measures = Dataset()
    spacing = mpp * rgb_shape[1] / w / 1000  # mm per pixel of this level
    measures.PixelSpacing, measures.SliceThickness = [spacing, spacing], 0.001
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    path = Dataset()
    path.OpticalPathIdentifier = "0"
    ds.OpticalPathSequence = [path]
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    return ds


def write_dicom_slide(folder: str | Path, rgb: np.ndarray, mpp: float, tile: int = 256, quality: int = 95,
                      max_levels: int = 4) -> Path:
    """Write ``rgb`` (H, W, 3) uint8 as a DICOM whole-slide image: a folder with one VL Whole Slide Microscopy
    instance per pyramid level (JPEG tiles; pixel spacing from ``mpp``, µm per level-0 pixel). The folder
    appears only when every level is written."""
    folder = Path(folder)
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid(), "name": folder.name[:64]}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for index, level in enumerate(pyramid(rgb, tile, max_levels)):
            _dicom_level(level, index, rgb.shape, mpp, tile, quality, uids).save_as(
                tmp / f"level{index}.dcm", enforce_file_format=True)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder
