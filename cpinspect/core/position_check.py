"""The check of a batch's own mRoPE ``position_ids`` against :func:`cpinspect.core.mrope.row_positions`.

Both upstream conventions count as correct; the known wrong variants (positions computed over the
whole row, sliced with another layout, on the wrong dim, or not sliced) are named as such.

With ``tokens.rope == "1d"`` (``--rope 1d``) the positions are plain 1-D RoPE, ``[1, T]`` or ``[T]``:
each token's expected position is its offset inside its (physical) segment, ``g - cu_seqlens[s]``,
at its global index ``g``; the same wrong variants are named, with ``ROPE_*`` codes. Without it,
1-D positions are reported as not 3-D, with the hint that names ``--rope 1d``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from cpinspect.core.batch import PackedBatch
from cpinspect.core.errors import InputError
from cpinspect.core.findings import Finding
from cpinspect.core.hybrid import segment_cp_sizes
from cpinspect.core.layout import DISTINCT_LAYOUTS, Layout, make_layout
from cpinspect.core.mrope import CONVENTIONS, row_positions
from cpinspect.core.tokens import TokenConfig, token_config


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
    model: str = ""
    axes: int = 3  # 3 for mRoPE (t, h, w), 1 for 1-D RoPE


def check_position_ids(batch: PackedBatch, cp: int, *, layout: str = "zigzag",
                       tokens: TokenConfig | None = None) -> list[Finding]:
    """Findings for the batch's own ``position_ids`` (none when it carries none).

    ``MROPE_NOT_PER_SEGMENT`` (computed over the whole row), ``MROPE_WRONG_SLICE`` (sliced with
    another layout, on the wrong dim, or not sliced) or ``MROPE_MISMATCH`` (first differing token).
    """
    return compare_position_ids(batch, cp, layout=layout, tokens=tokens).findings


def compare_position_ids(batch: PackedBatch, cp: int, *, layout: str = "zigzag",
                         tokens: TokenConfig | None = None, plan: Layout | None = None) -> PositionCheck:
    """Compare ``batch.position_ids`` (full ``[3,1,T]``/``[3,T]`` or one per rank) with the expected ones.

    ``plan`` (the simulation's layout: a hybrid one needs its sizes) replaces ``make_layout(..., layout)``.

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
    if form != "presharded":
        plan = None
    elif plan is None:  # hybrid CP takes its sizes from the batch's local_cp_size
        hybrid = layout == "hybrid"
        sizes = segment_cp_sizes(cp, batch.num_segments, batch_value=batch.local_cp_size) if hybrid else None
        plan = make_layout(batch.cu_seqlens, cp, layout, sizes)
    ids = _full_ids(batch, plan)
    candidates = _candidates(batch, ids, tokens) if tokens.rope != "1d" else _candidates_1d(batch, ids.numel(), tokens)
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
    return _Candidates(per_segment, whole, _real_tokens(batch.cu_seqlens, batch.logical_cu_seqlens, ids.numel()),
                       tokens.model)


def _candidates_1d(batch: PackedBatch, total: int, tokens: TokenConfig) -> _Candidates:
    """1-D RoPE: each token's offset in its physical segment (and the whole row's 0..T-1, a known wrong variant)."""
    cu = batch.cu_seqlens.to(torch.long)
    index = torch.arange(total)
    offset = index - cu[torch.searchsorted(cu[1:], index, right=True)]
    return _Candidates({"1d": offset.view(1, -1)}, {"1d": index.view(1, -1)},
                       _real_tokens(batch.cu_seqlens, batch.logical_cu_seqlens, total), tokens.model, axes=1)


def _real_tokens(cu: torch.Tensor, logical_cu: torch.Tensor | None, total: int) -> torch.Tensor:
    """``[T]`` True for tokens inside their segment's logical length (not padding)."""
    if logical_cu is None:
        return torch.ones(total, dtype=torch.bool)
    seg_len = cu[1:] - cu[:-1]
    segment = torch.repeat_interleave(torch.arange(seg_len.numel()), seg_len, output_size=total)
    offset = torch.arange(total) - cu[:-1][segment]
    return offset < (logical_cu[1:] - logical_cu[:-1])[segment]


def _as_rows(tensor: torch.Tensor, axes: int = 3) -> torch.Tensor | None:
    """``[3, L]`` from ``[3, 1, L]`` or ``[3, L]`` (``[1, L]`` from ``[1, L]`` or ``[L]`` for 1-D); else None."""
    if axes == 1:
        if tensor.dim() == 1 or (tensor.dim() == 2 and tensor.shape[0] == 1):
            return tensor.reshape(1, -1).to(torch.long)
        return None
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
            return _Verdict("ok" if convention in ("bridge", "1d") else "ok (transformers>=5 convention)")
    if any(_matches(got, expected[:, index], real) for expected in cand.whole_row.values()):
        return _Verdict("not per segment")
    expected = next(iter(cand.per_segment.values()))[:, index]
    differs = (got != expected) & real
    token = int(torch.nonzero(differs.any(dim=0)).view(-1)[0])
    axis = int(torch.nonzero(differs[:, token]).view(-1)[0])
    return _Verdict("mismatch", token, axis, tuple(got[:, token].tolist()), tuple(expected[:, token].tolist()))


def _code(name: str, axes: int) -> str:
    """``MROPE_*`` for mRoPE, ``ROPE_*`` for 1-D RoPE."""
    return name if axes == 3 else name.removeprefix("M")


def _not_per_segment(rank: int | None, axes: int = 3) -> Finding:
    if axes == 1:
        return Finding(
            "ROPE_NOT_PER_SEGMENT", "error",
            f"{_who(rank)} 1-D position_ids count over the whole packed row (position = global index): they do not "
            "restart at each segment, so every segment after the first is rotated as if it continued the one before",
            "give each token its offset inside its segment (global index - cu_seqlens_padded[segment]), then slice "
            "with the layout's indices", rank=rank)
    return Finding(
        "MROPE_NOT_PER_SEGMENT", "error",
        f"{_who(rank)} position_ids were computed over the whole packed row: they do not restart at each segment, "
        "so every segment after the first gets shifted text and vision positions",
        "compute mRoPE per physical segment (Megatron-Bridge get_rope_index with packed_seq_params; miles #1272), "
        "then slice", rank=rank)


def _mismatch(verdict: _Verdict, global_index: int, rank: int | None, segment: int, chunk: int | None,
              axes: int = 3) -> Finding:
    where = f"local token {verdict.token} (global {global_index})" if rank is not None else f"token {global_index}"
    if axes == 1:
        return Finding(
            "ROPE_MISMATCH", "error",
            f"{_who(rank)} 1-D position_ids differ from the per-segment positions first at {where}, segment "
            f"{segment}: got {verdict.got[0]}, expected {verdict.expected[0]} (its offset in the segment)",
            "give each token its offset inside its segment (global index - cu_seqlens_padded[segment]), then slice "
            "with the layout's indices", rank=rank, segment=segment, chunk=chunk)
    return Finding(
        "MROPE_MISMATCH", "error",
        f"{_who(rank)} position_ids differ from the expected per-segment mRoPE first at {where}, segment {segment}, "
        f"axis {'thw'[verdict.axis]}: got (t, h, w) = {list(verdict.got)}, expected {list(verdict.expected)}",
        "recompute them from exactly this row's grids with the right --model (Qwen2.5-VL: second_per_grid_ts)",
        rank=rank, segment=segment, chunk=chunk)


def _who(rank: int | None) -> str:
    return "the batch's" if rank is None else f"rank {rank}'s"


def _shape_problem(shape: list[int], total: int, *, rank: int | None, cand: _Candidates) -> Finding:
    full = rank is None
    if cand.axes == 1:
        return Finding(
            "ROPE_MISMATCH", "warning" if full else "error",
            f"{_who(rank)} position_ids have shape {shape}, not 1-D RoPE [1, {total}] or [{total}] (--rope 1d)",
            "store one position per token, [1, T] (or pass --rope mrope for 3-D mRoPE positions)", rank=rank)
    consequence = ("Megatron-Bridge discards them and recomputes" if full else
                   "Megatron-Bridge raises 'Pre-sharded packed CP inputs require explicit rank-local 3D MRoPE "
                   "position_ids.'")
    if shape and shape[-1] == total and (len(shape) == 1 or (len(shape) == 2 and shape[0] == 1)):
        return Finding(
            "MROPE_MISMATCH", "warning" if full else "error",
            f"{_who(rank)} position_ids have shape {shape}, 1-D: expected 3-D mRoPE [3, 1, {total}] for "
            f"{cand.model} ({consequence}); if this model uses 1-D RoPE, pass --rope 1d and they are checked as "
            "1-D positions", "pass --rope 1d for a 1-D RoPE model; for mRoPE store the (t, h, w) positions as "
            "[3, 1, T]", rank=rank)
    return Finding(
        "MROPE_MISMATCH", "warning" if full else "error",
        f"{_who(rank)} position_ids have shape {shape}, not 3-D mRoPE [3, 1, {total}] or [3, {total}]: {consequence}",
        "store the (t, h, w) positions as [3, 1, T] (axes first, tokens last)", rank=rank)


def _check_full(position_ids: torch.Tensor, cand: _Candidates, cu: torch.Tensor, cp: int) -> PositionCheck:
    total = cand.real.numel()
    rows = _as_rows(position_ids, cand.axes)
    shape = list(position_ids.shape)
    if rows is not None and rows.shape[1] != total and cp > 1 and rows.shape[1] * cp == total:
        return PositionCheck(True, ["sliced"], [Finding(
            _code("MROPE_WRONG_SLICE", cand.axes), "error",
            f"position_ids {shape} hold {rows.shape[1]} tokens but input_ids hold the full row of {total}: the "
            f"positions were sliced for one of {cp} ranks while the ids were not",
            "slice position_ids together with input_ids (or not at all), with the same layout indices")])
    if rows is None or rows.shape[1] != total:
        return PositionCheck(True, ["bad shape"], [_shape_problem(shape, total, rank=None, cand=cand)])
    verdict = _verdict(rows, cand, torch.arange(total))
    if verdict.status == "not per segment":
        return PositionCheck(True, [verdict.status], [_not_per_segment(None, cand.axes)])
    if verdict.status == "mismatch":
        segment = int(torch.searchsorted(cu[1:], torch.tensor(verdict.token), right=True))
        return PositionCheck(True, [verdict.status],
                             [_mismatch(verdict, verdict.token, None, segment, None, cand.axes)])
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
        elif problem is not None and problem.code.endswith("ROPE_NOT_PER_SEGMENT"):
            per_segment.append(rank)
        elif problem is not None:
            check.findings.append(problem)
    if per_segment:
        finding = _not_per_segment(per_segment[0], cand.axes)
        ranks = ", ".join(map(str, per_segment))
        check.findings.insert(0, Finding(finding.code, finding.severity, f"rank(s) {ranks}: " + finding.message,
                                         finding.hint, rank=per_segment[0]))
    if wrong_slice:
        check.findings.insert(0, Finding(
            _code("MROPE_WRONG_SLICE", cand.axes), "error", "; ".join(wrong_slice),
            f"slice the full row's {'[3, 1, T]' if cand.axes == 3 else '[1, T]'} positions on the last dim with the "
            f"same {plan.kind} indices as input_ids "
            "(Megatron: index_select(-1, thd_get_partitioned_indices(...)))",
            rank=next(r for r, s in enumerate(check.statuses) if s in _SLICE_STATUSES or s.startswith("sliced"))))
    return check


_SLICE_STATUSES = ("not sliced", "wrong dim")


def _rank_status(tensor: torch.Tensor, cand: _Candidates, plan: Layout, others: dict[str, Layout],
                 rank: int) -> tuple[str, Finding | str | None]:
    """One rank's status and its problem: a finding, or a wrong-slice sentence to merge."""
    shape, total, local = list(tensor.shape), plan.total_tokens, plan.local_tokens
    rows = _as_rows(tensor, cand.axes)
    if plan.cp > 1 and tensor.dim() > 0 and tensor.shape[-1] == total:
        if rows is not None:
            return "not sliced", f"rank {rank} holds {shape}: not sliced (the full row's positions)"
        return "wrong dim", (f"rank {rank} holds {shape}: cut on a dim other than the token dim (last), which still "
                             f"has all {total} tokens")
    if rows is None or rows.shape[1] != local:
        return "bad shape", _shape_problem(shape, local, rank=rank, cand=cand)
    index = plan.global_indices(rank)
    verdict = _verdict(rows, cand, index)
    if verdict.status.startswith("ok"):
        return verdict.status, None
    if verdict.status == "not per segment":
        return verdict.status, _not_per_segment(rank, cand.axes)
    sliced = _sliced_with(rows, cand, others, rank)
    if sliced is not None:
        kind, variant = sliced
        return f"sliced {kind}", (f"rank {rank}'s positions ({variant}) were sliced with the {kind} layout, "
                                  f"not {plan.kind}")
    place = plan.locate(rank, verdict.token)
    return verdict.status, _mismatch(verdict, int(index[verdict.token]), rank, place.segment, place.chunk, cand.axes)


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
    for kind in DISTINCT_LAYOUTS:
        if kind == plan.kind:
            continue
        try:
            others[kind] = make_layout(plan.cu_seqlens, plan.cp, kind)
        except InputError:
            continue
    return others
