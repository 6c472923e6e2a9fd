"""The straightforward selection the library routine is measured against.

It is written the way the upstream pre-sharded path reads (Megatron-Bridge
``_get_cp_local_vision_embed_indices``, described in the shared reference §2.5): a Python loop
over segments that reads boundaries and counts with ``.item()``, one all-gather, then a second
loop that builds one ``arange`` per non-empty chunk. Correct, easy to read, and on CUDA every
``.item()`` is a device-to-host synchronisation. Only the benchmark uses it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def loop_vision_rows(
    vision_mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    cp_group: dist.ProcessGroup,
    vision_embed_count: int | None = None,
) -> torch.Tensor:
    """This rank's embedding rows, segment by segment (zigzag: chunks r and 2cp-1-r)."""
    cp, cp_rank = cp_group.size(), cp_group.rank()
    mask = vision_mask.reshape(-1)
    num_segments = cu_seqlens.numel() - 1
    local_counts = torch.zeros(num_segments, 2, dtype=torch.long, device=mask.device)
    for seg in range(num_segments):
        start, end = cu_seqlens[seg].item(), cu_seqlens[seg + 1].item()
        local_start, chunk = start // cp, (end - start) // (2 * cp)
        local_counts[seg, 0] = mask[local_start:local_start + chunk].sum().item()
        local_counts[seg, 1] = mask[local_start + chunk:local_start + 2 * chunk].sum().item()
    gathered = [torch.empty_like(local_counts) for _ in range(cp)]
    dist.all_gather(gathered, local_counts, group=cp_group)
    full_counts = torch.zeros(num_segments, 2 * cp, dtype=torch.long, device=mask.device)
    for rank in range(cp):
        full_counts[:, rank] = gathered[rank][:, 0]
        full_counts[:, 2 * cp - 1 - rank] = gathered[rank][:, 1]
    total = full_counts.sum().item()
    if vision_embed_count is not None and total != vision_embed_count:
        raise ValueError(f"Packed CP ranks contain {total} vision tokens, but the vision encoder produced "
                         f"{vision_embed_count} embeddings.")
    offsets = (torch.cumsum(full_counts.reshape(-1), 0) - full_counts.reshape(-1)).view(num_segments, 2 * cp)
    parts = []
    for seg in range(num_segments):
        for local_chunk, full_chunk in ((0, cp_rank), (1, 2 * cp - 1 - cp_rank)):
            count = local_counts[seg, local_chunk].item()
            if count:
                first = offsets[seg, full_chunk].item()
                parts.append(torch.arange(first, first + count, device=mask.device))
    if not parts:
        return torch.empty(0, dtype=torch.long, device=mask.device)
    return torch.cat(parts)
