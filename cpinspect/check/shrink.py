"""Shrink a failing case to a smallest one that still fails the same way; save it; say how to replay.

Greedy, like a property-based tester's shrinker: try candidates from the biggest cut to the
smallest (a smaller cp, fewer segments, no padding, shorter segments, fewer vision tokens), keep
the first one that still fails, start again, stop when none does or the budget is spent. Every
candidate stays a valid row of the case's layout: under the zigzag rule segments shrink by the same
offset in each of their ``2*cp`` chunks, so the lengths stay divisible by ``2*cp``; under the other
rules :meth:`~cpinspect.check.cases.Case.keep` pads the row's end again as the layout pads. Under hybrid CP a
segment's chunks are its own ``2c``; a smaller cp clamps each segment's local cp to the largest divisor of
the new cp that divides it (``gcd(c, cp)``, no re-draw), and :meth:`~cpinspect.check.cases.Case.keep` pads
segments to ``2c`` and appends pad sequences for equal shares again.

The result is saved as a ``.safetensors`` batch that ``cpinspect simulate`` and ``cpinspect
check --batch`` load.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cpinspect.check.cases import Case
from cpinspect.core.layout import pad_multiple, rule_of
from cpinspect.core.vision_items import placeholder_mask


@dataclass(frozen=True)
class ShrinkResult:
    """The smallest failing case found, and how many candidate runs it took."""

    case: Case
    attempts: int


def shrink_case(case: Case, still_fails: Callable[[Case], bool], *, min_cp: int = 1, max_attempts: int = 400,
                max_seconds: float = 20.0) -> ShrinkResult:
    """Shrink ``case`` while ``still_fails(candidate)``; ``min_cp`` is the smallest cp tried."""
    deadline = time.monotonic() + max_seconds
    current, attempts = case, 0
    improved = True
    while improved:
        improved = False
        for candidate in candidates(current, min_cp):
            if attempts >= max_attempts or time.monotonic() > deadline:
                return ShrinkResult(current, attempts)
            if not _smaller(candidate, current):
                continue
            attempts += 1
            if still_fails(candidate):
                current, improved = candidate, True
                break
    return ShrinkResult(current, attempts)


def _size(case: Case) -> tuple[int, ...]:
    return (*case.size_key(), int(case.logical_cu_seqlens is not None))


def _smaller(candidate: Case, current: Case) -> bool:
    """Nothing grew and something shrank."""
    new, old = _size(candidate), _size(current)
    return new != old and all(a <= b for a, b in zip(new, old))


def candidates(case: Case, min_cp: int = 1) -> Iterator[Case]:
    """Smaller variants of ``case``, biggest cuts first."""
    for cp in range(min_cp, case.cp):
        yield with_cp(case, cp)
    yield from _fewer_segments(case)
    if case.logical_cu_seqlens is not None:
        yield replace(case, logical_cu_seqlens=None)
    yield from _shorter_segments(case)
    yield from _fewer_vision_tokens(case)


def with_cp(case: Case, cp: int) -> Case:
    """The case at a smaller cp, cut to what its layout's rule divides: each segment trimmed to a multiple of
    ``2*cp`` under the zigzag rule (empty ones dropped), the row's end to a multiple otherwise."""
    multiple: int | torch.Tensor = pad_multiple(cp, case.layout)
    if rule_of(case.layout) != "zigzag":
        return case.keep(torch.arange(case.total_tokens) < case.total_tokens // multiple * multiple, cp=cp)
    if case.segment_cp is not None:  # hybrid: each segment's clamped local cp (see the module docstring)
        multiple = _chunk_counts(torch.gcd(case.segment_cp, torch.tensor(cp)))
    segment = case.segment_of_positions()
    offset = torch.arange(case.total_tokens) - case.cu_seqlens[segment]
    lengths = case.cu_seqlens[1:] - case.cu_seqlens[:-1]
    return case.keep(offset < (lengths // multiple * multiple)[segment], cp=cp)


def _chunk_counts(segment_cp: torch.Tensor) -> torch.Tensor:
    """``[S]`` equal chunks of every hybrid segment: ``2c`` (``c`` = 1: one)."""
    return torch.where(segment_cp > 1, 2 * segment_cp, 1)


def _segment_chunks(case: Case) -> torch.Tensor:
    """``[S]`` the equal chunks every segment of ``case`` is cut into."""
    if case.segment_cp is not None:
        return _chunk_counts(case.segment_cp)
    return torch.full((case.num_segments,), 2 * case.cp if case.cp > 1 else 1)


def _fewer_segments(case: Case) -> Iterator[Case]:
    segment = case.segment_of_positions()
    count = case.num_segments
    if count < 2:
        return
    half = count // 2
    yield case.keep(segment < half)
    yield case.keep(segment >= half)
    for index in range(count):
        yield case.keep(segment != index)


def _chunk_offsets(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position: its segment, its offset inside its chunk, and its segment's chunk length."""
    segment = case.segment_of_positions()
    chunk_len = ((case.cu_seqlens[1:] - case.cu_seqlens[:-1]) // _segment_chunks(case))[segment]
    offset = torch.arange(case.total_tokens) - case.cu_seqlens[segment]
    return segment, offset % chunk_len.clamp(min=1), chunk_len


def _shorter_segments(case: Case) -> Iterator[Case]:
    """Halve every chunk of one segment, then drop one offset from every chunk of it."""
    segment, within, chunk_len = _chunk_offsets(case)
    lengths = (case.cu_seqlens[1:] - case.cu_seqlens[:-1]).tolist()
    order = sorted(range(case.num_segments), key=lambda s: -lengths[s])
    per_segment_chunk = [n // chunks for n, chunks in zip(lengths, _segment_chunks(case).tolist())]
    for index in order:
        length = per_segment_chunk[index]
        if length < 2:
            continue
        mine = segment == index
        yield case.keep(~mine | (within < length // 2))
        yield case.keep(~mine | (within >= length // 2))
        for drop in range(length):
            yield case.keep(~mine | (within != drop))


def _fewer_vision_tokens(case: Case) -> Iterator[Case]:
    """Clear half the vision tokens, then each maximal run, then each single token."""
    positions = torch.nonzero(case.vision_mask).view(-1)
    if positions.numel() == 0:
        return
    half = positions.numel() // 2
    for cleared in (positions[:half], positions[half:]):
        if cleared.numel():
            yield _cleared(case, cleared)
    breaks = torch.nonzero(positions[1:] != positions[:-1] + 1).view(-1) + 1
    runs = torch.tensor_split(positions, breaks)
    if len(runs) > 1:
        for run in runs:
            yield _cleared(case, run)
    for position in positions[:256]:
        yield _cleared(case, position.view(1))


def _cleared(case: Case, positions: torch.Tensor) -> Case:
    mask = case.vision_mask.clone()
    mask[positions] = False
    return case.with_mask(mask)


def save_case(case: Case, directory: Path, stem: str) -> Path:
    """Write ``case`` as ``directory/stem.safetensors`` in the batch format ``cpinspect simulate`` reads."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}.safetensors"
    tensors = {
        "input_ids": case.input_ids.reshape(1, -1).to(torch.long).contiguous(),
        "vision_embed_count": torch.tensor(case.vision_embed_count, dtype=torch.long),
    }
    physical = case.cu_seqlens.to(torch.int32).contiguous()
    if case.logical_cu_seqlens is not None:
        tensors["cu_seqlens_padded"] = physical
        tensors["cu_seqlens"] = case.logical_cu_seqlens.to(torch.int32).contiguous()
    else:
        tensors["cu_seqlens"] = physical
    placeholders = placeholder_mask(case.input_ids, case.tokens)
    if case.explicit_mask or not torch.equal(placeholders, case.vision_mask):  # the ids alone would mislead
        tensors["vision_mask"] = case.vision_mask.contiguous()
    if case.segment_cp is not None:  # hybrid CP: what simulate and check --batch --layout hybrid read
        tensors["local_cp_size"] = case.segment_cp.to(torch.int32).contiguous()
    layout = {} if case.layout == "zigzag" else {"layout": case.layout}
    save_file(tensors, str(path), metadata={"cpinspect": "shrunk failing case", "cp": str(case.cp),
                                            "from": case.name, **layout})
    return path


def replay_commands(target: str, path: Path, cp: int, signature: str, token_flags: Sequence[str] = (),
                    check_flags: Sequence[str] = (), layout: str = "zigzag") -> list[str]:
    """The command that replays the failure with the user's function, and the one showing the answer
    (both with ``--layout`` unless it is the default zigzag)."""
    layout_flags = [] if layout == "zigzag" else ["--layout", layout]
    tokens = "".join(f" {shlex.quote(flag)}" for flag in [*layout_flags, *token_flags])
    if layout == "hybrid":  # simulate takes hybrid CP from the file's local_cp_size, not from --layout
        simulate_flags = "".join(f" {shlex.quote(flag)}" for flag in token_flags)
    else:
        simulate_flags = tokens
    extra = "".join(f" {shlex.quote(flag)}" for flag in check_flags)
    signature_flag = f" --signature {shlex.quote(signature)}" if signature != "default" else ""
    quoted = shlex.quote(str(path))
    return [
        f"cpinspect check {shlex.quote(target)} --batch {quoted} --cp {cp} --cases 0{signature_flag}{tokens}{extra}",
        f"cpinspect simulate --cp {cp} {quoted}{simulate_flags}",
    ]
