"""The per-rank program: select this rank's rows of the natural-order vision embeddings.

This mirrors what a pre-sharded Megatron-Bridge style model does before its scatter
(``combined[vision_mask] = vision_embeds[rows]``): count the vision tokens in each locally held
piece, all-gather those counts over the CP group, and give each local vision token the number
of vision tokens before it in natural order.

Few kernels, all of fixed shape. With ``T`` local tokens and ``k = 2S`` local pieces:

1. local piece bounds ``[k + 1]`` from ``cu_seqlens``: one ``bucketize`` that divides and clamps,
   then one gather through a cached index table and a pair sum, which also give the bound of
   every gathered count's destination (:mod:`cpinspect.core.selection_plan`);
2. a running vision count ``[T + 1]`` (one fill, one copy, one cumulative sum), read at the
   bounds: the local counts ``[k]``;
3. **one** ``all_gather_into_tensor`` of the ``[k]`` counts (every rank calls it);
4. the dense row map: each gathered count is added, with one ``index_add_``, at the start of the
   first local piece that comes after it in natural order (a cached table says which), and a
   second cumulative sum over the local row gives every position its row; ``-1`` off vision.

That is 11 tensor operators with ``cu_seqlens`` on the device and 12 from the host (one
asynchronous copy), plus the all-gather; on CUDA 14 kernels and copies with the all-gather's
(each cumulative sum is two), 15 from the host. ``bench/selection.py`` counts them per call with
the profiler. Nothing reads a device value on the host, nothing has a
data-dependent shape, and the tables are built once per ``(S, cp, rank, device)``, so the call
is ``torch.compile(fullgraph=True)``-clean and can be captured in a CUDA graph (see the
README's Performance section for the pattern). Two things cannot be had for free, and the API
makes both the caller's choice:

* the *compact* row list has a data-dependent length (the rank's vision-token count). Passing
  ``local_vision_count`` (often known on the host already) makes it sync-free;
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
from cpinspect.core.selection_plan import (
    check_host_cu_seqlens,
    check_mask_length,
    minus_one,
    piece_bounds,
    zigzag_bounds,
    zigzag_tables,
)

# ``all_gather_into_tensor`` is ``all_gather_single`` from torch 2.13 on (same op, new name); dynamo
# turns either into the functional collective when it traces a registered group.
_ALL_GATHER_FLAT = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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


@dataclass
class LocalCounts:
    """Everything one rank computes before the all-gather; nothing in it has been read on the host.

    ``running`` is ``[T + 1]`` (vision tokens before each position), ``bounds`` ``[k + 1]`` (local
    piece bounds) and ``running_at`` the running count there; ``local_counts`` ``[k]`` is what
    every rank all-gathers (``[cp * k]`` back, rank-major). ``later`` ``[cp * k]`` is the table of
    :mod:`cpinspect.core.selection_plan` (``None`` in :func:`select_rank_rows`, which compacts
    from the natural-order offsets it builds for display) and ``later_bounds`` ``[cp * k]`` the
    local bound of each ``later`` piece. ``spread`` (``0`` then the mask, ``[T + 1]`` int64) is the
    dense map's scratch buffer, used up when the map is made.
    """

    mask: torch.Tensor
    spread: torch.Tensor | None
    running: torch.Tensor
    bounds: torch.Tensor
    running_at: torch.Tensor
    local_counts: torch.Tensor
    later: torch.Tensor | None
    global_tokens: torch.Tensor
    cp: int
    cp_rank: int
    later_bounds: torch.Tensor | None = None

    def gather(self, group: dist.ProcessGroup) -> torch.Tensor:
        """``[cp, k]`` every rank's counts, through one ``all_gather_into_tensor`` on ``group``."""
        gathered = self.local_counts.new_empty(self.cp * self.local_counts.numel())
        _ALL_GATHER_FLAT(gathered, self.local_counts, group=group)
        return gathered.view(self.cp, -1)

    def row_map(self, gathered: torch.Tensor) -> VisionRowMap:
        """The dense row map from the all-gathered counts (``[cp, k]`` or flat ``[cp * k]``)."""
        table = gathered if gathered.dim() == 2 else gathered.view(self.cp, -1)
        row_map = VisionRowMap(self, table, self.global_tokens, self.cp, self.cp_rank)
        row_map.dense = dense_rows(self, row_map.gathered)
        return row_map


def count_pieces(mask: torch.Tensor, bounds: torch.Tensor, later: torch.Tensor | None, global_tokens: torch.Tensor,
                 cp: int, cp_rank: int, later_bounds: torch.Tensor | None = None) -> LocalCounts:
    """The running count over the local row, read at the piece bounds: the counts to all-gather."""
    spread = torch.zeros(mask.numel() + 1, dtype=torch.long, device=mask.device)
    spread[1:].copy_(mask)
    running = spread.cumsum(0)
    running_at = running.take(bounds)  # take: one kernel, and a cheaper call than advanced indexing
    local_counts = torch.diff(running_at)
    return LocalCounts(mask, spread, running, bounds, running_at, local_counts, later, global_tokens, cp, cp_rank,
                       later_bounds)


def dense_rows(counts: LocalCounts, gathered: torch.Tensor) -> torch.Tensor:
    """``[T]`` row of every local vision position, ``-1`` elsewhere: one scatter-add, one cumsum.

    Each gathered count lands at the start of the first local piece after it in natural order;
    the running sum over ``0, mask[0], mask[1], ...`` plus those counts is, at a vision position,
    the number of vision tokens before it in natural order, which is its row.
    """
    spread = counts.spread
    counts.spread = None
    if spread is None:  # already used: start again from the mask
        spread = torch.zeros(counts.mask.numel() + 1, dtype=torch.long, device=counts.mask.device)
        spread[1:] = counts.mask
    assert counts.later_bounds is not None, "the dense map needs the later bounds (local_vision_counts makes them)"
    spread.index_add_(0, counts.later_bounds, gathered.reshape(-1))
    return torch.where(counts.mask, spread.cumsum_(0)[:-1], minus_one(spread.device))


def compact_rows(counts: LocalCounts, gathered: torch.Tensor, local_vision_count: int) -> torch.Tensor:
    """``[local_vision_count]`` rows in local order (what ``combined[mask] = ...`` consumes).

    The same construction over ordinals: the i-th local vision token takes row ``i`` plus the
    gathered counts placed at or before it, each at the first ordinal of its ``later`` piece.
    Sync-free; the count must be the rank's true vision-token count, else the list is cut short
    or runs past the end.
    """
    size = max(local_vision_count, counts.mask.numel() + 1)
    ordinal = torch.ones(size, dtype=torch.long, device=counts.mask.device)
    assert counts.later is not None, "the compact rows need the later table (local_vision_counts makes it)"
    ordinal.index_add_(0, counts.running_at[counts.later], gathered.reshape(-1))
    return ordinal.cumsum_(0)[:local_vision_count].sub_(1)


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
    counts = count_pieces(mask, bounds, None, bounds[-1] * group.size(), group.size(), cp_rank)
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

    counts: LocalCounts
    gathered: torch.Tensor
    global_tokens: torch.Tensor
    cp: int
    cp_rank: int
    dense: torch.Tensor | None = None

    @property
    def row_of_position(self) -> torch.Tensor:
        if self.dense is None:
            self.dense = dense_rows(self.counts, self.gathered)
        return self.dense

    @property
    def selection(self) -> RankSelection:
        """The intermediates in natural order too (for display; a few kernels more, made on demand)."""
        s = self.counts
        rank_pieces = zigzag_rank_pieces(s.local_counts.numel() // 2, self.cp, device=s.mask.device)
        full_counts = natural_counts(self.gathered, rank_pieces)
        return RankSelection(self.cp_rank, s.mask, s.local_counts, self.gathered, full_counts,
                             exclusive_cumsum(full_counts), torch.zeros(0, dtype=torch.long, device=s.mask.device),
                             self.dense)

    @property
    def vision_total(self) -> torch.Tensor:
        """0-dim: vision tokens over all ranks, from the gathered counts."""
        return self.gathered.sum()

    def rows(self, local_vision_count: int | None = None) -> torch.Tensor:
        """Compact rows in local order; sync-free when ``local_vision_count`` is given.

        Without the count it is read from the device (one sync on CUDA). On the CPU a given count
        is checked against the mask; on CUDA it is trusted (checking it would sync).
        """
        running_total = self.counts.running[-1]
        if local_vision_count is None:
            local_vision_count = int(running_total)
        elif running_total.device.type == "cpu" and torch.compiler.is_compiling():
            torch._assert_async(running_total == local_vision_count, "local_vision_count differs from the vision "
                                "tokens in the local vision mask")
        elif running_total.device.type == "cpu" and local_vision_count != int(running_total):
            raise ValueError(f"local_vision_count is {local_vision_count}, but the local vision mask holds "
                             f"{int(running_total)} vision tokens")
        return compact_rows(self.counts, self.gathered, local_vision_count)

    def host_values(self) -> tuple[int, int, int]:
        """``(vision_total, global_tokens, local_vision_count)`` read in one device-to-host copy."""
        total, global_tokens, local = torch.stack(
            [self.vision_total, self.global_tokens.to(torch.long), self.counts.running[-1]]).tolist()
        return total, global_tokens, local

    def check(self, vision_embed_count: int | None = None) -> None:
        """The deferred checks, with one device-to-host read: mask length, then the embedding count.

        Every rank sees the same gathered total, so with ``vision_embed_count`` all ranks raise
        together (:class:`VisionCountMismatch`); a mask of the wrong length raises ``ValueError``.
        """
        self._verify(*self.host_values()[:2], vision_embed_count)

    def _verify(self, total: int, global_tokens: int, vision_embed_count: int | None) -> None:
        check_mask_length(self.counts.mask.numel(), global_tokens, self.cp)
        if vision_embed_count is not None and total != vision_embed_count:
            raise VisionCountMismatch(
                f"Packed CP ranks contain {total} vision tokens, but the vision encoder produced "
                f"{vision_embed_count} embeddings."
            )


def local_vision_counts(vision_mask: torch.Tensor, cu_seqlens: torch.Tensor, *, cp: int, cp_rank: int) -> LocalCounts:
    """The part before the collective under per-document zigzag: bounds and local counts.

    ``local_vision_row_map`` is ``local_vision_counts(...)``, ``.gather(group)``, ``.row_map(...)``;
    call the three yourself to keep the all-gather outside a compiled or captured region.
    Host-side ``cu_seqlens`` are validated here; nothing is read from the device.
    """
    mask = vision_mask.reshape(-1)
    if mask.dtype != torch.bool:
        mask = mask.to(torch.bool)
    cu = cu_seqlens.reshape(-1)
    device = mask.device
    if cu.device.type == "cpu":
        check_host_cu_seqlens(cu, mask.numel(), cp)
    if cu.device != device:
        cu = cu.to(device, non_blocking=True)  # as given: a pinned host buffer stays capturable
    pieces = 2 * cu.numel() - 1
    pair, later = zigzag_tables(pieces // 2, cp, cp_rank, device)
    bounds, later_bounds = zigzag_bounds(cu, cp, pair, mask.numel()).split([pieces, later.numel()])
    return count_pieces(mask, bounds, later, cu[-1], cp, cp_rank, later_bounds)


def local_vision_row_map(
    vision_mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    cp_group: dist.ProcessGroup,
) -> VisionRowMap:
    """This rank's dense row map under per-document zigzag, with no device-to-host sync.

    ``vision_mask`` is this rank's local bool mask ``[cu_seqlens[-1] // cp]`` (any shape that
    flattens to it); ``cu_seqlens`` are the global physical boundaries ``[S + 1]``. Exactly one
    collective (an ``all_gather_into_tensor`` of ``[2S]`` counts) is issued on every rank.
    Host-side ``cu_seqlens`` are validated here (free) and copied asynchronously; device-side
    ones are validated by :meth:`VisionRowMap.check`, since reading them would sync. Safe to
    ``torch.compile(fullgraph=True)`` and to capture in a CUDA graph (README, Performance).
    """
    counts = local_vision_counts(vision_mask, cu_seqlens, cp=cp_group.size(), cp_rank=cp_group.rank())
    return counts.row_map(counts.gather(cp_group))


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
    counts = local_vision_counts(vision_mask, cu_seqlens, cp=cp_group.size(), cp_rank=cp_group.rank())
    row_map = VisionRowMap(counts, counts.gather(cp_group), counts.global_tokens, counts.cp, counts.cp_rank)
    if vision_embed_count is None:
        return row_map.rows(local_vision_count)
    total, global_tokens, local = row_map.host_values()
    row_map._verify(total, global_tokens, vision_embed_count)
    return row_map.rows(local if local_vision_count is None else local_vision_count)
