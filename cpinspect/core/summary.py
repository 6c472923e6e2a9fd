"""``cpinspect info``: what a batch holds, as a plain dict (the view is :mod:`cpinspect.views.info`)."""

from __future__ import annotations

from typing import Any

import torch

from cpinspect.core.batch import PackedBatch, row_cut_for
from cpinspect.core.tokens import TokenConfig
from cpinspect.core.valid_only import is_valid_only


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
    form, action = input_form(batch)
    return {
        "source": batch.source,
        "input_form": form,
        "would_do": action,
        "field_paths": dict(batch.keys),
        "containers": dict(batch.containers),
        "notes": [note.to_dict() for note in batch.notes],
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


def input_form(batch: PackedBatch) -> tuple[str, str]:
    """``(form, what cpinspect does with it)``: the stack's form the source came in, and the row's form."""
    stack = batch.form
    psp = next((p for p, c in batch.containers.items() if c.rsplit(".", 1)[-1] == "PackedSeqParams"), None)
    if not stack and psp:
        padded = batch.logical_cu_seqlens is not None
        stack = (f"Megatron-Bridge dict with PackedSeqParams at {psp} "
                 + ("(padded: cu_seqlens_q_padded is physical, cu_seqlens_q logical)" if padded
                    else "(unpadded: cu_seqlens_q_padded is None, so cu_seqlens_q is physical)"))
    if batch.per_rank_files:
        row, action = (f"pre-sharded rank files (cp={len(batch.rows)})",
                       f"simulates the {len(batch.rows)} local rows as they are (simulate --cp {len(batch.rows)})")
    elif is_valid_only(batch.row_tokens, batch.logical_cu_seqlens, batch.cu_seqlens):
        row, action = ("valid-tokens-only row under padded boundaries",
                       "reports VALID_ONLY_ROW: what each rank slices out of it (simulate --cp N)")
    elif batch.is_full:
        row, action = "full THD row", "shards the row over the CP ranks (simulate --cp N)"
    elif (cut := row_cut_for(batch.total_tokens, batch.row_tokens)) is not None:
        row, action = (f"one rank's pre-sharded local row (for cp={cut})",
                       f"needs all {cut} rank files to simulate; info works on this one")
    else:
        row, action = "neither a full nor a pre-sharded row", "refuses to simulate it (cu_seqlens and the row disagree)"
    if batch.form:
        action = f"packed it into one THD row ({batch.notes[0].code}); {action}" if batch.notes else action
    return (f"{stack}; {row}" if stack else row), action
