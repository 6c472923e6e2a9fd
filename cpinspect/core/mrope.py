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
Checking a batch's own ``position_ids`` against these is :mod:`cpinspect.core.position_check`.
"""

from __future__ import annotations

import torch

from cpinspect.core.errors import InputError
from cpinspect.core.runs import exclusive_cumsum
from cpinspect.core.tokens import TokenConfig
from cpinspect.core.vision_items import VIDEO, VisionItems, find_vision_items

CONVENTIONS = ("bridge", "transformers")
PAD_POSITION = {"bridge": 1, "transformers": 0}
DEFAULT_TOKENS_PER_SECOND = 2  # vision_config.tokens_per_second of the released Qwen2.5-VL checkpoints



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
        ordinal = torch.arange(item.numel()) - exclusive_cumsum(items.length)[item]
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
