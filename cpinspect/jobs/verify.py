"""Check, inside a real job, that every CP rank is about to scatter the right vision rows.

``cpinspect.verify(...)`` runs on the job's own CP group just before the scatter. Each rank
packs a fixed-size int64 summary of what it holds and what it selected, and the ranks exchange
the summaries in **one** ``all_gather``. Every rank then judges every rank from the same
numbers, so the verdict, and the :class:`VerificationError` it raises, are the same on all ranks
at once: no rank is left waiting in a later collective.

The summary, per rank (``S`` segments, so ``2S`` local zigzag pieces):

* header: local tokens, vision tokens held, rows selected, ``vision_embed_count``, and three
  numbers that identify ``cu_seqlens`` (its end, Σ (i+1)·cu[i], Σ cu[i]²);
* per local piece: vision tokens held, and the min and max of ``row - ordinal`` over its vision
  tokens (``ordinal`` = position among the piece's vision tokens). A piece is right exactly when
  both equal the piece's offset in natural order: the exclusive prefix sum of the gathered
  ``[S, 2cp]`` count table, which is what the oracle's global ranking of vision tokens gives.

That is ``7 + 6S`` int64 per rank: 248 bytes for 4 segments, 48 KB for 1000. The selection's own
all-gather already carries ``2S`` of them, so verify costs one more small all-gather and a few
vectorised ops (and one device-to-host copy to read the verdict).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from cpinspect.core.errors import CpInspectError
from cpinspect.core.findings import Finding
from cpinspect.core.layout import zigzag_rank_pieces
from cpinspect.core.rank_selection import piece_of_positions, zigzag_local_piece_len

HEADER = ("local_tokens", "held", "selected", "embed_count", "cu_end", "cu_weighted_sum", "cu_square_sum")
_EMPTY = 2**62


class VerificationError(CpInspectError):
    """The CP ranks disagree with the oracle; raised on every rank with the same findings.

    ``findings`` carry the codes (``EMBED_COUNT_MISMATCH``, ``SCATTER_SHAPE_MISMATCH``,
    ``ROWS_MISMATCH``, ``LOCAL_LENGTH_MISMATCH``, ``CU_SEQLENS_DIFFER``), ranks, segments and
    chunks; ``cp_rank`` is the rank that raised this copy.
    """

    exit_code = 1

    def __init__(self, findings: list[Finding], *, cp_rank: int, group_ranks: list[int]) -> None:
        self.findings = findings
        self.cp_rank = cp_rank
        self.group_ranks = group_ranks
        problems = "; ".join(f"{f.code}: {f.message}" for f in findings)
        super().__init__(
            f"cpinspect.verify found {len(findings)} problem(s) in the CP group of global ranks {group_ranks} "
            f"(raised on every rank together; this is CP rank {cp_rank}): {problems}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        """Picklable (to cross process boundaries like other exceptions) despite keyword-only arguments."""
        return _rebuild_error, (self.findings, self.cp_rank, self.group_ranks)

    @property
    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    @property
    def ranks(self) -> list[int]:
        return sorted({f.rank for f in self.findings if f.rank is not None})

    @property
    def segments(self) -> list[int]:
        return sorted({f.segment for f in self.findings if f.segment is not None})


def _rebuild_error(findings: list[Finding], cp_rank: int, group_ranks: list[int]) -> VerificationError:
    return VerificationError(findings, cp_rank=cp_rank, group_ranks=group_ranks)


@dataclass
class Verified:
    """What a passing :func:`verify` saw: the gathered ``[S, 2cp]`` count table (CPU) and its total."""

    cp: int
    full_counts: torch.Tensor

    @property
    def vision_tokens(self) -> int:
        return int(self.full_counts.sum())


def verify(
    *,
    vision_mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    selected_rows: torch.Tensor,
    vision_embed_count: int | torch.Tensor,
    cp_group: dist.ProcessGroup,
    timeout: float | None = None,
) -> Verified:
    """Check this step's vision-row selection on every rank of ``cp_group``; raise on all ranks together.

    Arguments are this rank's: the local zigzag ``vision_mask`` ``[cu_seqlens[-1] // cp]``, the
    global physical ``cu_seqlens``, the ``selected_rows`` it will scatter (local token order) and
    the encoder's row count. Exactly one collective runs, on the mask's device (CUDA for NCCL).
    ``timeout`` (seconds) bounds the wait; ``None`` leaves it to the group's own timeout.
    """
    cp = cp_group.size()
    summary = rank_summary(vision_mask, cu_seqlens, selected_rows, vision_embed_count, cp)
    gathered = _all_gather(summary, cp_group, timeout).cpu()
    findings = judge(gathered, cp)
    if findings:
        raise VerificationError(findings, cp_rank=cp_group.rank(), group_ranks=_group_ranks(cp_group))
    return Verified(cp, full_count_table(gathered, cp))


def rank_summary(vision_mask: torch.Tensor, cu_seqlens: torch.Tensor, selected_rows: torch.Tensor,
                 vision_embed_count: int | torch.Tensor, cp: int) -> torch.Tensor:
    """``[7 + 6S]`` int64 on the mask's device: the header, then per-piece counts, row-base min and max."""
    device = vision_mask.device
    mask = vision_mask.reshape(-1).to(torch.bool)
    cu = cu_seqlens.reshape(-1).to(device=device, dtype=torch.long)
    rows = selected_rows.reshape(-1).to(device=device, dtype=torch.long)
    pieces = 2 * (cu.numel() - 1)
    piece = piece_of_positions(zigzag_local_piece_len(cu, cp), mask.numel())  # == pieces past the end
    counts = torch.zeros(pieces + 1, dtype=torch.long, device=device).index_add_(0, piece, mask.to(torch.long))
    base_min, base_max = _row_bases(piece[mask], rows, counts, pieces + 1)
    weights = torch.arange(1, cu.numel() + 1, device=device)
    header = torch.stack([
        torch.tensor(mask.numel(), device=device), mask.sum(), torch.tensor(rows.numel(), device=device),
        torch.as_tensor(vision_embed_count, device=device).reshape(-1)[0].to(torch.long),
        cu[-1], (cu * weights).sum(), (cu * cu).sum(),
    ])
    return torch.cat([header, counts[:pieces], base_min[:pieces], base_max[:pieces]])


def _row_bases(vision_piece: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor,
               size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per piece, min and max of ``row - ordinal`` (``_EMPTY``/``-_EMPTY`` where nothing to compare)."""
    device = rows.device
    base_min = torch.full((size,), _EMPTY, dtype=torch.long, device=device)
    base_max = torch.full((size,), -_EMPTY, dtype=torch.long, device=device)
    if rows.numel() != vision_piece.numel() or rows.numel() == 0:
        return base_min, base_max  # a count mismatch is reported instead
    first_of_piece = torch.cumsum(counts, 0) - counts
    ordinal = torch.arange(rows.numel(), device=device) - first_of_piece[vision_piece]
    base = rows - ordinal
    base_min.scatter_reduce_(0, vision_piece, base, "amin")
    base_max.scatter_reduce_(0, vision_piece, base, "amax")
    return base_min, base_max


def _all_gather(summary: torch.Tensor, group: dist.ProcessGroup, timeout: float | None) -> torch.Tensor:
    received = [torch.empty_like(summary) for _ in range(group.size())]
    work = dist.all_gather(received, summary, group=group, async_op=True)
    if timeout is None:
        work.wait()
    else:
        work.wait(timedelta(seconds=timeout))
    return torch.stack(received)


def _group_ranks(group: dist.ProcessGroup) -> list[int]:
    try:
        return [int(r) for r in dist.get_process_group_ranks(group)]
    except Exception:  # noqa: BLE001 - a group torch does not know (e.g. simulated)
        return list(range(group.size()))


def _split(gathered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Header ``[cp, 7]`` and per-piece counts, base min, base max ``[cp, 2S]`` each."""
    header, rest = gathered[:, :len(HEADER)], gathered[:, len(HEADER):]
    counts, base_min, base_max = rest.chunk(3, dim=1)
    return header, counts, base_min, base_max


def full_count_table(gathered: torch.Tensor, cp: int) -> torch.Tensor:
    """``[S, 2cp]`` vision tokens per segment and chunk, in natural order."""
    _, counts, _, _ = _split(gathered)
    return _natural_counts(counts, zigzag_rank_pieces(counts.shape[1] // 2, cp)).view(-1, 2 * cp)


def _natural_counts(counts: torch.Tensor, global_piece: torch.Tensor) -> torch.Tensor:
    """``[P]`` counts in natural piece order from every rank's ``[cp, 2S]`` local counts."""
    full = torch.zeros(counts.numel(), dtype=torch.long)
    full[global_piece.reshape(-1)] = counts.reshape(-1)
    return full


def judge(gathered: torch.Tensor, cp: int) -> list[Finding]:
    """Findings from every rank's summary (``[cp, 7 + 6S]``, CPU); the same on every rank.

    The passing case costs a handful of vectorised ops and one boolean read; messages are built
    only when something is wrong.
    """
    header, counts, base_min, base_max = _split(gathered)
    if bool((header[:, 4:7] != header[0, 4:7]).any()):
        return _cu_seqlens_differ(header)
    if bool((header[:, 0] * cp != header[0, 4]).any()):
        return _local_lengths(header, cp)
    global_piece = zigzag_rank_pieces(counts.shape[1] // 2, cp)
    full = _natural_counts(counts, global_piece)
    expected = (torch.cumsum(full, 0) - full)[global_piece]
    shapes_ok = header[:, 2] == header[:, 1]
    wrong = (counts > 0) & shapes_ok[:, None] & ((base_min != expected) | (base_max != expected))
    total = full.sum()
    if not bool((header[:, 3] != total).any() | ~shapes_ok.all() | wrong.any()):
        return []
    return [*_embed_count(header, int(total)), *_shapes(header), *_rows(wrong, counts, base_min, base_max, expected,
                                                                         global_piece, cp)]


def _cu_seqlens_differ(header: torch.Tensor) -> list[Finding]:
    identity = header[:, 4:7]
    variants = torch.unique(identity, dim=0)
    if variants.shape[0] == 1:
        return []
    groups = [torch.nonzero((identity == v).all(dim=1)).view(-1).tolist() for v in variants]
    parts = [f"rank(s) {', '.join(map(str, ranks))} passed cu_seqlens ending at {int(header[ranks[0], 4])}"
             for ranks in groups]
    return [Finding(
        "CU_SEQLENS_DIFFER", "error",
        f"the CP ranks were given different cu_seqlens ({'; '.join(parts)}); every rank must pass the same "
        "global physical boundaries",
        "pass cu_seqlens_padded of the whole packed micro-batch on every rank, not a per-rank slice",
    )]


def _local_lengths(header: torch.Tensor, cp: int) -> list[Finding]:
    total = int(header[0, 4])
    findings = []
    for rank in torch.nonzero(header[:, 0] * cp != total).view(-1).tolist():
        findings.append(Finding(
            "LOCAL_LENGTH_MISMATCH", "error",
            f"rank {rank}'s vision_mask has {int(header[rank, 0])} tokens, but cu_seqlens ends at {total}, so a "
            f"rank of {cp} holds {total // cp}" + ("" if total % cp == 0 else f" ({total} is not divisible by {cp})"),
            "pass the rank-local (pre-sharded) mask and the global physical cu_seqlens of the same batch",
            rank=rank,
        ))
    return findings


def _embed_count(header: torch.Tensor, total: int) -> list[Finding]:
    embeds = header[:, 3]
    claimed = torch.unique(embeds).tolist()
    if claimed == [total]:
        return []
    if len(claimed) > 1:
        per_rank = ", ".join(f"rank {r}: {int(e)}" for r, e in enumerate(embeds.tolist()))
        message = (f"the CP ranks disagree on vision_embed_count ({per_rank}); together they hold {total} "
                   "vision tokens")
    else:
        message = (f"Packed CP ranks contain {total} vision tokens, but the vision encoder produced "
                   f"{claimed[0]} embeddings.")
    return [Finding("EMBED_COUNT_MISMATCH", "error", message,
                    "placeholder tokens and image/video grids disagree: check truncation of vision spans and the "
                    "grids passed to the encoder")]


def _shapes(header: torch.Tensor) -> list[Finding]:
    return [
        Finding("SCATTER_SHAPE_MISMATCH", "error",
                f"rank {rank} selected {int(header[rank, 2])} rows but holds {int(header[rank, 1])} vision tokens",
                "the scatter combined[mask] = rows needs exactly one row per local vision token", rank=rank)
        for rank in torch.nonzero(header[:, 2] != header[:, 1]).view(-1).tolist()
    ]


def _rows(wrong: torch.Tensor, counts: torch.Tensor, base_min: torch.Tensor, base_max: torch.Tensor,
          expected: torch.Tensor, global_piece: torch.Tensor, cp: int) -> list[Finding]:
    """ROWS_MISMATCH for each rank whose rows are not its chunks' offsets in natural order."""
    findings = []
    for rank in torch.nonzero(wrong.any(dim=1)).view(-1).tolist():
        local = int(torch.nonzero(wrong[rank])[0])
        piece = int(global_piece[rank, local])
        segment, chunk = divmod(piece, 2 * cp)
        start, count = int(expected[rank, local]), int(counts[rank, local])
        got = (f"rows starting at {int(base_min[rank, local])}" if base_min[rank, local] == base_max[rank, local]
               else "rows that are not consecutive")
        findings.append(Finding(
            "ROWS_MISMATCH", "error",
            f"rank {rank} selected {got} for the {count} vision token(s) of segment {segment} chunk {chunk}, but "
            f"that chunk's rows are {start}..{start + count - 1} in natural order "
            f"({int(wrong[rank].sum())} of this rank's chunks are wrong)",
            "offsets must follow natural order: segment-major, then chunk 0..2cp-1",
            rank=rank, segment=segment, chunk=chunk,
        ))
    return findings
