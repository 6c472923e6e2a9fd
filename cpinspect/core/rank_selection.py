"""Any layout's selection, every intermediate kept: what the simulation runs and displays.

The simulated ranks run this for each layout (:mod:`cpinspect.simulation.run`): the same running
count and all-gather as the training path (:func:`cpinspect.core.selection.count_pieces`), then the
counts in natural piece order, their offsets and the compact rows, so that every number the views
print was computed by the rank that holds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from cpinspect.core.runs import exclusive_cumsum
from cpinspect.core.selection import count_pieces
from cpinspect.core.selection_plan import piece_bounds

__all__ = ["RankSelection", "exclusive_cumsum", "natural_counts", "piece_of_positions", "rows_from_offsets",
           "select_rank_rows", "zigzag_local_piece_len"]


@dataclass
class RankSelection:
    """Every intermediate of one rank's selection, for display and checking.

    ``local_counts`` is ``[pieces_per_rank]`` (``[S, 2]`` once reshaped for zigzag),
    ``gathered`` is ``[cp, pieces_per_rank]`` as received, ``full_counts`` and ``offsets`` are
    ``[P]`` in natural piece order, and ``rows`` holds one embedding row per local vision token.
    ``row_map`` is ``[local_tokens]``: the row of each local position, ``-1`` where not vision.
    """

    cp_rank: int
    local_mask: torch.Tensor
    local_counts: torch.Tensor
    gathered: torch.Tensor
    full_counts: torch.Tensor
    offsets: torch.Tensor
    rows: torch.Tensor
    row_map: torch.Tensor | None = None


def piece_of_positions(local_piece_len: torch.Tensor, local_tokens: int) -> torch.Tensor:
    """``[local_tokens]`` index of the local piece each local position falls in (sync-free)."""
    ends = torch.cumsum(local_piece_len, 0)
    positions = torch.arange(local_tokens, device=local_piece_len.device)
    return torch.searchsorted(ends, positions, right=True)


def natural_counts(gathered: torch.Tensor, rank_pieces: torch.Tensor) -> torch.Tensor:
    """``[P]`` counts in natural piece order: rank r's column j is piece ``rank_pieces[r, j]``."""
    full = torch.zeros(rank_pieces.numel(), dtype=gathered.dtype, device=gathered.device)
    return full.scatter_(0, rank_pieces.reshape(-1).to(gathered.device), gathered.reshape(-1))


def zigzag_local_piece_len(cu_seqlens: torch.Tensor, cp: int) -> torch.Tensor:
    """``[2S]`` local piece lengths under per-document zigzag: chunk length twice per segment."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if cp == 1:
        head = lengths // 2
        return torch.stack([head, lengths - head], dim=1).reshape(-1)
    chunk = lengths // (2 * cp)
    return torch.stack([chunk, chunk], dim=1).reshape(-1)


def select_rank_rows(
    local_mask: torch.Tensor,
    local_piece_len: torch.Tensor,
    rank_pieces: torch.Tensor,
    group: dist.ProcessGroup,
    *,
    local_vision_count: int | None = None,
) -> RankSelection:
    """Run the selection for ``group.rank()`` given the layout's pieces (see :mod:`cpinspect.core.layout`).

    ``local_piece_len`` is ``[pieces_per_rank]`` for this rank and ``rank_pieces`` is
    ``[cp, pieces_per_rank]`` global piece ids for every rank (known to all ranks from cu_seqlens).
    Sync-free on CUDA when ``local_vision_count`` (this rank's vision tokens) is given; otherwise
    the count is read from the device once.
    """
    cp_rank = group.rank()
    mask = local_mask.reshape(-1).to(torch.bool)
    bounds = piece_bounds(local_piece_len.to(mask.device), mask.numel())
    counts = count_pieces(mask, bounds, bounds[-1:] * group.size(), group.size(), cp_rank)
    gathered = counts.gather(group)
    count = int(counts.running[-1]) if local_vision_count is None else local_vision_count
    full_counts = natural_counts(gathered, rank_pieces)
    offsets = exclusive_cumsum(full_counts)
    rows = rows_from_offsets(offsets[rank_pieces[cp_rank].to(offsets.device)], counts.running_at, count)
    return RankSelection(cp_rank, mask, counts.local_counts, gathered, full_counts, offsets, rows)


def rows_from_offsets(first_row: torch.Tensor, running_at: torch.Tensor, local_vision_count: int) -> torch.Tensor:
    """Compact rows for any layout, from each local piece's first natural row: ``O(k + n)``, no table.

    The i-th local vision token lies in the last piece k whose first ordinal ``running_at[k]`` is
    at most i and takes row ``first_row[k] + i - running_at[k]``: a difference array over the
    ordinals and one cumulative sum (empty pieces share an ordinal with the next one, which then
    wins: right, since an empty piece covers nothing). The simulation uses it, because it builds
    the natural-order offsets for display anyway.
    """
    shift = first_row - running_at[:-1]
    step = shift.clone()
    step[1:] -= shift[:-1]
    spread = torch.zeros(local_vision_count + 1, dtype=torch.long, device=shift.device)
    spread.index_add_(0, running_at[:-1].clamp(max=local_vision_count), step)
    return torch.arange(local_vision_count, device=shift.device) + spread[:local_vision_count].cumsum_(0)
