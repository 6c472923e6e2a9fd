/* cpinspect explore: the views. Everything drawn here comes from CPX.computeModel (model.js).
 *
 * Every token cell carries data-g (global index); local-row cells also data-r / data-l; count
 * cells data-count; row lists data-rows; work blocks data-work. #cpx-model holds the model as
 * JSON after every change, so a test (or a reader) can read back exactly what is shown.
 */
"use strict";

const DATA = JSON.parse(document.getElementById("cpx-data").textContent);
const DETAIL = DATA.detail_tokens;   // token cells drawn at most per view; longer rows show a range
const LETTERS = DATA.letters;
const $ = (id) => document.getElementById(id);
const letter = (r) => (r < LETTERS.length ? LETTERS[r] : String(r));
const fmt = (n) => n.toLocaleString("en-US");
let state = { model: null, key: null, cursor: null, step: 0, cells: new Map() };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function paletteStyle() {
  const rules = DATA.palette.map(([bg, fg], r) => `.r${r}{background:${bg};color:${fg}}`);
  document.head.append(el("style", { text: rules.join("\n") }));
}
const rankClass = (r) => `r${r % DATA.palette.length}`;

/* ---- the controls ---- */
function parseSeqlens(text) {
  const parts = text.split(",").map((p) => p.trim()).filter((p) => p !== "");
  if (!parts.length) throw new Error("give at least one segment length, e.g. 16,32");
  return parts.map((p, i) => {
    if (!/^\d+$/.test(p) || Number(p) < 1) throw new Error(`segment length ${i} is "${p}", not a positive whole number`);
    return Number(p);
  });
}

function parseSpans(text) {
  const spans = [];
  for (const [i, raw] of text.split(",").entries()) {
    const p = raw.trim();
    if (!p) continue;
    const m = /^(\d+):(\d+)\+(\d+)(?:\s+(image|video|audio))?$/.exec(p);
    if (!m) throw new Error(`vision span ${i} is "${p}"; write SEGMENT:START+LENGTH [image|video|audio], e.g. 0:15+64 image`);
    spans.push([Number(m[1]), Number(m[2]), Number(m[3]), m[4] || "image"]);
  }
  return spans;
}

const spansText = (spans) => spans.map(([s, a, n, k]) => `${s}:${a}+${n} ${k}`).join(", ");

function readSetting() {
  return {
    cp: Math.max(1, Math.min(16, Number($("cpx-cp").value) || 1)),
    layout: $("cpx-layout").value,
    pad: $("cpx-pad").checked,
    seqlens: parseSeqlens($("cpx-seqlens").value),
    spans: parseSpans($("cpx-spans").value),
  };
}

function initControls() {
  const select = $("cpx-layout");
  for (const name of DATA.layouts) {
    const known = !!CPX.LAYOUTS[name];
    select.append(el("option", { value: name, text: known ? name : `${name} (not drawn by this page)` }));
  }
  const s = DATA.initial;
  $("cpx-cp").value = s.cp; $("cpx-cp-slider").value = s.cp; select.value = s.layout;
  $("cpx-pad").checked = s.pad; $("cpx-seqlens").value = s.seqlens.join(","); $("cpx-spans").value = spansText(s.spans);
  $("cpx-from").value = DATA.start;
  $("cpx-cp-slider").addEventListener("input", () => { $("cpx-cp").value = $("cpx-cp-slider").value; update(); });
  $("cpx-cp").addEventListener("input", () => { $("cpx-cp-slider").value = $("cpx-cp").value; later(); });
  for (const id of ["cpx-layout", "cpx-pad", "cpx-rank"]) $(id).addEventListener("input", update);
  for (const id of ["cpx-seqlens", "cpx-spans", "cpx-from"]) $(id).addEventListener("input", later);
  for (const id of ["cpx-cp", "cpx-layout", "cpx-pad", "cpx-seqlens", "cpx-spans", "cpx-rank", "cpx-from"]) {
    $(id).addEventListener("change", update);
  }
  $("cpx-prev").addEventListener("click", () => setStep(state.step - 1));
  $("cpx-next").addEventListener("click", () => setStep(state.step + 1));
  $("cpx-steps").addEventListener("keydown", (e) => {
    if (e.key === "ArrowRight") { setStep(state.step + 1); e.preventDefault(); }
    if (e.key === "ArrowLeft") { setStep(state.step - 1); e.preventDefault(); }
  });
}

/* Typing redraws once the keys pause (a long row takes a moment to draw); leaving the field redraws at once. */
let pending = null;
function later() {
  clearTimeout(pending);
  pending = setTimeout(update, 150);
}

function rankOptions(cp) {
  const select = $("cpx-rank"), keep = Math.min(Number(select.value) || 0, cp - 1);
  if (select.options.length !== cp) {
    select.replaceChildren(...Array.from({ length: cp }, (_, r) => el("option", { value: r, text: `rank ${r}` })));
  }
  select.value = keep;
  return keep;
}

/* The token range drawn cell by cell: the whole row when it is short, else DETAIL tokens from "from". */
function detailRange(model) {
  const big = model.total > DETAIL;
  $("cpx-range").hidden = !big;
  if (!big) return [0, model.total];
  const from = Math.max(0, Math.min(model.total - DETAIL, Number($("cpx-from").value) || 0));
  $("cpx-range-note").textContent = `${fmt(model.total)} tokens: cells drawn for [${fmt(from)}, ${fmt(from + DETAIL)}); ` +
    "click the overview or type a start to move the range.";
  return [from, from + DETAIL];
}

/* ---- the views ---- */
function tokenCell(model, g, cls, extra) {
  const kind = model.vkind[g];
  const cell = el("span", Object.assign({ class: `t ${cls}${kind ? " v" + kind : ""}`, "data-g": g }, extra));
  cell.textContent = cls.startsWith("r") ? letter(model.owner[CPX.tokenInfo(model, g).piece]) : "";
  return cell;
}

function remember(key, node) {
  if (!state.cells.has(key)) state.cells.set(key, []);
  state.cells.get(key).push(node);
}

function drawOverview(model, box) {
  const bins = 128, size = Math.ceil(model.total / bins), strip = el("div", { class: "overview", role: "group",
    "aria-label": "overview of the whole row: vision share per bin; click to draw that range" });
  for (let b = 0; b * size < model.total; b++) {
    const a = b * size, e = Math.min(model.total, a + size), share = (model.before[e] - model.before[a]) / (e - a);
    const bin = el("button", { class: "bin", title: `tokens [${a}, ${e}): ${Math.round(100 * share)}% vision`,
      style: `--v:${share}`, "data-from": a });
    bin.addEventListener("click", () => { $("cpx-from").value = a; update(); });
    strip.append(bin);
  }
  box.append(strip);
}

function drawRow(model, [lo, hi]) {
  const box = $("cpx-row");
  box.replaceChildren();
  if (model.total > DETAIL) drawOverview(model, box);
  const cu = model.cu, P = model.P;
  for (let s = CPX.segmentOf(cu, lo); s < cu.length - 1 && cu[s] < hi; s++) {
    const a = Math.max(lo, cu[s]), b = Math.min(hi, cu[s + 1]);
    const seg = el("div", { class: "seg", "data-seg": s });
    seg.append(el("div", { class: "seglabel", text: `segment ${s}  [${fmt(cu[s])}, ${fmt(cu[s + 1])})` }));
    const cells = el("div", { class: "cells" });
    let piece = -1;
    for (let g = a; g < b; g++) {
      const info = CPX.tokenInfo(model, g);
      if (info.piece !== piece) {
        piece = info.piece;
        cells.append(el("span", { class: "cut", text: `c${P.chunk[piece]}`, title: `${CPX.namePiece(model.layout, P, piece)} ` +
          `[${P.start[piece]}, ${P.start[piece] + P.len[piece]}) → rank ${info.rank}` }));
      }
      const cell = tokenCell(model, g, rankClass(info.rank), { "data-r": info.rank });
      remember(g, cell);
      cells.append(cell);
    }
    seg.append(cells);
    box.append(seg);
  }
}

function drawLocal(model, [lo, hi], chosen) {
  const box = $("cpx-local");
  box.replaceChildren();
  for (const r of model.ranks) {
    const row = el("div", { class: "local" + (r.rank === chosen ? " chosen" : ""), "data-rank": r.rank });
    row.append(el("div", { class: "seglabel", text: `rank ${r.rank}: ${fmt(r.globals.length)} local tokens, ` +
      `${fmt(r.rows.length)} vision` }));
    const cells = el("div", { class: "cells" });
    let at = 0;
    for (const id of r.pieces) {
      const len = model.P.len[id], a = model.P.start[id];
      const shown = [Math.max(lo, a), Math.min(hi, a + len)];
      if (shown[0] < shown[1]) {
        cells.append(el("span", { class: "cut", text: `@${at + shown[0] - a}`, title: `local offset ` +
          `${at + shown[0] - a}: segment ${model.P.seg[id]}, chunk ${model.P.chunk[id]}, global ${shown[0]}` }));
        for (let g = shown[0]; g < shown[1]; g++) {
          const cell = tokenCell(model, g, rankClass(r.rank), { "data-r": r.rank, "data-l": at + g - a });
          remember(g, cell);
          cells.append(cell);
        }
      }
      at += len;
    }
    row.append(cells);
    box.append(row);
  }
}

function segmentsShown(model, [lo, hi]) {
  const rows = model.gathered.length;
  if (model.layout !== "zigzag" || rows <= 64) return [0, rows];
  const first = CPX.segmentOf(model.cu, lo);
  return [first, Math.min(rows, Math.max(first + 1, CPX.segmentOf(model.cu, hi - 1) + 1), first + 64)];
}

function drawCounts(model, range, chosen) {
  const table = el("table", { class: "counts" }), head = el("tr", {}, el("th", { text: "seg" }));
  const byPiece = model.layout !== "zigzag";  // one row of all pieces: name each column by its piece
  for (let c = 0; c < model.columns; c++) head.append(el("th", { text: byPiece ? CPX.namePiece(model.layout, model.P, c) : `c${c}` }));
  table.append(el("thead", {}, head));
  const body = el("tbody");
  const [s0, s1] = segmentsShown(model, range);
  for (let s = s0; s < s1; s++) {
    const tr = el("tr", {}, el("th", { text: String(s) }));
    model.gathered[s].forEach((count, c) => {
      const id = s * model.columns + c, r = model.owner[id];
      tr.append(el("td", { class: `${rankClass(r)}${r === chosen ? " mine" : ""}`, "data-seg": s, "data-chunk": c,
        "data-count": count, "data-owner": r, title: `segment ${model.P.seg[id]}, ${model.P.chunk[id] < 0 ?
          "empty piece" : `chunk ${model.P.chunk[id]}`}: ${count} vision tokens, held by ` +
        `rank ${r}; its first embedding row is ${model.offsets[id]}` }, String(count), el("sub", { text: letter(r) })));
    });
    body.append(tr);
  }
  table.append(body);
  const sum = model.counts.reduce((a, b) => a + b, 0);
  $("cpx-counts").replaceChildren(table, el("p", { class: "note", text: `[${model.gathered.length}, ${model.columns}]` +
    ` table in natural chunk order (rows ${s0}-${s1 - 1} shown), Σ = ${fmt(sum)} vision tokens; the small ` +
    "letter is the rank that counted it and sent it in the all-gather; outlined cells are the chosen rank's." }));
}

function drawRows(model, chosen) {
  const strip = el("div", { class: "cells rowstrip", "aria-label": "embedding rows in encoder order, by rank" });
  const rankOfRow = new Int32Array(model.visionTokens).fill(-1);
  for (const r of model.ranks) for (const row of r.rows) rankOfRow[row] = r.rank;
  const limit = Math.min(model.visionTokens, DETAIL);
  for (let row = 0; row < limit; row++) {
    const cell = el("span", { class: `t ${rankClass(rankOfRow[row])}`, "data-row": row, text: letter(rankOfRow[row]) });
    remember(`row${row}`, cell);
    strip.append(cell);
  }
  const lists = el("ul", { class: "rowlists" });
  for (const r of model.ranks) {
    const runs = CPX.toRanges(r.rows);
    const why = runs.length > 1 ? `: ${runs.length} runs, because its chunks are not adjacent in the natural order` : "";
    lists.append(el("li", { class: r.rank === chosen ? "chosen" : "", "data-rank": r.rank,
      "data-rows": model.total <= DETAIL ? JSON.stringify(r.rows) : "" },
    el("span", { class: `tag ${rankClass(r.rank)}`, text: letter(r.rank) }),
    ` rank ${r.rank}: rows ${CPX.formatRanges(r.rows, 12)} (${fmt(r.rows.length)} rows)${why}`));
  }
  const more = model.visionTokens > limit ? ` (first ${fmt(limit)} of ${fmt(model.visionTokens)} rows drawn)` : "";
  $("cpx-rows").replaceChildren(el("p", { class: "note", text: `The encoder returns ${fmt(model.visionTokens)} rows in ` +
    `natural order${more}; each cell is the rank that takes that row.` }), strip, lists);
}

function drawWork(model) {
  const box = $("cpx-work");
  box.replaceChildren();
  for (const name of DATA.layouts) {
    const b = model.balance[name];
    const block = el("div", { class: "work" + (name === model.layout ? " chosen" : ""), "data-layout": name });
    if (!b) {
      block.append(el("h3", { text: `${name}: cannot cut this row at cp ${model.cp}` }));
      box.append(block);
      continue;
    }
    block.setAttribute("data-work", JSON.stringify(b.work));
    block.setAttribute("data-imbalance", String(b.imbalance));
    block.append(el("h3", { text: `${name}: max/mean = ${b.imbalance.toFixed(3)}` }));
    const total = b.work.reduce((x, y) => x + y, 0);
    b.work.forEach((w, r) => {
      const pct = total ? (100 * w) / total : 0;
      block.append(el("div", { class: "bar" }, el("span", { class: `tag ${rankClass(r)}`, text: letter(r) }),
        el("span", { class: `fill ${rankClass(r)}`, style: `width:${b.max ? (60 * w) / b.max : 0}%` }),
        el("span", { class: "num", text: ` ${fmt(w)} (${pct.toFixed(1)}%)` })));
    });
    block.append(el("p", { class: "note", text: `max ${fmt(b.max)}, mean ${fmt(Math.round(b.mean * 10) / 10)}` }));
    box.append(block);
  }
}

/* ---- linking: hover, tap or keys show one token's numbers in every view ---- */
function show(g) {
  const model = state.model;
  if (!model || model.error || g === null || g < 0 || g >= model.total) return;
  for (const n of document.querySelectorAll(".hl")) n.classList.remove("hl");
  state.cursor = g;
  const info = CPX.tokenInfo(model, g);
  for (const n of state.cells.get(g) || []) n.classList.add("hl");
  if (info.row !== null) for (const n of state.cells.get(`row${info.row}`) || []) n.classList.add("hl");
  const box = $("cpx-inspect");
  for (const key of ["global", "segment", "chunk", "rank", "local", "row", "kind"]) box.dataset[key] = info[key] ?? "";
  box.textContent = `token ${info.global}: segment ${info.segment}, chunk ${info.chunk}, rank ${info.rank}, ` +
    `local index ${info.local}` + (info.row !== null ? `, ${info.kind} token, embedding row ${info.row}` : ", text");
}

function linkEvents() {
  for (const id of ["cpx-row", "cpx-local", "cpx-rows"]) {
    const box = $(id);
    const pick = (e) => {
      const t = e.target.closest("[data-g],[data-row]");
      if (!t) return;
      if (t.dataset.g !== undefined) show(Number(t.dataset.g));
      else show(rowToken(Number(t.dataset.row)));
    };
    box.addEventListener("mouseover", pick);
    box.addEventListener("click", pick);
    box.addEventListener("keydown", (e) => {
      const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: 32, ArrowUp: -32 }[e.key];
      if (step === undefined) return;
      show(Math.max(0, Math.min(state.model.total - 1, (state.cursor ?? -step) + step)));
      e.preventDefault();
    });
  }
}

function rowToken(row) {
  const m = state.model;
  let lo = 0, hi = m.total - 1;  // the vision token whose embedding row is `row`
  while (lo < hi) { const mid = (lo + hi) >> 1; if (m.before[mid + 1] <= row) lo = mid + 1; else hi = mid; }
  return lo;
}

/* ---- the model, readable from the DOM ---- */
function publish(model, setting) {
  const out = { setting, cp: model.cp, layout: model.layout, cu: model.cu, total: model.total, error: model.error,
    balance: model.balance };
  if (!model.error) {
    const full = model.total <= DETAIL;
    out.gathered_counts = model.gathered;
    out.vision_tokens = model.visionTokens;
    out.ranks = model.ranks.map((r) => ({ rank: r.rank, tokens: r.globals.length, vision: r.rows.length,
      local_counts: r.localCounts, global_indices: full ? Array.from(r.globals) : null,
      vision_positions: full ? r.positions : null, selected_rows: full ? r.rows : null }));
  }
  $("cpx-model").textContent = JSON.stringify(out);
}

function update() {
  clearTimeout(pending);
  const error = $("cpx-error");
  let setting;
  try { setting = readSetting(); } catch (e) { error.textContent = e.message; error.hidden = false; return; }
  const key = JSON.stringify(setting);  // a new range or rank redraws without recomputing the model
  const changed = key !== state.key;
  const model = changed ? CPX.computeModel(setting) : state.model;
  state.key = key;
  state.model = model;
  state.setting = setting;
  state.cells = new Map();
  const chosen = rankOptions(model.cp);
  $("cpx-about").textContent = CPX.LAYOUTS[model.layout] ? CPX.LAYOUTS[model.layout].about : "";
  error.hidden = !model.error;
  error.textContent = model.error ? `${model.layout} cannot cut this row at cp ${model.cp}: ${model.error}` : "";
  drawWork(model);
  publish(model, setting);
  $("cpx-main").classList.toggle("failed", !!model.error);
  if (model.error) return;
  if (model.clipped) {
    $("cpx-about").textContent += ` (${fmt(model.clipped)} vision-span token(s) lie outside their segment and are left out)`;
  }
  const range = detailRange(model);
  drawRow(model, range);
  drawLocal(model, range, chosen);
  drawCounts(model, range, chosen);
  drawRows(model, chosen);
  drawSteps(model, chosen);
  if (changed) checkBadge(model, setting);
  if (state.cursor !== null && state.cursor < model.total) show(state.cursor);
}

document.addEventListener("DOMContentLoaded", () => {
  paletteStyle();
  initControls();
  linkEvents();
  update();
});
