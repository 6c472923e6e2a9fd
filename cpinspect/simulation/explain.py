"""``simulate --explain``: the one computation the narration needs beyond the simulation's own numbers.

The narration itself is :mod:`cpinspect.views.explain`.
"""

from __future__ import annotations

import torch

STAND_IN_HIDDEN = 4


def naive_scatter_message(local_mask: torch.Tensor, all_rows: int) -> str | None:
    """PyTorch's own error for ``combined[vision_mask] = vision_embeds`` with every row, or None if it fits.

    Runs the real masked assignment on a ``[1, local_tokens, 4]`` stand-in (the hidden size does
    not change the message's shape, only its last number).
    """
    combined = torch.zeros(1, local_mask.numel(), STAND_IN_HIDDEN, dtype=torch.int8)
    embeds = torch.zeros(all_rows, STAND_IN_HIDDEN, dtype=torch.int8)
    try:
        combined[local_mask.view(1, -1)] = embeds
    except RuntimeError as exc:
        return f"RuntimeError: {exc}"
    return None
