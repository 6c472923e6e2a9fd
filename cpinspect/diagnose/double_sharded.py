"""DOUBLE_SHARDED: rank rows that are a shard of a shard (miles#1308, Megatron-Bridge re-sharding local data).

A stack that CP-splits the batch in the data loader and then again in the model (e.g. Megatron-
Bridge's ``preprocess_packed_seqs`` run on rows that are already local) leaves every rank with
``T / cp²`` tokens. Zigzag of a zigzag is itself a zigzag: rank ``r``'s second split keeps the
pieces of cp² rank ``q(r)``. :func:`equivalent_ranks` composes the two index maps and finds ``q``,
which is what the files are compared against.
"""

from __future__ import annotations

import torch

from cpinspect.core.errors import InputError
from cpinspect.core.findings import Finding
from cpinspect.core.layout import make_layout
from cpinspect.core.tokens import TokenConfig
from cpinspect.diagnose.report import cause

HINT = ("make the second sharding an identity for inputs that are already CP-local: skip the split (Megatron-Bridge "
        "preprocess_packed_seqs / get_batch_on_this_cp_rank) when cu_seqlens[-1] == cp x the local length, or hand "
        "the model the full row")


def double_indices(cu: torch.Tensor, cp: int, rank: int, layout: str = "zigzag") -> torch.Tensor:
    """Global indices rank ``rank`` keeps when its local row is split a second time with ``layout``."""
    first = make_layout(cu, cp, layout).global_indices(rank)
    local_cu = torch.div(cu.to(torch.long), cp, rounding_mode="floor")
    second = make_layout(local_cu, cp, layout).global_indices(rank)
    return first[second]


def equivalent_ranks(cu: torch.Tensor, cp: int, layout: str = "zigzag") -> list[int | None]:
    """For each rank, the cp² rank whose indices equal its doubly-split indices (None if none)."""
    try:
        squared = make_layout(cu, cp * cp, layout)
        doubles = [double_indices(cu, cp, rank, layout) for rank in range(cp)]
    except InputError:
        return [None] * cp
    out: list[int | None] = []
    for indices in doubles:
        out.append(next((q for q in range(cp * cp) if torch.equal(squared.global_indices(q), indices)), None))
    return out


def span_breaks(placed: torch.Tensor, tokens: TokenConfig) -> int:
    """Placeholder runs cut open by a known neighbour in a partly known row (``-1``: unknown).

    A placeholder whose known left neighbour is neither a placeholder nor ``<|vision_start|>``, or
    whose known right neighbour is neither a placeholder nor ``<|vision_end|>``, cannot be where
    the placement put it.
    """
    vision = (placed == tokens.image_token_id) | (placed == tokens.video_token_id)
    known = placed >= 0
    left, right = placed[:-1], placed[1:]
    left_bad = vision[1:] & known[:-1] & ~vision[:-1] & (left != tokens.vision_start_token_id)
    right_bad = vision[:-1] & known[1:] & ~vision[1:] & (right != tokens.vision_end_token_id)
    return int(left_bad.sum()) + int(right_bad.sum())


def _placed(rows: list[torch.Tensor], indices: list[torch.Tensor], total: int) -> torch.Tensor:
    out = torch.full((total,), -1, dtype=torch.long)
    for row, index in zip(rows, indices):
        out[index] = row.to(torch.long)
    return out


def double_sharded_finding(cu: torch.Tensor, cp: int, rows: list[torch.Tensor], tokens: TokenConfig,
                           layout: str) -> Finding | None:
    """The finding for ``cp`` rank files of ``n`` tokens each whose cu_seqlens end at cp² x n.

    Confirmed only when the files' vision spans say so: placed where a second split puts them they
    break no span, placed as ranks 0..cp-1 of a cp² run (rank files missing) they do.
    """
    total, n = int(cu[-1]), rows[0].numel()
    if cp < 2 or total != cp * cp * n or len(rows) != cp:
        return None
    ranks = equivalent_ranks(cu, cp, layout)
    if any(q is None for q in ranks):
        return None
    squared = make_layout(cu, cp * cp, layout)
    doubled = span_breaks(_placed(rows, [squared.global_indices(q or 0) for q in ranks], total), tokens)
    missing = span_breaks(_placed(rows, [squared.global_indices(r) for r in range(cp)], total), tokens)
    if doubled != 0 or missing == 0:
        return None
    names = ", ".join(f"rank {r} = cp-{cp * cp} rank {q}" for r, q in enumerate(ranks[:8]))
    return cause(
        "DOUBLE_SHARDED",
        f"the {cp} rank files hold {n} tokens each, but cu_seqlens ends at {total} = {cp}² x {n}: every rank's row is "
        f"a shard of its shard, exactly what a second {layout} split of each rank's local row ({total // cp} tokens) "
        f"gives ({names}); a model at cp={cp} sees cu_seqlens[-1] != cp x local ({total} != {cp} x {n}), treats the "
        f"rows as full ones, and tensors split once ({total // cp} per rank) meet rows split twice ({n}); the files' "
        f"vision spans fit that placement whole, while read as ranks 0..{cp - 1} of a cp={cp * cp} run they break "
        f"{missing} span edge(s)",
        HINT)
