"""``cpinspect info``: what a batch holds, as a plain dict (the view is :mod:`cpinspect.views.info`)."""

from __future__ import annotations

from typing import Any

import torch

from cpinspect.core.batch import PackedBatch
from cpinspect.core.tokens import TokenConfig


def describe_batch(batch: PackedBatch, tokens: TokenConfig, *, cp: int | None = None) -> dict[str, Any]:
    """Keys, shapes, segments, vision tokens and the input form (for ``cp`` if given)."""
    cu = batch.cu_seqlens
    lengths = (cu[1:] - cu[:-1]).tolist()
    rows = batch.rows
    ids = torch.cat(rows)
    total = int(cu[-1])
    forms: dict[str, Any] = {}
    if cp is not None:
        forms["cp"] = cp
        forms["form"] = batch.form_for(cp)
        forms["divisible_by_2cp"] = all(length % (2 * cp) == 0 for length in lengths) if cp > 1 else True
    if batch.is_full:
        looks = "full row"
    elif batch.row_tokens and total % batch.row_tokens == 0:
        looks = f"pre-sharded local row for cp={total // batch.row_tokens}"
    else:
        looks = "neither full nor pre-sharded (cu_seqlens[-1] is not a multiple of the row length)"
    return {
        "source": batch.source,
        "files": [[{"key": f.key, "shape": list(f.shape), "dtype": f.dtype} for f in found] for found in batch.found],
        "fields": batch.keys,
        "rank_files": len(rows) if batch.per_rank_files else 0,
        "row_tokens": batch.row_tokens,
        "cu_seqlens_end": total,
        "segments": len(lengths),
        "segment_lengths": lengths,
        "logical_segment_lengths": (
            (batch.logical_cu_seqlens[1:] - batch.logical_cu_seqlens[:-1]).tolist()
            if batch.logical_cu_seqlens is not None else None
        ),
        "image_tokens": int((ids == tokens.image_token_id).sum()),
        "video_tokens": int((ids == tokens.video_token_id).sum()),
        "images": batch.image_grid_thw.shape[0] if batch.image_grid_thw is not None else None,
        "videos": batch.video_grid_thw.shape[0] if batch.video_grid_thw is not None else None,
        "vision_embed_count": batch.vision_embed_count,
        "looks_like": looks,
        **forms,
    }
