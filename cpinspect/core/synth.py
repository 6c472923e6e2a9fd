"""Synthetic packed batches in the Qwen-VL token conventions: the demo, examples and test cases.

A segment is described as items: ``("text", n)``, ``("image", (t, h, w))`` or
``("video", (t, h, w))`` in patch units. Images become ``vision_start + t*h*w/4 image_pad +
vision_end``; Qwen3-VL videos become, per temporal patch, a short timestamp text, then
``vision_start + h*w/4 video_pad + vision_end``. Each segment is then padded to its physical
length, so ``cu_seqlens`` (logical) and ``cu_seqlens_padded`` (physical) both exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cpinspect.core.tokens import TokenConfig, token_config

Item = tuple[str, Any]
TEXT_LOW, TEXT_HIGH = 100, 150000


def build_batch(
    segments: Sequence[Sequence[Item]],
    physical_lengths: Sequence[int] | None = None,
    *,
    tokens: TokenConfig | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A full-row batch dict (``input_ids``, both cu_seqlens, grids, ``vision_embed_count``)."""
    tokens = tokens or token_config()
    generator = torch.Generator().manual_seed(seed)
    rows: list[torch.Tensor] = []
    logical: list[int] = []
    physical: list[int] = []
    images: list[list[int]] = []
    videos: list[list[int]] = []
    for index, items in enumerate(segments):
        parts = [_item_tokens(kind, spec, tokens, generator, images, videos) for kind, spec in items]
        row = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        length = physical_lengths[index] if physical_lengths is not None else row.numel()
        if length < row.numel():
            raise ValueError(f"segment {index} needs {row.numel()} tokens but its physical length is {length}")
        rows.append(torch.cat([row, torch.full((length - row.numel(),), tokens.pad_token_id)]))
        logical.append(row.numel())
        physical.append(length)
    merge = tokens.merge_area
    grid_rows = images + videos
    batch: dict[str, torch.Tensor] = {
        "input_ids": torch.cat(rows).view(1, -1),
        "cu_seqlens": _cumsum(logical),
        "cu_seqlens_padded": _cumsum(physical),
        "image_grid_thw": torch.tensor(images, dtype=torch.long).view(-1, 3),
        "video_grid_thw": torch.tensor(videos, dtype=torch.long).view(-1, 3),
        "vision_embed_count": torch.tensor(sum(t * h * w // merge for t, h, w in grid_rows)),
    }
    return batch


def _cumsum(lengths: Sequence[int]) -> torch.Tensor:
    return torch.cumsum(torch.tensor([0, *lengths], dtype=torch.int32), 0).to(torch.int32)


def _item_tokens(kind: str, spec: Any, tokens: TokenConfig, generator: torch.Generator,
                 images: list[list[int]], videos: list[list[int]]) -> torch.Tensor:
    if kind == "text":
        return torch.randint(TEXT_LOW, TEXT_HIGH, (int(spec),), generator=generator)
    t, h, w = (int(v) for v in spec)
    per_frame = h * w // tokens.merge_area
    start, end = torch.tensor([tokens.vision_start_token_id]), torch.tensor([tokens.vision_end_token_id])
    if kind == "image":
        images.append([t, h, w])
        return torch.cat([start, torch.full((t * per_frame,), tokens.image_token_id), end])
    if kind == "video":
        videos.append([t, h, w])
        if tokens.model != "qwen3-vl":
            return torch.cat([start, torch.full((t * per_frame,), tokens.video_token_id), end])
        frames = []
        for _ in range(t):
            stamp = torch.randint(TEXT_LOW, TEXT_HIGH, (3,), generator=generator)
            frames.append(torch.cat([stamp, start, torch.full((per_frame,), tokens.video_token_id), end]))
        return torch.cat(frames)
    raise ValueError(f"unknown item kind {kind!r}")


# The bundled example: 4 segments (336 tokens, lengths divisible by 2*cp for cp 1, 2, 3, 4, 6, 8),
# 3 images and one 2-frame video (124 vision tokens). With cp 2 the first image crosses the rank
# boundaries at 24 and 72; with cp 4 rank 0 (first and last eighth of each segment) holds no
# vision token; segments 1 and 3 carry padding (logical != physical boundaries).
DEMO_SEGMENTS: tuple[tuple[Item, ...], ...] = (
    (("text", 14), ("image", (1, 16, 16)), ("text", 16)),
    (("text", 45),),
    (("text", 20), ("video", (2, 8, 8)), ("text", 5), ("image", (1, 8, 12)), ("text", 45)),
    (("text", 8), ("image", (1, 4, 4)), ("text", 26)),
)
DEMO_LENGTHS = (96, 48, 144, 48)


def demo_batch_dict() -> dict[str, torch.Tensor]:
    """The bundled demo batch as a dict of tensors (what ``examples/qwen3vl_packed.pt`` holds)."""
    return build_batch(DEMO_SEGMENTS, DEMO_LENGTHS, seed=2026)


def demo_batch() -> Any:
    """The bundled demo as a :class:`~cpinspect.core.batch.PackedBatch`."""
    from cpinspect.core.loading import load_batch

    batch = load_batch(demo_batch_dict())
    batch.source = "built-in demo batch (cpinspect.core.synth.demo_batch)"
    return batch


def shard_batch(batch: dict[str, torch.Tensor], cp: int, layout: str = "zigzag") -> list[dict[str, torch.Tensor]]:
    """Pre-shard a full batch dict the way miles/slime do: local ids, global physical cu_seqlens."""
    from cpinspect.core.layout import make_layout

    cu = batch.get("cu_seqlens_padded", batch["cu_seqlens"]).to(torch.long)
    plan = make_layout(cu, cp, layout)
    ids = batch["input_ids"].reshape(-1)
    shards = []
    for rank in range(cp):
        shard = {k: v.clone() for k, v in batch.items() if k != "input_ids"}
        shard["input_ids"] = ids[plan.global_indices(rank)].view(1, -1)
        shards.append(shard)
    return shards


def random_batch(
    seed: int,
    cp: int,
    *,
    max_segments: int = 6,
    max_chunk: int = 6,
    vision_fraction: float = 0.4,
    tokens: TokenConfig | None = None,
) -> dict[str, torch.Tensor]:
    """A seeded random full row whose segment lengths divide ``2*cp``, with vision runs anywhere.

    Vision runs are raw placeholder runs (no grids): they start and end at random offsets, so
    they cross chunk and rank boundaries, and some segments get none.
    """
    tokens = tokens or token_config()
    generator = torch.Generator().manual_seed(seed)
    num_segments = int(torch.randint(1, max_segments + 1, (1,), generator=generator))
    chunks = torch.randint(0, max_chunk + 1, (num_segments,), generator=generator)
    lengths = (chunks * 2 * cp).tolist()
    if sum(lengths) == 0:
        lengths[0] = 2 * cp
    total = sum(lengths)
    ids = torch.randint(TEXT_LOW, TEXT_HIGH, (total,), generator=generator)
    is_vision = torch.rand(total, generator=generator) < vision_fraction
    runs = torch.cumsum(torch.rand(total, generator=generator) < 0.25, 0)  # group neighbours into runs
    vision_run = is_vision[runs.clamp(max=total - 1)]
    video = torch.rand(total, generator=generator) < 0.3
    ids[vision_run & ~video[runs.clamp(max=total - 1)]] = tokens.image_token_id
    ids[vision_run & video[runs.clamp(max=total - 1)]] = tokens.video_token_id
    cu = torch.cumsum(torch.tensor([0, *lengths]), 0).to(torch.int32)
    return {"input_ids": ids.view(1, -1), "cu_seqlens": cu}


def write_files(files: dict[str, Any], out: Any) -> list[Any]:
    """Write generated example files under ``out``: tensor dicts as ``.pt``/``.safetensors``, strings as text.

    One writer for every ``examples/make_*.py`` generator, so their committed outputs are saved alike.
    """
    from pathlib import Path

    from safetensors.torch import save_file

    written = []
    for name, content in files.items():
        path = Path(out) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        elif path.suffix == ".safetensors":
            save_file({k: v.contiguous() for k, v in content.items()}, str(path))
        else:
            torch.save(content, path)
        written.append(path)
    return written

