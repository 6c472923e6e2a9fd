"""The per-rank program: select this rank's rows of the natural-order vision embeddings.

This mirrors what a pre-sharded Megatron-Bridge style model does before its scatter
(``combined[vision_mask] = vision_embeds[rows]``): count the vision tokens in each locally held
piece, all-gather those counts over the CP group, rebuild the global table in natural order,
take exclusive offsets and add each local vision token's ordinal within its piece.

Everything is vectorised over pieces and tokens; the only collective is one all-gather of a
fixed-shape count tensor, so every rank calls it, including ranks without vision tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from cpinspect.layout import zigzag_rank_pieces


class VisionCountMismatch(ValueError):
    """The gathered vision-token total differs from the number of vision embeddings."""


@dataclass
class RankSelection:
    """Every intermediate of one rank's selection, for display and checking.

    ``local_counts`` is ``[pieces_per_rank]`` (``[S, 2]`` once reshaped for zigzag),
    ``gathered`` is ``[cp, pieces_per_rank]`` as received, ``full_counts`` and ``offsets`` are
    ``[P]`` in natural piece order, and ``rows`` holds one embedding row per local vision token.
    """

    cp_rank: int
    local_mask: torch.Tensor
    local_counts: torch.Tensor
    gathered: torch.Tensor
    full_counts: torch.Tensor
    offsets: torch.Tensor
    rows: torch.Tensor


def piece_of_positions(local_piece_len: torch.Tensor, local_tokens: int) -> torch.Tensor:
    """``[local_tokens]`` index of the local piece each local position falls in (sync-free)."""
    ends = torch.cumsum(local_piece_len, 0)
    positions = torch.arange(local_tokens, device=local_piece_len.device)
    return torch.searchsorted(ends, positions, right=True)


def count_per_piece(local_mask: torch.Tensor, piece_of_position: torch.Tensor, num_pieces: int) -> torch.Tensor:
    """``[num_pieces]`` number of vision tokens in each local piece (a scatter-add, no bincount sync)."""
    counts = torch.zeros(num_pieces, dtype=torch.long, device=local_mask.device)
    return counts.index_add_(0, piece_of_position, local_mask.to(torch.long))


def gather_counts(local_counts: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``[cp, pieces_per_rank]``: every rank's counts, through one all-gather on ``group``."""
    received = [torch.empty_like(local_counts) for _ in range(group.size())]
    dist.all_gather(received, local_counts, group=group)
    return torch.stack(received)


def rows_from_counts(
    local_mask: torch.Tensor,
    piece_of_position: torch.Tensor,
    local_counts: torch.Tensor,
    full_counts: torch.Tensor,
    my_pieces: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets ``[P]`` and this rank's rows, in local token order (the order a masked scatter fills)."""
    offsets = torch.cumsum(full_counts, 0) - full_counts
    vision_positions = torch.nonzero(local_mask).view(-1)
    piece = piece_of_position[vision_positions]
    local_offsets = torch.cumsum(local_counts, 0) - local_counts
    ordinal = torch.arange(vision_positions.numel(), device=local_mask.device) - local_offsets[piece]
    return offsets, offsets[my_pieces[piece]] + ordinal


def select_rank_rows(
    local_mask: torch.Tensor,
    local_piece_len: torch.Tensor,
    rank_pieces: torch.Tensor,
    group: dist.ProcessGroup,
) -> RankSelection:
    """Run the selection for ``group.rank()`` given the layout's pieces (see :mod:`cpinspect.layout`).

    ``local_piece_len`` is ``[pieces_per_rank]`` for this rank and ``rank_pieces`` is
    ``[cp, pieces_per_rank]`` global piece ids for every rank (known to all ranks from cu_seqlens).
    """
    cp_rank = group.rank()
    mask = local_mask.reshape(-1).to(torch.bool)
    piece = piece_of_positions(local_piece_len, mask.numel())
    local_counts = count_per_piece(mask, piece, local_piece_len.numel())
    gathered = gather_counts(local_counts, group)
    full_counts = torch.zeros(rank_pieces.numel(), dtype=torch.long, device=mask.device)
    full_counts[rank_pieces.reshape(-1)] = gathered.reshape(-1)
    offsets, rows = rows_from_counts(mask, piece, local_counts, full_counts, rank_pieces[cp_rank])
    return RankSelection(cp_rank, mask, local_counts, gathered, full_counts, offsets, rows)


def zigzag_local_piece_len(cu_seqlens: torch.Tensor, cp: int) -> torch.Tensor:
    """``[2S]`` local piece lengths under per-document zigzag: chunk length twice per segment."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if cp == 1:
        head = lengths // 2
        return torch.stack([head, lengths - head], dim=1).reshape(-1)
    chunk = lengths // (2 * cp)
    return torch.stack([chunk, chunk], dim=1).reshape(-1)


def local_vision_rows(
    vision_mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    cp_group: dist.ProcessGroup,
    vision_embed_count: int | None = None,
) -> torch.Tensor:
    """Rows of the full natural-order vision embeddings that this CP rank must scatter.

    ``vision_mask`` is this rank's local bool mask ``[cu_seqlens[-1] // cp]`` of a row sharded in
    Megatron's per-document zigzag layout; ``cu_seqlens`` are the global physical boundaries.
    Exactly one collective (an all-gather of ``[S, 2]`` counts) is issued on every rank. When
    ``vision_embed_count`` is given, the gathered total is checked against it on every rank alike,
    so all ranks raise together.
    """
    cp = cp_group.size()
    cu = cu_seqlens.reshape(-1).to(device=vision_mask.device, dtype=torch.long)
    local_piece_len = zigzag_local_piece_len(cu, cp)
    rank_pieces = zigzag_rank_pieces(cu.numel() - 1, cp, device=vision_mask.device)
    selection = select_rank_rows(vision_mask, local_piece_len, rank_pieces, cp_group)
    if vision_embed_count is not None:
        total = int(selection.full_counts.sum())
        if total != vision_embed_count:
            raise VisionCountMismatch(
                f"Packed CP ranks contain {total} vision tokens, but the vision encoder produced "
                f"{vision_embed_count} embeddings."
            )
    return selection.rows
