"""BUG: passes the process group to an autograd Function's ``apply`` as a keyword.

``apply`` takes no keyword arguments on the torch releases training stacks pin
(``TypeError: apply() takes no keyword arguments``, Megatron-Bridge #4391 and #4784), so every
rank raises before the collective: ``exception`` on all ranks together.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from correct import chunk_columns, chunk_offsets, local_chunk_counts, natural_counts, rows_for_local_tokens


class AllGatherCounts(torch.autograd.Function):
    """All-gather ``[S, 2]`` counts; backward sums the gradients of this rank's slot over the group."""

    @staticmethod
    def forward(ctx, counts, cp_group):
        ctx.cp_group = cp_group
        received = [torch.empty_like(counts) for _ in range(cp_group.size())]
        dist.all_gather(received, counts, group=cp_group)
        return torch.stack(received)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.cp_group)
        return grad[ctx.cp_group.rank()], None


def select_rows(vision_mask, cu_seqlens, *, vision_embed_count, cp_group):
    local = vision_mask.reshape(-1).to(torch.bool)
    cp = cp_group.size()
    counts, segment, half = local_chunk_counts(local, cu_seqlens, cp)
    gathered = AllGatherCounts.apply(counts, cp_group=cp_group)  # the bug: pass cp_group positionally
    full = natural_counts(gathered, cp)
    return rows_for_local_tokens(local, segment, half, counts, chunk_offsets(full), chunk_columns(cp_group.rank(), cp))
