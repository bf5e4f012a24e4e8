// stainmil view — outlines on a viewer's overlay canvas, in level-0 px: the pathologist's lesion outline of the slide
// (analysis.truth, `/api/outline/N`: its own solid, ignored regions grey and hatched, or its H&E's carried through
// the registration) and, in review mode, the H&E's review polygons carried onto the IHC viewers (review.js). Anything
// carried is drawn one way, by carried() here: dashed, a label "from <stain>: <class>" at its top. Loaded before
// review.js and case.js; it uses case.js's item() and screenOf() only when called.
"use strict";
const outlines = (() => {
  const LESION = "#ff1fa6", IGNORE = "#6f6f6f";

  function toScreen(view, [x, y]) {
    return screenOf(view, item(view).imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y)));
  }
  function trace(ctx, rings) {                 // one path of closed rings (holes cut out with "evenodd")
    ctx.beginPath();
    for (const ring of rings) {
      ring.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      ctx.closePath();
    }
  }
  function top(view, ring) {                   // the vertex highest on screen (turned and mirrored viewers too)
    let best = ring[0], bestY = Infinity;
    for (const p of ring) { const y = toScreen(view, p).y; if (y < bestY) { best = p; bestY = y; } }
    return best;
  }

  // the look of everything carried from the reference slide; returns the labels to write with labels()
  // (`scale`: screen px per image px; items: [{rings, class}]; colourOf(item), labelOf(item): text or "")
  function carried(view, ctx, scale, items, colourOf, labelOf, width = 2.5) {
    const px = n => n / scale, out = [];
    ctx.save();
    ctx.lineJoin = "round";
    ctx.setLineDash([px(9), px(6)]);
    ctx.lineWidth = px(width);
    for (const outline of items) {
      ctx.strokeStyle = colourOf(outline);
      trace(ctx, outline.rings); ctx.stroke();
      const text = labelOf(outline);
      if (text) out.push([top(view, outline.rings[0]), text, colourOf(outline)]);
    }
    ctx.restore();
    return out;
  }

  // text in screen space, so it reads upright on turned and mirrored viewers: [[level-0 point, text, colour]]
  function labels(view, ctx, list) {
    if (!list.length) return;
    const ratio = window.devicePixelRatio || 1;
    ctx.save();
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.setLineDash([]);
    ctx.textAlign = "center"; ctx.font = "12px system-ui, sans-serif"; ctx.textBaseline = "bottom";
    for (const [at, text, fill] of list) {
      const s = toScreen(view, at), width = ctx.measureText(text).width;
      ctx.fillStyle = "rgba(255,255,255,.85)"; ctx.fillRect(s.x - width / 2 - 3, s.y - 20, width + 6, 16);
      ctx.fillStyle = fill; ctx.fillText(text, s.x, s.y - 5);
    }
    ctx.restore();
  }

  let hatch = null;                            // grey diagonal lines, 8 screen px apart
  function hatching(ctx, scale) {
    if (!hatch) {
      hatch = document.createElement("canvas");
      hatch.width = hatch.height = 8;
      const h = hatch.getContext("2d");
      h.strokeStyle = IGNORE; h.lineWidth = 1.2;
      h.beginPath(); h.moveTo(-2, 10); h.lineTo(10, -2); h.moveTo(-2, 2); h.lineTo(2, -2); h.moveTo(6, 10); h.lineTo(10, 6);
      h.stroke();
    }
    const pattern = ctx.createPattern(hatch, "repeat");
    pattern.setTransform(new DOMMatrix().scale(1 / scale));
    return pattern;
  }

  // the slide's /api/outline answer: its own outline solid (lesion) or grey hatched (ignored), the carried dashed
  function truth(view, ctx, scale, answer) {
    if (!answer || !answer.outlines) return;
    const px = n => n / scale, own = answer.outlines.filter(o => !o.carried);
    const colourOf = o => (o.kind === "ignore" ? IGNORE : LESION);
    ctx.save();
    ctx.lineJoin = "round";
    for (const o of own.filter(o => o.kind === "ignore")) {
      trace(ctx, o.rings);
      ctx.fillStyle = hatching(ctx, scale); ctx.fill("evenodd");
      ctx.strokeStyle = IGNORE; ctx.lineWidth = px(1.2); ctx.stroke();
    }
    for (const o of own.filter(o => o.kind !== "ignore")) {
      trace(ctx, o.rings);
      ctx.strokeStyle = "rgba(255,255,255,.7)"; ctx.lineWidth = px(4.5); ctx.stroke();   // a halo: seen on any stain
      ctx.strokeStyle = LESION; ctx.lineWidth = px(2.5); ctx.stroke();
    }
    ctx.restore();
    const moved = answer.outlines.filter(o => o.carried);
    const lesion = moved.filter(o => o.kind !== "ignore"), ignored = moved.filter(o => o.kind === "ignore");
    const list = carried(view, ctx, scale, ignored, colourOf, () => "", 1.2)
      .concat(carried(view, ctx, scale, lesion, colourOf, o => `from ${answer.stain || "H&E"}: ${o.class}`));
    labels(view, ctx, list);
  }

  // what the panel says of a slide's outline: [text, whether it is a problem]
  function note(answer) {
    if (!answer) return ["", false];
    if (answer.loading) return ["reading the lesion outline…", false];
    const own = answer.outlines.filter(o => !o.carried), moved = answer.outlines.filter(o => o.carried);
    const parts = [];
    if (own.length) parts.push(`lesion outline of ${answer.file.split(/[\\/]/).pop()}` +
                               (own.some(o => o.kind === "ignore") ? " (grey: ignored)" : ""));
    if (moved.length) parts.push(`lesion outline carried from ${answer.from} (dashed` +
                                 (moved.some(o => o.kind === "ignore") ? "; grey: ignored)" : ")"));
    if (answer.why) parts.push(answer.why);
    if (answer.problem) return [answer.problem, true];
    return [parts.join(" · "), false];
  }

  return { toScreen, trace, carried, labels, truth, note, LESION, IGNORE };
})();
