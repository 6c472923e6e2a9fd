/* cpinspect explore: the maths of the page (no DOM here).
 *
 * A layout is one entry of LAYOUTS: a check (null or the reason it cannot cut the row) and a
 * function (cu, cp) -> pieces. A piece is a contiguous range of global positions one rank holds
 * whole; every rank holds the same number of pieces, listed in local-memory order in rankPieces.
 * This mirrors cpinspect.core.layout (make_layout / Layout); tests/test_explore_browser.py checks
 * everything computed here against the CLI's own JSON for random settings.
 *
 * Adding a layout the CLI learns (cpinspect.core.layout.LAYOUTS) is one entry here: `check`,
 * `pieces` (mapPieces builds them from a per-rank index map) and how `--pad` pads for it; `paired`
 * (local counts read as [rows, 2], Layout.paired) and `perSegmentChunks` (a piece is named by segment and
 * chunk); the browser test fails while a CLI layout has no entry.
 */
"use strict";

const CPX = {};

function seqLengths(cu) {
  const out = [];
  for (let s = 0; s + 1 < cu.length; s++) out.push(cu[s + 1] - cu[s]);
  return out;
}

/* cpinspect.core.layout._zigzag_pieces: 2cp chunks per segment of `split` (cp 1: floor/ceil). */
function zigzagPieces(split, cp) {
  const n = 2 * cp, lengths = seqLengths(split), S = lengths.length;
  const start = new Array(S * n), len = new Array(S * n), seg = new Array(S * n), chunk = new Array(S * n);
  for (let s = 0; s < S; s++) {
    const L = lengths[s], cl = Math.floor(L / n);
    let at = split[s];
    for (let c = 0; c < n; c++) {
      const id = s * n + c, l = cp === 1 && c === 1 ? L - cl : cl;
      start[id] = at; len[id] = l; seg[id] = s; chunk[id] = c; at += l;
    }
  }
  const rankPieces = [];
  for (let r = 0; r < cp; r++) {
    const held = [];
    for (let s = 0; s < S; s++) held.push(s * n + r, s * n + n - 1 - r);
    rankPieces.push(held);
  }
  return { start, len, seg, chunk, rankPieces, columns: n };
}

/* cpinspect.core.layout_maps.layout_from_indices: the pieces of a layout given by its per-rank index map.
 * `flat` is rank-major (rank r's local j at r*T/cp + j). Pieces are the maximal runs of consecutive global
 * positions in a rank's local order inside one segment, in natural (start) order; ranks with fewer runs
 * get empty pieces (length 0, start T, chunk -1) so every rank holds the same number; the count table is
 * one row of all pieces. */
function mapPieces(cu, cp, flat) {
  const total = cu[cu.length - 1], S = cu.length - 1, share = Math.max(Math.floor(total / cp), 1);
  const segAt = new Int32Array(total);
  for (let s = 0; s < S; s++) segAt.fill(s, cu[s], cu[s + 1]);
  const runStart = [], runLen = [], runRank = [], perRank = new Array(cp).fill(0);
  for (let i = 0; i < flat.length; i++) {
    const g = flat[i];
    if (i % share === 0 || g !== flat[i - 1] + 1 || segAt[g] !== segAt[flat[i - 1]]) {
      runStart.push(g); runLen.push(1); runRank.push(Math.floor(i / share)); perRank[Math.floor(i / share)]++;
    } else {
      runLen[runLen.length - 1]++;
    }
  }
  const real = runStart.length, width = cp ? Math.max(...perRank) : 0, empties = cp * width - real;
  const runAt = new Int32Array(total).fill(-1);
  runStart.forEach((g, k) => { runAt[g] = k; });
  const natural = new Int32Array(real), start = [], len = [], seg = [], chunk = [];
  for (let g = 0; g < total; g++) {
    const k = runAt[g];
    if (k < 0) continue;
    natural[k] = start.length;
    const s = segAt[g], j = start.length;
    chunk.push(j && seg[j - 1] === s ? chunk[j - 1] + 1 : 0);
    start.push(g); len.push(runLen[k]); seg.push(s);
  }
  for (let e = 0; e < empties; e++) { start.push(total); len.push(0); seg.push(S - 1); chunk.push(-1); }
  const rankPieces = [];
  for (let r = 0; r < cp; r++) rankPieces.push([]);
  for (let k = 0; k < real; k++) rankPieces[runRank[k]].push(natural[k]);
  let next = real;
  for (const held of rankPieces) while (held.length < width) held.push(next++);
  return { start, len, seg, chunk, rankPieces, columns: start.length };
}

/* cpinspect.core.layout_maps.per_document_head_tail_indices: each document rearranged into
 * [rank 0 head, rank 0 tail, rank 1 head, ...] chunks, then the rearranged row cut into cp shares. */
function perDocumentHeadTailIndices(cu, cp) {
  const total = cu[cu.length - 1], flat = new Int32Array(total);
  for (let s = 0; s + 1 < cu.length; s++) {
    const a = cu[s], L = cu[s + 1] - a, c = Math.floor(L / (2 * cp)), d = Math.max(2 * c, 1);
    for (let o = 0; o < L; o++) {
      if (cp === 1) { flat[a + o] = a + o; continue; }
      const pair = Math.floor(o / d), within = o % d, head = within < c;
      flat[a + o] = a + (head ? pair : 2 * cp - 1 - pair) * c + (head ? within : within - c);
    }
  }
  return flat;
}

const MAX_MAPPED_TOKENS = 2 ** 26;  // cpinspect.core.layout.MAX_MAPPED_TOKENS

function divisibleReason(lengths, multiple, what, kind) {
  for (let s = 0; s < lengths.length; s++) {
    const L = lengths[s];
    if (L > 0 && L < multiple) {
      return `cp is too large for ${what(s)}: it has ${L} token(s), fewer than the ${multiple} pieces the ` +
        `${kind} layout cuts it into`;
    }
    if (L % multiple) {
      const next = Math.ceil(L / multiple) * multiple;
      return `${what(s)} has length ${L}, which is not divisible by ${multiple}; the next multiple is ${next} ` +
        `(tick "pad" to pad like frameworks do)`;
    }
  }
  return null;
}

const LAYOUTS = {
  "zigzag": {
    about: "Megatron per-document THD: every segment cut into 2·cp chunks; rank r holds chunks r and 2cp−1−r",
    check: (cu, cp) => cp === 1 ? null : divisibleReason(seqLengths(cu), 2 * cp, (s) => `segment ${s}`, "zigzag"),
    pieces: (cu, cp) => zigzagPieces(cu, cp),
    padMultiple: (cp) => (cp > 1 ? 2 * cp : 1),
    padPerSegment: true,
    paired: true,
    perSegmentChunks: true,
  },
  "sequence-zigzag": {
    about: "BSHD / per-sequence: the whole row cut as one sequence into 2·cp chunks",
    check: (cu, cp) => cp === 1 ? null :
      divisibleReason([cu[cu.length - 1]], 2 * cp, () => "the packed row", "sequence-zigzag"),
    pieces: (cu, cp) => zigzagPieces([0, cu[cu.length - 1]], cp),
    padMultiple: (cp) => (cp > 1 ? 2 * cp : 1),
    padPerSegment: false,
    paired: true,
  },
  "contiguous": {
    about: "verl Ulysses / allgather CP: rank r holds [r·T/cp, (r+1)·T/cp)",
    check: (cu, cp) => divisibleReason([cu[cu.length - 1]], cp, () => "the packed row", "contiguous"),
    pieces: (cu, cp) => {
      const total = cu[cu.length - 1], local = total / cp;
      const start = [], len = [], seg = [], chunk = [], rankPieces = [];
      for (let r = 0; r < cp; r++) { start.push(r * local); len.push(local); seg.push(0); chunk.push(r); rankPieces.push([r]); }
      return { start, len, seg, chunk, rankPieces, columns: cp };
    },
    padMultiple: (cp) => cp,
    padPerSegment: false,
  },
  "head-tail": {
    about: "PyTorch _HeadTailLoadBalancer: chunk pairs (r, 2cp−1−r) of the whole row, rank-major, then cut " +
      "contiguously (the same map as sequence-zigzag)",
    check: (cu, cp) => cp === 1 ? null :
      divisibleReason([cu[cu.length - 1]], 2 * cp, () => "the packed row", "head-tail"),
    pieces: (cu, cp) => zigzagPieces([0, cu[cu.length - 1]], cp),
    padMultiple: (cp) => (cp > 1 ? 2 * cp : 1),
    padPerSegment: false,
    paired: true,
  },
  "per-document-head-tail": {
    about: "PyTorch _PerDocumentHeadTailLoadBalancer: each document rearranged into chunk pairs (r, 2cp−1−r), " +
      "rank-major, then the rearranged row cut into cp contiguous shares (a rank need not hold every document)",
    check: (cu, cp) => {
      const total = cu[cu.length - 1];
      if (total > MAX_MAPPED_TOKENS) {
        return `the row has ${total} tokens, more than the ${MAX_MAPPED_TOKENS} a per-token index map may hold`;
      }
      return cp === 1 ? null : divisibleReason(seqLengths(cu), 2 * cp, (s) => `segment ${s}`, "per-document-head-tail");
    },
    pieces: (cu, cp) => mapPieces(cu, cp, perDocumentHeadTailIndices(cu, cp)),
    padMultiple: (cp) => (cp > 1 ? 2 * cp : 1),
    padPerSegment: true,
    perSegmentChunks: true,
  },
};

/* core.layout.padded_boundaries / simulate --pad: per segment for zigzag, the row's end otherwise. */
function padLengths(lengths, cp, kind) {
  const m = LAYOUTS[kind].padMultiple(cp);
  const up = (x) => Math.ceil(x / m) * m;
  if (LAYOUTS[kind].padPerSegment) return lengths.map(up);
  const total = lengths.reduce((a, b) => a + b, 0), out = lengths.slice();
  if (out.length) out[out.length - 1] += up(total) - total;
  return out;
}

function cumsum(lengths) {
  const cu = [0];
  for (const l of lengths) cu.push(cu[cu.length - 1] + l);
  return cu;
}

/* Segment of every global position: the last s with cu[s] <= p (searchsorted right - 1). */
function segmentOf(cu, p) {
  let lo = 0, hi = cu.length - 1;
  while (hi - lo > 1) { const mid = (lo + hi) >> 1; if (cu[mid] <= p) lo = mid; else hi = mid; }
  while (lo + 1 < cu.length - 1 && cu[lo + 1] <= p) lo++;
  return lo;
}

/* cpinspect.core.balance.prefix_work: unmasked query-key pairs of every query before p. */
function prefixWork(cu, whole, p) {
  const s = segmentOf(cu, p), k = p - cu[s];
  return whole[s] + k * (k + 1) / 2;
}

function rankWork(cu, kind, cp) {
  if (LAYOUTS[kind].check(cu, cp)) return null;
  const P = LAYOUTS[kind].pieces(cu, cp), lengths = seqLengths(cu), whole = [0];
  for (const L of lengths) whole.push(whole[whole.length - 1] + L * (L + 1) / 2);
  const work = P.rankPieces.map((held) => held.reduce(
    (acc, id) => acc + prefixWork(cu, whole, P.start[id] + P.len[id]) - prefixWork(cu, whole, P.start[id]), 0));
  const total = work.reduce((a, b) => a + b, 0), max = Math.max(...work);
  return { work, imbalance: total ? max * work.length / total : 1.0, max, mean: total / cp };
}

/* The vision mask of the physical row: spans are [segment, start-in-segment, length, kind]. */
function visionMask(cu, spans) {
  const total = cu[cu.length - 1], mask = new Uint8Array(total);
  const kind = new Uint8Array(total);  // 0 text, 1 image, 2 video, 3 audio
  let clipped = 0;
  for (const [s, a, n, k] of spans) {
    if (s >= cu.length - 1) { clipped += n; continue; }
    const L = cu[s + 1] - cu[s], end = Math.min(a + n, L);
    clipped += a + n - Math.max(end, a);
    for (let i = a; i < end; i++) { mask[cu[s] + i] = 1; kind[cu[s] + i] = k === "video" ? 2 : k === "audio" ? 3 : 1; }
  }
  return { mask, kind, clipped };
}

/* Everything one setting shows: the layout, each rank's rows and selection, the balance. */
function computeModel(setting) {
  const { cp, layout: kind, pad } = setting;
  const lengths = pad ? padLengths(setting.seqlens, cp, kind) : setting.seqlens.slice();
  const cu = cumsum(lengths), total = cu[cu.length - 1];
  const model = { cp, layout: kind, pad, lengths, cu, total, error: null };
  if (!LAYOUTS[kind]) { model.error = `the page has no implementation of the layout ${kind}`; return model; }
  model.error = LAYOUTS[kind].check(cu, cp);
  model.balance = {};
  for (const name of Object.keys(LAYOUTS)) {
    const b = rankWork(cu, name, cp);
    if (b) model.balance[name] = b;
  }
  if (model.error) return model;
  const P = LAYOUTS[kind].pieces(cu, cp), nPieces = P.start.length;
  const { mask, kind: vkind, clipped } = visionMask(cu, setting.spans);
  const before = new Int32Array(total + 1);  // vision tokens before each position = embedding row
  for (let p = 0; p < total; p++) before[p + 1] = before[p] + mask[p];
  const owner = new Int32Array(nPieces), pieceLocal = new Int32Array(nPieces);
  const ranks = [];
  for (let r = 0; r < cp; r++) {
    let at = 0;
    for (const id of P.rankPieces[r]) { owner[id] = r; pieceLocal[id] = at; at += P.len[id]; }
  }
  const counts = P.start.map((a, id) => before[a + P.len[id]] - before[a]);  // what the all-gather rebuilds
  const offsets = [];
  let run = 0;
  for (let id = 0; id < nPieces; id++) { offsets.push(run); run += counts[id]; }
  for (let r = 0; r < cp; r++) {
    const held = P.rankPieces[r], local = held.reduce((a, id) => a + P.len[id], 0);
    const globals = new Int32Array(local), rows = [], positions = [];
    let at = 0;
    for (const id of held) {
      let ordinal = 0;
      for (let i = 0; i < P.len[id]; i++, at++) {
        const g = P.start[id] + i;
        globals[at] = g;
        if (mask[g]) { positions.push(at); rows.push(offsets[id] + ordinal); ordinal++; }
      }
    }
    ranks.push({ rank: r, pieces: held, globals, localCounts: held.map((id) => counts[id]), positions, rows });
  }
  const columns = P.columns;
  const gathered = [];
  for (let i = 0; i < nPieces; i += columns) gathered.push(counts.slice(i, i + columns));
  Object.assign(model, { P, owner, pieceLocal, counts, offsets, gathered, ranks, mask, vkind, before,
    visionTokens: before[total], clipped, columns });
  return model;
}

/* How a piece is named: segment and chunk where chunks count per segment, "empty" for a map's padding pieces. */
function namePiece(kind, P, id) {
  if (P.chunk[id] < 0) return "empty";
  return LAYOUTS[kind].perSegmentChunks ? `s${P.seg[id]} c${P.chunk[id]}` : `c${P.chunk[id]}`;
}

/* Where global position g lives: segment, chunk, owner, local index, embedding row. */
function tokenInfo(model, g) {
  const P = model.P;
  let lo = 0, hi = P.start.length - 1;  // the last piece with start <= g holds g (empty pieces come first)
  while (lo < hi) { const mid = (lo + hi + 1) >> 1; if (P.start[mid] <= g) lo = mid; else hi = mid - 1; }
  const rank = model.owner[lo];
  return {
    global: g, segment: segmentOf(model.cu, g), chunk: P.chunk[lo], piece: lo, rank,
    local: model.pieceLocal[lo] + g - P.start[lo],
    row: model.mask[g] ? model.before[g] : null, kind: ["text", "image", "video", "audio"][model.vkind[g]],
  };
}

/* Inclusive runs of consecutive integers, like cpinspect.core.ranges.to_ranges. */
function toRanges(values) {
  const out = [];
  for (let i = 0; i < values.length; i++) {
    if (out.length && values[i] === out[out.length - 1][1] + 1) out[out.length - 1][1] = values[i];
    else out.push([values[i], values[i]]);
  }
  return out;
}

function fromRanges(ranges) {
  const out = [];
  for (const [a, b] of ranges) for (let v = a; v <= b; v++) out.push(v);
  return out;
}

function formatRanges(values, limit) {
  const runs = toRanges(values).map(([a, b]) => (a === b ? `${a}` : `${a}-${b}`));
  if (!runs.length) return "-";
  if (limit && runs.length > limit) {
    return runs.slice(0, limit - 2).join(", ") + `, ... (${runs.length - limit} more runs) ..., ` + runs.slice(-2).join(", ");
  }
  return runs.join(", ");
}

Object.assign(CPX, { LAYOUTS, computeModel, tokenInfo, padLengths, cumsum, toRanges, fromRanges, formatRanges,
  segmentOf, rankWork, namePiece, mapPieces });
