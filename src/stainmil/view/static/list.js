// stainmil view — the case list: sortable, filterable, each row opens the case page.
"use strict";
const params = new URLSearchParams(location.search);
const state = { source: Number(params.get("source") || 0), filter: params.get("filter") || "all",
                sort: params.get("sort") || "case", dir: params.get("dir") || "asc", data: null };
const ERROR_ORDER = { "false negative": 0, "false positive": 1, "wrong": 2, "right": 3, "": 4 };

function fmt(x, digits = 3) { return x === null || x === undefined ? "" : Number(x).toFixed(digits); }
function caseKey(c) { return /^\d+$/.test(c) ? [0, Number(c), c] : [1, 0, c]; }
function compare(a, b) {
  if (Array.isArray(a)) { for (let i = 0; i < a.length; i++) { const d = compare(a[i], b[i]); if (d) return d; } return 0; }
  if (a === null || a === "") return b === null || b === "" ? 0 : 1;
  if (b === null || b === "") return -1;
  return a < b ? -1 : a > b ? 1 : 0;
}
const COLUMNS = [
  { key: "case", title: "case", value: r => caseKey(r.case), cell: r => `<a href="/case?source=${state.source}&case=${encodeURIComponent(r.case)}">${esc(r.case)}</a>` },
  { key: "label", title: "label", value: r => r.label, cell: r => esc(r.label) || "<i>unknown</i>" },
  { key: "pred", title: "prediction", value: r => r.pred, cell: r => esc(r.pred) },
  { key: "prob", title: "P", value: r => r.prob, cell: r => fmt(r.prob) },
  { key: "error", title: "error", value: r => [ERROR_ORDER[r.error], r.prob], cell: r => esc(r.error), cls: r => "err-" + r.error.replace(" ", "-") },
  { key: "split", title: "split", value: r => r.split, cell: r => esc(r.split) },
  { key: "stains", title: "stain attention", value: r => Math.max(0, ...Object.values(r.stains).map(v => v || 0)),
    cell: r => `<span class="stainbars">` + Object.entries(r.stains).map(([s, w]) =>
      `<span class="lbl">${esc(s)}</span><span class="bar" style="width:${Math.round(60 * (w || 0))}px"></span>${fmt(w, 2)}`).join("<br>") + "</span>" },
  { key: "registration", title: "registration", value: r => r.registration, cell: r => esc(r.registration).replaceAll("; ", "<br>") },
];
const LESION_TITLES = { attention_lesion_auc: "attention–lesion AUC", attention_topk_precision: "top-k in lesion",
                        attention_pointing: "top-1 in lesion" };   // analysis against the lesion outlines, when present
const lesionColumn = key => ({ key, title: LESION_TITLES[key] || key, value: r => r[key], cell: r => fmt(r[key]) });

function keep(r) {
  if (state.filter === "all") return true;
  if (state.filter === "errors") return r.error && r.error !== "right";
  if (state.filter === "false negative") return r.error && r.error !== "right";  // every error, false negatives on top
  return r.error === state.filter;
}

function columns() {
  return [...COLUMNS, ...(state.data.lesion_columns || []).map(lesionColumn)];
}

function render() {
  const data = state.data, shown = columns();
  document.getElementById("notes").textContent = data.notes.join(" ");
  const head = document.querySelector("#cases thead");
  head.innerHTML = "<tr>" + shown.map(c => `<th data-key="${c.key}"${c.key === state.sort ? ` data-dir="${esc(state.dir)}"` : ""}>${esc(c.key === "prob" ? data.prob_label : c.title)}</th>`).join("") + "</tr>";
  head.querySelectorAll("th").forEach(th => th.onclick = () => {
    state.dir = state.sort === th.dataset.key && state.dir === "asc" ? "desc" : "asc";
    state.sort = th.dataset.key; save(); render();
  });
  const column = shown.find(c => c.key === state.sort) || shown[0];
  const blank = v => v === null || v === undefined || v === "";     // empty cells last, either way
  const rows = data.cases.filter(keep).sort((a, b) => {
    const va = column.value(a), vb = column.value(b);
    return blank(va) !== blank(vb) ? (blank(va) ? 1 : -1) : (state.dir === "asc" ? 1 : -1) * compare(va, vb);
  });
  document.querySelector("#cases tbody").innerHTML = rows.map(r => `<tr data-case="${esc(r.case)}">` +
    shown.map(c => `<td class="${c.cls ? c.cls(r) : ""}">${c.cell(r)}</td>`).join("") + "</tr>").join("");
  document.getElementById("count").textContent = `${rows.length} of ${data.cases.length} cases`;
  document.querySelectorAll("#filters button").forEach(b => b.classList.toggle("on", b.dataset.filter === state.filter));
}

function save() {
  const p = new URLSearchParams({ source: state.source, filter: state.filter, sort: state.sort, dir: state.dir });
  history.replaceState(null, "", "?" + p);
}

async function load() {
  const response = await fetch(`/api/cases?source=${state.source}`);
  state.data = await response.json();
  if (!response.ok) { document.getElementById("notes").textContent = state.data.error; return; }
  const select = document.getElementById("source");
  select.innerHTML = state.data.sources.map((s, i) => `<option value="${i}"${i === state.source ? " selected" : ""}>${esc(s)}</option>`).join("");
  select.parentElement.hidden = state.data.sources.length < 2;
  select.onchange = () => { state.source = Number(select.value); save(); load(); };
  render();
}

document.querySelectorAll("#filters button").forEach(b => b.onclick = () => {
  state.filter = b.dataset.filter;
  if (state.filter === "false negative") { state.sort = "error"; state.dir = "asc"; }
  save(); render();
});
load();
