"""Audio items of a packed Qwen-Omni row: their placeholders, their mel-frame lengths, the rows each yields.

A batch carries the lengths as the Omni models' ``get_audio_features`` takes them:
``audio_feature_lengths`` (``[N]``, one per audio item) or ``feature_attention_mask`` (``[N, frames]``,
summed over the frames). The rows an item yields are :func:`cpinspect.core.tokens.audio_tokens` of its
length under the model's rule. In the row, an item's placeholders are the audio pad tokens after one
``audio_start`` token (an audio track interleaved with its video, ``use_audio_in_video``, stays one
item); a row without start tokens has one item per maximal run of audio pads in a segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cpinspect.core.batch import PackedBatch
from cpinspect.core.errors import InputError
from cpinspect.core.tokens import TokenConfig, audio_tokens
from cpinspect.core.vision_items import embedding_rows

AUDIO_LENGTH_KEYS = ("audio_feature_lengths", "feature_attention_mask")
AUDIO_RULES = ("qwen2.5-omni", "qwen3-omni")  # the models whose per-item rule cpinspect knows


@dataclass(frozen=True)
class AudioItems:
    """The audio items of a full row, in token order, and the batch's lengths for them (if it has any).

    ``placeholders``, ``first_token`` and ``segment`` describe the spans found in the row; ``lengths``
    are the mel frames per item from ``key`` (None when the batch carries none), in the order the
    encoder takes them.
    """

    model: str
    placeholders: list[int]
    first_token: list[int]
    segment: list[int]
    lengths: list[int] | None = None
    key: str | None = None

    @property
    def count(self) -> int:
        return len(self.placeholders)

    @property
    def total_placeholders(self) -> int:
        return sum(self.placeholders)

    def rows(self, model: str | None = None) -> list[int] | None:
        """Rows per item under ``model``'s rule (default: the batch's model), or None without lengths."""
        if self.lengths is None:
            return None
        return [audio_tokens(model or self.model, length) for length in self.lengths]

    @property
    def total_rows(self) -> int:
        """Rows the audio encoder yields: Σ rule(length), or one per placeholder without lengths."""
        rows = self.rows()
        return sum(rows) if rows is not None else self.total_placeholders

    @property
    def per_item(self) -> bool:
        """True when the row has exactly one span per length (items can be compared one by one)."""
        return self.lengths is not None and len(self.lengths) == self.count


def audio_lengths(batch: PackedBatch) -> tuple[list[int], str] | None:
    """Mel-frame length of every audio item the batch carries, and the key it came from (None if absent)."""
    for extra in batch.extra:
        for name in AUDIO_LENGTH_KEYS:
            key = next((k for k in extra if k == name or k.endswith("." + name)), None)
            if key is not None:
                return _as_lengths(extra[key], name, f"{batch.source}, key {key}"), key
    return None


def _as_lengths(value: torch.Tensor, name: str, where: str) -> list[int]:
    if value.is_floating_point() or value.is_complex():
        raise InputError(f"{name} has dtype {value.dtype}, but it must hold integers (frames or a 0/1 mask)",
                         where=where, fix=f"save {name} as the processor returns it (an integer tensor)")
    if name == "feature_attention_mask":
        if value.dim() != 2 or bool(((value != 0) & (value != 1)).any()):
            raise InputError(f"feature_attention_mask must be a [num_audios, frames] tensor of 0/1, got shape "
                             f"{list(value.shape)}", where=where,
                             fix="save the processor's feature_attention_mask unchanged (one row per audio item)")
        return value.to(torch.long).sum(dim=-1).tolist()
    if value.dim() > 1 or bool((value < 0).any()):
        raise InputError(f"audio_feature_lengths must be a 1-D tensor of non-negative frame counts, got shape "
                         f"{list(value.shape)}", where=where, fix="save one mel-frame length per audio item")
    return value.reshape(-1).to(torch.long).tolist()


def find_audio_items(ids: torch.Tensor, cu: torch.Tensor, tokens: TokenConfig,
                     batch: PackedBatch | None = None) -> AudioItems | None:
    """The audio spans of the full row ``ids`` (and the batch's lengths), or None for a model without audio."""
    if tokens.audio_token_id is None:
        return None
    found = audio_lengths(batch) if batch is not None else None
    lengths, key = found if found is not None else (None, None)
    positions = torch.nonzero(ids == tokens.audio_token_id).view(-1)
    if not positions.numel():
        return AudioItems(tokens.model, [], [], [], lengths, key)
    segment = torch.searchsorted(cu[1:].to(torch.long), positions, right=True)
    if tokens.audio_start_token_id is not None and bool((ids == tokens.audio_start_token_id).any()):
        opened = torch.cumsum((ids == tokens.audio_start_token_id).long(), 0)[positions]
    else:  # no start tokens: every maximal run of audio pads is an item
        breaks = (positions[1:] != positions[:-1] + 1).long()
        opened = torch.cumsum(torch.cat([torch.ones(1, dtype=torch.long), breaks]), 0)
    new = torch.ones(positions.numel(), dtype=torch.bool)
    new[1:] = (opened[1:] != opened[:-1]) | (segment[1:] != segment[:-1])
    item = torch.cumsum(new.long(), 0) - 1
    counts = torch.bincount(item).tolist()
    starts = torch.nonzero(new).view(-1)
    return AudioItems(tokens.model, counts, positions[starts].tolist(), segment[starts].tolist(), lengths, key)


def counted_together(placeholders: list[int], lengths: list[int], model: str) -> list[tuple[int, int]] | None:
    """Consecutive groups of items ``[(first, end), ...]``, one per span, whose lengths *added up* give each
    span's placeholders under ``model``'s rule, with at least one group of several items; None if none does.

    This is what a count made once per row (the row's summed frames) instead of once per item leaves.
    """
    spans, items = len(placeholders), len(lengths)
    if not spans or spans >= items:
        return None
    prefix = [0]
    for length in lengths:
        prefix.append(prefix[-1] + length)
    reach: list[dict[int, int]] = [{0: -1}] + [{} for _ in range(spans)]  # reach[j][i]: j spans cover items < i
    for j in range(spans):
        for start in reach[j]:
            for end in range(start + 1, items - (spans - j - 1) + 1):
                if end not in reach[j + 1] and audio_tokens(model, prefix[end] - prefix[start]) == placeholders[j]:
                    reach[j + 1][end] = start
    if items not in reach[spans]:
        return None
    groups, end = [], items
    for j in range(spans, 0, -1):
        start = reach[j][end]
        groups.append((start, end))
        end = start
    return groups[::-1]


def modality_rows(batch: PackedBatch, ids: torch.Tensor, tokens: TokenConfig,
                  audio: AudioItems | None) -> dict[str, int]:
    """Encoder rows per modality for the whole row: grids' Σ t·h·w/merge² per kind (one per placeholder
    without grids) and, for the Omni presets, the audio rows (:attr:`AudioItems.total_rows`)."""
    out = {}
    for kind, grid, token_id in (("image", batch.image_grid_thw, tokens.image_token_id),
                                 ("video", batch.video_grid_thw, tokens.video_token_id)):
        out[kind] = embedding_rows([grid], tokens.merge_area) if grid is not None else int((ids == token_id).sum())
    if audio is not None:
        out["audio"] = audio.total_rows
    return out
