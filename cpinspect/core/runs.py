"""Runs of token positions: the one place that expands ``(start, length)`` runs and finds them in a mask.

A layout's pieces, a vision item's tokens and an encoder's rows are all runs; so are the maximal
stretches of placeholders in a row, which never cross a segment boundary in a packed row.
"""

from __future__ import annotations

import torch


def exclusive_cumsum(values: torch.Tensor) -> torch.Tensor:
    """``[0, v0, v0+v1, ...]`` without the total: where each run starts when runs are laid end to end."""
    return torch.cumsum(values, 0) - values


def expand_runs(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenated ``arange(start, start + length)`` of every run, without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.repeat_interleave(starts - exclusive_cumsum(lengths), lengths, output_size=total) + torch.arange(total)


def mask_runs(mask: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and length of every maximal run of True in ``mask``, split at the segment boundaries of
    ``cu_seqlens`` when given (a packed row's runs never cross one)."""
    n = mask.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    boundary = torch.zeros(n + 1, dtype=torch.bool)
    boundary[0] = boundary[n] = True
    if cu_seqlens is not None:
        boundary[cu_seqlens.clamp(max=n)] = True
    previous = torch.cat([torch.zeros(1, dtype=torch.bool), mask[:-1]])
    following = torch.cat([mask[1:], torch.zeros(1, dtype=torch.bool)])
    starts = torch.nonzero(mask & (~previous | boundary[:-1])).view(-1)
    stops = torch.nonzero(mask & (~following | boundary[1:])).view(-1) + 1
    return starts, stops - starts
