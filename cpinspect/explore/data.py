"""The JSON document an explorer page embeds: the setting, the batch's vision spans, the CLI's numbers.

Index lists go in as inclusive ``[first, last]`` runs (:func:`cpinspect.core.ranges.to_ranges`),
so a million-token batch costs a few runs per segment rather than a million numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cpinspect.core.layout import LAYOUTS
from cpinspect.core.ranges import to_ranges
from cpinspect.simulation.run import Result

DETAIL_TOKENS = 2048  # token cells the page draws per view; a longer row is drawn a range at a time
MAX_LISTED_SEGMENTS = 256  # the layout JSON's per-chunk listing is embedded up to this many segments


KINDS = ("image", "video", "audio")  # span kinds, in the page's order (model.js: kind 1, 2, 3)


def vision_spans(result: Result) -> list[list[Any]]:
    """``[segment, start in segment, length, "image"|"video"|"audio"]`` for every run of placeholder tokens.

    Runs are cut at segment boundaries and where the kind changes; offsets are relative to the
    segment, so they stay put when segments are padded.
    """
    mask = result.full_mask
    cu = result.layout.cu_seqlens
    if not int(mask.sum()):
        return []
    ids = result.full_ids if result.full_ids.numel() == mask.numel() else torch.full_like(mask, -1, dtype=torch.long)
    audio_id = result.tokens.audio_token_id
    code = mask.long() * (1 + (ids == result.tokens.video_token_id).long()
                          + 2 * (ids == (audio_id if audio_id is not None else -2)).long())
    boundary = torch.zeros(mask.numel() + 1, dtype=torch.bool)
    boundary[cu[cu <= mask.numel()]] = True
    padded = torch.cat([torch.zeros(1, dtype=torch.long), code, torch.zeros(1, dtype=torch.long)])
    change = (padded[1:] != padded[:-1]) | boundary
    starts = torch.nonzero(change[:-1] & (code != 0)).view(-1)
    ends = torch.nonzero(change[1:] & (code != 0)).view(-1) + 1
    segment = torch.searchsorted(cu, starts, right=True) - 1
    kinds = code[starts]
    return [[s, a - int(cu[s]), e - a, KINDS[k - 1]]
            for s, a, e, k in zip(segment.tolist(), starts.tolist(), ends.tolist(), kinds.tolist())]


def _runs(values: torch.Tensor) -> list[list[int]]:
    return [list(pair) for pair in to_ranges(values)]


def cli_digest(result: Result, layout_json: dict[str, Any]) -> dict[str, Any]:
    """``simulate --json`` and ``layout --json`` for this setting, with index lists as runs."""
    document = result.document()
    ranks = [{
        "rank": entry["rank"],
        "global_indices": _runs(entry["global_indices"]),
        "vision_positions": _runs(entry["vision_positions"]),
        "local_counts": entry["local_counts"],
        "selected_rows": _runs(entry["selected_rows"]),
    } for entry in document["ranks"]]
    simulate = {key: document[key] for key in ("cp", "layout", "tokens", "segments", "vision_tokens",
                                               "vision_embed_count", "gathered_counts", "ok")}
    simulate["ranks"] = ranks
    layout = {"cp": layout_json["cp"], "layout": layout_json["layout"], "balance": layout_json["balance"]}
    if len(layout_json["segments"]) <= MAX_LISTED_SEGMENTS:
        layout["segments"] = layout_json["segments"]
    return {"simulate": simulate, "layout": layout}


def page_data(result: Result, *, seqlens: Sequence[int], pad: bool, layout_json: dict[str, Any],
              naive: Sequence[str | None], commands: Sequence[str], palette: Sequence[tuple[str, str]],
              letters: str, start: int = 0) -> dict[str, Any]:
    """Everything the page needs: palette, layouts, the initial setting and the CLI's numbers for it.

    ``seqlens`` are the physical segment lengths before any ``--pad``; ``naive`` is PyTorch's
    message for the naive scatter on each rank (None where it fits); ``start`` is the first
    token drawn when the row is longer than :data:`DETAIL_TOKENS`.
    """
    setting = {"cp": result.cp, "layout": result.layout.kind, "pad": pad, "seqlens": list(seqlens),
               "spans": vision_spans(result)}
    return {
        "version": 1,
        "palette": [list(pair) for pair in palette],
        "letters": letters,
        "layouts": list(LAYOUTS),
        "detail_tokens": DETAIL_TOKENS,
        "start": start,
        "initial": setting,
        "vision_embed_count": result.vision_embed_count,
        "cli": {"setting": setting, "commands": list(commands), "naive": list(naive),
                **cli_digest(result, layout_json)},
    }
