// stainmil view — one case: a deep-zoom viewer per slice of every stain, overlays (overlays.js), and viewers linked
// through each IHC slice's registration onto its H&E slice (registration.js: affine + non-rigid displacement field,
// as `stainmil register` wrote them). All the page's state is one object, `app`; the test hook at the end is the
// only way in from outside (docs/viewer.md).
"use strict";
const app = (() => {
  const params = new URLSearchParams(location.search);
  return {
    source: Number(params.get("source") || 0),
    case: params.get("case") || "",
    page: null,            // /api/case's answer
    views: [],             // {slice, panel, osd, layer, on: {overlay: bool}, loaded, transform, opened, ready}
    byId: new Map(),
    leader: null,          // the viewer the user moved last: only its moves are followed
    syncing: false,
  };
})();
const INTERACTIONS = ["canvas-press", "canvas-drag", "canvas-scroll", "canvas-pinch", "canvas-key", "canvas-double-click",
                      "navigator-click", "navigator-drag", "navigator-scroll"];

// ---- viewer geometry (level-0 image px) ---------------------------------------------------------------------------
function item(view) { return view.osd && view.osd.world.getItemAt(0); }
function centre(view) {
  const p = item(view).viewportToImageCoordinates(view.osd.viewport.getCenter(true));
  return [p.x, p.y];
}
function imageZoom(view) { return item(view).viewportToImageZoom(view.osd.viewport.getZoom(true)); }
function place(view, x, y, zoom, immediately = true) {
  const it = item(view), vp = view.osd.viewport;
  vp.zoomTo(it.imageToViewportZoom(zoom), null, immediately);
  vp.panTo(it.imageToViewportCoordinates(x, y), immediately);
}
function screenOf(view, p) { return view.layer.screenOf(p); }
function draw(view) { if (view.layer) view.layer.redraw(); }
function linked(view) { return view.slice.link && view.slice.link.linked && view.transform && view.opened; }

function follow(from) {                        // move every viewer linked to `from` onto the same tissue
  if (!document.getElementById("linked").checked || app.syncing || !from.opened) return;
  app.syncing = true;
  try {
    let reference = from;
    if (!from.slice.reference) {
      if (!linked(from)) return;
      reference = app.byId.get(from.slice.link.fixed);
      if (!reference || !reference.opened) return;
      const [fx, fy] = registration.movingToFixed(from.transform, ...centre(from));
      place(reference, fx, fy, imageZoom(from) / registration.zoomRatio(from.transform));
    }
    const [cx, cy] = centre(reference), zoom = imageZoom(reference);
    for (const view of app.views) {
      if (view === from || view === reference || !linked(view) || view.slice.link.fixed !== reference.slice.id) continue;
      const [mx, my] = registration.fixedToMoving(view.transform, cx, cy);
      place(view, mx, my, zoom * registration.zoomRatio(view.transform));
    }
  } finally { app.syncing = false; }
}

function orient(view) {                        // turn (and mirror) an IHC viewer so its tissue lies as on the H&E
  if (!linked(view)) return;
  const { flip, degrees } = registration.orientation(view.transform, document.getElementById("orient").checked);
  view.osd.viewport.setFlip(flip);
  view.osd.viewport.setRotation(degrees, true);
}

// ---- overlays on and off (what they load, loaded once) ------------------------------------------------------------
function setOverlay(view, key, value) {
  const overlay = OVERLAYS.find(o => o.key === key);
  view.on[key] = value;
  const box = view.panel.querySelector(`input[data-overlay="${key}"]`);
  if (box) box.checked = value;
  if (value && overlay.load && !view.loading[key] && (!overlay.offered || overlay.offered(view.slice))) {
    view.loading[key] = overlay.load(view)
      .then(data => { view.loaded[key] = data; }, () => { delete view.loading[key]; })  // failed: ticked again, retried
      .finally(() => { outlineNote(view); draw(view); });
  }
  if (key === "outline") outlineNote(view);
  draw(view);
}
function outlineNote(view) {                   // one line under the overlay boxes: whose outline, or why none
  const box = view.panel.querySelector(".onote");
  const answer = view.loaded.outline || { loading: true, outlines: [] };
  const [text, problem] = view.on.outline && view.slice.outline ? outlines.note(answer) : ["", false];
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
  const rows = [["case", app.case], ["stain / slice", `${s.stain} / ${s.slice}`], ["patch", p.patch ? p.patch[i] : i],
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
    <div class="ovl">${overlayBoxes("overlay", slice)}</div><div class="onote" hidden></div>` +
    (slice.problem ? `<div class="problem">${esc(slice.problem)}</div>` : `<div class="osd"></div>`);
  return div;
}

function makeViewer(slice) {
  const view = { slice, on: Object.fromEntries(OVERLAYS.map(o => [o.key, o.on])), loaded: {}, loading: {},
                 opened: false };
  view.panel = panel(slice);
  document.getElementById("viewers").appendChild(view.panel);
  app.views.push(view); app.byId.set(slice.id, view);
  view.panel.querySelectorAll("input[data-overlay]").forEach(box => {
    box.onchange = () => setOverlay(view, box.dataset.overlay, box.checked);
  });
  if (slice.problem) { view.ready = Promise.resolve(); return view; }
  view.osd = OpenSeadragon({
    element: view.panel.querySelector(".osd"), prefixUrl: "/osd/images/", tileSources: `/slides/${slice.id}.dzi`,
    showNavigator: true, navigatorPosition: "BOTTOM_RIGHT", maxZoomPixelRatio: 4, visibilityRatio: 0.1,
    animationTime: 0.5, springStiffness: 8, gestureSettingsMouse: { clickToZoom: false }, imageLoaderLimit: 6,
    timeout: 60000, showRotationControl: true, showFlipControl: false, drawer: "canvas",
  });
  view.layer = view.osd.stainmilOverlays(view);
  view.ready = new Promise(resolve => view.osd.addOnceHandler("open", () => { view.opened = true; resolve(); }));
  view.osd.addHandler("animation", () => { if (app.leader === view) follow(view); });
  view.osd.addHandler("animation-finish", () => { if (app.leader === view) follow(view); });
  for (const name of INTERACTIONS) view.osd.addHandler(name, () => { app.leader = view; });
  view.osd.addHandler("canvas-click", e => { if (e.quick && !review.click(view, e)) pick(view, e.position); });
  review.attach(view);
  return view;
}

async function main() {
  const response = await fetch(`/api/case?source=${app.source}&case=${encodeURIComponent(app.case)}`);
  const page = app.page = await response.json();
  if (!response.ok) { document.getElementById("notes").textContent = page.error; return; }
  const info = page.case;
  document.title = `stainmil view — case ${app.case}`;
  document.getElementById("title").textContent = `case ${app.case}`;
  document.getElementById("back").href = `/?source=${app.source}`;
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
  app.leader = app.views.find(v => v.slice.reference && v.osd) || app.views.find(v => v.osd) || null;
  await Promise.all(app.views.map(async view => {
    if (view.slice.link && view.slice.link.linked) {
      view.transform = registration.prepare(await (await fetch(`/api/transform/${view.slice.link.transform}`)).json());
    }
  }));
  await Promise.all(app.views.map(v => v.ready));
  app.views.forEach(orient);
  if (app.leader) follow(app.leader);
  app.views.forEach(draw);
  await review.load();
  document.body.dataset.ready = "1";
}

// the page's toolbar: one box per overlay for every viewer at once (from the same table as the panels')
document.getElementById("all-overlays").innerHTML = overlayBoxes("all");
document.querySelectorAll("input[data-all]").forEach(box => box.onchange = () =>
  app.views.forEach(view => setOverlay(view, box.dataset.all, box.checked)));
document.getElementById("k").onchange = () => app.views.forEach(draw);
document.getElementById("linked").onchange = e => {
  if (e.target.checked && app.leader) follow(app.leader);
  app.views.forEach(v => { const line = v.panel.querySelector(".link.on"); if (line && !v.slice.reference) line.style.opacity = e.target.checked ? 1 : 0.4; });
};
document.getElementById("orient").onchange = () => { app.views.forEach(orient); if (app.leader) follow(app.leader); };

// The test hook (docs/viewer.md): what a browser test may read and do, by viewer number (the panels' order).
window.stainmil = Object.freeze({
  done: main(),
  viewers: () => app.views.map(v => ({
    id: v.slice.id, stain: v.slice.stain, slice: v.slice.slice, reference: v.slice.reference, opened: v.opened,
    linked: !!(v.slice.link && v.slice.link.linked), fixed: v.slice.link ? v.slice.link.fixed : null,
    transform: v.slice.link ? v.slice.link.transform : null, on: { ...v.on }, outline: v.slice.outline,
    centre: v.opened ? centre(v) : null, zoom: v.opened ? imageZoom(v) : null,
    size: v.opened ? [item(v).getContentSize().x, item(v).getContentSize().y] : null,
    tiles: v.opened ? item(v).getFullyLoaded() : false })),
  settled: () => app.views.every(v => !v.osd || (!v.osd.world.needsDraw()
    && v.osd.viewport.getCenter(true).equals(v.osd.viewport.getCenter(false)))),
  // every linked viewer within one of its screen px of where the registration places its H&E viewer's centre
  aligned: () => app.views.filter(linked).every(v => {
    const [ex, ey] = registration.fixedToMoving(v.transform, ...centre(app.byId.get(v.slice.link.fixed)));
    const [x, y] = centre(v);
    return Math.hypot(x - ex, y - ey) <= 1 / imageZoom(v);
  }),
  whenStill: i => new Promise(resolve => app.views[i].osd.addOnceHandler("animation-finish", () => resolve())),
  moveTo: (i, x, y, zoom, animate = true) => { app.leader = app.views[i]; place(app.views[i], x, y, zoom, !animate); },
  redraw: () => app.views.forEach(v => v.osd && v.osd.forceRedraw()),
  overlayImage: i => app.views[i].layer.canvas.toDataURL(),
  canvasBox: i => { const b = app.views[i].osd.canvas.getBoundingClientRect(); return [b.left, b.top, b.width, b.height]; },
  patches: i => app.views[i].slice.patches,
  loaded: (i, key) => app.views[i].loaded[key] ?? null,        // what an overlay loaded (null until it has)
  note: i => app.views[i].panel.querySelector(".onote").textContent,
  toScreen: (i, point) => { const p = outlines.toScreen(app.views[i], point); return [p.x, p.y]; },
  toImage: (i, [x, y]) => review.toImage(app.views[i], new OpenSeadragon.Point(x, y)),
  polygons: i => app.views[i].review ? app.views[i].review.polygons : null,
  carried: i => app.views[i].review ? app.views[i].review.carried : null,
  marks: () => review.marks(),
  dirty: () => review.dirty(),
});
