"""The independent answer every selection is checked against.

It never counts per chunk and never talks to other ranks. It maps each local position straight to
its global position with the closed-form index formula (the one TransformerEngine's
``thd_get_partitioned_indices`` kernel uses), then ranks global vision positions among all vision
tokens of the full row. A rank's expected rows are the ranks of its vision tokens, in local order.
Layouts defined only by a per-rank index map (``per-document-head-tail``, ``file``) take the map
itself: it is their definition, and the pieces derived from it are what is under test.
"""

from __future__ import annotations

import torch


def global_positions(kind: str, cu_seqlens: torch.Tensor, cp: int, cp_rank: int,
                     index_map: torch.Tensor | None = None) -> torch.Tensor:
    """Global index of every local position of ``cp_rank``, by direct formula per local token.

    ``index_map`` (``[cp, T/cp]``) is required for ``kind == "file"``.
    """
    total = int(cu_seqlens[-1])
    local = torch.arange(total // cp)
    if kind == "file":
        if index_map is None:
            raise ValueError("the file layout's oracle needs its index map")
        return index_map[cp_rank]
    if kind == "per-document-head-tail":
        from cpinspect.core.layout_maps import per_document_head_tail_indices

        return per_document_head_tail_indices(cu_seqlens, cp)[cp_rank]
    if kind == "contiguous":
        return cp_rank * (total // cp) + local
    cu = cu_seqlens if kind == "zigzag" else torch.tensor([0, total])  # sequence-zigzag, head-tail
    if cp == 1:
        return local
    local_cu = cu // cp
    segment = torch.searchsorted(local_cu[1:], local, right=True)
    half = (local_cu[segment + 1] - local_cu[segment]) // 2
    k = local - local_cu[segment]
    offset = torch.where(k < half, torch.full_like(k, cp_rank), torch.full_like(k, 2 * cp - 2 - cp_rank))
    return k + local_cu[segment] * cp + half * offset


def expected_rows(full_mask: torch.Tensor, global_index: torch.Tensor) -> torch.Tensor:
    """Ranks among all vision tokens of the full row, for the vision tokens at ``global_index``."""
    vision_rank = torch.cumsum(full_mask.to(torch.long), 0) - 1
    held = global_index[full_mask[global_index]]
    return vision_rank[held]
