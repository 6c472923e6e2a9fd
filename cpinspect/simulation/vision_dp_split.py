"""Vision data parallelism under CP: the count split, the embedding all-gather and its backward, and
the run count upstream's ``reorganize_inputs`` asserts (the mechanics; :mod:`cpinspect.simulation.vision_dp`
runs them on a simulation and judges them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from cpinspect.core.runs import expand_runs, mask_runs
from cpinspect.core.vision_items import VisionItems

VISION_DP_RANKS_KEY = "vision_dp_ranks"  # the batch's own item -> rank assignment, when it has one
# --------------------------------------------------------------------------- the split


def split_by_count(num_items: int, cp: int) -> torch.Tensor:
    """``[cp]`` items per rank: ``n // cp`` each, the first ``n % cp`` ranks take one more."""
    return num_items // cp + (torch.arange(cp) < num_items % cp).to(torch.long)


@dataclass(frozen=True)
class VisionDPPlan:
    """Which rank encodes which vision item, and the sizes that follow (all tensors int64).

    ``item_rank``, ``item_rows`` (merged tokens = embedding rows) and ``item_first_row`` (first
    natural embedding row) are ``[N]`` in natural item order.
    """

    cp: int
    items: VisionItems
    item_rank: torch.Tensor
    item_rows: torch.Tensor
    item_first_row: torch.Tensor
    assigned_by: str

    def _per_rank(self, values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.cp, dtype=torch.long).index_add_(0, self.item_rank, values)

    @property
    def items_per_rank(self) -> torch.Tensor:
        return self._per_rank(torch.ones_like(self.item_rank))

    @property
    def patches_per_rank(self) -> torch.Tensor:
        """``[cp]`` encoder input patches (``t*h*w``) per rank."""
        return self._per_rank(self.items.patches)

    @property
    def rows_per_rank(self) -> torch.Tensor:
        """``[cp]`` merged-token rows each rank contributes to the all-gather."""
        return self._per_rank(self.item_rows)

    def rank_items(self, cp_rank: int) -> torch.Tensor:
        """Natural indices of the items ``cp_rank`` encodes, in its encoding order."""
        return torch.nonzero(self.item_rank == cp_rank).view(-1)

    def rank_rows(self, cp_rank: int) -> torch.Tensor:
        """Natural embedding rows ``cp_rank`` produces, in the order it produces them."""
        mine = self.rank_items(cp_rank)
        return expand_runs(self.item_first_row[mine], self.item_rows[mine])




def plan_vision_dp(items: VisionItems, cp: int, merge_area: int, item_rank: torch.Tensor | None = None) -> VisionDPPlan:
    """The Megatron-Bridge count split, or the batch's own ``item_rank`` assignment when given."""
    rows = items.patches // merge_area
    first_row = torch.cumsum(rows, 0) - rows
    if item_rank is None:
        item_rank = torch.repeat_interleave(torch.arange(cp), split_by_count(items.count, cp),
                                            output_size=items.count)
        return VisionDPPlan(cp, items, item_rank, rows, first_row, "by count (Megatron-Bridge)")
    return VisionDPPlan(cp, items, item_rank.to(torch.long), rows, first_row, f"the batch's {VISION_DP_RANKS_KEY}")


# --------------------------------------------------------------------------- the collectives


def all_gather_vision_embeddings(local: torch.Tensor, rows_per_rank: torch.Tensor,
                                 group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's embedding rows in rank order, through one all-gather on ``group``.

    Ranks contribute different row counts (known everywhere from the grids), so each sends its
    rows padded to the largest count and every rank trims what it receives. A rank with no item
    still sends its (all-padding) buffer: skipping would leave the others waiting.
    """
    width = max(int(rows_per_rank.max()), 0)
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[: local.shape[0]] = local
    received = [torch.empty_like(padded) for _ in range(group.size())]
    dist.all_gather(received, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(received, rows_per_rank.tolist())])


def reduce_vision_grad(grad_output: torch.Tensor, rows_per_rank: torch.Tensor,
                       group: dist.ProcessGroup) -> torch.Tensor:
    """Backward of the gather: all-reduce (SUM) the gathered rows' gradient, keep this rank's rows.

    Every rank uses rows encoded elsewhere, so without the all-reduce an encoder rank would only
    see the gradient of the rows it scattered itself (the partial gradient of Megatron-Bridge #4784).
    """
    total = grad_output.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    start = int(rows_per_rank[: group.rank()].sum())
    return total[start: start + int(rows_per_rank[group.rank()])]


@dataclass
class RankDP:
    """What one rank's vision-DP step produced: gathered rows (natural row ids), the selection, grads."""

    gathered: torch.Tensor
    selected: torch.Tensor
    deepstack_selected: list[torch.Tensor]
    grad: torch.Tensor | None


def vision_dp_rank_program(group: dist.ProcessGroup, local_rows: list[torch.Tensor], rows_per_rank: torch.Tensor,
                           selected_rows: list[torch.Tensor], deepstack_layers: int,
                           requires_grad: list[bool]) -> RankDP:
    """One CP rank: 'encode' its items, gather embeddings (and deepstack), select, run backward.

    An embedding row is its natural row index, so the gathered tensor shows the order directly.
    The backward collectives run only when this rank's encoder output requires grad, as autograd
    would; module-level so a process backend could pickle it.
    """
    rank = group.rank()
    local = local_rows[rank].view(-1, 1)
    gathered = all_gather_vision_embeddings(local, rows_per_rank, group)
    deepstack = [all_gather_vision_embeddings(local, rows_per_rank, group) for _ in range(deepstack_layers)]
    rows = selected_rows[rank]
    selected = gathered.index_select(0, rows).view(-1)
    deepstack_selected = [feature.index_select(0, rows).view(-1) for feature in deepstack]
    grad = None
    if requires_grad[rank]:
        used = torch.zeros(gathered.shape[0], 1).index_fill_(0, rows, 1.0)
        for _ in range(deepstack_layers):
            reduce_vision_grad(used, rows_per_rank, group)
        grad = reduce_vision_grad(used, rows_per_rank, group).view(-1)
    return RankDP(gathered.view(-1), selected, deepstack_selected, grad)


# --------------------------------------------------------------------------- what upstream's reorganize_inputs sees


@dataclass(frozen=True)
class RunCount:
    """Maximal image/video placeholder runs in the row one rank hands to ``reorganize_inputs``."""

    image_runs: int
    video_runs: int
    expected: int
    lengths_match: bool

    @property
    def runs(self) -> int:
        return self.image_runs + self.video_runs

    @property
    def passes(self) -> bool:
        return self.runs == self.expected and self.lengths_match




def run_count(ids: torch.Tensor, frames: VisionItems, image_id: int, video_id: int) -> RunCount:
    """The run-count assertion of ``reorganize_inputs`` (reference §2.7) on one row.

    Upstream asserts ``runs == sum(t over image grids) + sum(t over video grids)``, then that each
    item's runs hold ``t*h*w / merge**2`` tokens; ``frames`` are the per-temporal-patch items.
    """
    image_start, image_len = mask_runs(ids == image_id)
    video_start, video_len = mask_runs(ids == video_id)
    start = torch.cat([image_start, video_start])
    kind = torch.cat([torch.zeros_like(image_start), torch.ones_like(video_start)])[torch.argsort(start)]
    length = torch.cat([image_len, video_len])[torch.argsort(start)]
    expected = frames.count
    lengths_match = kind.numel() == expected and bool(
        torch.equal(kind, frames.kind) and torch.equal(length, frames.length))
    return RunCount(image_start.numel(), video_start.numel(), expected, lengths_match)
