"""``cpinspect check PROGRAM --reference REF``: judge any CP program by its per-token output.

PROGRAM is called ``fn(group, **batch)`` on every simulated rank, with the rank's local batch fields
(as the generic signature gives them, but ``input_ids`` are the rank's real local token ids);
REF is called ``ref(**batch)`` once per case, in this process, on the unsharded row, and returns a
per-token output ``[T, ...]``. Rank ``r`` passes when its output equals ``REF(...)[positions]``,
``positions`` being the global position of each of its local tokens in the case's layout:
exactly for integer and bool outputs, within ``torch.isclose(rtol, atol)`` for floating ones
(NaN equal to NaN). Timeouts, divergences and exceptions are judged as for row selections
(:func:`cpinspect.check.verdicts.judge`); only a rank's returned value is judged here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from cpinspect.check.cases import Case
from cpinspect.check.signatures import (
    BATCH_FIELDS,
    SIGNATURES,
    RankInputs,
    Signature,
    call_with_fields,
    check_fits,
    generic_fields,
)
from cpinspect.check.verdicts import (
    BAD_RETURN,
    DIVERGENCE,
    EXCEPTION,
    PASS,
    SEVERITY,
    TIMEOUT,
    WRONG_LENGTH,
    WRONG_OUTPUT,
    CaseResult,
    RankVerdict,
    Returned,
    _Places,
    judge,
)
from cpinspect.core.errors import InputError
from cpinspect.core.tokens import token_config
from cpinspect.groups.callsite import error_site
from cpinspect.groups.coordinator import RankState, SpmdError

# fp32 attention: a sharded softmax (log-sum-exp merges, another summation order) differs from the
# unsharded one by ~1e-6 relative; a real bug (a wrong mask, the wrong block) by far more
DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5
SHOWN_VALUES = 4


@dataclass(frozen=True)
class Reference:
    """The single-process reference ``fn(**full_batch) -> [T, ...]`` and the float tolerances."""

    fn: Callable[..., Any]
    name: str
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL

    def describe(self) -> str:
        return f"{self.name} (rtol {self.rtol:g}, atol {self.atol:g} for floats; integers exactly)"


def full_fields(case: Case) -> dict[str, Any]:
    """The unsharded row's batch fields, named and shaped as the program's local ones."""
    return {
        "input_ids": case.input_ids.view(1, -1).clone(), "vision_mask": case.vision_mask.clone(),
        "cu_seqlens": case.logical_or_physical.to(torch.int32), "cu_seqlens_padded": case.cu_seqlens.to(torch.int32),
        "vision_embed_count": case.vision_embed_count, "image_token_id": token_config().image_token_id,
        **({} if case.segment_cp is None else {"local_cp_size": case.segment_cp.to(torch.int32)}),
    }


def reference_output(reference: Reference, case: Case) -> torch.Tensor:
    """``REF(**full_batch)`` for ``case``; an exit-2 error when it raises or is not per-token ``[T, ...]``."""
    try:
        out = call_with_fields(reference.fn, (), full_fields(case))
    except Exception as exc:  # noqa: BLE001 - the user's reference failing is a usage error, not a verdict
        raise InputError(
            f"the reference {reference.name} raised {type(exc).__name__}: {exc} on {case.name} ({case.describe()})",
            where=error_site(exc, include_cpinspect=False) or reference.name,
            fix="make the reference run on the unsharded row (ref(**batch): input_ids [1, T], cu_seqlens_padded ...)",
        ) from None
    total = case.total_tokens
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != total:
        got = f"shape {list(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise InputError(
            f"the reference {reference.name} returned {got} for a row of {total} tokens on {case.name}; "
            "--reference needs a per-token output [T, ...] (one entry per token of the row) to compare each "
            "rank's local tokens with, so no case was judged",
            where=reference.name,
            fix="return the per-token output with the row's tokens first (out[0] or out.squeeze(0) for [1, T, ...])",
        )
    return out.detach().cpu()


def _call_program(fn: Callable[..., Any], inputs: RankInputs, cp_group: Any) -> Any:
    return call_with_fields(fn, (cp_group,), generic_fields(inputs, inputs.input_ids))


def reference_signature(fn: Callable[..., Any], signature: str | None, reference: Reference) -> Signature:
    """The generic signature with the program's real token ids, judged against ``reference``; exit 2 when
    another signature was asked for or either function's parameters cannot take its call."""
    if signature not in (None, "default", "generic"):  # "default": run_check's own default, not a choice
        raise InputError(f"--reference runs the program as fn(group, **batch), not the {signature!r} signature",
                         where="--signature", fix="drop --signature (or pass --signature generic)")
    generic = SIGNATURES["generic"]
    check_fits(fn, generic)
    _check_reference_fits(reference)

    def judge_outputs(case: Case, states: list[RankState], failure: SpmdError | None) -> CaseResult:
        return judge_against(case, states, failure, reference)

    return replace(generic, call=_call_program, judge=judge_outputs)


def _check_reference_fits(reference: Reference) -> None:
    try:
        params = list(inspect.signature(reference.fn).parameters.values())
    except (TypeError, ValueError):
        return
    unknown = [p.name for p in params if p.name not in BATCH_FIELDS and p.default is inspect.Parameter.empty
               and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
    positional_only = [p.name for p in params if p.kind == inspect.Parameter.POSITIONAL_ONLY]
    if unknown or positional_only:
        raise InputError(
            f"the reference {reference.name} takes ({', '.join(p.name for p in params)}), but it is called "
            f"ref(**batch) with only the batch fields {', '.join(BATCH_FIELDS)}, so no case was run",
            where="--reference", fix="name only batch fields as keyword parameters (or take **batch)")


def preflight(reference: Reference, cases: list[Case]) -> None:
    """Run the reference on the first case before any case runs: a bad reference is an exit-2 error."""
    if cases:
        reference_output(reference, cases[0])


def judge_against(case: Case, states: list[RankState], failure: SpmdError | None,
                  reference: Reference) -> CaseResult:
    """Timeouts, divergences and exceptions as :func:`judge` says; returned outputs against the reference."""
    stopped = judge(case, states, failure)
    if stopped.verdict in (TIMEOUT, DIVERGENCE, EXCEPTION):
        return stopped
    expected = reference_output(reference, case)
    places = _Places(case)
    positions = case.global_indices()
    ranks = [_compare(places, state, expected[positions[state.rank]], reference) for state in states]
    worst = max((r.verdict for r in ranks), key=SEVERITY.index, default=PASS)
    return CaseResult(case, worst, "", ranks)


def _compare(places: _Places, state: RankState, expected: torch.Tensor, reference: Reference) -> RankVerdict:
    value = state.value.value if isinstance(state.value, Returned) else state.value
    rank = state.rank
    verdict = RankVerdict(rank, PASS, f"rank {rank}: ok", [], calls=list(state.calls))
    shape = [*expected.shape]
    if not isinstance(value, torch.Tensor):
        verdict.verdict, verdict.message = BAD_RETURN, f"rank {rank}: returned a {type(value).__name__}, not a tensor"
        return verdict
    got = value.detach().cpu()
    if list(got.shape) != shape:
        verdict.verdict = WRONG_LENGTH
        verdict.message = (f"rank {rank}: wrong shape: returned {list(got.shape)} for its {shape[0]} local token(s); "
                           f"the reference's output at their global positions is {shape}")
        return verdict
    exact = not (expected.is_floating_point() or expected.is_complex())
    if exact and (got.is_floating_point() or got.is_complex()):
        verdict.verdict = BAD_RETURN
        verdict.message = (f"rank {rank}: returned a {str(got.dtype).removeprefix('torch.')} tensor where the "
                           f"reference's is {str(expected.dtype).removeprefix('torch.')} (compared exactly)")
        return verdict
    same = _token_matches(got, expected, reference, exact)
    wrong = torch.nonzero(~same).view(-1)
    if wrong.numel():
        first = int(wrong[0])
        place = places.layout.locate(rank, first)
        verdict.verdict, verdict.first_difference = WRONG_OUTPUT, first
        verdict.segment, verdict.chunk = place.segment, place.chunk
        how = "exactly" if exact else f"within rtol {reference.rtol:g}, atol {reference.atol:g}"
        gap = "" if exact else f"; max |got - expected| there {_gap(got[first], expected[first]):.3g}"
        verdict.message = (
            f"rank {rank}: wrong output at {wrong.numel()} of {shape[0]} local token(s) (compared {how}); first at "
            f"local token {first}: global position {place.position}, segment {place.segment} chunk {place.chunk}: "
            f"expected {_values(expected[first])}, got {_values(got[first])}{gap}")
    return verdict


def _token_matches(got: torch.Tensor, expected: torch.Tensor, reference: Reference, exact: bool) -> torch.Tensor:
    """``[n]`` whether each local token's output matches the reference's."""
    if exact:
        close = got == expected
    else:
        dtype = torch.promote_types(got.dtype, expected.dtype)
        close = torch.isclose(got.to(dtype), expected.to(dtype), rtol=reference.rtol, atol=reference.atol,
                              equal_nan=True)
    return close.reshape(close.shape[0], -1).all(dim=1) if close.dim() > 1 else close


def _gap(got: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (got.double() - expected.double()).abs()
    return float(torch.nan_to_num(diff, nan=float("inf")).max()) if diff.numel() else 0.0


def _values(values: torch.Tensor) -> str:
    flat = values.reshape(-1).tolist()
    shown = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in flat[:SHOWN_VALUES])
    return f"[{shown}{', ...' if len(flat) > SHOWN_VALUES else ''}]"
