"""The per-rank program: select this rank's rows of the natural-order vision embeddings.

This mirrors what a pre-sharded Megatron-Bridge style model does before its scatter
(``combined[vision_mask] = vision_embeds[rows]``): count the vision tokens in each locally held
piece, all-gather those counts over the CP group, rebuild the global table in natural order,
take exclusive offsets and add each local vision token's ordinal within its piece.

Everything is vectorised over pieces and tokens; the only collective is one all-gather of a
fixed-shape count tensor, so every rank calls it, including ranks without vision tokens.

Sync-freedom on CUDA. Every step up to the *dense row map* (one row per local position, ``-1``
where there is no vision token) is a fixed-shape kernel: a running count, gathers at piece
bounds, the all-gather, an ``index_copy_`` into natural order, a cumulative sum, and a
difference-array expansion of per-piece shifts. Nothing reads a device value on the host, so a
training step can use :func:`local_vision_row_map` without a single device-to-host sync. Two
things cannot be had for free, and the API makes both the caller's choice:

* the *compact* row list has a data-dependent length (the rank's vision-token count). Passing
  ``local_vision_count`` (often known on the host already) compacts with a scatter, sync-free;
  without it the length is read from the device (one sync), as ``combined[mask] = ...`` does too.
* the check against ``vision_embed_count`` compares a device total with a host number. It runs
  eagerly (one sync) when the count is passed to :func:`local_vision_rows`, or later, when the
  caller chooses, through :meth:`VisionRowMap.check`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from cpinspect.core.layout import zigzag_rank_pieces


class VisionCountMismatch(ValueError):
    """The gathered vision-token total differs from the number of vision embeddings."""


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


def exclusive_cumsum(values: torch.Tensor) -> torch.Tensor:
    """``out[i] = sum(values[:i])``: the first row of each piece in a natural-order table."""
    return torch.cumsum(values, 0).sub_(values)


def running_count(mask: torch.Tensor) -> torch.Tensor:
    """``[T + 1]`` vision tokens before each position (``out[p] = mask[:p].sum()``), one pass."""
    running = torch.zeros(mask.numel() + 1, dtype=torch.long, device=mask.device)
    running[1:] = mask
    return running.cumsum_(0)


def piece_starts(local_piece_len: torch.Tensor) -> torch.Tensor:
    """``[pieces_per_rank + 1]`` local start of every piece, then the end of the last one."""
    starts = torch.zeros(local_piece_len.numel() + 1, dtype=torch.long, device=local_piece_len.device)
    torch.cumsum(local_piece_len, 0, out=starts[1:])
    return starts


def gather_counts(local_counts: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``[cp, pieces_per_rank]``: every rank's counts, through one all-gather on ``group``."""
    received = [torch.empty_like(local_counts) for _ in range(group.size())]
    dist.all_gather(received, local_counts, group=group)
    return torch.stack(received)


def natural_counts(gathered: torch.Tensor, rank_pieces: torch.Tensor) -> torch.Tensor:
    """``[P]`` counts in natural piece order: rank r's column j is piece ``rank_pieces[r, j]``."""
    full = torch.zeros(rank_pieces.numel(), dtype=gathered.dtype, device=gathered.device)
    return full.scatter_(0, rank_pieces.reshape(-1), gathered.reshape(-1))


def piecewise_constant(values: torch.Tensor, first: torch.Tensor, length: int) -> torch.Tensor:
    """``[length]`` where index i holds ``values[k]`` of the last piece k with ``first[k] <= i``.

    A difference array and one cumulative sum: no repeat with a data-dependent size, nothing
    read on the host, and indices past ``length`` are clamped, never out of bounds. Empty pieces
    share their first index with the next piece; the telescoping sum leaves the later one in
    charge, which is right because an empty piece covers nothing.
    """
    step = values.clone()
    step[1:] -= values[:-1]
    spread = torch.zeros(length + 1, dtype=values.dtype, device=values.device)
    spread.index_add_(0, first.clamp(max=length), step)
    return spread[:length].cumsum_(0)


def dense_row_map(mask: torch.Tensor, starts: torch.Tensor, shift: torch.Tensor,
                  running: torch.Tensor) -> torch.Tensor:
    """``[T]`` row of every local vision position (``-1`` elsewhere), without compaction.

    A vision token of local piece k with running count ``c`` (vision tokens before it on this
    rank) takes row ``shift[k] + c``.
    """
    shift_at = piecewise_constant(shift, starts[:-1], mask.numel())
    return torch.where(mask, shift_at + running[:-1], -1)


def compact_rows(shift: torch.Tensor, first_ordinal: torch.Tensor, local_vision_count: int) -> torch.Tensor:
    """``[local_vision_count]`` rows in local order (what ``combined[mask] = ...`` consumes).

    The i-th local vision token lies in the last piece whose first ordinal (vision tokens before
    the piece on this rank) is at most i, and takes row ``i + shift[piece]``. Sync-free; the count
    must be the rank's true vision-token count, else the list is cut short or runs past the end.
    """
    ordinal = torch.arange(local_vision_count, device=shift.device)
    return ordinal + piecewise_constant(shift, first_ordinal, local_vision_count)


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
    stages = _select(local_mask, local_piece_len, rank_pieces, group)
    count = int(stages.running[-1]) if local_vision_count is None else local_vision_count
    selection = stages.selection
    selection.rows = compact_rows(stages.shift, stages.running[stages.starts[:-1]], count)
    return selection


@dataclass
class _Stages:
    """The fixed-shape stages of one selection; nothing in them has been read on the host.

    ``running`` is ``[T + 1]`` (vision tokens before each position), ``starts`` ``[k + 1]``
    (local piece bounds) and ``shift`` ``[k]`` (row of a piece's vision token minus its running
    count on this rank).
    """

    selection: RankSelection
    running: torch.Tensor
    starts: torch.Tensor
    shift: torch.Tensor


def _select(local_mask: torch.Tensor, local_piece_len: torch.Tensor, rank_pieces: torch.Tensor,
            group: dist.ProcessGroup) -> _Stages:
    """Count, gather once, reorder, offset: every stage with a shape known from the inputs' shapes."""
    cp_rank = group.rank()
    mask = local_mask.reshape(-1).to(torch.bool)
    running = running_count(mask)
    starts = piece_starts(local_piece_len).clamp(max=mask.numel())
    local_counts = running[starts[1:]] - running[starts[:-1]]
    gathered = gather_counts(local_counts, group)
    full_counts = natural_counts(gathered, rank_pieces)
    offsets = exclusive_cumsum(full_counts)
    shift = offsets[rank_pieces[cp_rank]] - running[starts[:-1]]
    no_rows = torch.zeros(0, dtype=torch.long, device=mask.device)
    selection = RankSelection(cp_rank, mask, local_counts, gathered, full_counts, offsets, no_rows)
    return _Stages(selection, running, starts, shift)


def zigzag_local_piece_len(cu_seqlens: torch.Tensor, cp: int) -> torch.Tensor:
    """``[2S]`` local piece lengths under per-document zigzag: chunk length twice per segment."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if cp == 1:
        head = lengths // 2
        return torch.stack([head, lengths - head], dim=1).reshape(-1)
    chunk = lengths // (2 * cp)
    return torch.stack([chunk, chunk], dim=1).reshape(-1)


@dataclass
class VisionRowMap:
    """One rank's selection as fixed-shape device tensors: nothing has been read on the host.

    ``row_of_position`` is ``[local_tokens]`` int64, the embedding row of every local vision
    position and ``-1`` elsewhere. A training step can scatter without any sync::

        rows = row_map.row_of_position
        combined = torch.where(mask[:, None], vision_embeds[rows.clamp(min=0)], combined)

    :meth:`rows` gives the compact list and :meth:`check` runs the deferred checks, each when the
    caller chooses to pay for reading device values. ``selection`` holds the intermediates.
    """

    selection: RankSelection
    stages: _Stages
    global_tokens: torch.Tensor
    cp: int

    @property
    def row_of_position(self) -> torch.Tensor:
        if self.selection.row_map is None:
            s = self.stages
            self.selection.row_map = dense_row_map(self.selection.local_mask, s.starts, s.shift, s.running)
        return self.selection.row_map

    @property
    def vision_total(self) -> torch.Tensor:
        """0-dim: vision tokens over all ranks, from the gathered counts."""
        return self.selection.full_counts.sum()

    def rows(self, local_vision_count: int | None = None) -> torch.Tensor:
        """Compact rows in local order; sync-free when ``local_vision_count`` is given.

        Without the count it is read from the device (one sync on CUDA). On the CPU a given count
        is checked against the mask; on CUDA it is trusted (checking it would sync).
        """
        running_total = self.stages.running[-1]
        if local_vision_count is None:
            local_vision_count = int(running_total)
        elif running_total.device.type == "cpu" and local_vision_count != int(running_total):
            raise ValueError(f"local_vision_count is {local_vision_count}, but the local vision mask holds "
                             f"{int(running_total)} vision tokens")
        return compact_rows(self.stages.shift, self.stages.running[self.stages.starts[:-1]], local_vision_count)

    def host_values(self) -> tuple[int, int, int]:
        """``(vision_total, global_tokens, local_vision_count)`` read in one device-to-host copy."""
        total, global_tokens, local = torch.stack(
            [self.vision_total, self.global_tokens, self.stages.running[-1]]).tolist()
        return total, global_tokens, local

    def check(self, vision_embed_count: int | None = None) -> None:
        """The deferred checks, with one device-to-host read: mask length, then the embedding count.

        Every rank sees the same gathered total, so with ``vision_embed_count`` all ranks raise
        together (:class:`VisionCountMismatch`); a mask of the wrong length raises ``ValueError``.
        """
        self._verify(*self.host_values()[:2], vision_embed_count)

    def _verify(self, total: int, global_tokens: int, vision_embed_count: int | None) -> None:
        _check_mask_length(self.selection.local_mask.numel(), global_tokens, self.cp)
        if vision_embed_count is not None and total != vision_embed_count:
            raise VisionCountMismatch(
                f"Packed CP ranks contain {total} vision tokens, but the vision encoder produced "
                f"{vision_embed_count} embeddings."
            )


def _check_mask_length(local_tokens: int, global_tokens: int, cp: int) -> None:
    if local_tokens * cp != global_tokens:
        raise ValueError(
            f"the local vision mask has {local_tokens} entries, but cu_seqlens[-1] // cp = {global_tokens} // {cp} "
            f"= {global_tokens // cp}: the mask must be this rank's whole local row"
        )


def _check_host_cu_seqlens(cu: torch.Tensor, local_tokens: int, cp: int) -> None:
    """Shape checks that are free when ``cu_seqlens`` lives on the host (no device read)."""
    _check_mask_length(local_tokens, int(cu[-1]), cp)
    if cp > 1:
        lengths = cu[1:] - cu[:-1]
        if bool((lengths % (2 * cp)).any()):
            seg = int(torch.nonzero(lengths % (2 * cp))[0])
            raise ValueError(
                f"segment {seg} has physical length {int(lengths[seg])}, not divisible by 2*cp = {2 * cp}: "
                "the zigzag layout needs every physical segment padded to a multiple of 2*cp"
            )


def local_vision_row_map(
    vision_mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    cp_group: dist.ProcessGroup,
) -> VisionRowMap:
    """This rank's dense row map under per-document zigzag, with no device-to-host sync.

    ``vision_mask`` is this rank's local bool mask ``[cu_seqlens[-1] // cp]`` (any shape that
    flattens to it); ``cu_seqlens`` are the global physical boundaries ``[S + 1]``. Exactly one
    collective (an all-gather of ``[2S]`` counts) is issued on every rank. Host-side
    ``cu_seqlens`` are validated here (free) and copied asynchronously; device-side ones are
    validated by :meth:`VisionRowMap.check`, since reading them would sync.
    """
    cp = cp_group.size()
    mask = vision_mask.reshape(-1).to(torch.bool)
    cu = cu_seqlens.reshape(-1)
    if cu.device.type == "cpu":
        cu = cu.to(torch.long)
        _check_host_cu_seqlens(cu, mask.numel(), cp)
    cu = cu.to(device=mask.device, dtype=torch.long, non_blocking=True)
    local_piece_len = zigzag_local_piece_len(cu, cp)
    rank_pieces = zigzag_rank_pieces(cu.numel() - 1, cp, device=mask.device)
    stages = _select(mask, local_piece_len, rank_pieces, cp_group)
    return VisionRowMap(stages.selection, stages, cu[-1], cp)


def local_vision_rows(
    vision_mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    cp_group: dist.ProcessGroup,
    vision_embed_count: int | None = None,
    local_vision_count: int | None = None,
) -> torch.Tensor:
    """Rows of the full natural-order vision embeddings that this CP rank must scatter.

    ``vision_mask`` is this rank's local bool mask ``[cu_seqlens[-1] // cp]`` of a row sharded in
    Megatron's per-document zigzag layout; ``cu_seqlens`` are the global physical boundaries.
    Exactly one collective (an all-gather of ``[S, 2]`` counts) is issued on every rank. When
    ``vision_embed_count`` is given, the gathered total is checked against it on every rank alike,
    so all ranks raise together.

    Device-to-host syncs on CUDA: none when ``local_vision_count`` (this rank's vision tokens) is
    given and ``vision_embed_count`` is ``None`` (defer the check with :func:`local_vision_row_map`
    and :meth:`VisionRowMap.check`, or skip it); otherwise exactly one, which reads the gathered
    total and the local count together. The returned rows are in local token order.
    """
    row_map = local_vision_row_map(vision_mask, cu_seqlens, cp_group=cp_group)
    if vision_embed_count is None:
        return row_map.rows(local_vision_count)
    total, global_tokens, local = row_map.host_values()
    row_map._verify(total, global_tokens, vision_embed_count)
    return row_map.rows(local if local_vision_count is None else local_vision_count)
