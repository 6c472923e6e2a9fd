"""``simulate --positions``: each rank's expected mRoPE (or 1-D RoPE) positions, compactly, and the batch's checked.

The maths lives in :mod:`cpinspect.core.mrope`; this module describes it per rank (data only; the
view is :mod:`cpinspect.views.positions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cpinspect.core.batch import PackedBatch
from cpinspect.core.findings import Finding
from cpinspect.core.layout import Layout
from cpinspect.core.mrope import (
    DEFAULT_TOKENS_PER_SECOND,
    PAD_POSITION,
    mrope_positions,
)
from cpinspect.core.position_check import PositionCheck, compare_position_ids
from cpinspect.core.vision_items import VisionItems, find_vision_items
from cpinspect.simulation.run import Result


@dataclass(frozen=True)
class PieceSpan:
    """One locally held piece and the positions at its first and last token (for the view)."""

    segment: int
    chunk: int
    local_first: int
    local_last: int
    first: tuple[int, ...]  # (t, h, w) under mRoPE, (p,) under 1-D RoPE
    last: tuple[int, ...]


@dataclass(frozen=True)
class ItemSpan:
    """The part of one vision item a rank holds: how many tokens and the t/h/w ranges."""

    label: str
    segment: int
    held: int
    length: int
    low: tuple[int, ...]
    high: tuple[int, ...]


@dataclass
class RankPositions:
    """One rank's ``[3, local_T]`` (1-D RoPE: ``[1, local_T]``) positions and their compact description."""

    rank: int
    positions: torch.Tensor
    pieces: list[PieceSpan]
    items: list[ItemSpan]
    batch_status: str | None = None


class PositionsExtension:
    """``simulate --positions``: expected per-rank mRoPE positions and the check of the batch's own.

    The positions are those of the simulated full row (padded when ``--pad`` was given), sliced
    with the layout's global indices; the batch's ``position_ids``, if any, are compared as given.
    """

    def __init__(self, batch: PackedBatch, *, convention: str = "bridge",
                 tokens_per_second: int = DEFAULT_TOKENS_PER_SECOND) -> None:
        self.batch = batch
        self.convention = convention
        self.tokens_per_second = tokens_per_second
        self.ranks: list[RankPositions] = []
        self.items: VisionItems | None = None
        self.check = PositionCheck(present=False)
        self.model = ""
        self.rope = "mrope"

    @property
    def findings(self) -> list[Finding]:
        return self.check.findings

    @property
    def ok(self) -> bool:
        return not any(f.is_problem for f in self.findings)

    def run(self, result: Result) -> None:
        """Compute every rank's positions from ``result`` (a :class:`~cpinspect.simulation.run.Result`)."""
        tokens, layout = result.tokens, result.layout
        self.model, self.rope = tokens.model, tokens.rope
        logical = _logical_lengths(self.batch, bool(result.padded_tokens))
        items = find_vision_items(result.full_ids, layout.cu_seqlens, tokens,
                                  image_grid_thw=self.batch.image_grid_thw, video_grid_thw=self.batch.video_grid_thw,
                                  split_video_frames=tokens.model == "qwen3-vl", logical_lengths=logical)
        if tokens.rope == "1d":  # each token's offset inside its physical segment
            full = segment_offsets(layout.total_tokens, layout.cu_seqlens).view(1, -1)
        else:
            full = mrope_positions(layout.total_tokens, layout.cu_seqlens, items, tokens, logical_lengths=logical,
                                   second_per_grid_ts=self.batch.second_per_grid_ts,
                                   tokens_per_second=self.tokens_per_second, convention=self.convention)
        self.items = items
        token_item = items.token_item(layout.total_tokens)
        self.ranks = [_describe_rank(r.rank, r.global_indices, full, token_item, items, layout) for r in result.ranks]
        self.check = compare_position_ids(self.batch, result.cp, layout=layout.kind, tokens=tokens, plan=layout)
        for rank, status in zip(self.ranks, _rank_statuses(self.check, result.cp)):
            rank.batch_status = status

    def add_json(self, document: dict[str, Any]) -> None:
        """``ranks[r].positions`` as ``[3][local_T]``, a ``positions`` summary, and the findings."""
        by_rank = {r.rank: r for r in self.ranks}
        for entry in document["ranks"]:
            rank = by_rank[entry["rank"]]
            entry["positions"] = rank.positions.tolist()
            entry["position_ids_status"] = rank.batch_status
        items = self.items
        document["positions"] = {
            "model": self.model,
            "rope": self.rope,
            "convention": self.convention,
            "pad_position": PAD_POSITION[self.convention],
            "batch_position_ids": self.check.statuses if self.check.present else None,
            "items": [] if items is None else [
                {"item": items.label(i), "segment": s, "start": a, "length": n, "grid": g}
                for i, (s, a, n, g) in enumerate(zip(items.segment.tolist(), items.start.tolist(),
                                                     items.length.tolist(), items.grid.tolist()))
            ],
        }
        document.setdefault("findings", []).extend(f.to_dict() for f in self.findings)


def segment_offsets(total: int, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[total]`` 1-D RoPE positions: each token's offset inside its physical segment (restarted per segment)."""
    positions = torch.arange(total)
    cu = cu_seqlens.to(torch.long)
    segment = torch.searchsorted(cu[1:], positions, right=True)
    return positions - cu[segment]


def _logical_lengths(batch: PackedBatch, padded: bool) -> torch.Tensor | None:
    """Real lengths per segment: the logical boundaries, or the original ones when --pad grew them."""
    cu = batch.logical_cu_seqlens if batch.logical_cu_seqlens is not None else batch.cu_seqlens if padded else None
    return None if cu is None else (cu[1:] - cu[:-1]).to(torch.long)


def _rank_statuses(check: PositionCheck, cp: int) -> list[str | None]:
    if not check.present:
        return [None] * cp
    if len(check.statuses) == 1:  # one full-row tensor: the same verdict for every rank's slice
        return [check.statuses[0]] * cp
    return list(check.statuses)


def _describe_rank(rank: int, global_index: torch.Tensor, full: torch.Tensor, token_item: torch.Tensor,
                   items: VisionItems, layout: Layout) -> RankPositions:
    positions = full[:, global_index]
    piece_len = layout.local_piece_len(rank)
    ends = torch.cumsum(piece_len, 0)
    kept = piece_len > 0
    firsts, lasts = (ends - piece_len)[kept], (ends - 1)[kept]
    pieces_ids = layout.rank_pieces[rank][kept]
    pieces = [PieceSpan(s, c, a, b, tuple(p), tuple(q)) for s, c, a, b, p, q in zip(
        layout.piece_segment[pieces_ids].tolist(), layout.piece_chunk[pieces_ids].tolist(), firsts.tolist(),
        lasts.tolist(), positions[:, firsts].T.tolist(), positions[:, lasts].T.tolist())]
    return RankPositions(rank, positions, pieces, _held_items(positions, token_item[global_index], items))


def _held_items(positions: torch.Tensor, local_item: torch.Tensor, items: VisionItems) -> list[ItemSpan]:
    """Per item this rank holds tokens of: count and min/max position on each axis (vectorised)."""
    if not items.count:
        return []
    vision = local_item >= 0
    item, pos = local_item[vision], positions[:, vision]
    held = torch.zeros(items.count, dtype=torch.long).index_add_(0, item, torch.ones_like(item))
    axes = positions.shape[0]
    index = item.expand(axes, -1)
    low = torch.full((axes, items.count), torch.iinfo(torch.long).max).scatter_reduce(1, index, pos, "amin")
    high = torch.full((axes, items.count), -1, dtype=torch.long).scatter_reduce(1, index, pos, "amax")
    present = torch.nonzero(held).view(-1)
    return [ItemSpan(items.label(i), s, n, length, tuple(lo), tuple(hi)) for i, s, n, length, lo, hi in zip(
        present.tolist(), items.segment[present].tolist(), held[present].tolist(), items.length[present].tolist(),
        low[:, present].T.tolist(), high[:, present].T.tolist())]
