// stainmil view — the registration maths of the linked viewers, pure (no page, no viewer): a pair's transform as
// /api/transform/N sends it (stainmil.view.transforms: affine in µm, displacement grids u, v as base64 float32,
// their spacing, the slides' µm/px) carried between the H&E's and the IHC slide's level-0 px, as
// stainmil.slides.register.PairTransform does. Tested on its own (tests/view/test_registration_js.py, under node).
"use strict";
const registration = (() => {
  function decode(b64) {                       // base64 little-endian float32 -> Float32Array
    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
    return new Float32Array(bytes.buffer);
  }

  // the transform ready to use: its grids split into (x, y) components, the affine's inverse and scale
  function prepare(t) {
    const [h, w] = t.shape, n = h * w;
    const u = decode(t.u), v = decode(t.v);
    const a = t.affine, det = a[0][0] * a[1][1] - a[0][1] * a[1][0];
    const inverse = [[a[1][1] / det, -a[0][1] / det], [-a[1][0] / det, a[0][0] / det]];
    return { ...t, grids: { u: [u.subarray(0, n), u.subarray(n, 2 * n)], v: [v.subarray(0, n), v.subarray(n, 2 * n)] },
             scale: Math.sqrt(Math.abs(det)), inverse,
             inverseShift: [-(inverse[0][0] * a[0][2] + inverse[0][1] * a[1][2]),
                            -(inverse[1][0] * a[0][2] + inverse[1][1] * a[1][2])] };
  }

  // bilinear sample of a (2, H, W) grid at µm (x, y); pixel centres at (i + ½) spacing, edges extended
  function sample(t, grid, x, y) {
    const [h, w] = t.shape;
    const clamp = (value, hi) => Math.min(Math.max(value, 0), hi);
    const fi = clamp(y / t.spacing_um - 0.5, h - 1), fj = clamp(x / t.spacing_um - 0.5, w - 1);
    const i0 = Math.floor(fi), j0 = Math.floor(fj), i1 = Math.min(i0 + 1, h - 1), j1 = Math.min(j0 + 1, w - 1);
    const di = fi - i0, dj = fj - j0;
    const at = (g, i, j) => g[i * w + j];
    return [0, 1].map(k => {
      const g = grid[k];
      return (1 - di) * ((1 - dj) * at(g, i0, j0) + dj * at(g, i0, j1)) + di * ((1 - dj) * at(g, i1, j0) + dj * at(g, i1, j1));
    });
  }

  function fixedToMoving(t, px, py) {          // H&E level-0 px -> IHC level-0 px
    const x = px * t.fixed_mpp, y = py * t.fixed_mpp;
    const d = sample(t, t.grids.u, x, y);
    const qx = x + d[0], qy = y + d[1], a = t.affine;
    return [(a[0][0] * qx + a[0][1] * qy + a[0][2]) / t.moving_mpp, (a[1][0] * qx + a[1][1] * qy + a[1][2]) / t.moving_mpp];
  }

  function movingToFixed(t, px, py) {          // IHC level-0 px -> H&E level-0 px
    const x = px * t.moving_mpp, y = py * t.moving_mpp, m = t.inverse;
    const qx = m[0][0] * x + m[0][1] * y + t.inverseShift[0], qy = m[1][0] * x + m[1][1] * y + t.inverseShift[1];
    const d = sample(t, t.grids.v, qx, qy);
    return [(qx + d[0]) / t.fixed_mpp, (qy + d[1]) / t.fixed_mpp];
  }

  // IHC screen px per H&E screen px at the same tissue: the zoom an IHC viewer takes to match its H&E viewer
  function zoomRatio(t) { return t.moving_mpp / (t.fixed_mpp * t.scale); }

  // how to turn (and mirror) an IHC viewer so its tissue lies as on the H&E: OpenSeadragon draws
  // screen = F R(phi) p (F: its horizontal flip); a step d on the H&E is L d on the IHC slide (L: the affine's
  // linear part), so R(phi) must be F L^-1 up to scale
  function orientation(t, on) {
    const m = t.inverse, flip = on && t.flipped;
    const m00 = flip ? -m[0][0] : m[0][0], m10 = m[1][0];
    return { flip, degrees: on ? Math.atan2(m10, m00) * 180 / Math.PI : 0 };
  }

  return { decode, prepare, sample, fixedToMoving, movingToFixed, zoomRatio, orientation };
})();
if (typeof module !== "undefined") module.exports = registration;  // node (the tests); the page uses the global
