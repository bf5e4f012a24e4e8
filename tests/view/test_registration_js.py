"""The linked viewers' registration maths (static/registration.js) run under node against the Python transform it
mirrors (stainmil.slides.register.PairTransform), on a transform file written as `stainmil register` writes it."""

import json
import shutil
import subprocess

import numpy as np
import pytest

from stainmil.data.registration import write_pair
from stainmil.slides.transform import PairTransform
from stainmil.view.app import STATIC
from stainmil.view.transforms import transform_json

NODE = shutil.which("node") or "node"  # part of the toolchain: `make setup` installs the viewer's client with npm

SCRIPT = """
const registration = require(process.argv[1]);
const input = JSON.parse(require("fs").readFileSync(0, "utf8"));
const t = registration.prepare(input.transform);
process.stdout.write(JSON.stringify({
  forward: input.fixed.map(([x, y]) => registration.fixedToMoving(t, x, y)),
  back: input.moving.map(([x, y]) => registration.movingToFixed(t, x, y)),
  zoom: registration.zoomRatio(t), turned: registration.orientation(t, true), plain: registration.orientation(t, false),
}));
"""


def _run(transform: dict, fixed: np.ndarray, moving: np.ndarray) -> dict:
    out = subprocess.run([NODE, "-e", SCRIPT, str(STATIC / "registration.js")], check=True, capture_output=True,
                         text=True, input=json.dumps({"transform": transform, "fixed": fixed.tolist(),
                                                      "moving": moving.tolist()}))
    return json.loads(out.stdout)


def test_the_browser_carries_points_as_the_python_transform_does(tmp_path):
    rng = np.random.default_rng(0)
    angle, flip = np.deg2rad(23.0), np.diag([-1.0, 1.0])
    linear = 1.02 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ flip
    affine = np.eye(3)
    affine[:2, :2], affine[:2, 2] = linear, [1500.0, -200.0]
    yy, xx = np.mgrid[0:40, 0:50]
    u = np.stack([8 * np.sin(xx / 7.0), 6 * np.cos(yy / 5.0)])          # a smooth field, µm
    pair = PairTransform(affine, u, -u, 25.0, True)
    write_pair(tmp_path / "pair.h5", pair, {"fixed_mpp": 0.5, "moving_mpp": 0.25})
    fixed_px = rng.uniform(0, 2400, (50, 2))                           # H&E level-0 px (µm / 0.5)
    moving_px = rng.uniform(0, 4000, (50, 2))
    got = _run(transform_json(tmp_path / "pair.h5"), fixed_px, moving_px)
    want_forward = pair.fixed_to_moving(fixed_px * 0.5) / 0.25
    want_back = pair.moving_to_fixed(moving_px * 0.25) / 0.5
    assert np.abs(np.array(got["forward"]) - want_forward).max() < 1e-3   # float32 grids: well under a pixel
    assert np.abs(np.array(got["back"]) - want_back).max() < 1e-3
    assert got["zoom"] == pytest.approx(0.25 / (0.5 * 1.02))
    # turned like the H&E: a mirrored section is flipped back and rotated by the affine's inverse angle
    assert got["turned"]["flip"] is True and got["plain"] == {"flip": False, "degrees": 0}
    inverse = np.linalg.inv(linear)
    assert got["turned"]["degrees"] == pytest.approx(np.degrees(np.arctan2(inverse[1, 0], -inverse[0, 0])))
