"""A correct CP-local vision-row selection, written the way a framework author would.

Each rank holds, per packed segment, chunk ``r`` and chunk ``2*cp-1-r`` of ``2*cp`` equal chunks.
It counts its vision tokens per held chunk, all-gathers those ``[S, 2]`` counts (every rank, even
one without vision tokens), rebuilds the ``[S, 2*cp]`` table in natural order, and gives each local
vision token the exclusive offset of its chunk plus its ordinal inside the chunk.

Two entry points, one per ``cpinspect check --signature``:

    cpinspect check examples/impls/correct.py:select_rows
    cpinspect check examples/impls/correct.py:get_cp_local_vision_embed_indices --signature megatron-bridge

The buggy examples next to this file import these steps and break exactly one of them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def local_chunk_counts(local_mask: torch.Tensor, cu_seqlens: torch.Tensor, cp: int):
    """``[S, 2]`` vision tokens in this rank's two chunks of each segment, plus, per local position,
    its segment and which of the two chunks (0 = chunk r, 1 = chunk 2cp-1-r) it lies in."""
    cu = cu_seqlens.to(torch.long)
    chunk_len = (cu[1:] - cu[:-1]) // (2 * cp)
    local_start = cu[:-1] // cp
    positions = torch.arange(local_mask.numel())
    segment = torch.searchsorted(cu[1:] // cp, positions, right=True)
    half = ((positions - local_start[segment]) >= chunk_len[segment]).to(torch.long)
    counts = torch.zeros(2 * chunk_len.numel(), dtype=torch.long)
    counts.index_add_(0, segment * 2 + half, local_mask.to(torch.long))
    return counts.view(-1, 2), segment, half


def gather_counts(counts: torch.Tensor, cp_group) -> torch.Tensor:
    """``[cp, S, 2]``: every rank's counts. Every rank must call this, with the same shape."""
    received = [torch.empty_like(counts) for _ in range(cp_group.size())]
    dist.all_gather(received, counts, group=cp_group)
    return torch.stack(received)


def chunk_columns(cp_rank: int, cp: int) -> tuple[int, int]:
    """The natural chunk numbers of this rank's first and second local chunk."""
    return cp_rank, 2 * cp - 1 - cp_rank


def natural_counts(gathered: torch.Tensor, cp: int) -> torch.Tensor:
    """``[S, 2*cp]`` vision tokens per chunk in natural order, from every rank's ``[S, 2]``."""
    ranks = torch.arange(cp)
    full = torch.zeros(gathered.shape[1], 2 * cp, dtype=torch.long)
    full[:, ranks] = gathered[:, :, 0].T
    full[:, 2 * cp - 1 - ranks] = gathered[:, :, 1].T
    return full


def chunk_offsets(full: torch.Tensor) -> torch.Tensor:
    """First embedding row of every chunk: exclusive prefix sum, segment-major then chunk."""
    flat = full.reshape(-1)
    return (torch.cumsum(flat, 0) - flat).view_as(full)


def rows_for_local_tokens(local_mask, segment, half, counts, offsets, columns) -> torch.Tensor:
    """One row per local vision token, in local order (the order ``combined[mask] = rows`` fills)."""
    vision = torch.nonzero(local_mask).view(-1)
    seg, which = segment[vision], half[vision]
    column = torch.where(which == 0, torch.tensor(columns[0]), torch.tensor(columns[1]))
    flat_counts = counts.reshape(-1)
    first_local = (torch.cumsum(flat_counts, 0) - flat_counts)[seg * 2 + which]
    ordinal = torch.arange(vision.numel()) - first_local
    return offsets[seg, column] + ordinal


def check_total(full: torch.Tensor, vision_embed_count: int) -> None:
    """Same sum on every rank, so every rank raises together (no rank is left waiting)."""
    total = int(full.sum())
    if total != vision_embed_count:
        raise ValueError(
            f"Packed CP ranks contain {total} vision tokens, but the vision encoder produced "
            f"{vision_embed_count} embeddings."
        )


def select_rows(vision_mask, cu_seqlens, *, vision_embed_count, cp_group):
    """Default signature: local bool mask ``[local_T]``, global physical ``cu_seqlens``."""
    cp, cp_rank = cp_group.size(), cp_group.rank()
    local = vision_mask.reshape(-1).to(torch.bool)
    counts, segment, half = local_chunk_counts(local, cu_seqlens, cp)
    full = natural_counts(gather_counts(counts, cp_group), cp)
    check_total(full, vision_embed_count)
    return rows_for_local_tokens(local, segment, half, counts, chunk_offsets(full), chunk_columns(cp_rank, cp))


def get_cp_local_vision_embed_indices(vision_mask, packed_seq_params, *, vision_embed_count, cp_group,
                                      embed_device):
    """Megatron-Bridge signature, with the behaviour and error texts of the upstream helper."""
    cu = getattr(packed_seq_params, "cu_seqlens_q_padded", None)
    if cu is None:
        cu = getattr(packed_seq_params, "cu_seqlens_q", None)
    if not isinstance(cu, torch.Tensor):
        raise ValueError("Pre-sharded packed CP vision selection requires physical cu_seqlens metadata.")
    cp = cp_group.size()
    local = vision_mask.reshape(-1).to(torch.bool)
    if local.numel() != int(cu[-1]) // cp:
        raise ValueError("Pre-sharded packed CP vision mask length does not match the global packed-sequence metadata.")
    counts, segment, half = local_chunk_counts(local, cu, cp)
    full = natural_counts(gather_counts(counts, cp_group), cp)
    check_total(full, vision_embed_count)
    rows = rows_for_local_tokens(local, segment, half, counts, chunk_offsets(full), chunk_columns(cp_group.rank(), cp))
    return rows.to(embed_device)
