"""What ``cpinspect layout`` reports, as data: segments clipped into cells, the ``--json`` document,
and the boundaries drawn from ``--seqlens`` (the picture is :mod:`cpinspect.views.layout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cpinspect.core.balance import Balance
from cpinspect.core.errors import InputError
from cpinspect.core.layout import Layout, padded_boundaries, rule_of


@dataclass(frozen=True)
class Cell:
    """One piece of a layout clipped to one segment: global tokens ``[start, end)`` held by ``rank``."""

    segment: int
    chunk: int
    rank: int
    start: int
    end: int

    @property
    def tokens(self) -> int:
        return self.end - self.start


def segment_cells(layout: Layout) -> list[list[Cell]]:
    """Per physical segment, the layout's pieces clipped to it, in global order.

    Segments and pieces both tile the row, so the cuts at every segment and piece boundary give
    exactly the non-empty intersections; each is found by a binary search, not a per-token loop.
    """
    cu = layout.cu_seqlens
    starts = layout.piece_start
    bounds = torch.unique(torch.cat([cu, starts, starts + layout.piece_len]))
    low, high = bounds[:-1], bounds[1:]
    segment = torch.searchsorted(cu, low, right=True) - 1
    piece = torch.searchsorted(starts, low, right=True) - 1
    owner = layout.owner_of_piece()[piece]
    cells: list[list[Cell]] = [[] for _ in range(layout.num_segments)]
    rows = zip(segment.tolist(), layout.piece_chunk[piece].tolist(), owner.tolist(), low.tolist(), high.tolist())
    for seg, chunk, rank, start, end in rows:
        cells[seg].append(Cell(seg, chunk, rank, start, end))
    return cells


def parse_seqlens(text: str) -> list[int]:
    """``"16, 32"`` -> ``[16, 32]``; an exit-2 error naming the bad entry otherwise."""
    entries = [part.strip() for part in text.split(",")]
    lengths = []
    for index, entry in enumerate(entries):
        if not entry.isdigit() or int(entry) < 1:
            raise InputError(
                f"--seqlens entry {index} is {entry!r}, not a positive whole number of tokens",
                where=f"--seqlens {text}",
                fix="give the physical segment lengths as comma-separated integers, e.g. --seqlens 16,32",
            )
        lengths.append(int(entry))
    return lengths


def layout_document(layout: Layout, balances: dict[str, Balance]) -> dict[str, Any]:
    """The ``--json`` object: segments with their chunks (``end`` exclusive), ranks, balance."""
    cu = layout.cu_seqlens.tolist()
    total = layout.total_tokens
    split = {"zigzag": None, "sequence-zigzag": 2 * layout.cp, "contiguous": layout.cp}[rule_of(layout.kind)]
    segments = []
    for index, cells in enumerate(segment_cells(layout)):
        length = cu[index + 1] - cu[index]
        chunk_len = length // (2 * layout.cp) if split is None else total // split
        segments.append({
            "segment": index, "start": cu[index], "length": length, "chunk_len": chunk_len,
            "chunks": [{"chunk": c.chunk, "rank": c.rank, "start": c.start, "end": c.end} for c in cells],
        })
    indices = layout.all_global_indices().tolist()
    return {
        "cp": layout.cp,
        "layout": layout.kind,
        "segments": segments,
        "ranks": [{"rank": rank, "global_indices": held} for rank, held in enumerate(indices)],
        "balance": {kind: balance.to_dict() for kind, balance in balances.items()},
    }


def seqlens_cu(seqlens: str, cp: int, kind: str, pad: bool) -> tuple[torch.Tensor, str]:
    """``cu_seqlens`` of ``--seqlens`` (padded like ``simulate --pad`` when ``pad``) and how to name it."""
    lengths = parse_seqlens(seqlens)
    cu = torch.cumsum(torch.tensor([0, *lengths]), 0)
    source = f"--seqlens {seqlens}"
    if not pad:
        return cu, source
    padded = padded_boundaries(cu, cp, kind)
    if not torch.equal(padded, cu):
        source += f" (padded by --pad to {','.join(map(str, (padded[1:] - padded[:-1]).tolist()))})"
    return padded, source
