"""Compact text for long index lists: ``0-95, 288-311`` instead of 120 numbers."""

from __future__ import annotations

import torch


def to_ranges(values: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs of consecutive integers, as inclusive ``(first, last)`` pairs (vectorised)."""
    flat = values.reshape(-1).to(torch.long)
    if flat.numel() == 0:
        return []
    breaks = torch.nonzero(flat[1:] != flat[:-1] + 1).view(-1) + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long), breaks])
    ends = torch.cat([breaks - 1, torch.tensor([flat.numel() - 1])])
    return list(zip(flat[starts].tolist(), flat[ends].tolist()))


def format_ranges(values: torch.Tensor, *, limit: int | None = 8) -> str:
    """``"0-95, 288-311"``; with ``limit``, the first and last runs and how many were left out."""
    runs = to_ranges(values)
    if not runs:
        return "-"
    text = [f"{a}-{b}" if a != b else f"{a}" for a, b in runs]
    if limit is not None and len(text) > limit:
        head, tail = text[: limit - 2], text[-2:]
        return ", ".join(head) + f", ... ({len(text) - limit} more runs) ..., " + ", ".join(tail)
    return ", ".join(text)
