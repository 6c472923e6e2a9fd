"""A packed batch as cpinspect sees it (loading it is :mod:`cpinspect.core.loading`).

Two input forms exist. A *full* batch holds the whole packed row (``cu_seqlens[-1] == T``); the
tool shards it. A *pre-sharded* batch holds one local row per CP rank (``cu_seqlens[-1] ==
cp * local_T``, global physical boundaries), e.g. after miles/slime ``slice_with_cp``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from cpinspect.core.errors import InputError
from cpinspect.core.findings import Finding

PHYSICAL_CU_KEYS = ("cu_seqlens_padded", "cu_seqlens_q_padded", "cu_seqlens", "cu_seqlens_q")
PADDED_CU_KEYS = ("cu_seqlens_padded", "cu_seqlens_q_padded")
LOGICAL_CU_KEYS = ("cu_seqlens_q", "cu_seqlens")
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "input_ids": ("input_ids", "tokens"),
    "image_grid_thw": ("image_grid_thw",),
    "video_grid_thw": ("video_grid_thw",),
    "position_ids": ("position_ids",),
    "vision_mask": ("vision_mask", "visual_pos_masks"),
    "vision_embed_count": ("vision_embed_count",),
    "second_per_grid_ts": ("second_per_grid_ts",),
    "attention_mask": ("attention_mask",),
    "local_cp_size": ("local_cp_size",),  # hybrid / dynamic CP (Megatron-LM): a batch key or PackedSeqParams field
}
FIELDS = ("input_ids", "cu_seqlens", "logical_cu_seqlens", *list(FIELD_ALIASES)[1:])

BatchSource = Union[str, os.PathLike, Mapping[str, Any], Sequence[Union[str, os.PathLike, Mapping[str, Any]]]]


@dataclass(frozen=True)
class FieldInfo:
    """One entry found in a batch file: for ``cpinspect info``."""

    key: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class PackedBatch:
    """Tensors of one packed micro-batch (all on the CPU, ids as int64, never the caller's objects).

    ``rows`` holds one 1-D id row for a full batch, or one local row per rank (rank order) for a
    pre-sharded batch. ``vision_mask`` and ``position_ids`` follow the same shape convention.
    """

    rows: list[torch.Tensor]
    cu_seqlens: torch.Tensor
    logical_cu_seqlens: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    position_ids: list[torch.Tensor] | None = None
    vision_mask: list[torch.Tensor] | None = None
    vision_embed_count: int | None = None
    second_per_grid_ts: torch.Tensor | None = None
    # hybrid / dynamic CP: one local CP size for the micro-batch ([1]) or one per segment ([S])
    local_cp_size: torch.Tensor | None = None
    source: str = "<dict>"
    keys: dict[str, str] = field(default_factory=dict)
    found: list[list[FieldInfo]] = field(default_factory=list)
    # per row: tensors under keys cpinspect does not map to a field (e.g. vision_dp_ranks,
    # deepstack_rows), kept for the pipeline checks that know those names
    extra: list[dict[str, torch.Tensor]] = field(default_factory=list)
    # the input form as the source held it (``cpinspect info`` names it) and what loading did or noticed
    # (PACKED_FROM_PADDED, PACKED_FROM_POSITION_IDS, small id dtypes), for the views to print
    form: str = ""
    containers: dict[str, str] = field(default_factory=dict)
    notes: list[Finding] = field(default_factory=list)

    @property
    def per_rank_files(self) -> bool:
        """True when the batch came as several per-rank rows (a directory or a list of files)."""
        return len(self.rows) > 1

    @property
    def row_tokens(self) -> int:
        return self.rows[0].numel()

    @property
    def num_segments(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def total_tokens(self) -> int:
        """``cu_seqlens[-1]``: the tokens of the whole packed row."""
        return int(self.cu_seqlens[-1])

    @property
    def is_full(self) -> bool:
        """One row holding the whole packed row (``cu_seqlens[-1] == T``)."""
        return not self.per_rank_files and self.total_tokens == self.row_tokens

    def form_for(self, cp: int) -> str:
        """``"full"``, ``"presharded"`` or ``"neither"`` for ``cp``, by the upstream length rule.

        This is the one input-form rule of cpinspect: a model decides the same way (pre-sharded
        when ``cu_seqlens[-1] == cp * local_T``).
        """
        if self.is_full:
            return "full"
        if self.total_tokens == cp * self.row_tokens:
            return "presharded"
        return "neither"

    def cut_for(self) -> int | None:
        """The cp the rows were cut for, when the batch says it: the number of rank files, or for one
        row :func:`row_cut_for`; None for a full row (or a length that fits no cp)."""
        if self.per_rank_files:
            return len(self.rows)
        return row_cut_for(self.total_tokens, self.row_tokens)


def row_cut_for(total: int, row_tokens: int) -> int | None:
    """``total / row_tokens`` when one local row of ``row_tokens`` is a whole share (> 1) of ``total``."""
    if row_tokens and total % row_tokens == 0 and total > row_tokens:
        return total // row_tokens
    return None


def check_grid_merge(grid: torch.Tensor | None, key: str, merge: int, *, where: str | None = None) -> None:
    """Raise when an item's h or w is not a multiple of the spatial merge size (no whole token count)."""
    if grid is None or grid.numel() == 0:
        return
    bad = torch.nonzero((grid[:, 1:] % merge).any(dim=1)).view(-1)
    if bad.numel():
        row = int(bad[0])
        raise InputError(
            f"{key} row {row} is {grid[row].tolist()}: h and w must be multiples of the spatial merge size "
            f"{merge} ({merge}x{merge} patches become one token), so t·h·w/{merge * merge} is not whole",
            where=f"{where or key}, row {row}",
            fix="store the grid the processor returned (in patches, before merging); for Qwen-VL h and w are even",
        )
