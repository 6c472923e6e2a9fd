"""ROPE_SEGMENT_OFFSET_MISSING: a rank's positions selected from the table without the segment offset.

Megatron-LM#5243: the full row's position table has one entry per packed token (``[3, T]`` mRoPE
or ``[T]`` 1-D RoPE, per segment), a rank must take the entries of its *global* indices (cu
``[0, 4, 8]``, cp 2: rank 0 takes ``[0, 3, 4, 7]``), but the selection used each token's offset
inside its segment (``[0, 3, 0, 3]``): every segment after the first gets the first segment's
positions. Three forms of the same evidence are tested, one rule each:

* mRoPE ``position_ids`` ``[3, 1, n]``: equal to ``table[:, g - cu[segment(g)]]`` (the table from
  :func:`cpinspect.core.mrope.row_positions`, either upstream convention);
* 1-D ``position_ids`` ``[n]`` or ``[1, n]``: equal to ``table[g - cu[segment(g)]]`` where the
  table is the row's per-segment 1-D positions (each segment counts from 0), compared on real
  tokens (not padding);
* ``rope_indices`` (the indices a rank selected the table with, ``[n]``): equal to the offsets
  ``g - cu[segment(g)]`` instead of the global indices ``g``.

A form is confirmed only when every rank fits it and at least one real token tells the wrong
selection from the right one (else the positions are simply right).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cpinspect.core.batch import PackedBatch
from cpinspect.core.findings import Finding
from cpinspect.core.layout import Layout
from cpinspect.core.mrope import CONVENTIONS, row_positions
from cpinspect.diagnose.data_layout import try_layout
from cpinspect.diagnose.report import cause, info
from cpinspect.diagnose.scene import Scene

HINT = ("select the table's columns with the global indices (segment start + offset): Megatron "
        "index_select(-1, thd_get_partitioned_indices(cu_seqlens, total, cp_size, cp_rank)), not the offsets inside "
        "each segment")
HINT_1D = ("index the packed RoPE table (one row per packed token, freqs.size(0) == cu_seqlens[-1]) at each token's "
           "global index cu_seqlens[i] + offset (Megatron-LM#5243: _apply_rotary_pos_emb_thd), or give each rank the "
           "per-segment positions position_ids[global_indices]")
INDEX_KEYS = ("rope_indices", "rotary_indices", "freqs_indices")


@dataclass(frozen=True)
class _Form:
    """One way the evidence is written: what the rows hold and how the finding words it."""

    name: str  # "mRoPE position_ids", "1-D position_ids", "rope_indices"
    dims: int
    table: torch.Tensor  # [dims, T]: the right value of every global token
    real: torch.Tensor  # [T] tokens compared (padding left out where the batch says which it is)


def segment_offset_findings(scene: Scene) -> list[Finding]:
    """ROPE_SEGMENT_OFFSET_MISSING when every rank's positions (or RoPE indices) fit the offset-less selection.

    Pre-sharded input tests every rank; one rank's file (with ``--rank``) is tested alone in the 1-D
    forms, whose table needs only the boundaries (mRoPE's needs the full row's ids and grids).
    """
    batch = scene.batch
    if scene.form == "presharded" and scene.result is not None and scene.full_ids is not None:
        plan, ranks = scene.result.layout, list(range(scene.cp))
    elif scene.form == "one rank" and scene.rank is not None and scene.cp > 1:
        found_plan = try_layout(batch.cu_seqlens, scene.cp, scene.data_layout)
        if found_plan is None:
            return []
        plan, ranks = found_plan, [scene.rank]
    elif scene.form == "one rank" and scene.cp > 1 and (batch.position_ids or _extra_rows(batch, 1, -1, any_n=True)):
        return [info("SKIPPED", "one rank's position_ids (or rope_indices) are tested for ROPE_SEGMENT_OFFSET_MISSING "
                     "only when the rank is known", "pass --rank R (the CP rank this file came from)")]
    else:
        return []
    cu = plan.cu_seqlens.to(torch.long)
    total, n = int(cu[-1]), plan.global_indices(0).numel()
    if batch.rows[0].numel() != n:
        return []
    indices = _extra_rows(batch, len(ranks), n)
    if indices is not None:
        form = _Form(indices[0], 1, torch.arange(total).view(1, -1), torch.ones(total, dtype=torch.bool))
        return _found(_check(form, plan, dict(zip(ranks, indices[1])), cu))
    if not batch.position_ids or len(batch.position_ids) != len(ranks):
        return []
    if all(_one_d(t, n) for t in batch.position_ids):
        form = _Form("1-D position_ids", 1, _segment_positions(cu).view(1, -1), _real(cu, batch.logical_cu_seqlens))
        rows = [t.reshape(1, n).to(torch.long) for t in batch.position_ids]
        return _found(_check(form, plan, dict(zip(ranks, rows)), cu))
    three = [_three_d(t, n) for t in batch.position_ids]
    if scene.full_ids is None or int(cu[-1]) != scene.full_ids.numel() or any(r is None for r in three):
        return []
    for convention in CONVENTIONS:
        table = row_positions(scene.full_ids, cu, scene.tokens, image_grid_thw=batch.image_grid_thw,
                              video_grid_thw=batch.video_grid_thw, logical_cu_seqlens=batch.logical_cu_seqlens,
                              second_per_grid_ts=batch.second_per_grid_ts, convention=convention)
        form = _Form("mRoPE position_ids", 3, table, torch.ones(total, dtype=torch.bool))
        found = _check(form, plan, {r: t for r, t in zip(ranks, three) if t is not None}, cu)
        if found is not None:
            return [found]
    return []


def _found(finding: Finding | None) -> list[Finding]:
    return [finding] if finding is not None else []


def _extra_rows(batch: PackedBatch, files: int, n: int, *,
                any_n: bool = False) -> tuple[str, list[torch.Tensor]] | None:
    """Every file's RoPE selection indices (``[n]`` each; any length with ``any_n``), when the files carry them."""
    for key in INDEX_KEYS:
        values = [e.get(key) for e in batch.extra]
        if len(values) == files and all(isinstance(v, torch.Tensor) and (any_n or _one_d(v, n)) for v in values):
            return key, [v.reshape(1, n).to(torch.long) for v in values if v is not None]
    return None


def _one_d(tensor: torch.Tensor, n: int) -> bool:
    return tensor.numel() == n and (tensor.dim() == 1 or (tensor.dim() == 2 and tensor.shape[0] == 1))


def _three_d(tensor: torch.Tensor, n: int) -> torch.Tensor | None:
    if tensor.numel() != 3 * n or tensor.shape[0] != 3:
        return None
    return tensor.reshape(3, n).to(torch.long)


def _segment_positions(cu: torch.Tensor) -> torch.Tensor:
    """``[T]`` each token's offset inside its physical segment: 1-D RoPE positions, restarted per segment."""
    total = int(cu[-1])
    segment = torch.searchsorted(cu[1:], torch.arange(total), right=True)
    return torch.arange(total) - cu[segment]


def _real(cu: torch.Tensor, logical_cu: torch.Tensor | None) -> torch.Tensor:
    """``[T]`` True inside each segment's logical length (padding positions vary between frameworks)."""
    offsets = _segment_positions(cu)
    if logical_cu is None:
        return torch.ones_like(offsets, dtype=torch.bool)
    segment = torch.searchsorted(cu[1:], torch.arange(int(cu[-1])), right=True)
    return offsets < (logical_cu[1:] - logical_cu[:-1]).to(torch.long)[segment]


def _check(form: _Form, plan: Layout, rows: dict[int, torch.Tensor], cu: torch.Tensor) -> Finding | None:
    first: tuple[int, int] | None = None
    for rank, got in rows.items():
        index = plan.global_indices(rank)
        offsets = index - cu[torch.searchsorted(cu[1:], index, right=True)]
        real = form.real[index]
        wrong = form.table[:, offsets]
        if got.shape != wrong.shape or not bool(((got == wrong) | ~real).all()):
            return None
        differs = torch.nonzero(((wrong != form.table[:, index]).any(dim=0)) & real).view(-1)
        if differs.numel() and first is None:
            first = (rank, int(differs[0]))
    if first is None:
        return None
    return _finding(form, plan, cu, *first, every=len(rows) > 1)


def _finding(form: _Form, plan: Layout, cu: torch.Tensor, rank: int, local: int, *, every: bool) -> Finding:
    place = plan.locate(rank, local)
    index = plan.global_indices(rank)
    global_index = int(index[local])
    offset = global_index - int(cu[place.segment])
    seg_of = torch.searchsorted(cu[1:], index, right=True)
    later = index[seg_of == place.segment][:6]
    shown, wrong = later.tolist(), (later - cu[place.segment]).tolist()
    source = int(torch.searchsorted(cu[1:], torch.tensor(offset), right=True))
    where = f"first visible on rank {rank}, local token {local} (global {global_index}, segment {place.segment})"
    who = "every rank's" if every else f"rank {rank}'s"
    if form.name == "mRoPE position_ids":
        return cause(
            "ROPE_SEGMENT_OFFSET_MISSING",
            f"{who} position_ids are the full row's per-segment table taken at each token's offset inside its "
            f"segment instead of at its global index: rank {rank} takes table columns {wrong} for its "
            f"segment-{place.segment} tokens {shown}; {where}: it got column {offset} of the table (a token of "
            f"segment {source})", HINT, rank=rank, segment=place.segment, chunk=place.chunk)
    if form.name == "1-D position_ids":
        got, right = int(form.table[0, offset]), int(form.table[0, global_index])
        return cause(
            "ROPE_SEGMENT_OFFSET_MISSING",
            f"{who} 1-D position_ids are the packed row's per-segment positions taken at each token's offset "
            f"inside its segment instead of at its global index: rank {rank} reads table entries {wrong} for its "
            f"segment-{place.segment} tokens {shown}; {where}: it has position {got} (entry {offset}, a token of "
            f"segment {source}) where {right} is right. (These are 1-D RoPE positions; an mRoPE model such as "
            "Qwen-VL needs [3, 1, T] ones as well.)", HINT_1D, rank=rank, segment=place.segment, chunk=place.chunk)
    return cause(
        "ROPE_SEGMENT_OFFSET_MISSING",
        f"{who} {form.name} are the offsets inside each segment, not the global indices of its tokens: rank "
        f"{rank} selects table rows {wrong} for its segment-{place.segment} tokens at global {shown}; {where}: row "
        f"{offset} belongs to segment {source}", HINT_1D, rank=rank, segment=place.segment, chunk=place.chunk)
