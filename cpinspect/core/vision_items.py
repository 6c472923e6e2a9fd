"""Vision items of a packed Qwen-VL row: placeholder runs matched to their grids, in token order.

Grids are consumed in order over the whole row (across segments), as upstream does; a Qwen3-VL video
becomes one item per temporal patch. Shared by the mRoPE positions and the vision-DP split, which
both need to know where each image or video sits and how many tokens it has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cpinspect.core.batch import PackedBatch, check_grid_merge
from cpinspect.core.errors import InputError
from cpinspect.core.runs import exclusive_cumsum, expand_runs
from cpinspect.core.tokens import TokenConfig

IMAGE, VIDEO = 0, 1

@dataclass(frozen=True)
class VisionItems:
    """Vision items of a full row in natural (token) order; all tensors ``[N]`` (``grid`` ``[N, 3]``).

    ``kind`` is 0 for an image, 1 for a video (or one temporal patch of a split Qwen3-VL video);
    ``source`` is the row of ``image_grid_thw``/``video_grid_thw`` it came from and ``frame`` the
    temporal patch of a split video. ``grid`` is in patches as the encoder sees the item.
    """

    kind: torch.Tensor
    source: torch.Tensor
    frame: torch.Tensor
    grid: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor
    segment: torch.Tensor
    split_frames: bool = False

    @property
    def count(self) -> int:
        return self.kind.numel()

    @property
    def patches(self) -> torch.Tensor:
        """``[N]`` encoder patches per item (``t*h*w``)."""
        return self.grid.prod(dim=1)

    def label(self, item: int) -> str:
        """``image 0``, ``video 1`` or ``video 1 frame 2`` for people."""
        return self.labels()[item]

    def labels(self) -> list[str]:
        """Every item's label, in natural order (built once: views ask for many)."""
        cached: list[str] | None = self.__dict__.get("_labels")
        if cached is None:
            cached = [
                f"{'image' if kind == IMAGE else 'video'} {source}"
                + (f" frame {frame}" if self.split_frames and kind == VIDEO else "")
                for kind, source, frame in zip(self.kind.tolist(), self.source.tolist(), self.frame.tolist())
            ]
            object.__setattr__(self, "_labels", cached)
        return cached

    def token_item(self, total_tokens: int) -> torch.Tensor:
        """``[T]`` item index of every token of the full row, -1 for text."""
        owner = torch.full((total_tokens,), -1, dtype=torch.long)
        if self.count:
            owner[expand_runs(self.start, self.length)] = torch.repeat_interleave(torch.arange(self.count), self.length)
        return owner


def placeholder_mask(ids: torch.Tensor, tokens: TokenConfig) -> torch.Tensor:
    """Placeholders of an id row: the image or video pad token, and the audio pad token for the Omni
    presets (the one mask rule)."""
    mask = (ids == tokens.image_token_id) | (ids == tokens.video_token_id)
    return mask | (ids == tokens.audio_token_id) if tokens.audio_token_id is not None else mask


def embedding_rows(grids: Sequence[torch.Tensor | None], merge_area: int) -> int:
    """Rows the vision encoder yields for these grids: sum of ``t*h*w / merge**2`` (the one row rule)."""
    return int(sum(int((g.prod(dim=1) // merge_area).sum()) for g in grids if g is not None))


def batch_embedding_rows(batch: PackedBatch, full_mask: torch.Tensor, merge_area: int, audio: int = 0) -> int:
    """Rows a batch's encoders produced: its ``vision_embed_count`` (the vision encoder's), else its grids' rows,
    either plus ``audio``, the audio encoder's rows (:attr:`cpinspect.core.audio_items.AudioItems.total_rows`:
    from the batch's audio feature lengths, else one per audio placeholder); else one per placeholder."""
    if batch.vision_embed_count is not None:
        return batch.vision_embed_count + audio
    grids = [g for g in (batch.image_grid_thw, batch.video_grid_thw) if g is not None]
    return embedding_rows(grids, merge_area) + audio if grids else int(full_mask.sum())


def _grid(grid: torch.Tensor | None) -> torch.Tensor:
    return torch.zeros(0, 3, dtype=torch.long) if grid is None else grid.reshape(-1, 3).to(torch.long)


def find_vision_items(
    ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    tokens: TokenConfig,
    *,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    split_video_frames: bool,
    logical_lengths: torch.Tensor | None = None,
) -> VisionItems:
    """Match the placeholder runs of ``ids`` to the grids, in order, and check they agree.

    Grids are consumed in order over the whole row (across segments), as upstream does. Raises
    :class:`InputError` when the placeholders and grids disagree, an item is not one contiguous
    run, or an item crosses a segment boundary or sits in a segment's padding.
    """
    image_grid, video_grid = _grid(image_grid_thw), _grid(video_grid_thw)
    check_grid_merge(image_grid, "image_grid_thw", tokens.spatial_merge_size)
    check_grid_merge(video_grid, "video_grid_thw", tokens.spatial_merge_size)
    image = _place(ids, image_grid, tokens.image_token_id, "image", "image_grid_thw", tokens)
    video_grid_items, video_source, video_frame = _video_items(video_grid, split_video_frames)
    video = _place(ids, video_grid_items, tokens.video_token_id, "video", "video_grid_thw", tokens)
    kind = torch.cat([torch.full((image_grid.shape[0],), IMAGE), torch.full((video_grid_items.shape[0],), VIDEO)])
    source = torch.cat([torch.arange(image_grid.shape[0]), video_source]).to(torch.long)
    frame = torch.cat([torch.zeros(image_grid.shape[0], dtype=torch.long), video_frame])
    grid = torch.cat([image_grid, video_grid_items])
    start = torch.cat([image[0], video[0]])
    length = torch.cat([image[1], video[1]])
    order = torch.argsort(start)
    items = VisionItems(kind[order], source[order], frame[order], grid[order], start[order], length[order],
                        torch.zeros(0, dtype=torch.long), split_video_frames)
    segment = _check_segments(items, cu_seqlens, logical_lengths)
    return VisionItems(items.kind, items.source, items.frame, items.grid, items.start, items.length, segment,
                       split_video_frames)


def _video_items(grid: torch.Tensor, split_frames: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Video grids as items: one per video, or (Qwen3-VL) one ``[1, h, w]`` per temporal patch."""
    count = grid.shape[0]
    if not split_frames:
        return grid, torch.arange(count), torch.zeros(count, dtype=torch.long)
    frames = grid[:, 0]
    source = torch.repeat_interleave(torch.arange(count), frames)
    frame = torch.arange(source.numel()) - torch.repeat_interleave(exclusive_cumsum(frames), frames)
    per_frame = grid[source].clone()
    per_frame[:, 0] = 1
    return per_frame, source, frame


def _place(ids: torch.Tensor, grid: torch.Tensor, token_id: int, kind: str, key: str,
           tokens: TokenConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """First token and length of every item of one kind: its placeholders consumed in grid order."""
    positions = torch.nonzero(ids == token_id).view(-1)
    lengths = grid.prod(dim=1) // tokens.merge_area
    expected = int(lengths.sum())
    if positions.numel() != expected:
        raise InputError(
            f"the row has {positions.numel()} {kind} placeholder tokens (id {token_id}) but {key} "
            f"({grid.shape[0]} item(s)) accounts for {expected} = sum(t*h*w) / {tokens.merge_area}",
            where=key,
            fix=f"pass the {key} of exactly this row (a truncated vision span or a missing grid row is the usual "
            "cause), or the right --model / --image-token-id / --video-token-id",
        )
    if not lengths.numel():
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    first = exclusive_cumsum(lengths)
    start, last = positions[first], positions[first + lengths - 1]
    broken = torch.nonzero(last - start + 1 != lengths).view(-1)
    if broken.numel():
        item = int(broken[0])
        raise InputError(
            f"{kind} item {item} (grid {grid[item].tolist()}, {int(lengths[item])} tokens) is not one contiguous run: "
            f"its placeholders span tokens {int(start[item])}..{int(last[item])}",
            where=f"{key}, item {item}, tokens {int(start[item])}..{int(last[item])}",
            fix="the grids must match the placeholder runs in order (one run per item; one per temporal patch "
            "for Qwen3-VL videos): check the --model preset and the grid order",
        )
    return start, lengths


def _check_segments(items: VisionItems, cu: torch.Tensor, logical_lengths: torch.Tensor | None) -> torch.Tensor:
    if not items.count:
        return torch.zeros(0, dtype=torch.long)
    first_seg = torch.searchsorted(cu[1:], items.start, right=True)
    last_seg = torch.searchsorted(cu[1:], items.start + items.length - 1, right=True)
    crossing = torch.nonzero(first_seg != last_seg).view(-1)
    if crossing.numel():
        item = int(crossing[0])
        raise InputError(
            f"{items.label(item)} (tokens {int(items.start[item])}..{int(items.start[item] + items.length[item] - 1)})"
            f" crosses the boundary between segments {int(first_seg[item])} and {int(last_seg[item])}",
            where=f"segment {int(first_seg[item])}, {items.label(item)}",
            fix="a packed segment must hold whole vision items: check cu_seqlens and truncation",
        )
    if logical_lengths is not None:
        logical_end = cu[:-1][first_seg] + logical_lengths[first_seg]
        padded = torch.nonzero(items.start + items.length > logical_end).view(-1)
        if padded.numel():
            item = int(padded[0])
            raise InputError(
                f"{items.label(item)} reaches into the padding of segment {int(first_seg[item])} (logical end "
                f"{int(logical_end[item])})",
                where=f"segment {int(first_seg[item])}, {items.label(item)}",
                fix="the logical cu_seqlens must cover every vision token: are the logical and padded keys swapped?",
            )
    return first_seg


@dataclass(frozen=True)
class VisionItem:
    """One image, video (Qwen3-VL: video frame) or grid-less run of vision tokens, for people.

    From the grids alone (:func:`expected_items`) it knows ``grid``/``frame`` and how many
    placeholders it promises; found in a row (:func:`row_items`) it also knows where its tokens
    are and which natural-order embedding rows it owns.
    """

    kind: str  # "image", "video" or "vision run" (a run no grid accounts for)
    index: int
    tokens: int
    grid: tuple[int, int, int] | None = None
    frame: int | None = None
    first_token: int = -1  # -1: known from the grids alone, not found in a row
    last_token: int = -1
    first_row: int = -1

    @property
    def name(self) -> str:
        return f"{self.kind} {self.index}"

    @property
    def end_row(self) -> int:
        return self.first_row + self.tokens

    def describe(self) -> str:
        t, h, w = self.grid or (0, 0, 0)
        frame = f" frame {self.frame} of {t}" if self.frame is not None else ""
        return f"{self.kind} {self.index}{frame} (grid [{t}, {h}, {w}])"

    def arithmetic(self, merge_area: int) -> str:
        t, h, w = self.grid or (0, 0, 0)
        if self.frame is not None:
            return f"{h}·{w}/{merge_area} = {self.tokens}"
        return f"{t}·{h}·{w}/{merge_area} = {self.tokens}"


def expected_items(grid: torch.Tensor | None, kind: str, tokens: TokenConfig) -> list[VisionItem]:
    """The placeholder runs ``grid`` promises, in order (Qwen3-VL: one run per video frame)."""
    if grid is None or grid.numel() == 0:
        return []
    merge = tokens.merge_area
    items: list[VisionItem] = []
    for index, (t, h, w) in enumerate(tuple(int(v) for v in row) for row in grid.tolist()):
        if kind == "video" and tokens.model == "qwen3-vl":
            items.extend(VisionItem(kind, index, h * w // merge, (t, h, w), frame) for frame in range(t))
        else:
            items.append(VisionItem(kind, index, t * h * w // merge, (t, h, w)))
    return items


def _item_ordinals(kind_mask: torch.Tensor, grid: torch.Tensor | None, merge_area: int,
                   runs: torch.Tensor) -> torch.Tensor:
    """Item number of each vision token of one kind: by the grids when they account for every
    token (grid row k owns the next t*h*w/merge tokens), otherwise by maximal runs."""
    count = int(kind_mask.sum())
    if grid is not None and grid.numel() and int((grid.prod(dim=1) // merge_area).sum()) == count:
        ends = torch.cumsum(grid.prod(dim=1) // merge_area, 0)
        return torch.searchsorted(ends, torch.arange(count), right=True)
    held = runs[kind_mask]
    return torch.unique(held, return_inverse=True)[1] if held.numel() else held


def row_items(full_ids: torch.Tensor, full_mask: torch.Tensor, cu_seqlens: torch.Tensor, *,
              image_token_id: int, video_token_id: int, image_grid: torch.Tensor | None = None,
              video_grid: torch.Tensor | None = None, merge_area: int = 4) -> list[VisionItem]:
    """Images, videos and other vision runs of the full row, in natural order (grids optional:
    where they do not account for a kind's tokens, each maximal run is one item)."""
    positions = torch.nonzero(full_mask).view(-1)
    if positions.numel() == 0:
        return []
    ids = full_ids[positions]
    kind = torch.where(ids == image_token_id, 0, torch.where(ids == video_token_id, 1, 2))
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[1:] = (positions[1:] != positions[:-1] + 1) | (kind[1:] != kind[:-1])
    starts |= torch.isin(positions, cu_seqlens)
    runs = torch.cumsum(starts.to(torch.long), 0) - 1
    item = torch.zeros_like(positions)
    for code, grid in ((0, image_grid), (1, video_grid), (2, None)):
        mask = kind == code
        if bool(mask.any()):
            item[mask] = _item_ordinals(mask, grid, merge_area, runs)
    key = kind * (positions.numel() + 1) + item
    unique, inverse = torch.unique(key, return_inverse=True)
    rows = torch.arange(positions.numel())
    first = torch.full((unique.numel(),), positions.numel(), dtype=torch.long).scatter_reduce(0, inverse, rows, "amin")
    last = torch.zeros(unique.numel(), dtype=torch.long).scatter_reduce(0, inverse, rows, "amax")
    order = torch.argsort(first)
    names = ("image", "video", "vision run")
    stride = positions.numel() + 1
    columns = (unique[order], positions[first[order]], positions[last[order]], first[order], last[order] + 1)
    return [
        VisionItem(names[key // stride], key % stride, end_row - first_row, first_token=first_token,
                   last_token=last_token, first_row=first_row)
        for key, first_token, last_token, first_row, end_row in zip(*(c.tolist() for c in columns))
    ]
