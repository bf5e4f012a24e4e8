// stainmil view — review mode (`stainmil view FOLDER --review NAME`): polygons drawn on each viewer (level-0 px),
// agree / disagree / unsure marks on the top-k patches, a note and the reviewer's grade of the case, saved to the
// server (`/api/review/N`, `/api/marks`); the reference (H&E) slide's polygons carried onto the registered IHC
// viewers (`/api/carried/N`, drawn by outlines.js as every carried outline is). Loaded after outlines.js and before
// case.js; case.js calls in here, and this file uses case.js's item(), screenOf(), draw(), app and common.js's esc()
// only when called. Without --review nothing here shows.
"use strict";
const review = (() => {
  const MARK_STYLE = { agree: ["#1b9e3e", "✓"], disagree: ["#d62728", "✗"], unsure: ["#f0a000", "?"] };
  const NEAR = 8;                              // screen px: a vertex or an edge this close is hit
  const state = { info: null, marks: new Map(), grade: "", note: "", version: "", caseChanges: 0, caseSaved: 0,
                  saving: false, message: "" };
  const on = () => state.info !== null;

  // ---- coordinates and geometry (level-0 px of the slide; screen = the viewer element's px) ----------------------
  function toImage(view, position) {
    const p = item(view).viewerElementToImageCoordinates(screenOf(view, position));
    return [p.x, p.y];
  }
  const toScreen = outlines.toScreen;
  function distanceToSegment(p, a, b) {
    const dx = b.x - a.x, dy = b.y - a.y, length = dx * dx + dy * dy;
    const t = length ? Math.max(0, Math.min(1, ((p.x - a.x) * dx + (p.y - a.y) * dy) / length)) : 0;
    return Math.hypot(p.x - a.x - t * dx, p.y - a.y - t * dy);
  }
  function uuid() {
    if (crypto.randomUUID) return crypto.randomUUID();  // secure contexts only (localhost is one)
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 15) | 64; b[8] = (b[8] & 63) | 128;
    const h = [...b].map(x => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }
  const colour = name => (state.info.classes.find(c => c.name === name) || { colour: "#333" }).colour;
  const markKey = (slice, patch) => `${slice.stain}|${slice.slice}|${patch}`;

  // ---- state of each viewer: view.review = {polygons, version, changes, saved, selected, drawing, drag, carried} -
  function changed(view) { view.review.changes += 1; status(); draw(view); }
  function dirty() {
    return app.views.some(v => v.review && v.review.changes !== v.review.saved) || state.caseChanges !== state.caseSaved;
  }
  function status(text) {
    if (text !== undefined) state.message = text;
    const box = document.getElementById("review-status");
    if (!box) return;
    const unsaved = dirty();
    box.textContent = (unsaved ? "● unsaved changes " : "") + state.message;
    box.classList.toggle("unsaved", unsaved);
  }
  function hint(view) {
    const box = view.panel.querySelector(".rev .hint"), r = view.review, c = r.carried;
    const parts = [];
    if (r.drawing) parts.push("click the vertices; double-click or Enter closes, Escape cancels");
    else if (r.selected) parts.push("selected: drag a vertex · the menu sets its class · Delete removes it");
    if (c && c.outlines.length) parts.push(`${c.outlines.length} outline(s) carried from ${c.from} (dashed)`);
    else if (c && c.why && !view.slice.reference) parts.push(`${c.from ? c.from + " " : "H&E "}outlines not carried: ${c.why}`);
    else if (c && c.from) parts.push(`nothing drawn on ${c.from} yet`);
    box.textContent = box.title = parts.join(" · ");     // one line, never taller: the viewer below stays put
    view.panel.querySelector(".rev [data-act=delete]").disabled = !r.selected;
    view.panel.querySelector(".rev [data-act=draw]").classList.toggle("on", !!r.drawing);
    view.osd.canvas.style.cursor = r.drawing ? "crosshair" : "";
  }

  // ---- drawing, selecting, editing --------------------------------------------------------------------------------
  function startDrawing(view) {
    app.views.forEach(v => { if (v.review && v !== view && v.review.drawing) cancel(v); });
    view.review.drawing = { points: [], cursor: null };
    view.review.selected = null;
    hint(view); draw(view);
  }
  function cancel(view) {
    view.review.drawing = null; hint(view); draw(view);
  }
  function addPoint(view, position) {
    const points = view.review.drawing.points, last = points[points.length - 1];
    if (last) {
      const s = toScreen(view, last);
      if (Math.hypot(s.x - position.x, s.y - position.y) < 4) return;   // the second click of a double-click
    }
    points.push(toImage(view, position));
    draw(view);
  }
  function close(view) {
    const points = view.review.drawing.points;
    if (points.length < 3) { status("a polygon needs at least 3 vertices."); cancel(view); return; }
    const cls = view.panel.querySelector(".rev select").value;
    const polygon = { id: uuid(), cls, rings: [[...points, points[0]]] };
    view.review.polygons.push(polygon);
    view.review.drawing = null;                 // not selected: the class menu stays the next polygon's class
    hint(view); changed(view);
  }
  function selected(view) { return view.review.polygons.find(p => p.id === view.review.selected) || null; }
  function remove(view) {
    if (!view.review.selected) return;
    view.review.polygons = view.review.polygons.filter(p => p.id !== view.review.selected);
    view.review.selected = null;
    hint(view); changed(view);
  }
  function hitPolygon(view, position) {       // the polygon whose outline passes within NEAR px of the click
    for (const polygon of view.review.polygons.slice().reverse()) {
      for (const ring of polygon.rings) {
        const s = ring.map(p => toScreen(view, p));
        for (let i = 1; i < s.length; i++) if (distanceToSegment(position, s[i - 1], s[i]) <= NEAR) return polygon;
      }
    }
    return null;
  }
  function hitVertex(view, position) {
    const polygon = selected(view);
    if (!polygon) return null;
    for (let r = 0; r < polygon.rings.length; r++) {
      const ring = polygon.rings[r];
      for (let v = 0; v < ring.length - 1; v++) {
        const s = toScreen(view, ring[v]);
        if (Math.hypot(s.x - position.x, s.y - position.y) <= NEAR) return { polygon, ring: r, vertex: v };
      }
    }
    return null;
  }
  // a quick click: true when it placed a vertex; otherwise it (de)selects the polygon whose outline it is on and
  // case.js still shows the patch under it (so a top-k patch on an outline can be marked)
  function click(view, event) {
    if (!on() || !view.review) return false;
    if (view.review.drawing) { addPoint(view, event.position); return true; }
    const hit = hitPolygon(view, event.position), before = view.review.selected;
    view.review.selected = hit ? hit.id : null;
    if (hit) view.panel.querySelector(".rev select").value = hit.cls;
    if (hit || before) { hint(view); draw(view); }
    return false;
  }

  function attach(view) {
    if (!on() || !view.osd) return;
    view.review = { polygons: [], version: "", changes: 0, saved: 0, selected: null, drawing: null, drag: null,
                    carried: null };
    const bar = document.createElement("div");
    bar.className = "rev";
    bar.innerHTML = `<button data-act="draw" title="click the vertices; double-click or Enter closes">✎ draw polygon</button>
      <select title="class of the polygon">${state.info.classes.map(c => `<option>${esc(c.name)}</option>`).join("")}</select>
      <button data-act="delete" disabled title="delete the selected polygon (Delete)">delete</button><span class="hint"></span>`;
    view.panel.querySelector(".ovl").after(bar);
    bar.querySelector("[data-act=draw]").onclick = () => (view.review.drawing ? cancel(view) : startDrawing(view));
    bar.querySelector("[data-act=delete]").onclick = () => remove(view);
    bar.querySelector("select").onchange = e => {
      const polygon = selected(view);
      if (polygon && polygon.cls !== e.target.value) { polygon.cls = e.target.value; changed(view); }
    };
    const osd = view.osd;
    // the browser's own double-click (OpenSeadragon pairs any two quick clicks, so fast drawing would close early)
    osd.canvas.addEventListener("dblclick", () => { if (view.review.drawing) close(view); });
    osd.addHandler("canvas-double-click", e => { if (view.review.drawing) e.preventDefaultAction = true; });
    osd.addHandler("canvas-press", e => {
      view.review.drag = view.review.drawing ? null : hitVertex(view, e.position);
    });
    osd.addHandler("canvas-drag", e => {
      const drag = view.review.drag;
      if (!drag) return;
      e.preventDefaultAction = true;
      const ring = drag.polygon.rings[drag.ring], point = toImage(view, e.position);
      ring[drag.vertex] = point;
      if (drag.vertex === 0) ring[ring.length - 1] = point;
      changed(view);
    });
    osd.addHandler("canvas-drag-end", e => { if (view.review.drag) e.preventDefaultAction = true; });
    osd.addHandler("canvas-release", () => { view.review.drag = null; });
    osd.canvas.addEventListener("pointermove", e => {
      if (!view.review.drawing) return;
      const box = osd.canvas.getBoundingClientRect();
      view.review.drawing.cursor = toImage(view, new OpenSeadragon.Point(e.clientX - box.left, e.clientY - box.top));
      draw(view);
    });
    hint(view);
  }

  // ---- what is drawn on a viewer's overlay canvas (ctx: image px -> screen; `scale`: screen px per image px) ---
  function paint(view, ctx, scale) {
    if (!on() || !view.review) return;
    const r = view.review, px = n => n / scale;
    const labels = r.carried ? outlines.carried(view, ctx, scale, r.carried.outlines, o => colour(o.class),
                                                o => `from ${r.carried.stain || "H&E"}: ${o.class}`) : [];
    ctx.save();
    ctx.lineJoin = "round";
    const path = rings => {
      ctx.beginPath();
      for (const ring of rings) ring.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    };
    for (const polygon of r.polygons) {
      const chosen = polygon.id === r.selected;
      ctx.fillStyle = colour(polygon.cls); ctx.strokeStyle = colour(polygon.cls);
      path(polygon.rings);
      ctx.globalAlpha = 0.15; ctx.fill("evenodd"); ctx.globalAlpha = 1;
      ctx.lineWidth = px(chosen ? 3.5 : 2); ctx.stroke();
      if (chosen) {
        ctx.fillStyle = "#fff"; ctx.lineWidth = px(1.5);
        for (const ring of polygon.rings) for (const [x, y] of ring.slice(0, -1)) {
          ctx.fillRect(x - px(4), y - px(4), px(8), px(8)); ctx.strokeRect(x - px(4), y - px(4), px(8), px(8));
        }
      }
    }
    if (r.drawing && r.drawing.points.length) {
      const points = r.drawing.points, cls = view.panel.querySelector(".rev select").value;
      ctx.strokeStyle = colour(cls); ctx.fillStyle = colour(cls); ctx.lineWidth = px(2);
      path([points]); ctx.stroke();
      if (r.drawing.cursor) {
        ctx.setLineDash([px(4), px(4)]);
        ctx.beginPath(); ctx.moveTo(...points[points.length - 1]); ctx.lineTo(...r.drawing.cursor); ctx.stroke();
        ctx.setLineDash([]);
      }
      for (const [x, y] of points) { ctx.beginPath(); ctx.arc(x, y, px(3.5), 0, 2 * Math.PI); ctx.fill(); }
    }
    const p = view.slice.patches, symbols = [];
    if (p.patch) {
      ctx.lineWidth = px(3);
      for (let i = 0; i < p.x.length; i++) {
        const mark = state.marks.get(markKey(view.slice, p.patch[i]));
        if (!mark) continue;
        const [stroke, symbol] = MARK_STYLE[mark];
        ctx.strokeStyle = stroke;
        ctx.strokeRect(p.x[i] + px(2), p.y[i] + px(2), p.size[i] - px(4), p.size[i] - px(4));
        symbols.push([[p.x[i] + p.size[i] / 2, p.y[i] + p.size[i] / 2], symbol, stroke]);
      }
    }
    // text in screen space, so it reads upright on turned and mirrored viewers
    const ratio = window.devicePixelRatio || 1;
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.textAlign = "center"; ctx.textBaseline = "middle";
    ctx.font = "bold 16px system-ui, sans-serif";
    for (const [at, symbol, fill] of symbols) {
      const s = toScreen(view, at);
      ctx.fillStyle = "rgba(255,255,255,.85)"; ctx.beginPath(); ctx.arc(s.x, s.y, 10, 0, 2 * Math.PI); ctx.fill();
      ctx.fillStyle = fill; ctx.fillText(symbol, s.x, s.y + 1);
    }
    ctx.restore();
    outlines.labels(view, ctx, labels);
  }

  // ---- top-k marks in the patch panel -----------------------------------------------------------------------------
  function patchInfo(view, i, box) {
    const p = view.slice.patches;
    if (!on() || !p.patch) return;
    const key = markKey(view.slice, p.patch[i]), current = state.marks.get(key) || "";
    const k = Number(document.getElementById("k").value) || 10, rank = p.rank_in_case ? p.rank_in_case[i] : null;
    const div = document.createElement("div");
    div.className = "marks";
    if ((rank === null || rank > k) && !current) {
      div.textContent = `rank ${rank ?? "–"}: not in the top ${k} (raise the number of top patches to mark it)`;
    } else {
      div.innerHTML = `<b>your mark</b> ` + [...Object.keys(MARK_STYLE), ""].map(m =>
        `<button data-mark="${m}" class="${m === current ? "on" : ""}">${m || "clear"}</button>`).join(" ");
      div.querySelectorAll("button").forEach(b => b.onclick = () => {
        if (b.dataset.mark) state.marks.set(key, b.dataset.mark); else state.marks.delete(key);
        div.querySelectorAll("button").forEach(x => x.classList.toggle("on", x === b && !!b.dataset.mark));
        state.caseChanges += 1; status();
        app.views.forEach(v => v.osd && draw(v));
      });
    }
    box.appendChild(div);
  }

  // ---- loading and saving -----------------------------------------------------------------------------------------
  async function json(url, options) {
    const response = await fetch(url, options);
    let body;
    try { body = await response.json(); } catch { body = { error: `${response.status} ${response.statusText}` }; }
    return [response.ok, body];
  }
  const fromServer = polygons => polygons.map(p => ({ id: p.id, cls: p.class, rings: p.rings }));
  async function loadCarried(view) {
    if (!view.review || view.slice.reference) return;
    const [ok, body] = await json(`/api/carried/${view.slice.id}`);
    view.review.carried = ok ? body : { outlines: [], why: body.error };
    hint(view); draw(view);
  }
  async function load() {
    if (!on()) return;
    await Promise.all(app.views.filter(v => v.review).map(async view => {
      const [ok, body] = await json(`/api/review/${view.slice.id}`);
      if (!ok) { status(body.error); return; }
      view.review.polygons = fromServer(body.polygons); view.review.version = body.version;
      draw(view);
    }));
    const [ok, body] = await json(`/api/marks?source=${app.source}&case=${encodeURIComponent(app.case)}`);
    if (ok) {
      state.version = body.version;
      body.marks.forEach(m => state.marks.set(`${m.stain}|${m.slice}|${m.patch}`, m.mark));
      document.getElementById("grade").value = state.grade = body.grade;
      document.getElementById("note").value = state.note = body.note;
    } else status(body.error);
    await Promise.all(app.views.map(loadCarried));
    app.views.forEach(v => v.osd && draw(v));
    status();
  }

  async function saveSlide(view) {
    const r = view.review, changes = r.changes;
    const polygons = r.polygons.map(p => ({ id: p.id, class: p.cls, geometry: { type: "Polygon", coordinates: p.rings } }));
    const [ok, body] = await json(`/api/review/${view.slice.id}`, {
      method: "PUT", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ base_version: r.version, polygons }) });
    if (!ok) return `${view.slice.stain} slice ${view.slice.slice}: ${body.error}`;
    r.version = body.version; r.saved = changes;
    if (r.changes === changes) {                  // nothing drawn meanwhile: show what was saved (repaired)
      r.polygons = fromServer(body.polygons);
      if (!r.polygons.some(p => p.id === r.selected)) r.selected = null;
    }
    app.views.filter(v => v.slice.link && v.slice.link.fixed === view.slice.id).forEach(loadCarried);
    draw(view); hint(view);
    return body.repaired ? `${body.repaired} self-crossing polygon(s) on ${view.slice.stain} slice ${view.slice.slice} were split into valid parts.` : "";
  }
  async function saveCase() {
    const changes = state.caseChanges;
    const marks = [...state.marks].map(([key, mark]) => { const [stain, slice, patch] = key.split("|"); return { stain, slice, patch, mark }; });
    const [ok, body] = await json(`/api/marks?source=${app.source}&case=${encodeURIComponent(app.case)}`, {
      method: "PUT", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ base_version: state.version, marks, grade: state.grade, note: state.note }) });
    if (!ok) return `case ${app.case}: ${body.error}`;
    state.version = body.version; state.caseSaved = changes;
    return "";
  }
  async function save() {
    if (!on() || state.saving) return;
    state.saving = true; status("saving…");
    try {
      const jobs = app.views.filter(v => v.review && v.review.changes !== v.review.saved).map(saveSlide);
      if (state.caseChanges !== state.caseSaved) jobs.push(saveCase());
      const messages = (await Promise.all(jobs)).filter(Boolean);
      status(messages.length ? messages.join(" ") : `saved ${new Date().toLocaleTimeString()}`);
    } catch (error) {
      status(`not saved: ${error}`);
    } finally { state.saving = false; }
  }

  // ---- the case's review bar, keys, leaving the page --------------------------------------------------------------
  function start(page) {
    if (!page.review) return;
    state.info = page.review;
    const bar = document.getElementById("review");
    bar.innerHTML = `<b>reviewing as ${esc(state.info.name)}</b>
      <label>your grade <select id="grade"><option value="">–</option>${state.info.grades.map(g => `<option>${esc(g)}</option>`).join("")}</select></label>
      <label class="note">note <textarea id="note" rows="1" placeholder="what you see in this case"></textarea></label>
      <button id="save" title="Ctrl-S">Save</button><span id="review-status"></span>`;
    bar.title = `saved in ${state.info.folder}`;
    bar.hidden = false;
    const edit = () => { state.caseChanges += 1; status(); };
    document.getElementById("grade").onchange = e => { state.grade = e.target.value; edit(); };
    document.getElementById("note").oninput = e => { state.note = e.target.value; edit(); };
    document.getElementById("save").onclick = save;
    document.addEventListener("keydown", key, true);
    window.addEventListener("beforeunload", e => { if (dirty()) { e.preventDefault(); e.returnValue = ""; } });
  }
  function key(e) {
    if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "s") { e.preventDefault(); save(); return; }
    if (/^(INPUT|TEXTAREA|SELECT)$/.test(e.target.tagName)) return;
    const drawing = app.views.find(v => v.review && v.review.drawing);
    if (drawing && e.key === "Enter") { e.preventDefault(); close(drawing); }
    else if (drawing && e.key === "Escape") { e.preventDefault(); cancel(drawing); }
    else if (e.key === "Escape") app.views.forEach(v => { if (v.review && v.review.selected) { v.review.selected = null; hint(v); draw(v); } });
    else if (e.key === "Delete" || e.key === "Backspace") {
      const view = app.views.find(v => v.review && v.review.selected);
      if (view) { e.preventDefault(); remove(view); }
    }
  }

  const marks = () => Object.fromEntries(state.marks);   // "stain|slice|patch" -> agree | disagree | unsure
  return { start, attach, load, paint, click, patchInfo, save, dirty, marks, toImage, toScreen };
})();
