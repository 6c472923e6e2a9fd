"""The layout picture: every segment's chunks in global order, then every rank's local row.

Nobody else draws this: DTensor and JAX visualisers show contiguous blocks of one tensor, and a
zigzag split is not a placement they can express. Here each segment of ``cu_seqlens`` is drawn
as its ``2*cp`` chunks, each cell coloured by the rank that holds it and labelled with its chunk
number and global token range; beneath, each rank's local row shows those chunks in the order
they sit in memory, with the local offsets ``cu[i]/cp`` marked. Cells are proportional to their
token counts and shrink to the terminal width; labels always carry the exact numbers, and rank
digits/letters keep the picture readable without colour. With a vision mask every cell also
shows where its vision tokens are (``█`` all vision, ``▓ ▒ ░`` some, ``·`` none).

``python -m cpinspect.views.layout`` draws the worked example (``cu_seqlens = [0, 8, 24]``, cp 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rich.console import Group, RenderableType
from rich.padding import Padding
from rich.text import Text

from cpinspect.core.hybrid import block_text
from cpinspect.core.layout import Layout
from cpinspect.core.layout_report import Cell, segment_cells
from cpinspect.views.balance import shown_ranks
from cpinspect.views.simulate import RANK_COLORS, contrast_text, density_glyph, rank_label

MAX_SEGMENTS = 12
MAX_LISTED = 12
RULE_TEXT = {
    "zigzag": "each segment is cut into 2·cp = {n} equal chunks; rank r holds chunks r and {last}-r of every segment",
    "sequence-zigzag": "the whole row is cut into 2·cp = {n} equal chunks, ignoring segment boundaries; "
                       "rank r holds chunks r and {last}-r",
    "contiguous": "the whole row is cut into cp = {n} equal pieces, ignoring segment boundaries; rank r holds piece r",
    "head-tail": "PyTorch's head-tail balancer: the whole row is cut into 2·cp = {n} equal chunks, rearranged "
                 "rank-major as (r, {last}-r) pairs, then sharded contiguously (the same map as sequence-zigzag)",
    "per-document-head-tail": "PyTorch's per-document head-tail balancer: each document is cut into 2·cp = {n} "
                              "chunks and rearranged document by document as (r, {last}-r) pairs, then the "
                              "rearranged row is sharded contiguously; pieces are each rank's runs of positions",
    "file": "the per-rank global indices given with --layout-from; pieces are each rank's runs of positions",
    "hybrid": "hybrid CP: segment s has its own cp c and sits on an aligned block of c ranks (the least loaded); "
              "block member j holds chunks j and 2c-1-j of its 2·c chunks (c = 1: the whole segment)",
}
SEGMENT_LABELLED = ("zigzag", "per-document-head-tail", "file", "hybrid")


@dataclass(frozen=True)
class Box:
    """A cell as drawn: its label lines, its token range (for width and vision), its rank (colour)."""

    labels: tuple[str, ...]
    note: str
    rank: int
    start: int
    end: int

    @property
    def tokens(self) -> int:
        return self.end - self.start


def token_span(start: int, end: int) -> str:
    """Inclusive text of global tokens ``[start, end)``: ``"0-3"``, ``"5"`` or ``"-"`` when empty."""
    if end <= start:
        return "-"
    return f"{start}" if end - start == 1 else f"{start}-{end - 1}"


def local_boxes(layout: Layout, cp_rank: int, before: int | None = None) -> list[Box]:
    """The non-empty pieces of ``cp_rank`` in local-memory order, labelled for the local row
    (only those starting before global token ``before``, when given)."""
    pieces = layout.rank_pieces[cp_rank]
    if before is not None:
        pieces = pieces[layout.piece_start[pieces] < before]
    starts = layout.piece_start[pieces].tolist()
    ends = (layout.piece_start[pieces] + layout.piece_len[pieces]).tolist()
    segments = layout.piece_segment[pieces].tolist()
    chunks = layout.piece_chunk[pieces].tolist()
    boxes = []
    for start, end, seg, chunk in zip(starts, ends, segments, chunks):
        if end > start:
            name = f"s{seg} c{chunk}" if layout.kind in SEGMENT_LABELLED else f"c{chunk}"
            boxes.append(Box((name, token_span(start, end)), str(chunk), cp_rank, start, end))
    return boxes


def cell_style(rank: int) -> str:
    """Background of the rank's colour, with black or white text, whichever contrasts more (WCAG)."""
    color = RANK_COLORS[rank % len(RANK_COLORS)]
    return f"{contrast_text(color)} on {color}"


def fit_widths(tokens: Sequence[int], minimum: Sequence[int], available: int,
               scale: float | None = None) -> list[int] | None:
    """Content widths proportional to ``tokens`` (at most ``scale`` columns per token), each at
    least its ``minimum``, together at most ``available``; ``None`` when the minimums alone do not fit.

    Cells too small for their label are pinned at their minimum and the rest share what is left
    (water filling), so one tiny piece does not squeeze a long one out of proportion.
    """
    if sum(minimum) > available:
        return None
    pinned = [False] * len(tokens)
    while True:
        free_tokens = sum(t for t, p in zip(tokens, pinned) if not p)
        room = available - sum(m for m, p in zip(minimum, pinned) if p)
        per_token = room / free_tokens if free_tokens else 0.0
        if scale is not None:
            per_token = min(per_token, scale)
        newly = [i for i, (t, m, p) in enumerate(zip(tokens, minimum, pinned)) if not p and t * per_token < m]
        if not newly:
            break
        for i in newly:
            pinned[i] = True
    return [m if p else max(m, int(t * per_token)) for t, m, p in zip(tokens, minimum, pinned)]


def wrap_groups(widths: Sequence[int], available: int) -> list[range]:
    """Consecutive boxes per output line, each line at most ``available`` columns (separators included)."""
    groups: list[range] = []
    start, used = 0, 1
    for i, width in enumerate(widths):
        if i > start and used + width + 1 > available:
            groups.append(range(start, i))
            start, used = i, 1
        used += width + 1
    groups.append(range(start, len(widths)))
    return groups


def vision_prefix(mask: torch.Tensor) -> torch.Tensor:
    """``[T + 1]`` vision tokens before each position: one cumulative sum serves every cell's strip."""
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(mask.to(torch.long), 0)])


def vision_strip(vision: torch.Tensor, start: int, end: int, width: int) -> str:
    """``width`` characters over tokens ``[start, end)`` (glyphs: :data:`cpinspect.views.simulate.STRIP_LEGEND`).

    ``vision`` is :func:`vision_prefix` of the full row's mask.
    """
    n = end - start
    if n <= 0 or width <= 0:
        return " " * max(width, 0)
    edges = torch.div(torch.arange(width + 1) * n, width, rounding_mode="floor") + start
    upper = torch.maximum(edges[1:], edges[:-1] + 1)
    counts = (vision[upper] - vision[edges[:-1]]).tolist()
    size = (upper - edges[:-1]).tolist()
    return "".join(density_glyph(v, s) for v, s in zip(counts, size))


def _content(box: Box, width: int, compact: bool) -> list[str]:
    """The label lines of one box, each exactly ``width`` characters."""
    if compact:
        fill = (rank_label(box.rank) * width)[:width]
        return [fill, box.note.center(width) if len(box.note) <= width else fill]
    return [label.center(width) if len(label) <= width else label[:width] for label in box.labels]


def draw_boxes(boxes: Sequence[Box], widths: Sequence[int], gutter: Sequence[str], *, compact: bool,
               vision: torch.Tensor | None) -> list[Text]:
    """The text lines of one row of boxes (already cut to fit), a gutter string per line."""
    contents = [_content(box, width, compact) for box, width in zip(boxes, widths)]
    if vision is not None:
        for box, width, lines in zip(boxes, widths, contents):
            lines.append(vision_strip(vision, box.start, box.end, width))
    height = max((len(c) for c in contents), default=0)
    out = []
    for line in range(height):
        text = Text(gutter[line] if line < len(gutter) else " " * len(gutter[0]))
        for box, lines in zip(boxes, contents):
            text.append("│", style="dim")
            text.append(lines[line], style=cell_style(box.rank))
        text.append("│" if boxes else "(empty)", style="dim")
        out.append(text)
    return out


def _full_minimum(boxes: Sequence[Box]) -> list[int]:
    return [max(len(label) for label in box.labels) + 2 for box in boxes]


def draw_segment(cells: Sequence[Cell], gutter: int, width: int, scale: float,
                 vision: torch.Tensor | None) -> list[RenderableType]:
    """One segment's cells: full labels if they fit, else rank letters and a legend, else wrapped."""
    boxes = [Box((f"c{c.chunk} r{rank_label(c.rank)}", token_span(c.start, c.end)), str(c.chunk), c.rank,
                 c.start, c.end) for c in cells]
    available = width - gutter - len(boxes) - 1
    tokens = [b.tokens for b in boxes]
    pad = [" " * gutter]
    widths = fit_widths(tokens, _full_minimum(boxes), available, scale)
    if widths is not None:
        return list(draw_boxes(boxes, widths, pad, compact=False, vision=vision))
    widths = fit_widths(tokens, [1] * len(boxes), available, scale)
    if widths is not None:
        legend = Padding(Text("chunks: " + " · ".join(f"c{b.note} {b.labels[1]}" for b in boxes), style="dim"),
                         (0, 0, 0, gutter))
        return [*draw_boxes(boxes, widths, pad, compact=True, vision=vision), legend]
    widths = _full_minimum(boxes)
    lines: list[RenderableType] = []
    for group in wrap_groups(widths, width - gutter):
        lines.extend(draw_boxes([boxes[i] for i in group], [widths[i] for i in group], pad, compact=False,
                                vision=vision))
    return lines


def segment_heading(layout: Layout, cells: Sequence[Cell], segment: int, vision: torch.Tensor | None) -> Text:
    start, end = int(layout.cu_seqlens[segment]), int(layout.cu_seqlens[segment + 1])
    length = end - start
    heading = Text(f"segment {segment}", style="bold")
    heading.append(f" · tokens {token_span(start, end)} · {length:,} tokens")
    if layout.kind == "zigzag" and layout.cp > 1:
        heading.append(f" = {2 * layout.cp} chunks of {length // (2 * layout.cp):,}")
    elif layout.segment_cp is not None:
        heading.append(f" · {block_text(layout, segment)}")
    elif layout.kind != "zigzag":
        pieces = _pieces_in(layout, start, end)  # all of them, also those of ranks not drawn
        heading.append(f" · holds parts of {pieces} {'piece' if pieces == 1 else 'pieces'} of the row")
    if vision is not None:
        heading.append(f" · {int(vision[end] - vision[start]):,} vision tokens")
    return heading


def global_view(layout: Layout, width: int, *, mask: torch.Tensor | None = None,
                full: bool = False) -> list[RenderableType]:
    """Every segment's cells in global order, one block per segment, proportional across segments."""
    gutter = _gutter(layout)
    drawn = set(shown_ranks(layout.cp, full))
    hidden = layout.cp - len(drawn)
    # a terminal shows a few dozen cells a row: unless full, the first segments and the first and last ranks
    cells = segment_cells(layout, None if full else MAX_SEGMENTS, sorted(drawn) if hidden else None)
    total_segments = layout.num_segments
    longest = max((sum(c.tokens for c in segment) for segment in cells), default=0)
    most_cells = max((len(c) for c in cells), default=0)
    scale = (width - gutter - most_cells - 1) / longest if longest else 1.0
    shown = range(len(cells))
    vision = vision_prefix(mask) if mask is not None else None
    out: list[RenderableType] = []
    for segment in shown:
        out.append(segment_heading(layout, cells[segment], segment, vision))
        out.extend(draw_segment(cells[segment], gutter, width, scale, vision))
    if hidden:
        out.append(Text(f"… the chunks of {hidden:,} ranks ({_hidden_span(drawn, layout.cp)}) are not drawn "
                        "(--full draws them; --json lists all)", style="dim"))
    if len(shown) < total_segments:
        out.append(Text(f"… {total_segments - len(shown)} more segments not drawn (--full draws all; --json lists all)",
                        style="dim"))
    return out


def _pieces_in(layout: Layout, start: int, end: int) -> int:
    """How many non-empty pieces overlap global tokens ``[start, end)``."""
    ends = layout.piece_start + layout.piece_len
    return int(((layout.piece_start < end) & (ends > start) & (layout.piece_len > 0)).sum())


def _hidden_span(drawn: set[int], cp: int) -> str:
    """``ranks 8-991``: the gap :func:`shown_ranks` leaves (it keeps a prefix and a suffix of the ranks)."""
    first = next(r for r in range(cp) if r not in drawn)
    last = next(r for r in range(cp - 1, -1, -1) if r not in drawn)
    return f"ranks {first}-{last}" if first != last else f"rank {first}"


def _gutter(layout: Layout) -> int:
    return len(f"rank {layout.cp - 1}") + 1


def _local_marks(layout: Layout, boxes: Sequence[Box]) -> list[tuple[int, int]]:
    """``(box index, local offset)`` pairs to mark under the local rows: segment starts for zigzag
    (``cu[i]/cp``), piece starts otherwise, and the end of the row."""
    marks, offset = [], 0
    starts = set(layout.cu_seqlens.tolist()) if layout.kind == "zigzag" else None
    for i, box in enumerate(boxes):
        if starts is None or box.start in starts:
            marks.append((i, offset))
        offset += box.tokens
    marks.append((len(boxes), offset))
    return marks


def _ruler(widths: Sequence[int], group: range, marks: Sequence[tuple[int, int]], gutter: int, width: int) -> Text:
    """``▲offset`` under each marked box boundary of this line; a label that would run past the
    line ends at its mark instead (``offset▲``), and one that would collide is left out."""
    positions = [gutter]
    for i in group:
        positions.append(positions[-1] + widths[i] + 1)
    line = [" "] * max(width, positions[-1] + 1)
    free_from = 0
    for index, offset in marks:
        if not group.start <= index <= group.stop:
            continue
        x = positions[index - group.start]
        label, left = f"▲{offset}", x
        if x + len(label) > width:
            label, left = f"{offset}▲", x - len(str(offset))
        if left < free_from:
            continue
        line[left:left + len(label)] = list(label)
        free_from = left + len(label) + 1
    return Text("".join(line).rstrip(), style="bold")


def local_view(layout: Layout, width: int, *, mask: torch.Tensor | None = None,
               full: bool = False) -> list[RenderableType]:
    """Each rank's local row as it sits in memory, cells sized alike for every rank, offsets marked.

    Unless ``full``, only the segments the global view draws are drawn here too.
    """
    cut = layout.num_segments > MAX_SEGMENTS and not full and layout.kind == "zigzag"
    limit = int(layout.cu_seqlens[MAX_SEGMENTS]) if cut else None
    ranks = shown_ranks(layout.cp, full)
    rows = [local_boxes(layout, r, limit) for r in ranks]
    gutter = _gutter(layout)
    vision = vision_prefix(mask) if mask is not None else None
    shapes = {tuple(b.tokens for b in row) for row in rows}
    # maps whose ranks hold runs of different sizes (per-document-head-tail, file) get one ruler per rank;
    # a block lists indices into the drawn ranks
    blocks = [list(range(len(ranks)))] if len(shapes) == 1 else [[index] for index in range(len(ranks))]
    out: list[RenderableType] = []
    for block in blocks:
        first = rows[block[0]]
        count = len(first)
        minimum = [max(len(label) for r in block for label in rows[r][i].labels) + 2 for i in range(count)]
        widths = fit_widths([b.tokens for b in first], minimum, width - gutter - count - 1) or minimum
        marks = _local_marks(layout, first)
        for group in wrap_groups(widths, width - gutter):
            for index in block:
                rank = ranks[index]
                if index and rank != ranks[index - 1] + 1 and (len(block) > 1 or group.start == 0):
                    out.append(Text(f"… {rank - ranks[index - 1] - 1:,} more ranks (--full draws them)", style="dim"))
                label = f"rank {rank}".ljust(gutter)
                out.extend(draw_boxes([rows[index][i] for i in group], [widths[i] for i in group], [label],
                                      compact=False, vision=vision))
            out.append(_ruler(widths, group, marks, gutter, width))
    if cut:
        out.append(Text(f"… the local rows continue with {layout.num_segments - MAX_SEGMENTS} more segments "
                        "(--full draws them)", style="dim"))
    out.append(_offsets_line(layout))
    return out


def _offsets_line(layout: Layout) -> Text:
    if layout.segment_cp is not None:
        return Text(f"each rank holds {layout.local_tokens:,} tokens: its share of each segment its block holds, in "
                    "row order; ▲ marks where each piece starts in local memory", style="dim")
    if layout.kind != "zigzag":
        return Text(f"each rank holds {layout.local_tokens:,} tokens; ▲ marks where each piece starts in local "
                    "memory (segment boundaries play no part in this layout)", style="dim")
    offsets = (layout.cu_seqlens // layout.cp).tolist()
    listed = ", ".join(f"s{i} at {o:,}" for i, o in enumerate(offsets[:-1][:MAX_LISTED]))
    more = f", … ({len(offsets) - 1 - MAX_LISTED} more)" if len(offsets) - 1 > MAX_LISTED else ""
    return Text(f"local offsets cu[i]/cp: {listed}{more}; each rank holds {layout.local_tokens:,} tokens",
                style="dim")


def rank_key(cp: int, full: bool = False) -> Text:
    """A colour key: one swatch per rank (the first and last ones at a large cp), its digit/letter inside."""
    key = Text("ranks ", style="bold")
    ranks = shown_ranks(cp, full)
    for index, rank in enumerate(ranks):
        if index and rank != ranks[index - 1] + 1:
            key.append("… ")
        key.append(f" {rank_label(rank)} ", style=cell_style(rank))
        key.append(" ")
    return key


def layout_header(layout: Layout) -> Text:
    parts = layout.cp if layout.kind == "contiguous" else 2 * layout.cp
    title = Text(f"{layout.kind} layout", style="bold")
    title.append(f" · cp {layout.cp} · {layout.num_segments:,} segment(s), {layout.total_tokens:,} tokens · "
                 f"{layout.local_tokens:,} tokens per rank\n")
    title.append(RULE_TEXT[layout.kind].format(n=parts, last=parts - 1), style="italic")
    return title


def layout_diagram(layout: Layout, width: int, *, mask: torch.Tensor | None = None,
                   full: bool = False) -> Group:
    """The whole picture of one layout: header, colour key, segments, then the local rows."""
    return Group(
        layout_header(layout),
        rank_key(layout.cp, full),
        Text(""),
        *global_view(layout, width, mask=mask, full=full),
        Text(""),
        Text(f"local rows: what each rank holds, in memory order ({layout.local_tokens:,} tokens each)", style="bold"),
        *local_view(layout, width, mask=mask, full=full),
    )


if __name__ == "__main__":  # pragma: no cover - a demo for eyeballing the view
    from rich.console import Console

    from cpinspect.core.layout import make_layout

    console = Console()
    worked = torch.tensor([0, 8, 24])
    console.print(layout_diagram(make_layout(worked, 2), console.width))
