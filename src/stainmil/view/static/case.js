// stainmil view — one case: a deep-zoom viewer per slice of every stain, overlays, and viewers linked through
// each IHC slice's registration onto its H&E slice (affine + non-rigid displacement field, as `stainmil register`
// wrote them; see stainmil.data.registration).
"use strict";
const esc = text => String(text ?? "").replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const params = new URLSearchParams(location.search);
const SOURCE = Number(params.get("source") || 0);
const CASE = params.get("case") || "";
const OVERLAYS = { attention: "attention", prob: "patch-alone P", mask: "tissue mask", regions: "QuPath regions",
                   outline: "lesion outline", topk: "top-k" };
const INTERACTIONS = ["canvas-press", "canvas-drag", "canvas-scroll", "canvas-pinch", "canvas-key", "canvas-double-click",
                      "navigator-click", "navigator-drag", "navigator-scroll"];
const views = [];          // {slice, osd, canvas, on: {overlay: bool}, transform, maskImage, regions, outline, opened}
const byId = new Map();
let leader = null;         // the viewer the user moved last: only its moves are followed
let syncing = false;
let page = null;

// ---- the registration transform (level-0 µm; see stainmil.slides.register.PairTransform) -------------------------
function decode(b64) {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  return new Float32Array(bytes.buffer);
}
function prepare(t) {
  const [h, w] = t.shape, n = h * w;
  const u = decode(t.u), v = decode(t.v);
  t.grids = { u: [u.subarray(0, n), u.subarray(n, 2 * n)], v: [v.subarray(0, n), v.subarray(n, 2 * n)] };
  const a = t.affine;
  const det = a[0][0] * a[1][1] - a[0][1] * a[1][0];
  t.scale = Math.sqrt(Math.abs(det));
  t.inverse = [[a[1][1] / det, -a[0][1] / det], [-a[1][0] / det, a[0][0] / det]];
  t.inverseShift = [-(t.inverse[0][0] * a[0][2] + t.inverse[0][1] * a[1][2]),
                    -(t.inverse[1][0] * a[0][2] + t.inverse[1][1] * a[1][2])];
  return t;
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
function fixedToMoving(t, px, py) {           // H&E level-0 px -> IHC level-0 px
  const x = px * t.fixed_mpp, y = py * t.fixed_mpp;
  const d = sample(t, t.grids.u, x, y);
  const qx = x + d[0], qy = y + d[1], a = t.affine;
  return [(a[0][0] * qx + a[0][1] * qy + a[0][2]) / t.moving_mpp, (a[1][0] * qx + a[1][1] * qy + a[1][2]) / t.moving_mpp];
}
function movingToFixed(t, px, py) {           // IHC level-0 px -> H&E level-0 px
  const x = px * t.moving_mpp, y = py * t.moving_mpp, m = t.inverse;
  const qx = m[0][0] * x + m[0][1] * y + t.inverseShift[0], qy = m[1][0] * x + m[1][1] * y + t.inverseShift[1];
  const d = sample(t, t.grids.v, qx, qy);
  return [(qx + d[0]) / t.fixed_mpp, (qy + d[1]) / t.fixed_mpp];
}

// ---- viewer geometry ---------------------------------------------------------------------------------------------
function item(view) { return view.osd && view.osd.world.getItemAt(0); }
function centre(view) {                        // current centre, level-0 image px
  const p = item(view).viewportToImageCoordinates(view.osd.viewport.getCenter(true));
  return [p.x, p.y];
}
function imageZoom(view) { return item(view).viewportToImageZoom(view.osd.viewport.getZoom(true)); }
function place(view, x, y, zoom) {
  const it = item(view), vp = view.osd.viewport;
  vp.zoomTo(it.imageToViewportZoom(zoom), null, true);
  vp.panTo(it.imageToViewportCoordinates(x, y), true);
}
function linked(view) { return view.slice.link && view.slice.link.linked && view.transform && view.opened; }

function follow(from) {                        // move every viewer linked to `from` onto the same tissue
  if (!document.getElementById("linked").checked || syncing || !from.opened) return;
  syncing = true;
  try {
    let reference = from;
    if (!from.slice.reference) {
      if (!linked(from)) return;
      reference = byId.get(from.slice.link.fixed);
      if (!reference || !reference.opened) return;
      const t = from.transform, [mx, my] = centre(from);
      const [fx, fy] = movingToFixed(t, mx, my);
      place(reference, fx, fy, imageZoom(from) * t.fixed_mpp * t.scale / t.moving_mpp);
    }
    const [cx, cy] = centre(reference), zoom = imageZoom(reference);
    for (const view of views) {
      if (view === from || view === reference || !linked(view) || view.slice.link.fixed !== reference.slice.id) continue;
      const t = view.transform, [mx, my] = fixedToMoving(t, cx, cy);
      place(view, mx, my, zoom * t.moving_mpp / (t.fixed_mpp * t.scale));
    }
  } finally { syncing = false; }
}

function orient(view) {                        // turn (and mirror) an IHC viewer so its tissue lies as on the H&E
  if (!linked(view)) return;
  const on = document.getElementById("orient").checked, m = view.transform.inverse;
  const flip = on && view.transform.flipped;
  // OpenSeadragon draws screen = F R(phi) p (F: its horizontal flip); a step d on the H&E is L d on the IHC
  // slide (L: the affine's linear part), so R(phi) must be F L^-1 up to scale
  const m00 = flip ? -m[0][0] : m[0][0], m10 = m[1][0];
  const degrees = on ? Math.atan2(m10, m00) * 180 / Math.PI : 0;
  view.osd.viewport.setFlip(flip);
  view.osd.viewport.setRotation(degrees, true);
}

// OpenSeadragon mirrors a flipped viewer's drawing about its centre, not its coordinate conversions
function screenOf(view, p) {
  return view.osd.viewport.getFlip() ? new OpenSeadragon.Point(view.osd.container.clientWidth - p.x, p.y) : p;
}

// ---- overlays ----------------------------------------------------------------------------------------------------
function draw(view) {
  const it = item(view), canvas = view.canvas;
  if (!it) return;
  const ratio = window.devicePixelRatio || 1, w = view.osd.container.clientWidth, h = view.osd.container.clientHeight;
  if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
    canvas.width = Math.round(w * ratio); canvas.height = Math.round(h * ratio);
    canvas.style.width = w + "px"; canvas.style.height = h + "px";
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const P = (x, y) => screenOf(view, it.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y)));
  const o = P(0, 0), ex = P(1024, 0), ey = P(0, 1024);
  const a = (ex.x - o.x) / 1024, b = (ex.y - o.y) / 1024, c = (ey.x - o.x) / 1024, d = (ey.y - o.y) / 1024;
  const screenPerPixel = Math.hypot(a, b);
  ctx.setTransform(a * ratio, b * ratio, c * ratio, d * ratio, o.x * ratio, o.y * ratio);
  const s = view.slice, p = s.patches, on = view.on;
  if (on.mask && view.maskImage && view.maskImage.complete) {
    const size = it.getContentSize();
    ctx.drawImage(view.maskImage, 0, 0, size.x, size.y);
  }
  const fills = [on.attention && "relative_attention", on.prob && "patch_prob"].filter(Boolean);
  fills.forEach((value, layer) => {
    const colours = p.colour[value];
    if (!colours) return;
    ctx.globalAlpha = 0.4;
    for (let i = 0; i < p.x.length; i++) {
      const size = p.size[i], inset = fills.length === 2 && layer === 1 ? size / 4 : 0;
      ctx.fillStyle = colours[i];
      ctx.fillRect(p.x[i] + inset, p.y[i] + inset, size - 2 * inset, size - 2 * inset);
    }
    ctx.globalAlpha = 1;
  });
  if (on.regions && view.regions) {
    ctx.lineWidth = 2 / screenPerPixel;
    for (const [which, colour] of [["include", "#1b9e3e"], ["exclude", "#d62728"]]) {
      ctx.strokeStyle = colour;
      for (const ring of view.regions[which]) {
        ctx.beginPath();
        ring.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
        ctx.closePath(); ctx.stroke();
      }
    }
  }
  if (on.outline) outlines.truth(view, ctx, screenPerPixel, view.outline);   // analysis.truth (outlines.js)
  if (on.topk && p.rank_in_case) {
    const k = Number(document.getElementById("k").value) || 10;
    ctx.lineWidth = 3 / screenPerPixel;
    ctx.strokeStyle = "#00e5ff"; ctx.fillStyle = "#00e5ff";
    ctx.font = `${13 / screenPerPixel}px system-ui, sans-serif`;
    ctx.textBaseline = "top";
    for (let i = 0; i < p.x.length; i++) {
      if (p.rank_in_case[i] > k) continue;
      ctx.strokeRect(p.x[i], p.y[i], p.size[i], p.size[i]);
      ctx.fillText(String(p.rank_in_case[i]), p.x[i] + 3 / screenPerPixel, p.y[i] + 2 / screenPerPixel);
    }
  }
  review.paint(view, ctx, screenPerPixel);     // review mode: polygons, carried outlines, marks (review.js)
}

function setOverlay(view, name, value) {
  view.on[name] = value;
  const box = view.panel.querySelector(`input[data-overlay="${name}"]`);
  if (box) box.checked = value;
  if (name === "mask" && value && !view.maskImage && view.slice.mask) {
    view.maskImage = new Image();
    view.maskImage.onload = () => draw(view);
    view.maskImage.src = `/slides/${view.slice.id}/mask.png`;
  }
  if (name === "regions" && value && !view.regions && view.slice.annotations) {
    fetch(`/api/regions/${view.slice.id}`).then(r => r.json()).then(data => { view.regions = data; draw(view); });
  }
  if (name === "outline" && value && !view.outline && view.slice.outline) {
    view.outline = { loading: true, outlines: [] };
    fetch(`/api/outline/${view.slice.id}`).then(async r => {
      const body = await r.json();
      view.outline = r.ok ? body : { outlines: [], why: "", problem: body.error };
    }).catch(error => { view.outline = { outlines: [], why: "", problem: `the lesion outline did not load (${error})` }; })
      .finally(() => { outlineNote(view); if (view.osd) draw(view); });
  }
  if (name === "outline") outlineNote(view);
  if (view.osd) draw(view);
}
function outlineNote(view) {                   // one line under the overlay boxes: whose outline, or why none
  const box = view.panel.querySelector(".onote");
  const [text, problem] = view.on.outline && view.slice.outline ? outlines.note(view.outline) : ["", false];
  box.textContent = box.title = text;
  box.hidden = !text;
  box.classList.toggle("bad", problem);
}

// ---- clicking a patch --------------------------------------------------------------------------------------------
function pick(view, position) {
  const it = item(view), p = view.slice.patches;
  const at = it.viewerElementToImageCoordinates(screenOf(view, position));
  for (let i = 0; i < p.x.length; i++) {
    if (at.x >= p.x[i] && at.x < p.x[i] + p.size[i] && at.y >= p.y[i] && at.y < p.y[i] + p.size[i]) {
      showPatch(view, i);
      return;
    }
  }
}
function showPatch(view, i) {
  const p = view.slice.patches, s = view.slice, fmt = (x, n = 4) => (x === null || x === undefined ? "–" : Number(x).toFixed(n));
  const rows = [["case", CASE], ["stain / slice", `${s.stain} / ${s.slice}`], ["patch", p.patch ? p.patch[i] : i],
                ["rank in case", p.rank_in_case ? p.rank_in_case[i] : "–"],
                ["relative attention", fmt(p.relative_attention && p.relative_attention[i], 3) + "×"],
                ["effective attention", fmt(p.effective_attention && p.effective_attention[i], 5)],
                ["patch weight (in slice)", fmt(p.patch_weight && p.patch_weight[i])],
                ["patch-alone P", fmt(p.patch_prob && p.patch_prob[i], 3)],
                ["slice weight", fmt(s.slice_weight, 3)], ["stain weight", fmt(s.stain_weight, 3)],
                ["x, y (level 0)", `${Math.round(p.x[i])}, ${Math.round(p.y[i])}`]];
  const box = document.getElementById("info");
  box.innerHTML = `<span class="close" onclick="this.parentElement.hidden=true">✕</span><b>patch</b><table>` +
    rows.map(([k, v]) => `<tr><td>${esc(k)}</td><td>${esc(v)}</td></tr>`).join("") + "</table>";
  box.hidden = false;
  box.dataset.patch = p.patch ? p.patch[i] : i;
  review.patchInfo(view, i, box);
}

// ---- building the page -------------------------------------------------------------------------------------------
function panel(slice) {
  const div = document.createElement("div");
  div.className = "panel";
  div.dataset.slide = slice.id;
  const weight = (name, x) => (x === null || x === undefined ? "" : `${name} ${Number(x).toFixed(3)}`);
  let link = "";
  if (slice.reference) link = `<div class="link on">reference (H&amp;E): the IHC viewers registered to it follow it</div>`;
  else if (slice.link && slice.link.linked) link = `<div class="link on">linked to ${esc(slice.link.fixed_name)} through its registration (aligned)</div>`;
  else if (slice.link) link = `<div class="link off">not linked: ${esc(slice.link.why)}</div>`;
  div.innerHTML = `<div class="title"><b>${esc(slice.stain)}</b> slice ${esc(slice.slice)} <span class="w">${esc(slice.name)}</span>
      <span class="w">${weight("stain weight", slice.stain_weight)} ${weight("slice weight", slice.slice_weight)}</span></div>${link}
    <div class="ovl">` + Object.entries(OVERLAYS).map(([k, name]) =>
      `<label><input type="checkbox" data-overlay="${k}"> ${name}</label>`).join("") + `</div>` +
    `<div class="onote" hidden></div>` +
    (slice.problem ? `<div class="problem">${esc(slice.problem)}</div>` : `<div class="osd"></div>`);
  return div;
}

function makeViewer(slice) {
  const view = { slice, on: { attention: true, prob: false, mask: false, regions: false, outline: false, topk: false },
                 opened: false };
  view.panel = panel(slice);
  document.getElementById("viewers").appendChild(view.panel);
  views.push(view); byId.set(slice.id, view);
  view.panel.querySelectorAll("input[data-overlay]").forEach(box => {
    box.checked = view.on[box.dataset.overlay];
    box.disabled = (box.dataset.overlay === "mask" && !slice.mask) || (box.dataset.overlay === "regions" && !slice.annotations)
      || (box.dataset.overlay === "outline" && !slice.outline);
    if (box.dataset.overlay === "outline") {
      box.parentElement.title = slice.outline === "own" ? "the pathologist's outline of this slide (analysis.truth)"
        : slice.outline === "carried" ? "its H&E slice's outline, carried through the registration (dashed)"
        : slice.outline ? "its H&E slice's outline: not carried (tick to see why)"
        : "no outline of this slide (or of its H&E slice) in analysis.truth";
    }
    box.onchange = () => setOverlay(view, box.dataset.overlay, box.checked);
  });
  if (slice.problem) { view.ready = Promise.resolve(); return view; }
  view.osd = OpenSeadragon({
    element: view.panel.querySelector(".osd"), prefixUrl: "/osd/images/", tileSources: `/slides/${slice.id}.dzi`,
    showNavigator: true, navigatorPosition: "BOTTOM_RIGHT", maxZoomPixelRatio: 4, visibilityRatio: 0.1,
    animationTime: 0.5, springStiffness: 8, gestureSettingsMouse: { clickToZoom: false }, imageLoaderLimit: 6,
    timeout: 60000, showRotationControl: true, showFlipControl: false, drawer: "canvas",
  });
  view.canvas = document.createElement("canvas");
  view.canvas.className = "overlay";
  view.osd.canvas.appendChild(view.canvas);
  view.ready = new Promise(resolve => view.osd.addOnceHandler("open", () => { view.opened = true; resolve(); }));
  view.osd.addHandler("update-viewport", () => draw(view));
  view.osd.addHandler("animation", () => { if (leader === view) follow(view); });
  view.osd.addHandler("animation-finish", () => { if (leader === view) follow(view); });
  for (const name of INTERACTIONS) view.osd.addHandler(name, () => { leader = view; });
  view.osd.addHandler("canvas-click", e => { if (e.quick && !review.click(view, e)) pick(view, e.position); });
  review.attach(view);
  return view;
}

async function main() {
  const response = await fetch(`/api/case?source=${SOURCE}&case=${encodeURIComponent(CASE)}`);
  page = await response.json();
  if (!response.ok) { document.getElementById("notes").textContent = page.error; return; }
  const info = page.case;
  document.title = `stainmil view — case ${CASE}`;
  document.getElementById("title").textContent = `case ${CASE}`;
  document.getElementById("back").href = `/?source=${SOURCE}`;
  document.getElementById("summary").innerHTML = [info.label ? `label <b>${esc(info.label)}</b>` : "label unknown",
    info.pred ? `prediction <b>${esc(info.pred)}</b>` : "", info.prob !== undefined && info.prob !== null ? `P ${Number(info.prob).toFixed(3)}` : "",
    info.error && info.error !== "right" ? `<b style="color:var(--bad)">${esc(info.error)}</b>` : "", info.split ? `split ${esc(info.split)}` : ""]
    .filter(Boolean).join(" · ");
  document.getElementById("notes").textContent = page.notes.join(" ");
  const scale = page.colour_scales.relative_attention;
  document.getElementById("legend").innerHTML = `<span>${esc(scale.label)}</span><span class="ramp" style="background:${scale.gradient}"></span>` +
    scale.ticks.map(t => esc(t.text)).join(" ");
  review.start(page);
  const outlineBox = document.querySelector("input[data-all='outline']");
  outlineBox.disabled = !page.slices.some(s => s.outline);
  outlineBox.parentElement.title = outlineBox.disabled ? "no slide of this case has an outline in analysis.truth" : "";
  const slices = page.slices.slice().sort((a, b) => (b.reference - a.reference) || a.stain.localeCompare(b.stain) || a.slice.localeCompare(b.slice, undefined, { numeric: true }));
  slices.forEach(makeViewer);
  leader = views.find(v => v.slice.reference && v.osd) || views.find(v => v.osd) || null;
  await Promise.all(views.map(async view => {
    if (view.slice.link && view.slice.link.linked) {
      view.transform = prepare(await (await fetch(`/api/transform/${view.slice.link.transform}`)).json());
    }
  }));
  await Promise.all(views.map(v => v.ready));
  views.forEach(orient);
  if (leader) follow(leader);
  views.forEach(v => v.osd && draw(v));
  await review.load();
  document.body.dataset.ready = "1";
}

document.querySelectorAll("input[data-all]").forEach(box => box.onchange = () =>
  views.forEach(view => setOverlay(view, box.dataset.all, box.checked)));
document.getElementById("k").onchange = () => views.forEach(v => v.osd && draw(v));
document.getElementById("linked").onchange = e => {
  if (e.target.checked && leader) follow(leader);
  views.forEach(v => { const line = v.panel.querySelector(".link.on"); if (line && !v.slice.reference) line.style.opacity = e.target.checked ? 1 : 0.4; });
};
document.getElementById("orient").onchange = () => { views.forEach(orient); if (leader) follow(leader); };
window.stainmil = { views, centre, imageZoom, follow, lead: view => { leader = view; }, fixedToMoving, movingToFixed,
                    screenOf, review, done: main() };
