"""Large synthetic packed batches for the benchmarks (seeded, generated without Python loops).

The test batches in :mod:`cpinspect.core.synth` are small and item-shaped; the benchmarks need
millions of tokens quickly, so this module draws segment lengths and vision runs in bulk.
"""

from __future__ import annotations

import torch

from cpinspect.core.tokens import IMAGE_PAD, VIDEO_PAD

TEXT_LOW, TEXT_HIGH = 100, 150000
MEAN_RUN = 64  # average length of a text or vision run, in tokens


def segment_lengths(total: int, segments: int, multiple: int, generator: torch.Generator) -> torch.Tensor:
    """``[segments]`` random positive multiples of ``multiple`` that sum to ``total``."""
    units = total // multiple
    if units * multiple != total or units < segments:
        raise ValueError(f"{total} tokens cannot form {segments} segments of multiples of {multiple}")
    cuts = torch.randperm(units - 1, generator=generator)[: segments - 1] + 1
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), torch.sort(cuts).values, torch.tensor([units])])
    return (bounds[1:] - bounds[:-1]) * multiple


def packed_batch(total: int, segments: int, *, multiple: int, vision_fraction: float = 0.4,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """A full-row batch dict: runs of text, image_pad and video_pad tokens crossing every boundary.

    ``multiple`` divides every segment length (``2*cp`` of the largest cp the batch must serve).
    ``vision_embed_count`` equals the vision tokens, so a correct simulation is consistent.
    """
    generator = torch.Generator().manual_seed(seed)
    lengths = segment_lengths(total, segments, multiple, generator)
    run = torch.cumsum(torch.rand(total, generator=generator) < 1.0 / MEAN_RUN, 0)
    runs = int(run[-1]) + 1
    run_is_vision = torch.rand(runs, generator=generator) < vision_fraction
    run_is_video = torch.rand(runs, generator=generator) < 0.3
    ids = torch.randint(TEXT_LOW, TEXT_HIGH, (total,), generator=generator)
    vision = run_is_vision[run]
    ids[vision] = torch.where(run_is_video[run][vision], VIDEO_PAD, IMAGE_PAD)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)]).to(torch.int32)
    return {"input_ids": ids.view(1, -1), "cu_seqlens": cu, "vision_embed_count": vision.sum()}
