/* cpinspect explore: the seven steps of `simulate --explain` for one rank, and the self-check
 * of the page's numbers against the CLI's JSON embedded by `cpinspect explore`.
 */
"use strict";

const MAX_LISTED = 12;
const pieceName = (m, id) => CPX.namePiece(m.layout, m.P, id);
const span = (a, b) => `[${fmt(a)}, ${fmt(b)})`;
const shortList = (xs) => (xs.length <= MAX_LISTED ? JSON.stringify(xs)
  : JSON.stringify(xs.slice(0, MAX_LISTED)).slice(0, -1) + `, … ${xs.length - MAX_LISTED} more]`);
const asRows = (m, flat) => {
  if (!CPX.LAYOUTS[m.layout].paired) return flat;
  const out = [];
  for (let i = 0; i < flat.length; i += 2) out.push([flat[i], flat[i + 1]]);
  return out;
};
const countsShape = (m) => (m.layout === "zigzag" ? `[S, 2] = [${m.cu.length - 1}, 2]`
  : CPX.LAYOUTS[m.layout].paired ? "[1, 2] (one sequence)"
  : `[${m.ranks[0].pieces.length}] (${m.ranks[0].pieces.length === 1 ? "one piece" : "pieces in local order"})`);

function lines(...texts) { return texts.map((t) => el("p", { text: t })); }

function miniTable(m, values, rank) {
  const table = el("table", { class: "counts mini" });
  const rows = values.length / m.columns;
  for (let s = 0; s < Math.min(rows, MAX_LISTED); s++) {
    const tr = el("tr", {}, el("th", { text: `s${s}` }));
    for (let c = 0; c < m.columns; c++) {
      const id = s * m.columns + c, r = m.owner[id];
      tr.append(el("td", { class: rankClass(r) + (r === rank ? " mine" : ""),
        text: r === rank ? `[${values[id]}]` : String(values[id]) }));
    }
    table.append(tr);
  }
  return rows > MAX_LISTED ? [table, el("p", { class: "note", text: `… ${rows - MAX_LISTED} more segments` })] : [table];
}

function stepBodies(m, rank) {
  const r = m.ranks[rank], held = r.pieces;
  const names = held.slice(0, MAX_LISTED).map((id) => pieceName(m, id)).join(", ") + (held.length > MAX_LISTED ? " …" : "");
  const starts = [];
  held.reduce((at, id) => { starts.push(at); return at + m.P.len[id]; }, 0);
  const chunkLines = held.slice(0, MAX_LISTED).map((id, j) => `${pieceName(m, id)}: local ` +
    `${span(starts[j], starts[j] + m.P.len[id])} (global ${span(m.P.start[id], m.P.start[id] + m.P.len[id])}) → ` +
    `${fmt(r.localCounts[j])} vision`);
  if (held.length > MAX_LISTED) chunkLines.push(`… ${held.length - MAX_LISTED} more chunks`);
  const total = m.counts.reduce((a, b) => a + b, 0);
  const rowsLines = [];
  held.forEach((id, j) => {
    if (r.localCounts[j] && rowsLines.length < MAX_LISTED) {
      rowsLines.push(`${pieceName(m, id)}: offset ${fmt(m.offsets[id])} + 0..${r.localCounts[j] - 1} → rows ` +
        span(m.offsets[id], m.offsets[id] + r.localCounts[j]));
    }
  });
  return [
    ["Local vision mask (the image_pad/video_pad positions of the local row)", lines(
      `Rank ${rank} holds ${fmt(r.globals.length)} of ${fmt(m.total)} tokens (global ` +
      `${CPX.formatRanges(Array.from(r.globals), 8)}): chunks ${names}.`,
      r.positions.length ? `${fmt(r.positions.length)} of them are vision tokens, at local positions ` +
        `${CPX.formatRanges(r.positions, 8)}.` : "None of them is a vision token.")],
    [`Count vision tokens per chunk it holds (${m.layout === "zigzag" ? "its first chunk, then its mirror chunk, " +
      "per segment" : "in local order"})`, lines(...chunkLines,
      `local_counts ${countsShape(m)}: ${shortList(asRows(m, r.localCounts))}`)],
    [`All-gather the counts: ${m.cp} × ${countsShape(m)}`, lines("Each rank knows only its own counts. One " +
      "all_gather of a fixed-shape tensor gives every rank everybody's; every rank must call it, even one without " +
      "vision tokens, or the others hang.", ...m.ranks.slice(0, MAX_LISTED).map((q) => `rank ${q.rank} sent ` +
      `${shortList(asRows(m, q.localCounts))} (chunks ${[...new Set(q.pieces.map((id) => m.P.chunk[id]))].sort((a, b) => a - b).join(", ")})`))],
    [`Rebuild the [${m.gathered.length}, ${m.columns}] table in natural chunk order`, [
      ...miniTable(m, m.counts, rank), ...lines(`Σ = ${fmt(total)} vision tokens, ${encoderRows(total)}. ` +
      "[x] = this rank's chunks.")]],
    ["Offsets: exclusive cumulative sum of the table (first encoder row of each chunk)", [
      ...miniTable(m, m.offsets, rank), ...lines("Read the table segment by segment, chunk 0 first: the vision " +
      "embeddings come out of the encoder in exactly this order, so a chunk's first row is the number of vision " +
      "tokens before it.")]],
    [`Rank ${rank}'s rows: offset of each chunk it holds + the token's ordinal inside the chunk`,
      lines(...rowsLines, `rows = ${CPX.formatRanges(r.rows, 8)} (${fmt(r.rows.length)} rows for ` +
      `${fmt(r.positions.length)} vision tokens)`, whyGather(m, rank))],
    ["Why not scatter every row: the shapes", lines(naive(m, rank), sliceNote(m, rank))],
  ];
}

/* The batch's own encoder row count (from its grids) is known for the setting the page was built with. */
function encoderRows(total) {
  if (!sameSetting(DATA.cli && DATA.cli.setting, state.setting)) return "one encoder row each";
  const rows = DATA.vision_embed_count;
  return `which ${rows === total ? "equals" : "DIFFERS FROM"} the ${fmt(rows)} rows the encoder returns for this batch`;
}

function whyGather(m, rank) {
  const r = m.ranks[rank];
  let own = 0;
  const ownBefore = m.counts.map((c, id) => { const b = own; if (m.owner[id] === rank) own += c; return b; });
  for (const [j, id] of r.pieces.entries()) {
    const others = m.offsets[id] - ownBefore[id];
    if (r.localCounts[j] && others) {
      const holders = [];
      for (let p = 0; p < id && holders.length < 6; p++) if (m.counts[p] && m.owner[p] !== rank) holders.push(p);
      return `Why the all-gather: the offset ${fmt(m.offsets[id])} of ${pieceName(m, id)} is ${fmt(ownBefore[id])} ` +
        `from this rank's own chunks + ${fmt(others)} from ` +
        holders.map((p) => `${pieceName(m, p)} (rank ${m.owner[p]})`).join(", ") +
        ": counts this rank never sees in its local row.";
    }
  }
  return "This rank needs no count from another rank here, but it still joins the all-gather.";
}

function naive(m, rank) {
  const r = m.ranks[rank], rows = m.visionTokens, held = r.positions.length;
  if (held === rows) return `Here it would happen to work: rank ${rank} holds all ${fmt(rows)} vision tokens.`;
  const cli = sameSetting(DATA.cli && DATA.cli.setting, state.setting) ? DATA.cli.naive[rank] : null;
  return `combined[vision_mask] = vision_embeds puts ${fmt(rows)} rows into ${fmt(held)} masked positions, so ` +
    "the shapes differ and the assignment raises. " +
    (cli ? `PyTorch's own words (run by cpinspect for this setting): ${cli}` : "`cpinspect simulate --explain` " +
    "runs it and shows PyTorch's own message.");
}

function sliceNote(m, rank) {
  const counts = m.ranks.map((q) => q.positions.length), held = counts[rank];
  const start = counts.slice(0, rank).reduce((a, b) => a + b, 0);
  if (!held) return "With no vision tokens this rank selects no rows, but it still had to join the all-gather.";
  const wrong = m.ranks[rank].rows.filter((row, i) => row !== start + i).length;
  if (!wrong) return `A contiguous slice of rows ${span(start, start + held)} would be right here.`;
  return `A contiguous slice vision_embeds[${start}:${start + held}] has the right shape but puts ${fmt(wrong)} of ` +
    `${fmt(held)} rows in the wrong place, silently: this rank's chunks are not adjacent in the natural order.`;
}

function drawSteps(m, rank) {
  state.bodies = stepBodies(m, rank);
  state.stepRank = rank;
  const tabs = $("cpx-steptabs");
  tabs.replaceChildren(...state.bodies.map(([title], i) => {
    const b = el("button", { type: "button", role: "tab", "data-step": i, title, text: String(i + 1) });
    b.addEventListener("click", () => setStep(i));
    return b;
  }));
  setStep(state.step);
}

function setStep(i) {
  if (!state.bodies) return;
  state.step = Math.max(0, Math.min(state.bodies.length - 1, i));
  const [title, body] = state.bodies[state.step];
  $("cpx-step").replaceChildren(el("h3", { text: `${state.step + 1}. ${title}` }), ...body);
  $("cpx-step").dataset.step = state.step + 1;
  for (const b of $("cpx-steptabs").children) b.setAttribute("aria-selected", String(Number(b.dataset.step) === state.step));
  $("cpx-prev").disabled = state.step === 0;
  $("cpx-next").disabled = state.step === state.bodies.length - 1;
}

/* ---- the self-check: this page's numbers against the CLI's JSON for the setting it was built with ---- */
function sameSetting(a, b) {
  return !!a && !!b && JSON.stringify([a.cp, a.layout, a.pad, a.seqlens, a.spans]) ===
    JSON.stringify([b.cp, b.layout, b.pad, b.seqlens, b.spans]);
}

function same(a, b) {
  if (Array.isArray(a) || ArrayBuffer.isView(a)) {
    if (!(Array.isArray(b) || ArrayBuffer.isView(b)) || a.length !== b.length) return false;
    for (let i = 0; i < a.length; i++) if (!same(a[i], b[i])) return false;
    return true;
  }
  return a === b;
}

function compareWithCli(m, cli) {
  const sim = cli.simulate, lay = cli.layout, wrong = [];
  if (!same(m.gathered, sim.gathered_counts)) wrong.push("gathered counts");
  for (const r of m.ranks) {
    const c = sim.ranks[r.rank];
    if (!same(r.globals, CPX.fromRanges(c.global_indices))) wrong.push(`rank ${r.rank} local row`);
    if (!same(r.positions, CPX.fromRanges(c.vision_positions))) wrong.push(`rank ${r.rank} vision positions`);
    if (!same(asRows(m, r.localCounts), c.local_counts)) wrong.push(`rank ${r.rank} local counts`);
    if (!same(r.rows, CPX.fromRanges(c.selected_rows))) wrong.push(`rank ${r.rank} rows`);
  }
  for (const [name, b] of Object.entries(lay.balance)) {
    const mine = m.balance[name];
    if (!mine || !same(mine.work, b.work) || Math.abs(mine.imbalance - b.imbalance) > 1e-12) wrong.push(`${name} work`);
  }
  for (const name of Object.keys(m.balance)) if (!lay.balance[name]) wrong.push(`${name} work (not in the CLI's)`);
  for (const seg of lay.segments || []) {
    for (const c of seg.chunks) {
      if (c.end > c.start && CPX.tokenInfo(m, c.start).rank !== c.rank) wrong.push(`owner of segment ${seg.segment} chunk ${c.chunk}`);
    }
  }
  return wrong;
}

function checkBadge(m, setting) {
  const badge = $("cpx-check"), cli = DATA.cli;
  if (!cli) {
    badge.className = "badge";
    badge.textContent = "Computed in the browser with the same maths as cpinspect (its tests compare the two).";
    return;
  }
  if (!sameSetting(cli.setting, setting)) {
    badge.className = "badge";
    badge.textContent = `Computed in the browser. For the setting this page was built with (cp ${cli.setting.cp}, ` +
      `${cli.setting.layout}) it was checked against the CLI's JSON; cpinspect's tests compare random settings.`;
    badge.dataset.checked = "other";
    return;
  }
  const wrong = compareWithCli(m, cli);
  badge.dataset.checked = wrong.length ? "differs" : "equal";
  badge.className = wrong.length ? "badge bad" : "badge good";
  badge.textContent = wrong.length ? `✗ The page differs from ${cli.commands.join(" and ")} in: ${wrong.join(", ")}.`
    : `✓ Checked on load: owners, local rows, counts, rows and work equal ${cli.commands.join(" and ")}.`;
}
