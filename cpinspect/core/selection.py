"""The per-rank program: select this rank's rows of the natural-order vision embeddings.

This mirrors what a pre-sharded Megatron-Bridge style model does before its scatter
(``combined[vision_mask] = vision_embeds[rows]``): count the vision tokens in each locally held
piece, all-gather those counts over the CP group, and give each local vision token the number
of vision tokens before it in natural order.

Few kernels, all of fixed shape. With ``T`` local tokens and ``k = 2S`` local pieces:

1. local piece bounds ``[k + 1]`` from ``cu_seqlens``: one ``bucketize`` that divides and clamps,
   then one gather through a cached index table and a pair sum, which also give the bound of
   every gathered count's destination (:mod:`cpinspect.core.selection_plan`). With host
   ``cu_seqlens`` and a device mask, eagerly, the ``k + 1`` bounds are made on the host from the
   values the checks read (one pinned copy) and the destinations are one gather on the device;
2. a running vision count ``[T + 1]`` (one ``cat`` of a cached zero and the mask, one cumulative
   sum), read at the bounds: the local counts ``[k]``;
3. **one** ``all_gather_into_tensor`` of the ``[k]`` counts (every rank calls it);
4. the dense row map: each gathered count is added, with one ``index_add_``, at the start of the
   first local piece that comes after it in natural order (a cached table says which), and a
   second cumulative sum over the local row gives every position its row; ``-1`` off vision.

That is 10 tensor operators plus the all-gather, with ``cu_seqlens`` on the device or the host
(on the host: a copy and a gather in place of the bucketize, gather and sum, and the checks in
numpy); on CUDA 14 kernels and copies with the all-gather's (each cumulative sum is two, the
``cat`` of two dtypes two copies), 13 from the host. All per-shape tables come from one cache
lookup per call (:func:`~cpinspect.core.selection_plan.zigzag_plan`). ``bench/selection.py``
counts them per call with the profiler. Nothing reads a device value on the host, nothing has a
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
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from cpinspect.core.layout import zigzag_rank_pieces
from cpinspect.core.selection_plan import (
    ZigzagPlan,
    check_host_cu_seqlens,
    check_mask_length,
    host_zigzag_bounds,
    minus_one,
    zero_prefix,
    zigzag_bounds,
    zigzag_plan,
)

if TYPE_CHECKING:
    from cpinspect.core.rank_selection import RankSelection

# ``all_gather_into_tensor`` is ``all_gather_single`` from torch 2.13 on (same op, new name); dynamo
# turns either into the functional collective when it traces a registered group.
_ALL_GATHER_FLAT = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class VisionCountMismatch(ValueError):
    """The gathered vision-token total differs from the number of vision embeddings."""


@dataclass
class LocalCounts:
    """Everything one rank computes before the all-gather; nothing in it has been read on the host.

    ``running`` is ``[T + 1]`` (vision tokens before each position), ``bounds`` ``[k + 1]`` (local
    piece bounds) and ``running_at`` the running count there; ``local_counts`` ``[k]`` is what
    every rank all-gathers (``[cp * k]`` back, rank-major). ``plan`` holds the call's tables
    (:func:`~cpinspect.core.selection_plan.zigzag_plan`; ``None`` in :func:`select_rank_rows`, which
    compacts from the natural-order offsets it builds for display) and ``later_bounds`` ``[cp * k]``
    the local bound of each :attr:`later` piece. ``spread`` (``0`` then the mask, ``[T + 1]`` int64) is the
    dense map's scratch buffer, used up when the map is made.
    """

    mask: torch.Tensor
    spread: torch.Tensor | None
    running: torch.Tensor
    bounds: torch.Tensor
    running_at: torch.Tensor
    local_counts: torch.Tensor
    ends: torch.Tensor
    cp: int
    cp_rank: int
    later_bounds: torch.Tensor | None = None
    plan: ZigzagPlan | None = None

    @property
    def later(self) -> torch.Tensor | None:
        """``[cp * k]`` the plan's ``later`` table: the first local piece after each gathered count."""
        return None if self.plan is None else self.plan.later

    @property
    def global_tokens(self) -> torch.Tensor:
        """0-dim: the packed row's length, the last of ``ends`` (``cu_seqlens``), read only when checked."""
        return self.ends[-1]

    def gather(self, group: dist.ProcessGroup) -> torch.Tensor:
        """``[cp, k]`` every rank's counts, through one ``all_gather_into_tensor`` on ``group``."""
        return self.gather_flat(group).view(self.cp, -1)

    def gather_flat(self, group: dist.ProcessGroup) -> torch.Tensor:
        """``[cp * k]`` every rank's counts, rank-major, as the all-gather wrote them."""
        gathered = self.local_counts.new_empty(self.cp * self.local_counts.numel())
        _ALL_GATHER_FLAT(gathered, self.local_counts, group=group)
        return gathered

    def row_map(self, gathered: torch.Tensor) -> VisionRowMap:
        """The dense row map from the all-gathered counts (``[cp, k]`` or flat ``[cp * k]``)."""
        row_map = VisionRowMap(self, gathered)
        row_map.dense = dense_rows(self, gathered)
        return row_map


def count_pieces(mask: torch.Tensor, bounds: torch.Tensor, ends: torch.Tensor, cp: int, cp_rank: int,
                 later_bounds: torch.Tensor | None = None, plan: ZigzagPlan | None = None) -> LocalCounts:
    """The running count over the local row, read at the piece bounds: the counts to all-gather.

    ``ends`` is any tensor whose last entry is the global row length (``cu_seqlens`` itself).
    """
    zero = zero_prefix(mask.device) if plan is None else plan.zero
    spread = torch.cat([zero, mask])  # int64 [T + 1]: 0, then the mask (cat promotes: one call)
    running = spread.cumsum(0)
    running_at = running.take(bounds)  # take: one kernel, and a cheaper call than advanced indexing
    local_counts = torch.diff(running_at)
    return LocalCounts(mask, spread, running, bounds, running_at, local_counts, ends, cp, cp_rank, later_bounds,
                       plan)


def dense_rows(counts: LocalCounts, gathered: torch.Tensor) -> torch.Tensor:
    """``[T]`` row of every local vision position, ``-1`` elsewhere: one scatter-add, one cumsum.

    Each gathered count lands at the start of the first local piece after it in natural order;
    the running sum over ``0, mask[0], mask[1], ...`` plus those counts is, at a vision position,
    the number of vision tokens before it in natural order, which is its row.
    """
    spread = counts.spread
    counts.spread = None
    if spread is None:  # already used: start again from the mask
        spread = torch.cat([zero_prefix(counts.mask.device), counts.mask])
    assert counts.later_bounds is not None, "the dense map needs the later bounds (local_vision_counts makes them)"
    spread.index_add_(0, counts.later_bounds, gathered if gathered.dim() == 1 else gathered.reshape(-1))
    fill = minus_one(spread.device) if counts.plan is None else counts.plan.minus_one
    return torch.where(counts.mask, spread.cumsum_(0)[:-1], fill)


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
    all_counts: torch.Tensor
    dense: torch.Tensor | None = None

    @property
    def gathered(self) -> torch.Tensor:
        """``[cp, k]`` every rank's local counts, as all-gathered."""
        counts = self.all_counts
        return counts if counts.dim() == 2 else counts.view(self.cp, -1)

    @property
    def cp(self) -> int:
        return self.counts.cp

    @property
    def cp_rank(self) -> int:
        return self.counts.cp_rank

    @property
    def global_tokens(self) -> torch.Tensor:
        """0-dim: ``cu_seqlens[-1]``, the packed row's length."""
        return self.counts.global_tokens

    @property
    def row_of_position(self) -> torch.Tensor:
        if self.dense is None:
            self.dense = dense_rows(self.counts, self.all_counts)
        return self.dense

    @property
    def selection(self) -> RankSelection:
        """The intermediates in natural order too (for display; a few kernels more, made on demand)."""
        from cpinspect.core.rank_selection import RankSelection, exclusive_cumsum, natural_counts  # imports this one

        s = self.counts
        rank_pieces = zigzag_rank_pieces(s.local_counts.numel() // 2, self.cp, device=s.mask.device)
        full_counts = natural_counts(self.gathered, rank_pieces)
        return RankSelection(self.cp_rank, s.mask, s.local_counts, self.gathered, full_counts,
                             exclusive_cumsum(full_counts), torch.zeros(0, dtype=torch.long, device=s.mask.device),
                             self.dense)

    @property
    def vision_total(self) -> torch.Tensor:
        """0-dim: vision tokens over all ranks, from the gathered counts."""
        return self.all_counts.sum()

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
        return compact_rows(self.counts, self.all_counts, local_vision_count)

    def host_values(self) -> tuple[int, int, int]:
        """``(vision_total, global_tokens, local_vision_count)`` read in one device-to-host copy."""
        total = self.vision_total
        total, global_tokens, local = torch.stack(  # global_tokens may be host cu_seqlens' last entry
            [total, self.global_tokens.to(total.device, torch.long), self.counts.running[-1]]).tolist()
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
    mask = vision_mask if vision_mask.dim() == 1 else vision_mask.reshape(-1)
    if mask.dtype != torch.bool:
        mask = mask.to(torch.bool)
    cu = cu_seqlens if cu_seqlens.dim() == 1 else cu_seqlens.reshape(-1)
    device, tokens, pieces = mask.device, mask.numel(), 2 * cu.numel() - 1
    values = check_host_cu_seqlens(cu, tokens, cp) if cu.device.type == "cpu" else None
    plan = zigzag_plan(pieces // 2, cp, cp_rank, tokens, cu.dtype if cu.dtype == torch.int32 else torch.int64,
                       device)
    if values is not None and device.type == "cuda":
        bounds = host_zigzag_bounds(values, cp, device)
        if bounds is not None:  # eager: made on the host from the checked values, one copy
            return count_pieces(mask, bounds, cu, cp, cp_rank, bounds.take(plan.later), plan)
    if cu.device != device:
        cu = cu.to(device, non_blocking=True)  # as given: a pinned host buffer stays capturable
    bounds = zigzag_bounds(cu, cp, plan.pair, tokens, plan.steps)
    return count_pieces(mask, bounds[:pieces], cu, cp, cp_rank, bounds[pieces:], plan)


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
    return counts.row_map(counts.gather_flat(cp_group))


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
    row_map = VisionRowMap(counts, counts.gather_flat(cp_group))
    if vision_embed_count is None:
        return row_map.rows(local_vision_count)
    total, global_tokens, local = row_map.host_values()
    row_map._verify(total, global_tokens, vision_embed_count)
    return row_map.rows(local if local_vision_count is None else local_vision_count)
