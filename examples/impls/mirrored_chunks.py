"""BUG: looks up the second local chunk at chunk ``r`` again instead of its mirror ``2*cp-1-r``.

The rows of a rank's second chunk repeat the rows of its first: ``wrong-rows`` whenever a rank
holds vision tokens in its second chunk.
"""

from __future__ import annotations

import torch
from correct import chunk_offsets, gather_counts, local_chunk_counts, natural_counts, rows_for_local_tokens


def select_rows(vision_mask, cu_seqlens, *, vision_embed_count, cp_group):
    local = vision_mask.reshape(-1).to(torch.bool)
    cp, cp_rank = cp_group.size(), cp_group.rank()
    counts, segment, half = local_chunk_counts(local, cu_seqlens, cp)
    full = natural_counts(gather_counts(counts, cp_group), cp)
    columns = (cp_rank, cp_rank)  # the bug: should be (cp_rank, 2 * cp - 1 - cp_rank)
    return rows_for_local_tokens(local, segment, half, counts, chunk_offsets(full), columns)
