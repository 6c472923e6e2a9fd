"""ROPE_SEGMENT_OFFSET_MISSING: a rank's positions selected from the table without the segment offset.

Megatron-LM#5243: the full row's position table is ``[3, T]`` (mRoPE, per segment), a rank must
take the columns of its *global* indices (cu ``[0, 4, 8]``, cp 2: rank 0 takes ``[0, 3, 4, 7]``),
but the selection used each token's offset inside its segment (``[0, 3, 0, 3]``): every segment
after the first gets the first segment's positions. The test: each rank's ``position_ids`` equal
``table[:, g - cu[segment(g)]]`` where they differ from ``table[:, g]`` (at least one real token
of a later segment must tell the two apart, else the positions are simply right).
"""

from __future__ import annotations

import torch

from cpinspect.core.findings import Finding
from cpinspect.core.mrope import CONVENTIONS, row_positions
from cpinspect.diagnose.report import cause
from cpinspect.diagnose.scene import Scene

HINT = ("select the table's columns with the global indices (segment start + offset): Megatron "
        "index_select(-1, thd_get_partitioned_indices(cu_seqlens, total, cp_size, cp_rank)), not the offsets inside "
        "each segment")


def _rows(tensor: torch.Tensor, n: int) -> torch.Tensor | None:
    if tensor.numel() != 3 * n or tensor.shape[0] != 3:
        return None
    return tensor.reshape(3, n).to(torch.long)


def segment_offset_findings(scene: Scene) -> list[Finding]:
    """ROPE_SEGMENT_OFFSET_MISSING when every rank's positions fit the offset-less selection."""
    batch = scene.batch
    if (scene.form != "presharded" or not batch.position_ids or scene.result is None or scene.full_ids is None
            or len(batch.position_ids) != scene.cp):
        return []
    plan = scene.result.layout
    cu = plan.cu_seqlens.to(torch.long)
    if int(cu[-1]) != scene.full_ids.numel():
        return []
    for convention in CONVENTIONS:
        table = row_positions(scene.full_ids, cu, scene.tokens, image_grid_thw=batch.image_grid_thw,
                              video_grid_thw=batch.video_grid_thw, logical_cu_seqlens=batch.logical_cu_seqlens,
                              second_per_grid_ts=batch.second_per_grid_ts, convention=convention)
        found = _check(scene, table, cu)
        if found is not None:
            return [found]
    return []


def _check(scene: Scene, table: torch.Tensor, cu: torch.Tensor) -> Finding | None:
    plan = scene.result.layout if scene.result is not None else None
    assert plan is not None
    first: tuple[int, int, int, int] | None = None
    for rank, tensor in enumerate(scene.batch.position_ids or []):
        index = plan.global_indices(rank)
        rows = _rows(tensor, index.numel())
        if rows is None:
            return None
        segment = torch.searchsorted(cu[1:], index, right=True)
        offsets = index - cu[segment]
        if not torch.equal(rows, table[:, offsets]):
            return None
        differs = torch.nonzero((table[:, offsets] != table[:, index]).any(dim=0)).view(-1)
        if differs.numel() and first is None:
            local = int(differs[0])
            first = (rank, local, int(index[local]), int(offsets[local]))
    if first is None:
        return None
    rank, local, global_index, offset = first
    place = plan.locate(rank, local)
    index = plan.global_indices(rank)
    seg_of = torch.searchsorted(cu[1:], index, right=True)
    later = index[seg_of == place.segment][:6]
    shown, wrong = later.tolist(), (later - cu[place.segment]).tolist()
    source = int(torch.searchsorted(cu[1:], torch.tensor(offset), right=True))
    return cause(
        "ROPE_SEGMENT_OFFSET_MISSING",
        f"every rank's position_ids are the full row's per-segment table taken at each token's offset inside its "
        f"segment instead of at its global index: rank {rank} takes table columns {wrong} for its "
        f"segment-{place.segment} tokens {shown}; first visible on rank {rank}, local token {local} (global "
        f"{global_index}, segment {place.segment}): it got column {offset} of the table (a token of segment {source})",
        HINT, rank=rank, segment=place.segment, chunk=place.chunk)
