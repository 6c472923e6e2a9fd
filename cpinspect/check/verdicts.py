"""Judge one case: every rank's final state against the oracle's rows, one verdict per rank.

Verdicts, most severe first: ``timeout`` (a rank never arrived), ``divergence`` (ranks called
different collectives, or one left while others waited), ``exception`` (on all ranks together, or
only some: then the others would hang), ``bad-return`` (not a 1-D integer tensor),
``wrong-length``, ``wrong-rows`` (``wrong-output`` under ``check --reference``: :mod:`cpinspect.check.reference`),
``pass``. The oracle (:mod:`cpinspect.core.oracle`) maps local
positions to global ones by formula and never counts chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from cpinspect.check.cases import Case
from cpinspect.core.compare import compare_rows
from cpinspect.core.layout import Place
from cpinspect.core.oracle import expected_rows, global_positions
from cpinspect.core.ranges import format_ranges
from cpinspect.groups.callsite import error_site
from cpinspect.groups.coordinator import CollectiveAbort, CollectiveCall, RankState, SpmdError, only_some_raised

PASS, WRONG_ROWS, WRONG_LENGTH, BAD_RETURN = "pass", "wrong-rows", "wrong-length", "bad-return"
WRONG_OUTPUT = "wrong-output"  # check --reference: a per-token output differs from the reference's
EXCEPTION, DIVERGENCE, TIMEOUT = "exception", "divergence", "timeout"
RANK_DEPENDENT = "rank-dependent-collectives"
SEVERITY = (PASS, WRONG_OUTPUT, WRONG_ROWS, WRONG_LENGTH, BAD_RETURN, EXCEPTION, DIVERGENCE, TIMEOUT)


@dataclass
class Returned:
    """What a rank's call gave back, and the line the user's function returned from."""

    value: Any
    site: str


@dataclass
class RankVerdict:
    """One rank's outcome. ``first_difference`` indexes the rank's vision tokens in local order."""

    rank: int
    verdict: str
    message: str
    expected: list[int]
    got: list[int] | None = None
    calls: list[CollectiveCall] = field(default_factory=list)
    first_difference: int | None = None
    segment: int | None = None
    chunk: int | None = None
    status: str = "returned"  # how the rank ended: returned, raised, waiting (aborted in a collective), running

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank, "verdict": self.verdict, "message": self.message, "expected": self.expected,
            "got": self.got, "first_difference": self.first_difference, "segment": self.segment, "chunk": self.chunk,
            "collectives": [c.describe() for c in self.calls],
        }


@dataclass
class CaseResult:
    """One case on every rank: the worst rank verdict and a paragraph saying what happened."""

    case: Case
    verdict: str
    summary: str
    ranks: list[RankVerdict]
    partial: bool = False  # an exception raised on some ranks only: the others would hang

    @property
    def ok(self) -> bool:
        return self.verdict == PASS

    @property
    def completed(self) -> bool:
        """Every rank returned (the rows may still be wrong)."""
        return self.verdict in (PASS, WRONG_OUTPUT, WRONG_ROWS, WRONG_LENGTH, BAD_RETURN)

    def detail_lines(self) -> list[str]:
        lines = [self.summary] if self.summary else []
        return lines + [r.message for r in self.ranks if r.verdict != PASS or not self.completed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case.name, "kind": self.case.kind, "cp": self.case.cp, "layout": self.case.layout,
            "segments": self.case.segment_lengths,
            "logical_segments": self.case.logical_lengths,
            "tokens": self.case.total_tokens, "vision_tokens": self.case.vision_tokens, "verdict": self.verdict,
            "summary": self.summary, "ranks": [r.to_dict() for r in self.ranks],
            **({} if self.case.segment_cp is None else {"local_cp_size": self.case.segment_cp.tolist()}),
        }


def judge(case: Case, states: list[RankState], failure: SpmdError | None) -> CaseResult:
    """Turn the ranks' final states into verdicts (see the module docstring for the order)."""
    # hybrid CP: simulate's oracle, the rows at the layout's own index map (its placement is a model, no formula)
    kind, index_map = ("file", case.global_indices()) if case.segment_cp is not None else (case.layout, None)
    expected = [expected_rows(case.vision_mask, global_positions(kind, case.cu_seqlens, case.cp, r, index_map))
                for r in range(case.cp)]
    raised = [s for s in states if s.status == "raised" and not isinstance(s.error, CollectiveAbort)]
    if failure is not None and failure.kind == "timeout":
        return _stopped(case, TIMEOUT, str(failure), states, expected)
    if raised:
        result = _stopped(case, EXCEPTION, _exception_summary(raised, states), states, expected)
        result.partial = len(raised) < len(states)
        return result
    if failure is not None:
        return _stopped(case, DIVERGENCE, f"collective divergence: {failure}", states, expected)
    places = _Places(case)
    ranks = [_compare(places, state, rows) for state, rows in zip(states, expected)]
    worst = max((r.verdict for r in ranks), key=SEVERITY.index, default=PASS)
    return CaseResult(case, worst, "", ranks)


def _stopped(case: Case, verdict: str, summary: str, states: list[RankState],
             expected: list[torch.Tensor]) -> CaseResult:
    ranks = [RankVerdict(s.rank, verdict, _state_line(s), rows.tolist(), calls=list(s.calls), status=_status(s))
             for s, rows in zip(states, expected)]
    return CaseResult(case, verdict, summary, ranks)


def _status(state: RankState) -> str:
    if isinstance(state.error, CollectiveAbort) or state.status == "waiting":
        return "waiting"
    return state.status


def _state_line(state: RankState) -> str:
    """Where one rank stood when the case stopped, with ``file:line``."""
    done = f"after {len(state.calls)} collective(s)"
    if isinstance(state.error, CollectiveAbort) or state.status == "waiting":
        return f"rank {state.rank}: waiting in {state.calls[-1].describe()}" if state.calls else (
            f"rank {state.rank}: stopped {done}")
    if state.status == "raised":
        site = error_site(state.error, include_cpinspect=False) if state.error is not None else ""
        where = f" at {site or state.error_site}" if site or state.error_site else ""
        return f"rank {state.rank}: raised {type(state.error).__name__}: {state.error}{where} {done}"
    if state.status == "returned":
        site = state.value.site if isinstance(state.value, Returned) and state.value.site else ""
        return f"rank {state.rank}: returned{f' at {site}' if site else ''} {done}"
    return f"rank {state.rank}: still running in its own code {done} (stuck before its next collective?)"


def _exception_summary(raised: list[RankState], states: list[RankState]) -> str:
    if len(raised) == len(states):
        return f"all {len(states)} ranks raised together: no rank is left waiting in a collective"
    others = [s for s in states if s not in raised]
    waiting = [f"rank {s.rank} in {s.calls[-1].describe()}" for s in others
               if isinstance(s.error, CollectiveAbort) and s.calls]
    return only_some_raised([s.rank for s in raised], len(states), waiting)


def _as_rows(value: Any) -> tuple[torch.Tensor | None, str]:
    """The returned rows as a 1-D int64 tensor, or why the value is not one."""
    if not isinstance(value, torch.Tensor):
        return None, f"returned a {type(value).__name__}, not a LongTensor of rows"
    if value.dtype not in (torch.int64, torch.int32):
        return None, f"returned a {str(value.dtype).removeprefix('torch.')} tensor; rows must be int64 (or int32)"
    if value.dim() != 1:
        return None, f"returned shape {list(value.shape)}; rows must be a 1-D tensor, one row per local vision token"
    return value.detach().to("cpu", torch.long), ""


class _Places:
    """Layout facts of one case, computed once, to name where a rank's first wrong row lies."""

    def __init__(self, case: Case) -> None:
        self.layout = case.plan()
        self.local_masks = case.local_masks()

    def of_vision_token(self, rank: int, index: int) -> Place:
        """The place of ``rank``'s ``index``-th local vision token; its segment is the packed segment
        (document) holding it, also where the layout's pieces span the whole row."""
        place = self.layout.locate(rank, int(torch.nonzero(self.local_masks[rank]).view(-1)[index]))
        if self.layout.kind == "zigzag":
            return place
        segment = int(torch.searchsorted(self.layout.cu_seqlens[1:], torch.tensor(place.position), right=True))
        return replace(place, segment=segment)


def _where(place: Place, index: int, got: torch.Tensor, expected: torch.Tensor, kind: str) -> str:
    """`` (first difference at ...: segment s chunk c ...)`` for the first differing vision token (outside
    zigzag the chunk is the layout's piece: ``segment s, contiguous piece p``)."""
    piece = f" chunk {place.chunk}" if kind == "zigzag" else f", {kind} piece {place.chunk}"
    return (f" (first difference at its vision token {index}: local position {place.local}, global position "
            f"{place.position}, segment {place.segment}{piece}: expected row "
            f"{int(expected[index])}, got {int(got[index])})")


def _compare(places: _Places, state: RankState, expected: torch.Tensor) -> RankVerdict:
    value = state.value.value if isinstance(state.value, Returned) else state.value
    got, problem = _as_rows(value)
    verdict = RankVerdict(state.rank, PASS, f"rank {state.rank}: ok", expected.tolist(), calls=list(state.calls))
    if got is None:
        verdict.verdict, verdict.message = BAD_RETURN, f"rank {state.rank}: {problem}"
        return verdict
    verdict.got = got.tolist()
    shown = f"expected {_rows_text(expected)}, got {_rows_text(got)}"
    diff = compare_rows(got, expected)
    where = ""
    if diff is not None and diff.differing:
        place = places.of_vision_token(state.rank, diff.first)
        verdict.first_difference, verdict.segment, verdict.chunk = diff.first, place.segment, place.chunk
        where = _where(place, diff.first, got, expected, places.layout.kind)
    if diff is not None and diff.length_differs:
        verdict.verdict = WRONG_LENGTH
        verdict.message = (f"rank {state.rank}: wrong length: {got.numel()} rows for {expected.numel()} local vision "
                           f"token(s); {shown}{where}")
    elif verdict.first_difference is not None:
        verdict.verdict = WRONG_ROWS
        order = "same rows, wrong order: " if diff is not None and diff.same_rows else ""
        verdict.message = f"rank {state.rank}: wrong rows: {order}{shown}{where}"
    return verdict


def _rows_text(rows: torch.Tensor) -> str:
    """The rows as ranges; an empty list says so (never a bare ``-``)."""
    return format_ranges(rows) if rows.numel() else "no rows"
