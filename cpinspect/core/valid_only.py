"""A valid-tokens-only row under padded boundaries, and what each CP rank receives from it (VALID_ONLY_ROW).

The shape behind Megatron-Bridge #5614 / verl #5981 / mbridge #157: the row holds only the valid
tokens (its length is the logical total ``cu_seqlens[-1]``) while ``cu_seqlens_padded`` describes the
padded layout. A stack that slices the padded zigzag chunk bounds out of that row gets chunks that
start past the row's end (empty) or run off it (short); stacking them with full chunks fails with
"The expanded size of the tensor (N) must match the existing size (M)". Here the slices are
computed directly: chunk ``c`` of segment ``s`` is ``[cu_padded[s] + c*L_s/(2cp), ... + L_s/(2cp))``
of the row, clamped to its length, rank ``r`` holding chunks ``r`` and ``2cp-1-r`` (:func:`chunk_slices`).
The other form a stack slices in, one segment's valid content at a time at its own padded chunk
size, is :func:`valid_only_cuts` (what ``diagnose`` tests its hypothesis with).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cpinspect.core.findings import Finding


@dataclass(frozen=True)
class ChunkSlice:
    """One zigzag chunk as a stack slices it from the valid-only row: wanted and got token counts."""

    rank: int
    segment: int
    chunk: int
    start: int
    end: int
    wanted: int
    got: int


def is_valid_only(row_tokens: int, logical: torch.Tensor | None, padded: torch.Tensor) -> bool:
    """The row is as long as the logical total and shorter than the padded one."""
    return logical is not None and row_tokens == int(logical[-1]) < int(padded[-1])


def chunk_slices(row_tokens: int, padded: torch.Tensor, cp: int) -> list[ChunkSlice]:
    """Every rank's zigzag chunks of every segment, sliced by padded bounds out of a row of ``row_tokens``."""
    out: list[ChunkSlice] = []
    bounds = [int(x) for x in padded.tolist()]
    for seg, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        size = (hi - lo) // (2 * cp)
        for rank in range(cp):
            for chunk in (rank, 2 * cp - 1 - rank):
                start, end = lo + chunk * size, lo + (chunk + 1) * size
                got = max(0, min(end, row_tokens) - min(start, row_tokens))
                out.append(ChunkSlice(rank, seg, chunk, start, end, size, got))
    return out


def valid_only_finding(row_tokens: int, logical: torch.Tensor, padded: torch.Tensor, cp: int) -> Finding:
    """VALID_ONLY_ROW (error): the first padded segment, its valid and padded lengths, the short chunks, the fix."""
    valid = (logical[1:] - logical[:-1]).tolist()
    full = (padded[1:] - padded[:-1]).tolist()
    seg = next(i for i, (v, p) in enumerate(zip(valid, full)) if v != p)
    short = [c for c in chunk_slices(row_tokens, padded, cp) if c.got < c.wanted]
    shown = "; ".join(
        f"rank {c.rank} chunk {c.chunk} of segment {c.segment}: {c.got} of {c.wanted} tokens"
        + (" (empty)" if c.got == 0 else "") for c in short[:6])
    more = f"; and {len(short) - 6} more" if len(short) > 6 else ""
    first = next((c for c in short if c.got == 0), short[0]) if short else None
    error = (f' -> "The expanded size of the tensor ({first.wanted}) must match the existing size ({first.got})"'
             if first else "")
    message = (f"the row holds only the {row_tokens} valid tokens (the logical cu_seqlens total), but "
               f"cu_seqlens_padded describes {int(padded[-1])} padded tokens: segment {seg} has {valid[seg]} valid "
               f"and {full[seg]} padded tokens. Slicing the padded zigzag chunk bounds out of this row at cp={cp} "
               f"gives {len(short)} short or empty chunk(s): {shown or 'none'}{more}{error}")
    hint = ("pad each segment to its cu_seqlens_padded length before slicing (as Megatron-Bridge "
            "preprocess_packed_seqs does), or clamp the first chunk's bounds to the valid length")
    return Finding("VALID_ONLY_ROW", "error", message, hint, segment=seg,
                   rank=first.rank if first else None, chunk=first.chunk if first else None)


# Per segment (Megatron-Bridge preprocess_packed_seqs before the clamp, #5614): each segment's valid
# content is cut at its own padded chunk size, so a short segment's later chunks come out empty.


@dataclass(frozen=True)
class ChunkCut:
    """One zigzag chunk cut from a valid-only segment: the size it should have and what it got."""

    segment: int
    chunk: int
    rank: int
    size: int       # padded chunk size: padded length / (2·cp)
    received: int   # tokens of the valid-only segment inside the chunk's bounds
    start: int      # the chunk's first offset inside the segment
    valid: int      # the segment's valid (logical) length


def valid_only_cuts(lengths: list[int], cp: int) -> list[ChunkCut]:
    """Every chunk that is short when padded bounds cut segments of valid ``lengths`` (zigzag, ``cp``)."""
    pieces = 2 * cp
    cuts = []
    for segment, valid in enumerate(lengths):
        size = -(-valid // pieces)
        for chunk in range(pieces):
            start = chunk * size
            received = max(0, min(valid, start + size) - start)
            if received < size:
                rank = chunk if chunk < cp else pieces - 1 - chunk
                cuts.append(ChunkCut(segment, chunk, rank, size, received, start, valid))
    return cuts
