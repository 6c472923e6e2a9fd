"""BUG: returns early on a rank without vision tokens, skipping the all-gather the others enter.

In a real job the other ranks wait in the all-gather until the NCCL timeout (the "CP rank with 0
images deadlocks the others" class of bug). ``cpinspect check`` reports a ``divergence`` on cases
with such a rank, and ``rank-dependent-collectives`` even when every rank happens to hold one.
"""

from __future__ import annotations

import torch
from correct import (
    chunk_columns,
    chunk_offsets,
    gather_counts,
    local_chunk_counts,
    natural_counts,
    rows_for_local_tokens,
)


def select_rows(vision_mask, cu_seqlens, *, vision_embed_count, cp_group):
    local = vision_mask.reshape(-1).to(torch.bool)
    if not local.any():
        return torch.empty(0, dtype=torch.long)  # the bug: nothing to select, so why gather?
    cp = cp_group.size()
    counts, segment, half = local_chunk_counts(local, cu_seqlens, cp)
    full = natural_counts(gather_counts(counts, cp_group), cp)
    return rows_for_local_tokens(local, segment, half, counts, chunk_offsets(full), chunk_columns(cp_group.rank(), cp))
