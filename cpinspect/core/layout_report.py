"""What ``cpinspect layout`` reports, as data: segments clipped into cells, the ``--json`` document,
and the boundaries drawn from ``--seqlens`` (the picture is :mod:`cpinspect.views.layout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cpinspect.core.balance import MAX_TOKENS, Balance
from cpinspect.core.errors import InputError
from cpinspect.core.layout import Layout, padded_boundaries, rule_of

# Stated limits of ``cpinspect layout`` (README "Reliability"); beyond them: exit 2, never a wrapped number
# or an allocation the machine cannot make.
MAX_PIECES = 1 << 23  # pieces (2*cp*segments for zigzag): ~0.4 GB of int64 tensors for the Layout
JSON_INDEX_LIMIT = 1 << 24  # above this many tokens, --json gives each rank's pieces instead of every index


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


def segment_cells(layout: Layout, segments: int | None = None, ranks: list[int] | None = None) -> list[list[Cell]]:
    """Per physical segment, the layout's pieces clipped to it, in global order.

    Segments and pieces both tile the row, so the cuts at every segment and piece boundary give
    exactly the non-empty intersections; each is found by a binary search, not a per-token loop.
    ``segments`` keeps only the first that many segments and ``ranks`` only the cells of those
    ranks (what a picture draws); the filtering is done on tensors, before any Python object is made.
    """
    cu = layout.cu_seqlens
    starts = layout.piece_start
    bounds = torch.unique(torch.cat([cu, starts, starts + layout.piece_len]))
    low, high = bounds[:-1], bounds[1:]
    segment = torch.searchsorted(cu, low, right=True) - 1
    piece = torch.searchsorted(starts, low, right=True) - 1
    owner = layout.owner_of_piece()[piece]
    count = layout.num_segments if segments is None else min(segments, layout.num_segments)
    keep = segment < count
    if ranks is not None:
        wanted = torch.zeros(layout.cp, dtype=torch.bool)
        wanted[torch.tensor(ranks, dtype=torch.long)] = True
        keep &= wanted[owner]
    segment, piece, owner, low, high = segment[keep], piece[keep], owner[keep], low[keep], high[keep]
    cells: list[list[Cell]] = [[] for _ in range(count)]
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
    if sum(lengths) > MAX_TOKENS:
        raise InputError(f"--seqlens adds up to {sum(lengths):,} tokens, more than the {MAX_TOKENS:,} (2**32 - 1) "
                         "cpinspect computes exactly", where=f"--seqlens {_abridged(text)}",
                         fix="give a shorter row (a few of its segments show the same per-segment layout)")
    return lengths


def _abridged(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."


def check_layout_size(cu_seqlens: torch.Tensor, cp: int, kind: str) -> None:
    """The exit-2 error for a layout with more pieces than :data:`MAX_PIECES` (checked before building it)."""
    segments = cu_seqlens.numel() - 1 if kind == "zigzag" else 1
    pieces = segments * (cp if kind == "contiguous" else 2 * cp)
    if pieces > MAX_PIECES:
        raise InputError(
            f"cp={cp:,} over {segments:,} segment(s) cuts the row into {pieces:,} pieces, more than the {MAX_PIECES:,} "
            f"`cpinspect layout` handles", where="--cp",
            fix="pick a smaller cp or fewer segments (the layout of each segment does not depend on the others)")


def layout_document(layout: Layout, balances: dict[str, Balance], index_limit: int = JSON_INDEX_LIMIT,
                    parallel: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``--json`` object: segments with their chunks (``end`` exclusive), ranks, balance.

    Each rank lists its ``global_indices`` (a 1-D tensor; :func:`cpinspect.cli.common.write_json`
    streams it) when the row has at most ``index_limit`` tokens; a longer row gives each rank's
    ``pieces`` (``[start, end)`` in local order) instead, and ``global_indices_omitted`` says so.
    ``parallel`` (:func:`cpinspect.core.parallel.sp_document`) adds the tensor/sequence-parallel numbers.
    """
    cu = layout.cu_seqlens.tolist()
    total = layout.total_tokens
    split = {"zigzag": None, "sequence-zigzag": 2 * layout.cp, "contiguous": layout.cp}[rule_of(layout.kind)]
    local_cp = layout.segment_cp.tolist() if layout.segment_cp is not None else [layout.cp] * layout.num_segments
    segments = []
    for index, cells in enumerate(segment_cells(layout)):
        length, size = cu[index + 1] - cu[index], local_cp[index]
        chunk_len = length // (2 * size if size > 1 else 1) if split is None else total // split
        segments.append({
            "segment": index, "start": cu[index], "length": length, "chunk_len": chunk_len,
            "chunks": [{"chunk": c.chunk, "rank": c.rank, "start": c.start, "end": c.end} for c in cells],
            **({"local_cp": size} if layout.segment_cp is not None else {}),
        })
    document: dict[str, Any] = {"cp": layout.cp, "layout": layout.kind, "segments": segments}
    if parallel is not None:
        document.update(parallel)
    if total <= index_limit:
        indices = layout.all_global_indices()
        document["ranks"] = [{"rank": rank, "global_indices": indices[rank]} for rank in range(layout.cp)]
    else:
        starts = layout.piece_start[layout.rank_pieces]
        ends = (starts + layout.piece_len[layout.rank_pieces]).tolist()
        document["ranks"] = [{"rank": rank, "pieces": [list(p) for p in zip(row, end) if p[1] > p[0]]}
                             for rank, (row, end) in enumerate(zip(starts.tolist(), ends))]
        document["global_indices_omitted"] = (
            f"the row has {total:,} tokens, more than {index_limit:,}: each rank lists its pieces "
            "([start, end) in local order) instead of every global index")
    document["balance"] = {kind: balance.to_dict() for kind, balance in balances.items()}
    return document


def seqlens_cu(seqlens: str, cp: int, kind: str, pad: bool, sp: int = 1,
               segment_cp: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """``cu_seqlens`` of ``--seqlens`` (padded like ``simulate --pad`` when ``pad``) and how to name it."""
    cu = torch.cumsum(torch.tensor([0, *parse_seqlens(seqlens)]), 0)
    source = f"--seqlens {seqlens}"
    if not pad:
        return cu, source
    padded = padded_boundaries(cu, cp, kind, sp, segment_cp)
    if not torch.equal(padded, cu):
        source += f" (padded by --pad to {','.join(map(str, (padded[1:] - padded[:-1]).tolist()))})"
    return padded, source
