"""Which layout pre-sharded rank rows were cut with: by reassembling vision spans, else by positions.

The model's layout is ``--layout``; the data's is the one under which the rank files reassemble
into whole vision spans (LAYOUT_MISMATCH when that is another one). Rows without vision spans are
told apart by their ``position_ids`` when they carry them (slime#1871: contiguous data, zigzag
attention).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cpinspect.core.errors import InputError
from cpinspect.core.findings import Finding
from cpinspect.core.layout import SEARCHED_LAYOUTS, Layout, make_layout
from cpinspect.core.vision_items import expected_items
from cpinspect.diagnose.report import cause
from cpinspect.diagnose.spans import align_spans, content_ends, find_runs

if TYPE_CHECKING:
    from cpinspect.diagnose.scene import Scene

SHARD_PER_DOCUMENT = "per document: Megatron get_batch_on_this_cp_rank given cu_seqlens (THD)"
LAYOUT_WORDS = {
    "zigzag": "per-document zigzag (Megatron THD: every segment cut into 2·cp chunks)",
    "sequence-zigzag": "per-sequence zigzag (the whole row cut as one sequence, BSHD-style)",
    "contiguous": "contiguous (the row cut into cp equal pieces)",
    "head-tail": "PyTorch head-tail (the whole row as 2·cp chunks, rank-major pairs, then cut contiguously)",
    "per-document-head-tail": "PyTorch per-document head-tail (each document's chunk pairs in document order, "
                              "then the row cut contiguously)",
    "hybrid": "hybrid CP (each segment zigzag over 2·c chunks on its own aligned block of c ranks)",
}


def try_layout(cu: torch.Tensor, cp: int, kind: str, segment_cp: torch.Tensor | None = None) -> Layout | None:
    """``kind`` cut over ``cp`` ranks, or None where it cannot cut ``cu`` (``segment_cp``: hybrid CP's sizes)."""
    try:
        return make_layout(cu, cp, kind, segment_cp if kind == "hybrid" else None)
    except InputError:
        return None


def choose_data_layout(scene: Scene) -> list[Finding]:
    """Pre-sharded rows: find the layout under which they reassemble into whole vision spans."""
    counted = {kind: _broken_spans(scene, kind) for kind in SEARCHED_LAYOUTS}
    broken = {kind: value for kind, value in counted.items() if value is not None}
    mine = broken.get(scene.layout)
    if mine is not None and all(value == (0, 0) for value in broken.values()):
        return _layout_from_positions(scene)  # no vision span tells the layouts apart: the positions may
    if mine is None or mine[0] == 0:
        scene.spans_intact = mine is not None
        return []
    best = min(broken, key=lambda kind: (broken[kind][0], kind != scene.layout))
    if broken[best][0] != 0:
        return []
    scene.data_layout, scene.spans_intact = best, True
    model_split = (SHARD_PER_DOCUMENT if scene.layout == "zigzag" else LAYOUT_WORDS[scene.layout])
    return [cause(
        "LAYOUT_MISMATCH",
        f"the rank files reassemble into whole vision spans only under {LAYOUT_WORDS[best]} (all {broken[best][1]} "
        f"intact); under {LAYOUT_WORDS[scene.layout]}, which --layout {scene.layout} (the model's split) assumes, "
        f"{mine[0]} of {mine[1]} spans disagree with their grids or lose their <|vision_start|>/<|vision_end|>: the "
        "data was sharded one way and the model shards and selects rows the other way, so every rank fills its "
        "vision positions with another rank's rows",
        f"shard the data the way the model does ({model_split}), or tell the model the data layout (cpinspect: "
        f"--layout {best})")]


def _layout_from_positions(scene: Scene) -> list[Finding]:
    """Pre-sharded rows without vision spans: the layout whose slice of the per-segment positions they hold."""
    positions = scene.batch.position_ids
    if not positions or len(positions) != scene.cp:
        return []
    n = scene.batch.row_tokens
    if any(p.numel() not in (n, 3 * n) for p in positions):
        return []
    rows = [p.reshape(-1, n).to(torch.long) for p in positions]  # [1, n] or [3, n]: text has t = h = w
    fits = []
    for kind in SEARCHED_LAYOUTS:
        plan = try_layout(scene.cu, scene.cp, kind)
        if plan is None:
            continue
        cu = plan.cu_seqlens.to(torch.long)
        expected = [plan.global_indices(r) - cu[torch.searchsorted(cu[1:], plan.global_indices(r), right=True)]
                    for r in range(scene.cp)]
        if all(bool((got == want).all()) for got, want in zip(rows, expected)):
            fits.append(kind)
    if len(fits) != 1 or fits[0] == scene.layout:
        return []
    best = fits[0]
    scene.data_layout = best
    model_split = SHARD_PER_DOCUMENT if scene.layout == "zigzag" else LAYOUT_WORDS[scene.layout]
    return [cause(
        "LAYOUT_MISMATCH",
        f"the rows hold no vision span to tell the layouts apart, but their position_ids do: on every rank they "
        f"are exactly the per-segment positions of the tokens {LAYOUT_WORDS[best]} gives that rank (rank 1 starts at "
        f"position {int(rows[1][0, 0]) if scene.cp > 1 else 0}), and no other layout fits; --layout {scene.layout} "
        f"(what the consumer assumes: {LAYOUT_WORDS[scene.layout]}) places them elsewhere, so attention and the "
        "loss see scrambled tokens with matching shapes",
        f"shard the data the way the model does ({model_split}), or tell the model the data layout (cpinspect: "
        f"--layout {best})")]


def _broken_spans(scene: Scene, kind: str) -> tuple[int, int] | None:
    """``(broken, total)`` vision spans when the rank rows are reassembled with layout ``kind``."""
    plan = try_layout(scene.cu, scene.cp, kind)
    if plan is None:
        return None
    ids = torch.empty(plan.total_tokens, dtype=torch.long)
    ids[plan.all_global_indices()] = torch.stack(scene.batch.rows)
    ends = content_ends(ids, scene.cu, scene.batch.logical_cu_seqlens, scene.tokens.pad_token_id)
    broken = total = 0
    for item_kind, token_id in (("image", scene.tokens.image_token_id), ("video", scene.tokens.video_token_id)):
        runs = find_runs(ids == token_id, scene.cu, ends)
        items = expected_items(scene._grid(item_kind), item_kind, scene.tokens)
        if items:
            issues = align_spans(items, runs)
            broken += len(issues)
            total += len(items) + sum(issue.problem == "extra" for issue in issues)
            continue
        before = ids[(runs.start - 1).clamp(min=0)] == scene.tokens.vision_start_token_id
        after = ids[(runs.start + runs.length).clamp(max=ids.numel() - 1)] == scene.tokens.vision_end_token_id
        broken += int((~(before & after)).sum())
        total += len(runs)
    return broken, total


