"""3-D mRoPE position ids (t, h, w) of a packed Qwen-VL row, per physical segment, per CP rank.

Why this matters under CP: the positions must restart at every packed segment (a segment is one
sample) and each rank must hold exactly the positions of the tokens it holds, i.e. the full row's
positions sliced with the layout's own global indices. Computing them over the whole row (miles
#1272), slicing them contiguously or on the wrong dim (Automodel #1482), or not slicing them at all
shifts every later image silently.

Rules (re-derived from ``get_rope_index`` of Qwen2-VL, Qwen2.5-VL and Qwen3-VL): text tokens count
up by one on all three axes; a vision item with grid ``(t, h, w)`` (patches; ``h, w`` divided by
the spatial merge size) gets ``start + (t_index, h_index, w_index)`` where ``start`` is the next
text position; image/video grids are consumed in order across segments; Qwen3-VL splits every
video into one item per temporal patch; Qwen2.5-VL spaces video ``t_index`` by
``second_per_grid_t * tokens_per_second``. Two upstream conventions differ in details:

* ``"bridge"`` (transformers < 5, vendored by Megatron-Bridge ``rope.py``, miles, verl): after an
  item text continues one past the item's largest position on any axis; Qwen2.5-VL truncates
  ``second_per_grid_t`` to an integer before scaling and gives images ``t_index`` 0; padding gets 1.
* ``"transformers"`` (transformers >= 5): after an item text continues ``max(h, w)`` further;
  Qwen2.5-VL scales by the exact ``second_per_grid_t``; padding gets 0.

For Qwen3-VL (every item has ``t == 1``) the two agree except for the padding value.
Everything is vectorised over tokens and items: no Python loop per token or per segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from cpinspect.batch import PackedBatch, check_grid_merge
from cpinspect.errors import InputError
from cpinspect.findings import Finding
from cpinspect.layout import LAYOUTS, Layout, make_layout
from cpinspect.tokens import TokenConfig, token_config

CONVENTIONS = ("bridge", "transformers")
PAD_POSITION = {"bridge": 1, "transformers": 0}
DEFAULT_TOKENS_PER_SECOND = 2  # vision_config.tokens_per_second of the released Qwen2.5-VL checkpoints
IMAGE, VIDEO = 0, 1


# --------------------------------------------------------------------------- vision items


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
            owner[_expand(self.start, self.length)] = torch.repeat_interleave(torch.arange(self.count), self.length)
        return owner


def _exclusive_cumsum(values: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(values, 0) - values


def _expand(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenated ``arange(start, start+len)`` of every run, without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.long)
    offsets = _exclusive_cumsum(lengths)
    return torch.repeat_interleave(starts - offsets, lengths, output_size=total) + torch.arange(total)


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
    frame = torch.arange(source.numel()) - torch.repeat_interleave(_exclusive_cumsum(frames), frames)
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
    first = _exclusive_cumsum(lengths)
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


# --------------------------------------------------------------------------- positions


def _time_interval(items: VisionItems, model: str, convention: str, second_per_grid_ts: torch.Tensor | None,
                   tokens_per_second: int) -> torch.Tensor:
    """``[N]`` spacing of ``t_index`` per item (int64, or float for exact Qwen2.5-VL seconds)."""
    ones = torch.ones(items.count, dtype=torch.long)
    if model != "qwen2.5-vl":
        return ones
    is_video = items.kind == VIDEO
    if second_per_grid_ts is None:
        seconds: torch.Tensor = torch.ones(items.count, dtype=torch.long)
    else:
        seconds = second_per_grid_ts.reshape(-1)
        missing = int(items.source[is_video].max()) + 1 if bool(is_video.any()) else 0
        if seconds.numel() < missing:
            raise InputError(
                f"second_per_grid_ts has {seconds.numel()} entries but the row has {missing} video(s)",
                where="second_per_grid_ts",
                fix="store one seconds-per-temporal-patch value per video",
            )
        seconds = seconds[items.source.clamp(max=max(seconds.numel() - 1, 0))] if seconds.numel() else ones
    if convention == "bridge":  # torch.as_tensor(second_per_grid_t, dtype=int64) truncates first
        video = seconds.to(torch.long) * tokens_per_second
        return torch.where(is_video, video, torch.zeros_like(video))
    video = tokens_per_second * seconds
    return torch.where(is_video, video, torch.ones_like(video))


def mrope_positions(
    total_tokens: int,
    cu_seqlens: torch.Tensor,
    items: VisionItems,
    tokens: TokenConfig,
    *,
    logical_lengths: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    tokens_per_second: int = DEFAULT_TOKENS_PER_SECOND,
    convention: str = "bridge",
) -> torch.Tensor:
    """``[3, T]`` (t, h, w) positions of the full row, restarting at every physical segment.

    Text position of token ``p`` = its offset in the segment minus, for every earlier item of the
    segment, the tokens that item saved (``length - advance``): one cumulative sum over the row.
    Vision tokens add their grid index to the text position of their item's first token.
    Tokens past a segment's logical length are padding and get :data:`PAD_POSITION`.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; use one of {CONVENTIONS}")
    cu = cu_seqlens.to(torch.long)
    merge = tokens.spatial_merge_size
    llm_t, llm_h, llm_w = items.grid[:, 0], items.grid[:, 1] // merge, items.grid[:, 2] // merge
    interval = _time_interval(items, tokens.model, convention, second_per_grid_ts, tokens_per_second)
    if convention == "bridge":
        last_t = ((llm_t - 1) * interval).long()
        advance = torch.maximum(torch.maximum(last_t, llm_h - 1), llm_w - 1) + 1
    else:
        advance = torch.maximum(llm_h, llm_w)
    saved = torch.zeros(total_tokens + 1, dtype=torch.long)
    saved.index_add_(0, items.start + items.length, items.length - advance)
    saved_before = torch.cumsum(saved, 0)
    seg_len = cu[1:] - cu[:-1]
    segment = torch.repeat_interleave(torch.arange(seg_len.numel()), seg_len, output_size=total_tokens)
    seg_start = cu[:-1][segment]
    offset = torch.arange(total_tokens) - seg_start
    text = offset - (saved_before[:total_tokens] - saved_before[seg_start])
    positions = text.expand(3, total_tokens).clone()
    if items.count:
        item = torch.repeat_interleave(torch.arange(items.count), items.length)
        ordinal = torch.arange(item.numel()) - _exclusive_cumsum(items.length)[item]
        plane = (llm_h * llm_w)[item]
        t_index = ((ordinal // plane) * interval[item]).long()
        h_index = (ordinal // llm_w[item]) % llm_h[item]
        w_index = ordinal % llm_w[item]
        where = items.start[item] + ordinal
        positions[:, where] = text[items.start][item] + torch.stack([t_index, h_index, w_index])
    if logical_lengths is not None:
        positions[:, offset >= logical_lengths.to(torch.long)[segment]] = PAD_POSITION[convention]
    return positions


def row_positions(
    ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    tokens: TokenConfig,
    *,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    logical_cu_seqlens: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    tokens_per_second: int = DEFAULT_TOKENS_PER_SECOND,
    convention: str = "bridge",
    whole_row: bool = False,
) -> torch.Tensor:
    """``[3, T]`` positions of a full packed row from its ids and grids (the common entry point).

    ``whole_row=True`` computes them as if the row were one sequence (the miles #1272 bug), for
    recognising positions that were not restarted per segment.
    """
    total = ids.numel()
    cu = torch.tensor([0, total]) if whole_row else cu_seqlens.to(torch.long)
    logical = None
    if logical_cu_seqlens is not None and not whole_row:
        logical = (logical_cu_seqlens[1:] - logical_cu_seqlens[:-1]).to(torch.long)
    items = find_vision_items(ids, cu, tokens, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                              split_video_frames=tokens.model == "qwen3-vl", logical_lengths=logical)
    return mrope_positions(total, cu, items, tokens, logical_lengths=logical, second_per_grid_ts=second_per_grid_ts,
                           tokens_per_second=tokens_per_second, convention=convention)


# --------------------------------------------------------------------------- checking position_ids


@dataclass
class PositionCheck:
    """The verdict on a batch's own ``position_ids``: per rank (or the full row) and findings."""

    present: bool
    statuses: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)


@dataclass(frozen=True)
class _Candidates:
    """The expected full-row positions and the known wrong variants, plus the pad mask."""

    per_segment: dict[str, torch.Tensor]
    whole_row: dict[str, torch.Tensor]
    real: torch.Tensor


def check_position_ids(batch: PackedBatch, cp: int, *, layout: str = "zigzag",
                       tokens: TokenConfig | None = None) -> list[Finding]:
    """Findings for the batch's own ``position_ids`` (none when it carries none).

    ``MROPE_NOT_PER_SEGMENT`` (computed over the whole row), ``MROPE_WRONG_SLICE`` (sliced with
    another layout, on the wrong dim, or not sliced) or ``MROPE_MISMATCH`` (first differing token).
    """
    return compare_position_ids(batch, cp, layout=layout, tokens=tokens).findings


def compare_position_ids(batch: PackedBatch, cp: int, *, layout: str = "zigzag",
                         tokens: TokenConfig | None = None) -> PositionCheck:
    """Compare ``batch.position_ids`` (full ``[3,1,T]``/``[3,T]`` or one per rank) with the expected ones.

    Pad tokens (between a segment's logical and physical end) are not compared: frameworks fill
    them differently. Either upstream convention counts as correct.
    """
    if not batch.position_ids:
        return PositionCheck(present=False)
    tokens = tokens or token_config()
    form = batch.form_for(cp)
    if form == "neither" or (form == "presharded" and len(batch.rows) != cp):
        raise InputError(
            f"cannot check position_ids: the batch is neither a full row nor {cp} pre-sharded rank rows "
            f"(cu_seqlens ends at {int(batch.cu_seqlens[-1])}, {len(batch.rows)} row(s) of {batch.row_tokens} tokens)",
            where=f"{batch.source}, position_ids",
            fix="pass the --cp the batch was sharded for, and every rank's file",
        )
    plan = make_layout(batch.cu_seqlens, cp, layout) if form == "presharded" else None
    ids = _full_ids(batch, plan)
    candidates = _candidates(batch, ids, tokens)
    if plan is None:
        return _check_full(batch.position_ids[0], candidates, batch.cu_seqlens, cp)
    return _check_presharded(batch.position_ids, candidates, plan)


def _full_ids(batch: PackedBatch, plan: Layout | None) -> torch.Tensor:
    if plan is None:
        return batch.rows[0]
    ids = torch.empty(plan.total_tokens, dtype=torch.long)
    ids[plan.all_global_indices()] = torch.stack(batch.rows)
    return ids


def _candidates(batch: PackedBatch, ids: torch.Tensor, tokens: TokenConfig) -> _Candidates:
    common: dict[str, Any] = dict(image_grid_thw=batch.image_grid_thw, video_grid_thw=batch.video_grid_thw,
                                  second_per_grid_ts=batch.second_per_grid_ts)
    per_segment = {c: row_positions(ids, batch.cu_seqlens, tokens, logical_cu_seqlens=batch.logical_cu_seqlens,
                                    convention=c, **common) for c in CONVENTIONS}
    whole = {c: row_positions(ids, batch.cu_seqlens, tokens, convention=c, whole_row=True, **common)
             for c in CONVENTIONS}
    return _Candidates(per_segment, whole, _real_tokens(batch.cu_seqlens, batch.logical_cu_seqlens, ids.numel()))


def _real_tokens(cu: torch.Tensor, logical_cu: torch.Tensor | None, total: int) -> torch.Tensor:
    """``[T]`` True for tokens inside their segment's logical length (not padding)."""
    if logical_cu is None:
        return torch.ones(total, dtype=torch.bool)
    seg_len = cu[1:] - cu[:-1]
    segment = torch.repeat_interleave(torch.arange(seg_len.numel()), seg_len, output_size=total)
    offset = torch.arange(total) - cu[:-1][segment]
    return offset < (logical_cu[1:] - logical_cu[:-1])[segment]


def _as_rows(tensor: torch.Tensor) -> torch.Tensor | None:
    """``[3, L]`` from ``[3, 1, L]`` or ``[3, L]``; None for any other shape."""
    if tensor.dim() == 3 and tensor.shape[0] == 3 and tensor.shape[1] == 1:
        return tensor[:, 0, :].to(torch.long)
    if tensor.dim() == 2 and tensor.shape[0] == 3:
        return tensor.to(torch.long)
    return None


@dataclass(frozen=True)
class _Verdict:
    """How one row of positions relates to the candidates; ``token``/``axis`` locate a mismatch."""

    status: str
    token: int = -1
    axis: int = -1
    got: tuple[int, ...] = ()
    expected: tuple[int, ...] = ()


def _matches(got: torch.Tensor, want: torch.Tensor, real: torch.Tensor) -> bool:
    return bool(((got == want) | ~real).all())


def _verdict(got: torch.Tensor, cand: _Candidates, index: torch.Tensor) -> _Verdict:
    """Compare ``got`` ``[3, L]`` with every candidate at global ``index`` ``[L]`` (pads ignored)."""
    real = cand.real[index]
    for convention, expected in cand.per_segment.items():
        if _matches(got, expected[:, index], real):
            return _Verdict("ok" if convention == "bridge" else "ok (transformers>=5 convention)")
    if any(_matches(got, expected[:, index], real) for expected in cand.whole_row.values()):
        return _Verdict("not per segment")
    expected = cand.per_segment["bridge"][:, index]
    differs = (got != expected) & real
    token = int(torch.nonzero(differs.any(dim=0)).view(-1)[0])
    axis = int(torch.nonzero(differs[:, token]).view(-1)[0])
    return _Verdict("mismatch", token, axis, tuple(got[:, token].tolist()), tuple(expected[:, token].tolist()))


def _not_per_segment(rank: int | None) -> Finding:
    return Finding(
        "MROPE_NOT_PER_SEGMENT", "error",
        f"{_who(rank)} position_ids were computed over the whole packed row: they do not restart at each segment, "
        "so every segment after the first gets shifted text and vision positions",
        "compute mRoPE per physical segment (Megatron-Bridge get_rope_index with packed_seq_params; miles #1272), "
        "then slice", rank=rank)


def _mismatch(verdict: _Verdict, global_index: int, rank: int | None, segment: int, chunk: int | None) -> Finding:
    where = f"local token {verdict.token} (global {global_index})" if rank is not None else f"token {global_index}"
    return Finding(
        "MROPE_MISMATCH", "error",
        f"{_who(rank)} position_ids differ from the expected per-segment mRoPE first at {where}, segment {segment}, "
        f"axis {'thw'[verdict.axis]}: got (t, h, w) = {list(verdict.got)}, expected {list(verdict.expected)}",
        "recompute them from exactly this row's grids with the right --model (Qwen2.5-VL: second_per_grid_ts)",
        rank=rank, segment=segment, chunk=chunk)


def _who(rank: int | None) -> str:
    return "the batch's" if rank is None else f"rank {rank}'s"


def _shape_problem(shape: list[int], total: int, *, rank: int | None) -> Finding:
    full = rank is None
    consequence = ("Megatron-Bridge discards them and recomputes" if full else
                   "Megatron-Bridge raises 'Pre-sharded packed CP inputs require explicit rank-local 3D MRoPE "
                   "position_ids.'")
    return Finding(
        "MROPE_MISMATCH", "warning" if full else "error",
        f"{_who(rank)} position_ids have shape {shape}, not 3-D mRoPE [3, 1, {total}] or [3, {total}]: {consequence}",
        "store the (t, h, w) positions as [3, 1, T] (axes first, tokens last)", rank=rank)


def _check_full(position_ids: torch.Tensor, cand: _Candidates, cu: torch.Tensor, cp: int) -> PositionCheck:
    total = cand.real.numel()
    rows = _as_rows(position_ids)
    shape = list(position_ids.shape)
    if rows is not None and rows.shape[1] != total and cp > 1 and rows.shape[1] * cp == total:
        return PositionCheck(True, ["sliced"], [Finding(
            "MROPE_WRONG_SLICE", "error",
            f"position_ids {shape} hold {rows.shape[1]} tokens but input_ids hold the full row of {total}: the "
            f"positions were sliced for one of {cp} ranks while the ids were not",
            "slice position_ids together with input_ids (or not at all), with the same layout indices")])
    if rows is None or rows.shape[1] != total:
        return PositionCheck(True, ["bad shape"], [_shape_problem(shape, total, rank=None)])
    verdict = _verdict(rows, cand, torch.arange(total))
    if verdict.status == "not per segment":
        return PositionCheck(True, [verdict.status], [_not_per_segment(None)])
    if verdict.status == "mismatch":
        segment = int(torch.searchsorted(cu[1:], torch.tensor(verdict.token), right=True))
        return PositionCheck(True, [verdict.status], [_mismatch(verdict, verdict.token, None, segment, None)])
    return PositionCheck(True, [verdict.status])


def _check_presharded(position_ids: list[torch.Tensor], cand: _Candidates, plan: Layout) -> PositionCheck:
    check = PositionCheck(True)
    others = _other_layouts(plan)
    wrong_slice: list[str] = []
    per_segment: list[int] = []
    for rank, tensor in enumerate(position_ids):
        status, problem = _rank_status(tensor, cand, plan, others, rank)
        check.statuses.append(status)
        if isinstance(problem, str):
            wrong_slice.append(problem)
        elif problem is not None and problem.code == "MROPE_NOT_PER_SEGMENT":
            per_segment.append(rank)
        elif problem is not None:
            check.findings.append(problem)
    if per_segment:
        finding = _not_per_segment(per_segment[0])
        ranks = ", ".join(map(str, per_segment))
        check.findings.insert(0, Finding(finding.code, finding.severity, f"rank(s) {ranks}: " + finding.message,
                                         finding.hint, rank=per_segment[0]))
    if wrong_slice:
        check.findings.insert(0, Finding(
            "MROPE_WRONG_SLICE", "error", "; ".join(wrong_slice),
            f"slice the full row's [3, 1, T] positions on the last dim with the same {plan.kind} indices as input_ids "
            "(Megatron: index_select(-1, thd_get_partitioned_indices(...)))",
            rank=next(r for r, s in enumerate(check.statuses) if s in _SLICE_STATUSES or s.startswith("sliced"))))
    return check


_SLICE_STATUSES = ("not sliced", "wrong dim")


def _rank_status(tensor: torch.Tensor, cand: _Candidates, plan: Layout, others: dict[str, Layout],
                 rank: int) -> tuple[str, Finding | str | None]:
    """One rank's status and its problem: a finding, or a wrong-slice sentence to merge."""
    shape, total, local = list(tensor.shape), plan.total_tokens, plan.local_tokens
    rows = _as_rows(tensor)
    if plan.cp > 1 and tensor.dim() > 0 and tensor.shape[-1] == total:
        if rows is not None:
            return "not sliced", f"rank {rank} holds {shape}: not sliced (the full row's positions)"
        return "wrong dim", (f"rank {rank} holds {shape}: cut on a dim other than the token dim (last), which still "
                             f"has all {total} tokens")
    if rows is None or rows.shape[1] != local:
        return "bad shape", _shape_problem(shape, local, rank=rank)
    index = plan.global_indices(rank)
    verdict = _verdict(rows, cand, index)
    if verdict.status.startswith("ok"):
        return verdict.status, None
    if verdict.status == "not per segment":
        return verdict.status, _not_per_segment(rank)
    sliced = _sliced_with(rows, cand, others, rank)
    if sliced is not None:
        kind, variant = sliced
        return f"sliced {kind}", (f"rank {rank}'s positions ({variant}) were sliced with the {kind} layout, "
                                  f"not {plan.kind}")
    ends = torch.cumsum(plan.local_piece_len(rank), 0)
    piece = int(plan.rank_pieces[rank, int(torch.searchsorted(ends, torch.tensor(verdict.token), right=True))])
    return verdict.status, _mismatch(verdict, int(index[verdict.token]), rank, int(plan.piece_segment[piece]),
                                     int(plan.piece_chunk[piece]))


def _sliced_with(rows: torch.Tensor, cand: _Candidates, others: dict[str, Layout],
                 rank: int) -> tuple[str, str] | None:
    """(layout, how computed) of another layout whose slice ``rows`` equals, if any."""
    for kind, other in others.items():
        index = other.global_indices(rank)
        for variant, table in (("computed per segment", cand.per_segment), ("computed over the whole row",
                                                                           cand.whole_row)):
            if any(_matches(rows, expected[:, index], cand.real[index]) for expected in table.values()):
                return kind, variant
    return None


def _other_layouts(plan: Layout) -> dict[str, Layout]:
    """The layouts other than ``plan`` that can cut this row (a wrong slice may match one)."""
    others = {}
    for kind in LAYOUTS:
        if kind == plan.kind:
            continue
        try:
            others[kind] = make_layout(plan.cu_seqlens, plan.cp, kind)
        except InputError:
            continue
    return others


# --------------------------------------------------------------------------- simulate --positions


@dataclass(frozen=True)
class PieceSpan:
    """One locally held piece and the positions at its first and last token (for the view)."""

    segment: int
    chunk: int
    local_first: int
    local_last: int
    first: tuple[int, int, int]
    last: tuple[int, int, int]


@dataclass(frozen=True)
class ItemSpan:
    """The part of one vision item a rank holds: how many tokens and the t/h/w ranges."""

    label: str
    segment: int
    held: int
    length: int
    low: tuple[int, int, int]
    high: tuple[int, int, int]


@dataclass
class RankPositions:
    """One rank's ``[3, local_T]`` positions and their compact description."""

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

    @property
    def findings(self) -> list[Finding]:
        return self.check.findings

    @property
    def ok(self) -> bool:
        return not any(f.is_problem for f in self.findings)

    def run(self, result: Any) -> None:
        """Compute every rank's positions from ``result`` (a :class:`~cpinspect.simulation.Result`)."""
        tokens, layout = result.tokens, result.layout
        self.model = tokens.model
        logical = _logical_lengths(self.batch, bool(result.padded_tokens))
        items = find_vision_items(result.full_ids, layout.cu_seqlens, tokens,
                                  image_grid_thw=self.batch.image_grid_thw, video_grid_thw=self.batch.video_grid_thw,
                                  split_video_frames=tokens.model == "qwen3-vl", logical_lengths=logical)
        full = mrope_positions(layout.total_tokens, layout.cu_seqlens, items, tokens, logical_lengths=logical,
                               second_per_grid_ts=self.batch.second_per_grid_ts,
                               tokens_per_second=self.tokens_per_second, convention=self.convention)
        self.items = items
        token_item = items.token_item(layout.total_tokens)
        self.ranks = [_describe_rank(r.rank, r.global_indices, full, token_item, items, layout) for r in result.ranks]
        self.check = compare_position_ids(self.batch, result.cp, layout=layout.kind, tokens=tokens)
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

    def render(self, console: Console, *, rank: int | None = None, full: bool = False) -> None:
        console.print(render_positions(self, rank=rank, full=full))


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
    index = item.expand(3, -1)
    low = torch.full((3, items.count), torch.iinfo(torch.long).max).scatter_reduce(1, index, pos, "amin")
    high = torch.full((3, items.count), -1, dtype=torch.long).scatter_reduce(1, index, pos, "amax")
    present = torch.nonzero(held).view(-1)
    return [ItemSpan(items.label(i), s, n, length, tuple(lo), tuple(hi)) for i, s, n, length, lo, hi in zip(
        present.tolist(), items.segment[present].tolist(), held[present].tolist(), items.length[present].tolist(),
        low[:, present].T.tolist(), high[:, present].T.tolist())]


def _triple(values: tuple[int, ...]) -> str:
    return str(values[0]) if len(set(values)) == 1 else "(" + ",".join(map(str, values)) + ")"


def _span(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}-{high}"


def render_findings(findings: list[Finding]) -> RenderableType:
    """✗/ℹ lines for findings, in the style of the simulate verdict."""
    from cpinspect.render import finding_line

    return Group(*(finding_line(finding) for finding in findings))


def _limited(entries: list[Any], full: bool, limit: int = 8) -> tuple[list[Any], int]:
    return (entries, 0) if full or len(entries) <= limit else (entries[:limit], len(entries) - limit)


def render_positions(ext: PositionsExtension, *, rank: int | None = None, full: bool = False) -> RenderableType:
    """Per rank: positions at each held piece's ends and, per vision item, the t/h/w ranges held."""
    convention = "Megatron-Bridge / transformers<5" if ext.convention == "bridge" else "transformers>=5"
    title = Text(f"mRoPE positions ({ext.model}, restarted per physical segment, {convention} convention, pads "
                 f"= {PAD_POSITION[ext.convention]})", style="bold")
    parts: list[RenderableType] = [title]
    for entry in ext.ranks if rank is None else [ext.ranks[rank]]:
        parts.append(_rank_view(entry, full))
    if ext.check.present and ext.ok:
        parts.append(Text("✓ the batch's position_ids match the expected per-segment positions on every rank",
                          style="bold green"))
    elif not ext.check.present:
        parts.append(Text("(the batch carries no position_ids to check)", style="dim"))
    parts.append(render_findings(ext.findings))
    return Group(*parts)


def _rank_view(entry: RankPositions, full: bool) -> RenderableType:
    from cpinspect.render import rank_style

    head = Text(f" rank {entry.rank} ", style=rank_style(entry.rank))
    head.append(f"  {entry.positions.shape[1]:,} tokens")
    if entry.batch_status is not None:
        good = entry.batch_status.startswith("ok")
        head.append(f"  batch position_ids: {'✓' if good else '✗'} {entry.batch_status}",
                    style="green" if good else "bold red")
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    by_segment: dict[int, list[PieceSpan]] = {}
    for piece in entry.pieces:
        by_segment.setdefault(piece.segment, []).append(piece)
    segments, more = _limited(list(by_segment.items()), full)
    for segment, pieces in segments:
        grid.add_row(f"  seg {segment} positions", "   ".join(
            f"ch {p.chunk} [{p.local_first}-{p.local_last}] {_triple(p.first)} → {_triple(p.last)}" for p in pieces))
    if more:
        grid.add_row("  ...", f"{more} more segment(s); --full shows all")
    items, more = _limited(entry.items, full)
    for item in items:
        grid.add_row(f"  {item.label} (seg {item.segment})",
                     f"{item.held} of {item.length} tokens   t {_span(item.low[0], item.high[0])}   "
                     f"h {_span(item.low[1], item.high[1])}   w {_span(item.low[2], item.high[2])}")
    if more:
        grid.add_row("  ...", f"{more} more vision item(s); --full shows all")
    if not entry.items:
        grid.add_row("  vision items", "none on this rank")
    return Group(head, grid)
