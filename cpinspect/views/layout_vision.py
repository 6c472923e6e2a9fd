"""The vision overlay of the layout picture: which encoder rows of each image land on which rank.

A learner sees here why a rank's rows are not contiguous: each image's rows are cut at the chunk
boundaries, and a rank's two chunks per segment sit far apart in the natural order of rows.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rich.console import Group, RenderableType
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from cpinspect.core.layout import Layout
from cpinspect.core.vision_items import VisionItem
from cpinspect.views.layout import MAX_LISTED, cell_style, token_span, vision_prefix
from cpinspect.views.simulate import rank_label


@dataclass(frozen=True)
class PieceRows:
    """Per piece, in natural order, as plain lists for display: its first encoder row, how many rows
    it holds (its vision tokens), the rank that holds it and its name (``s0 c3``)."""

    first: list[int]
    count: list[int]
    owner: list[int]
    name: list[str]


def piece_rows(layout: Layout, full_mask: torch.Tensor) -> PieceRows:
    """Rows of every piece: vision tokens before it and in it, by one cumulative sum."""
    csum = vision_prefix(full_mask)
    first = csum[layout.piece_start]
    count = csum[layout.piece_start + layout.piece_len] - first
    chunks = layout.piece_chunk.tolist()
    if layout.kind in ("zigzag", "per-document-head-tail", "file"):
        names = [f"s{seg} c{chunk}" for seg, chunk in zip(layout.piece_segment.tolist(), chunks)]
    else:
        names = [f"c{chunk}" for chunk in chunks]
    return PieceRows(first.tolist(), count.tolist(), layout.owner_of_piece().tolist(), names)


def piece_name(layout: Layout, piece: int) -> str:
    """``s3 c5`` (chunks counted per segment) or ``c5``; an empty filler piece (which only keeps every rank's
    count tensor the same shape, hybrid CP and saved index maps) is ``(empty)``."""
    chunk = int(layout.piece_chunk[piece])
    if chunk < 0:
        return "(empty)"
    per_segment = layout.kind in ("zigzag", "per-document-head-tail", "file", "hybrid")
    return f"s{int(layout.piece_segment[piece])} c{chunk}" if per_segment else f"c{chunk}"


def items_table(rows: PieceRows, items: Sequence[VisionItem], full: bool) -> Table:
    """Which rows of each image/video land on which rank, chunk by chunk."""
    table = Table(title="vision items: the encoder returns one row per vision token, in natural order",
                  title_justify="left", title_style="bold")
    for name in ("item", "global tokens", "rows", "held by (rows, chunk)"):
        table.add_column(name, overflow="fold")
    shown = items if full else items[:MAX_LISTED]
    for item in shown:
        held: dict[int, list[str]] = {}
        piece = bisect.bisect_right(rows.first, item.first_row) - 1
        while piece < len(rows.first) and rows.first[piece] < item.end_row:
            low = max(rows.first[piece], item.first_row)
            high = min(rows.first[piece] + rows.count[piece], item.end_row)
            if high > low:
                held.setdefault(rows.owner[piece], []).append(f"{token_span(low, high)} ({rows.name[piece]})")
            piece += 1
        cell = Text()
        for rank, parts in sorted(held.items()):
            if cell:
                cell.append("\n")
            cell.append(f" {rank_label(rank)} ", style=cell_style(rank))
            cell.append(f" rank {rank}: {', '.join(parts)}")
        table.add_row(item.name, f"{item.first_token}-{item.last_token}",
                      token_span(item.first_row, item.end_row), cell)
    if len(shown) < len(items):
        table.add_row(f"… {len(items) - len(shown)} more", "", "", "--full lists them")
    return table


def rank_rows_view(layout: Layout, rows: PieceRows, full: bool) -> list[RenderableType]:
    """Each rank's rows, chunk by chunk, and what sits in every gap between them (other ranks' chunks)."""
    out: list[RenderableType] = [Text("what each rank scatters: rows of the encoder output, in local token order",
                                      style="bold")]
    for rank, pieces in enumerate(layout.rank_pieces.tolist()):
        mine = [p for p in pieces if rows.count[p]]
        line = Text()
        line.append(f" {rank_label(rank)} ", style=cell_style(rank))
        if not mine:
            line.append(f" rank {rank}: no vision tokens, no rows (it still joins the count all-gather)")
            out.append(line)
            continue
        shown = mine if full else mine[:MAX_LISTED + 1]
        parts = [f"{token_span(rows.first[p], rows.first[p] + rows.count[p])} ({rows.name[p]})" for p in shown]
        line.append(f" rank {rank}: " + _listed(parts, full, len(mine)))
        out.append(line)
        gaps = _gaps(shown, rows)
        if gaps:
            out.append(Padding(Text("not contiguous: " + _listed(gaps, full, len(gaps)), style="dim"), (0, 0, 0, 4)))
    return out


def _gaps(mine: Sequence[int], rows: PieceRows) -> list[str]:
    """``"rows 9-56 are in s0 c1, s0 c2 (rank 1)"`` for every hole between a rank's row ranges.

    A rank's pieces come in natural order, so the rows of a hole belong to the pieces between them.
    """
    gaps = []
    for before, after in zip(mine, mine[1:]):
        gap_start, gap_end = rows.first[before] + rows.count[before], rows.first[after]
        if gap_end <= gap_start:
            continue
        by_rank: dict[int, list[str]] = {}
        for piece in range(before + 1, after):
            if rows.count[piece]:
                by_rank.setdefault(rows.owner[piece], []).append(rows.name[piece])
        holders = "; ".join(f"{', '.join(names)} (rank {r})" for r, names in sorted(by_rank.items()))
        gaps.append(f"rows {token_span(gap_start, gap_end)} are in {holders}")
    return gaps


def _listed(parts: Sequence[str], full: bool, total: int) -> str:
    if full or total <= MAX_LISTED:
        return " · ".join(parts)
    return " · ".join(parts[:MAX_LISTED]) + f" · … {total - MAX_LISTED} more (--full)"


def vision_view(layout: Layout, full_mask: torch.Tensor, items: Sequence[VisionItem],
                full: bool = False) -> Group:
    """The vision overlay's text half: items by rank, then each rank's rows with their gaps."""
    rows = piece_rows(layout, full_mask)
    return Group(items_table(rows, items, full), *rank_rows_view(layout, rows, full))
