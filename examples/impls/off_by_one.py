"""BUG: chunk offsets from an inclusive prefix sum, i.e. every chunk starts at the next chunk's row.

Every vision token gets a row shifted by its own chunk's count: ``wrong-rows`` (often past the end
of the embeddings) on every rank that holds a vision token.
"""

from __future__ import annotations

import torch
from correct import chunk_columns, gather_counts, local_chunk_counts, natural_counts, rows_for_local_tokens


def select_rows(vision_mask, cu_seqlens, *, vision_embed_count, cp_group):
    local = vision_mask.reshape(-1).to(torch.bool)
    cp = cp_group.size()
    counts, segment, half = local_chunk_counts(local, cu_seqlens, cp)
    full = natural_counts(gather_counts(counts, cp_group), cp)
    offsets = torch.cumsum(full.reshape(-1), 0).view_as(full)  # the bug: should subtract full (exclusive)
    return rows_for_local_tokens(local, segment, half, counts, offsets, chunk_columns(cp_group.rank(), cp))
