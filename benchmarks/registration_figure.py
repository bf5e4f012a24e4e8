"""The H&E and an IHC section side by side at full resolution, the IHC one read through its registered transform:
what the linked viewer shows at a place (docs/images/registration-cells.png).

    python benchmarks/registration_figure.py <registration folder> OUT.png [--side 320]

For each of the first two Melan-A pairs in ``<registration folder>/transforms`` (after ``stainmil register`` on
sections with landmarks, e.g. ``stainmil synth serial --section-mm 8``): the shared landmark whose IHC window holds
the most DAB, an H&E window of ``--side`` level-0 px around it, and every one of its pixels mapped through
``PairTransform.fixed_to_moving`` onto the IHC slide (bilinear). A cross marks the landmark in both.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from stainmil.data.registration import read_pair
from stainmil.data.serial_wsi import landmarks_of
from stainmil.slides.reader import Slide


def side_by_side(transform_file: Path, side: int) -> np.ndarray:
    transform, attrs = read_pair(transform_file)
    fixed, moving = Slide(attrs["fixed_slide"]), Slide(attrs["moving_slide"])
    fixed_mpp, moving_mpp = float(attrs["fixed_mpp"]), float(attrs["moving_mpp"])
    lf, lm = landmarks_of(attrs["fixed_slide"]), landmarks_of(attrs["moving_slide"])

    def brown(i):
        x, y = (lm.loc[i].to_numpy() / moving_mpp).astype(int)
        window = moving.read_box(x - 100, y - 100, 0, 200, 200).astype(float)
        return ((window[..., 0] - window[..., 2]) > 25).mean()

    centre = lf.loc[max(lf.index.intersection(lm.index), key=brown)].to_numpy()
    corner = centre - side * fixed_mpp / 2
    he = fixed.read_box(int(corner[0] / fixed_mpp), int(corner[1] / fixed_mpp), 0, side, side)
    rows, cols = np.mgrid[0:side, 0:side]
    points = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], axis=1) * fixed_mpp + corner
    at = transform.fixed_to_moving(points) / moving_mpp - 0.5
    lo, hi = np.floor(at.min(axis=0)).astype(int) - 2, np.ceil(at.max(axis=0)).astype(int) + 2
    box = moving.read_box(int(lo[0]), int(lo[1]), 0, int(hi[0] - lo[0]), int(hi[1] - lo[1])).astype(float)
    ihc = np.stack([ndimage.map_coordinates(box[..., k], [at[:, 1] - lo[1], at[:, 0] - lo[0]], order=1)
                    .reshape(side, side) for k in range(3)], axis=-1).astype(np.uint8)
    image = Image.fromarray(np.concatenate([he, np.full((side, 8, 3), 255, np.uint8), ihc], axis=1))
    draw = ImageDraw.Draw(image)
    for x in (side // 2, side + 8 + side // 2):
        draw.line([(x - 12, side // 2), (x + 12, side // 2)], fill=(0, 0, 0))
        draw.line([(x, side // 2 - 12), (x, side // 2 + 12)], fill=(0, 0, 0))
    return np.asarray(image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("registration", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--side", type=int, default=320)
    options = parser.parse_args()
    files = sorted((options.registration / "transforms").glob("*melan*__to__*.h5"))[:2]
    rows = [side_by_side(path, options.side) for path in files]
    gap = np.full((8, rows[0].shape[1], 3), 255, np.uint8)
    Image.fromarray(np.concatenate([part for row in rows for part in (row, gap)][:-1])).save(options.out,
                                                                                            optimize=True)


if __name__ == "__main__":
    main()
