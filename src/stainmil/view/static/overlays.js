// stainmil view — the overlays of a viewer, one table: each has a key, the label of its boxes, whether it starts on,
// what a slice needs to offer it, what it loads on first use and how it draws (in level-0 px). Both toolbars (the
// page's "all viewers" and each panel's) are made from this table, and the drawing is an OpenSeadragon plugin,
// `viewer.stainmilOverlays(view)`, that owns its canvas above the tiles. Loaded after outlines.js and review.js.
"use strict";

// patches filled with their colour; with both fills on, the second is drawn inset so both show
function fill(value) {
  return (view, ctx) => {
    const p = view.slice.patches, colours = p.colour[value];
    if (!colours) return;
    const inset = view.on.attention && view.on.prob && value === "patch_prob" ? 0.25 : 0;
    ctx.globalAlpha = 0.4;
    for (let i = 0; i < p.x.length; i++) {
      const size = p.size[i], pad = size * inset;
      ctx.fillStyle = colours[i];
      ctx.fillRect(p.x[i] + pad, p.y[i] + pad, size - 2 * pad, size - 2 * pad);
    }
    ctx.globalAlpha = 1;
  };
}

async function fetchJson(url) {                // the server's own sentence when it refuses (error.said)
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw Object.assign(new Error(body.error || response.statusText), { said: !!body.error });
  return body;
}

const OVERLAYS = [
  { key: "attention", label: "attention", on: true, draw: fill("relative_attention") },
  { key: "prob", label: "patch-alone P", on: false, draw: fill("patch_prob") },
  { key: "mask", label: "tissue mask", on: false, offered: s => s.mask, under: true,   // drawn below the fills
    load: view => new Promise(resolve => {
      const image = new Image();
      image.onload = image.onerror = () => resolve(image);
      image.src = `/slides/${view.slice.id}/mask.png`;
    }),
    draw: (view, ctx, scale, data, item) => {
      if (!data || !data.complete || !data.naturalWidth) return;
      const size = item.getContentSize();
      ctx.drawImage(data, 0, 0, size.x, size.y);
    } },
  { key: "regions", label: "QuPath regions", on: false, offered: s => s.annotations,
    load: view => fetchJson(`/api/regions/${view.slice.id}`),
    draw: (view, ctx, scale, data) => {
      if (!data) return;
      ctx.lineWidth = 2 / scale;
      for (const [which, colour] of [["include", "#1b9e3e"], ["exclude", "#d62728"]]) {
        ctx.strokeStyle = colour;
        for (const ring of data[which]) {
          ctx.beginPath();
          ring.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
          ctx.closePath(); ctx.stroke();
        }
      }
    } },
  { key: "outline", label: "lesion outline", on: false, offered: s => s.outline,
    title: s => s.outline === "own" ? "the pathologist's outline of this slide (analysis.truth)"
      : s.outline === "carried" ? "its H&E slice's outline, carried through the registration (dashed)"
      : s.outline ? "its H&E slice's outline: not carried (tick to see why)"
      : "no outline of this slide (or of its H&E slice) in analysis.truth",
    load: view => fetchJson(`/api/outline/${view.slice.id}`)
      .catch(error => ({ outlines: [], why: "",
                         problem: error.said ? error.message : `the lesion outline did not load (${error.message})` })),
    draw: (view, ctx, scale, data) => outlines.truth(view, ctx, scale, data) },
  { key: "topk", label: "top-k", on: false,
    draw: (view, ctx, scale) => {
      const p = view.slice.patches;
      if (!p.rank_in_case) return;
      const k = Number(document.getElementById("k").value) || 10;
      ctx.lineWidth = 3 / scale;
      ctx.strokeStyle = "#00e5ff"; ctx.fillStyle = "#00e5ff";
      ctx.font = `${13 / scale}px system-ui, sans-serif`;
      ctx.textBaseline = "top";
      for (let i = 0; i < p.x.length; i++) {
        if (p.rank_in_case[i] > k) continue;
        ctx.strokeRect(p.x[i], p.y[i], p.size[i], p.size[i]);
        ctx.fillText(String(p.rank_in_case[i]), p.x[i] + 3 / scale, p.y[i] + 2 / scale);
      }
    } },
];

// the boxes of one toolbar: `attribute` data-all (the page's) or data-overlay (a panel's)
function overlayBoxes(attribute, slice) {
  return OVERLAYS.map(o => {
    const off = slice && o.offered && !o.offered(slice);
    const title = slice && o.title ? ` title="${esc(o.title(slice))}"` : "";
    return `<label${title}><input type="checkbox" data-${attribute}="${o.key}"${o.on ? " checked" : ""}` +
      `${off ? " disabled" : ""}> ${esc(o.label)}</label>`;
  }).join("");
}

// The plugin: the viewer's overlay canvas, redrawn on every viewport change. `view` holds the slice, which overlays
// are on (view.on) and what each loaded (view.loaded); review.paint draws the review layer last.
OpenSeadragon.Viewer.prototype.stainmilOverlays = function (view) {
  const viewer = this, canvas = document.createElement("canvas");
  canvas.className = "overlay";
  viewer.canvas.appendChild(canvas);
  const layer = {
    canvas,
    // OpenSeadragon mirrors a flipped viewer's drawing about its centre, not its coordinate conversions
    screenOf: p => (viewer.viewport.getFlip() ? new OpenSeadragon.Point(viewer.container.clientWidth - p.x, p.y) : p),
    redraw() {
      const item = viewer.world.getItemAt(0);
      if (!item) return;
      const ratio = window.devicePixelRatio || 1, w = viewer.container.clientWidth, h = viewer.container.clientHeight;
      if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
        canvas.width = Math.round(w * ratio); canvas.height = Math.round(h * ratio);
        canvas.style.width = w + "px"; canvas.style.height = h + "px";
      }
      const ctx = canvas.getContext("2d");
      ctx.setTransform(1, 0, 0, 1, 0, 0);
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      const P = (x, y) => layer.screenOf(item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y)));
      const o = P(0, 0), ex = P(1024, 0), ey = P(0, 1024);
      const a = (ex.x - o.x) / 1024, b = (ex.y - o.y) / 1024, c = (ey.x - o.x) / 1024, d = (ey.y - o.y) / 1024;
      const scale = Math.hypot(a, b);                 // screen px per level-0 px
      ctx.setTransform(a * ratio, b * ratio, c * ratio, d * ratio, o.x * ratio, o.y * ratio);
      for (const overlay of [...OVERLAYS.filter(o => o.under), ...OVERLAYS.filter(o => !o.under)]) {
        if (view.on[overlay.key]) overlay.draw(view, ctx, scale, view.loaded[overlay.key], item);
      }
      review.paint(view, ctx, scale);          // review mode: polygons, carried outlines, marks (review.js)
    },
  };
  viewer.addHandler("update-viewport", () => layer.redraw());
  return layer;
};
