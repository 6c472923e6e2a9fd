"""``cpinspect info``: what a batch holds, as a plain dict, and its rich view."""

from __future__ import annotations

from typing import Any

import torch
from rich.console import Console
from rich.table import Table

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
    if not batch.per_rank_files and total == batch.row_tokens:
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


def render_info(summary: dict[str, Any], console: Console, *, source: str) -> None:
    files = summary["files"]
    for index, found in enumerate(files):
        title = f"keys in {source}" if len(files) == 1 else f"keys of rank {index}"
        table = Table(title=title, title_justify="left")
        table.add_column("key")
        table.add_column("shape")
        table.add_column("dtype")
        table.add_column("used as")
        used = {v: k for k, v in summary["fields"].items()}
        for entry in found:
            table.add_row(entry["key"], str(entry["shape"]), entry["dtype"], used.get(entry["key"], ""))
        console.print(table)
        if index == 0 and len(files) > 2:
            console.print(f"(ranks 1..{len(files) - 1} hold the same keys)")
            break
    lengths = summary["segment_lengths"]
    shown = lengths if len(lengths) <= 12 else [*lengths[:8], "...", *lengths[-3:]]
    console.print(f"segments: {summary['segments']} (physical lengths {shown})")
    if summary["logical_segment_lengths"] is not None:
        console.print(f"logical lengths: {summary['logical_segment_lengths'][:12]}"
                      f"{' ...' if summary['segments'] > 12 else ''}")
    console.print(f"row: {summary['row_tokens']:,} tokens per row; cu_seqlens ends at {summary['cu_seqlens_end']:,}"
                  + (f"; {summary['rank_files']} rank files" if summary["rank_files"] else ""))
    console.print(f"vision tokens: {summary['image_tokens']:,} image_pad, {summary['video_tokens']:,} video_pad"
                  + (f"; grids: {summary['images']} image(s), {summary['videos']} video(s)"
                     if summary["images"] is not None or summary["videos"] is not None else ""))
    if summary["vision_embed_count"] is not None:
        console.print(f"vision_embed_count: {summary['vision_embed_count']:,}")
    console.print(f"looks like: {summary['looks_like']}")
    if "cp" in summary:
        console.print(f"for cp={summary['cp']}: {summary['form']}; every segment divisible by 2*cp: "
                      f"{'yes' if summary['divisible_by_2cp'] else 'no (use --pad)'}")
