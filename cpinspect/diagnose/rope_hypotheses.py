"""Position hypotheses: mRoPE computed on a rank's local row (MROPE_LOCAL_ROW, miles#1296, ms-swift#3215).

``get_rope_index`` run on one rank's CP-local row with the grids of the whole micro-batch walks
the local ids the way it walks a full row: for every ``<|vision_start|>`` it holds it takes the
next placeholder as an item's first token, lays out the item's *whole* grid (t·h·w/merge²
positions) and jumps past it; text fills the gaps and the rest of the row. The positions it builds
then number ``A`` while the local row has ``B`` tokens, and the assignment into
``position_ids[..., mask]`` fails: ``value tensor of shape [3, A] cannot be broadcast to indexing
result of shape [3, B]``.

:func:`local_rope_length` re-walks that loop on the local ids (a literal reading of the upstream
control flow, lengths only). Two ways of handing it grids are tried: the grids of the items whose
``vision_start`` the rank holds (per-rank grids), and every grid of the row from the first
(the full grids). A prediction is confirmed only when ``(B, A)`` equals the error's pair.
"""

from __future__ import annotations

import dataclasses

import torch

from cpinspect.core.findings import Finding
from cpinspect.diagnose.prediction import Prediction
from cpinspect.diagnose.report import cause
from cpinspect.diagnose.scene import Scene

LOCAL_ROW_HINT = ("compute the mRoPE position_ids per segment on the full packed row (get_rope_index on the whole "
                  "row, or on each sample), then slice them with the layout's own indices for each rank "
                  "(position_ids[..., global_indices]); never run get_rope_index on a CP-local row")


def local_rope_length(ids: list[int], image_items: list[int], video_items: list[int], image_id: int,
                      video_id: int, vision_start_id: int) -> int | None:
    """Positions ``get_rope_index`` builds for ``ids`` given the items' token counts (None: it raises)."""
    starts = [i for i, token in enumerate(ids[:-1]) if token == vision_start_id]
    image_nums = sum(ids[i + 1] == image_id for i in starts)
    video_nums = sum(ids[i + 1] == video_id for i in starts)
    n = len(ids)
    st = total = image_index = video_index = 0
    remain_images, remain_videos = image_nums, video_nums
    for _ in range(image_nums + video_nums):
        ed_image = _index(ids, image_id, st) if remain_images > 0 else n + 1
        ed_video = _index(ids, video_id, st) if remain_videos > 0 else n + 1
        if ed_image < ed_video:
            if image_index >= len(image_items):
                return None
            tokens, ed = image_items[image_index], ed_image
            image_index, remain_images = image_index + 1, remain_images - 1
        else:
            if video_index >= len(video_items):
                return None
            tokens, ed = video_items[video_index], ed_video
            video_index, remain_videos = video_index + 1, remain_videos - 1
        total += max(ed - st, 0) + tokens
        st = ed + tokens
    if st < n:
        total += n - st
    return total


def _index(ids: list[int], token: int, start: int) -> int:
    try:
        return ids.index(token, start)
    except ValueError:
        return len(ids) + 1


def local_row_predictions(scene: Scene) -> list[Prediction]:
    """For every rank: (local tokens, positions get_rope_index builds on the local row), when they differ."""
    if scene.result is None or scene.cp < 2 or any(scene.issues.get(k) for k in ("image", "video")):
        return []
    plan, row = scene.result.layout, scene.result.full_ids
    tokens = scene.tokens
    counts = {kind: [item.tokens for item in scene.items.get(kind, [])] for kind in ("image", "video")}
    starts = {kind: (scene.runs[kind].start - 1).tolist() if kind in scene.runs else [] for kind in counts}
    predictions = []
    for rank in range(scene.cp):
        index = plan.global_indices(rank)
        ids = row[index].tolist()
        held = set(index.tolist())
        own = {kind: [c for c, s in zip(counts[kind], starts[kind]) if s in held] for kind in counts}
        for variant, grids in (("the grids of the items whose <|vision_start|> it holds", own),
                               ("the grids of the whole row, from the first", counts)):
            length = local_rope_length(ids, grids["image"], grids["video"], tokens.image_token_id,
                                       tokens.video_token_id, tokens.vision_start_token_id)
            if length is None or length == len(ids):
                continue
            story = (f"get_rope_index run on rank {rank}'s local row of {len(ids)} tokens with {variant} builds "
                     f"{length} positions: each <|vision_start|> it holds gets its item's whole grid, while the row "
                     f"holds only part of the span ({length} - {len(ids)} = {length - len(ids)} positions too many)")
            predictions.append(Prediction("MROPE_LOCAL_ROW", len(ids), length, story, LOCAL_ROW_HINT, rank=rank,
                                          variant=variant))
    return _unique(predictions)


def _unique(predictions: list[Prediction]) -> list[Prediction]:
    seen: dict[tuple[int | None, int | None, int | None], Prediction] = {}
    for p in predictions:
        seen.setdefault((p.rank, p.tokens, p.rows), p)
    return [dataclasses.replace(p, variant="") for p in seen.values()]



def local_rope_positions(ids: list[int], grids: list[tuple[int, int, int]], image_id: int,
                         vision_start_id: int) -> torch.Tensor | None:
    """``[3, A]`` positions ``get_rope_index`` builds on ``ids`` with image ``grids`` (merged t, h, w), or None.

    The same loop as :func:`local_rope_length`, images only: text counts up from one past the
    previous maximum; an image adds its (t, h, w) grid index to the position of its first token.
    """
    starts = [i for i, token in enumerate(ids[:-1]) if token == vision_start_id and ids[i + 1] == image_id]
    st, index, nxt = 0, 0, 0
    parts = []
    for _ in starts:
        if index >= len(grids):
            return None
        ed = _index(ids, image_id, st)
        t, h, w = grids[index]
        index += 1
        text = max(ed - st, 0)
        parts.append(torch.arange(text).expand(3, text) + nxt)
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
        parts.append(grid.reshape(3, -1) + nxt + text)
        nxt = int(parts[-1].max()) + 1
        st = ed + t * h * w
    if st < len(ids):
        parts.append(torch.arange(len(ids) - st).expand(3, len(ids) - st) + nxt)
    return torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)


def local_row_position_findings(scene: Scene) -> list[Finding]:
    """The silent form: every rank's own position_ids are what get_rope_index gives on its local row."""
    batch = scene.batch
    if (scene.form != "presharded" or not batch.position_ids or scene.result is None or scene.items.get("video")
            or any(scene.issues.get(k) for k in ("image", "video")) or len(batch.position_ids) != scene.cp):
        return []
    merge, plan = scene.tokens.spatial_merge_size, scene.result.layout
    images = scene.items.get("image", [])
    starts = (scene.runs["image"].start - 1).tolist() if "image" in scene.runs else []
    ranks = []
    for rank, tensor in enumerate(batch.position_ids):
        n = batch.row_tokens
        if tensor.numel() != 3 * n:
            return []
        index = plan.global_indices(rank)
        held = set(index.tolist())
        grids = [(g[0], g[1] // merge, g[2] // merge) for item, s in zip(images, starts)
                 if s in held and (g := item.grid) is not None]
        local = local_rope_positions(batch.rows[rank].tolist(), grids, scene.tokens.image_token_id,
                                     scene.tokens.vision_start_token_id)
        if local is None or local.shape[1] != n or not torch.equal(tensor.reshape(3, n).to(torch.long), local):
            return []
        ranks.append(rank)
    if not ranks:
        return []
    first = plan.global_indices(1)
    return [cause(
        "MROPE_LOCAL_ROW",
        f"every rank's position_ids are exactly what get_rope_index gives on that rank's local row (count from 0 at "
        f"the local row's start, across its segment pieces, each held <|vision_start|> with its item's grid): rank "
        f"1's first token is global {int(first[0])} but has position 0; positions must restart per segment of the "
        "full row and be sliced, not recomputed after the split",
        LOCAL_ROW_HINT, rank=1)]
