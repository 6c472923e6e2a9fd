"""Cases from what users give: a loaded batch file (full row or pre-sharded), or every rank's local mask.

Both are cut by the layout the check runs under (:func:`cpinspect.core.layout.make_layout`); a
pre-sharded batch must be in that layout, which the check cannot see from the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from cpinspect.check.cases import TEXT_TOKEN_ID, Case
from cpinspect.core.batch import PackedBatch
from cpinspect.core.errors import InputError
from cpinspect.core.hybrid import KIND as HYBRID
from cpinspect.core.layout import check_divisible, make_layout, pad_multiple, rule_of
from cpinspect.core.tokens import TokenConfig, token_config
from cpinspect.core.vision_items import batch_embedding_rows, placeholder_mask


def cases_from_batch(batch: PackedBatch, cps: Sequence[int], tokens: TokenConfig,
                     layout: str = "zigzag") -> tuple[list[Case], list[str]]:
    """Cases for a loaded batch file cut by ``layout``, and notes about cp values it cannot run at.

    A full row runs at every requested cp the layout can cut it at (zigzag: ``2*cp`` divides its
    segments); a pre-sharded batch (one row per rank, in ``layout``) runs at the cp it was cut for.
    """
    if (batch.local_cp_size is not None) != (layout == HYBRID) or (layout == HYBRID and batch.per_rank_files):
        raise _hybrid_mismatch(batch, layout)
    if batch.per_rank_files:
        case = _presharded_case(batch, tokens, layout)
        elsewhere = f"{batch.source} is pre-sharded for cp {case.cp}, so it was checked at cp {case.cp} only"
        return [case], [] if case.cp in cps else [elsewhere]
    if int(batch.cu_seqlens[-1]) != batch.row_tokens:
        total, row = int(batch.cu_seqlens[-1]), batch.row_tokens
        looks = f" (it looks like one rank's row pre-sharded for cp={total // row})" if row and total % row == 0 else ""
        raise InputError(
            f"cu_seqlens ends at {total} but the row has {row} tokens: this is not a full packed row{looks}",
            where=batch.source,
            fix="pass a full row, or the directory (or list) of every rank's pre-sharded file",
        )
    if layout == HYBRID:
        return _hybrid_cases(batch, cps, tokens)
    usable = [cp for cp in cps if _divisible(batch.cu_seqlens, cp, layout)]
    if not usable:
        check_divisible(batch.cu_seqlens, cps[0], layout)  # raises the message naming the first bad segment
    ids = batch.rows[0]
    mask = batch.vision_mask[0] if batch.vision_mask else placeholder_mask(ids, tokens)
    cases = [_batch_case(batch, f"{batch.source} at cp {cp}", cp, ids, mask, tokens, layout) for cp in usable]
    notes = [f"{batch.source} was skipped at cp {cp}: {_not_divisible(cp, layout)}" for cp in cps if cp not in usable]
    return cases, notes


def _hybrid_mismatch(batch: PackedBatch, layout: str) -> InputError:
    if batch.per_rank_files:
        return InputError(f"{batch.source} is pre-sharded, and check --layout hybrid reads full rows only",
                          where=batch.source, fix="pass the full packed row with its local_cp_size field")
    if layout == HYBRID:
        return InputError(f"{batch.source} has no local_cp_size field, so --layout hybrid cannot cut it",
                          where=f"{batch.source}, --layout hybrid",
                          fix="save one local_cp_size per segment in the batch, or drop --layout hybrid")
    return InputError(
        f"{batch.source} carries local_cp_size (hybrid CP, each segment its own cp), but check runs --layout "
        f"{layout}, which would cut it another way", where=f"{batch.source}, key local_cp_size",
        fix="pass --layout hybrid to cut it by its local_cp_size, or check a batch without that field")


def _hybrid_cases(batch: PackedBatch, cps: Sequence[int], tokens: TokenConfig) -> tuple[list[Case], list[str]]:
    """The full row at every requested cp its ``local_cp_size`` fits (each size divides it; the first error
    raised where none does); the row is cut as saved (no padding added: a saved case is padded already)."""
    from cpinspect.core.hybrid import hybrid_layout, segment_cp_sizes

    ids = batch.rows[0]
    mask = batch.vision_mask[0] if batch.vision_mask else placeholder_mask(ids, tokens)
    cases, notes, first_error = [], [], None
    for cp in cps:
        try:
            sizes = segment_cp_sizes(cp, batch.num_segments, batch_value=batch.local_cp_size)
            assert sizes is not None
            hybrid_layout(batch.cu_seqlens, cp, sizes)  # the exit-2 errors for cuts and unequal shares
        except InputError as error:
            first_error = first_error or error
            notes.append(f"{batch.source} was skipped at cp {cp}: {error}")
            continue
        case = _batch_case(batch, f"{batch.source} at cp {cp}", cp, ids, mask, tokens, HYBRID)
        cases.append(replace(case, segment_cp=sizes))
    if not cases and first_error is not None:
        raise first_error
    return cases, notes


def _divisible(cu_seqlens: torch.Tensor, cp: int, layout: str) -> bool:
    try:
        check_divisible(cu_seqlens, cp, layout)
    except InputError:
        return False
    return True


def _not_divisible(cp: int, layout: str) -> str:
    if rule_of(layout) == "zigzag":
        return f"a segment length is not divisible by 2*cp = {2 * cp}"
    return f"the row's length is not divisible by {pad_multiple(cp, layout)}, as the {layout} layout needs"


def _presharded_case(batch: PackedBatch, tokens: TokenConfig, layout: str) -> Case:
    cp = len(batch.rows)
    total = int(batch.cu_seqlens[-1])
    if total != cp * batch.row_tokens:
        raise InputError(
            f"{cp} per-rank rows of {batch.row_tokens} tokens do not make the {total} tokens cu_seqlens describes",
            where=batch.source,
            fix=f"each of the {cp} rank files must hold cu_seqlens[-1] / cp = {total // cp} local tokens",
        )
    indices = make_layout(batch.cu_seqlens, cp, layout).all_global_indices()
    ids = torch.empty(total, dtype=torch.long)
    ids[indices] = torch.stack(batch.rows)
    local_masks = batch.vision_mask or [placeholder_mask(row, tokens) for row in batch.rows]
    mask = torch.zeros(total, dtype=torch.bool)
    mask[indices] = torch.stack(local_masks)
    return _batch_case(batch, f"{batch.source} (pre-sharded, cp {cp})", cp, ids, mask, tokens, layout)


def _batch_case(batch: PackedBatch, name: str, cp: int, ids: torch.Tensor, mask: torch.Tensor,
                tokens: TokenConfig, layout: str) -> Case:
    count = batch_embedding_rows(batch, mask, tokens.merge_area)
    logical = batch.logical_cu_seqlens
    if logical is not None and torch.equal(logical, batch.cu_seqlens):
        logical = None
    return Case(name, "batch", cp, ids.clone(), mask.clone(), batch.cu_seqlens.clone(), logical, count, tokens,
                explicit_mask=batch.vision_mask is not None, layout=layout)


def case_from_local_masks(cu_seqlens: Sequence[int], local_masks: Sequence[Sequence[int]], *,
                          vision_embed_count: int | None = None, name: str = "pre-sharded masks",
                          tokens: TokenConfig | None = None, layout: str = "zigzag") -> Case:
    """A case from every rank's local mask in ``layout`` (how published test vectors are written)."""
    tokens = tokens or token_config()
    cu = torch.tensor(list(cu_seqlens), dtype=torch.long)
    cp = len(local_masks)
    indices = make_layout(cu, cp, layout).all_global_indices()
    mask = torch.zeros(int(cu[-1]), dtype=torch.bool)
    mask[indices] = torch.tensor([list(m) for m in local_masks], dtype=torch.bool)
    ids = torch.full_like(mask, TEXT_TOKEN_ID, dtype=torch.long)
    ids[mask] = tokens.image_token_id
    count = int(mask.sum()) if vision_embed_count is None else vision_embed_count
    return Case(name, "vectors", cp, ids, mask, cu, None, count, tokens, layout=layout)
