"""Run a user's own vision-row selection on simulated CP ranks and judge every rank.

Each case is sharded in Megatron's zigzag layout; every rank calls the user's function, unmodified,
through a signature adapter (:mod:`cpinspect.check.signatures`) on its own thread of
:func:`cpinspect.groups.simulated.execute_spmd`, which fingerprints every collective and never waits past the
timeout. A rank's rows are then compared with the oracle (:mod:`cpinspect.core.oracle`), which maps
local positions to global ones by formula and never counts chunks.

Verdicts, most severe first: ``timeout`` (a rank never arrived), ``divergence`` (ranks called
different collectives, or one left while others waited), ``exception`` (on all ranks together, or
only some: then the others would hang), ``bad-return`` (not a 1-D integer tensor),
``wrong-length``, ``wrong-rows``, ``pass``. Across cases, ``rank-dependent-collectives`` reports a
collective sequence that follows rank-local data even where no case happened to diverge.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.util
import os
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

import torch

from cpinspect.check.cases import Case, cases_from_batch, generate_cases
from cpinspect.check.shrink import ShrinkResult, replay_commands, save_case, shrink_case
from cpinspect.check.signatures import SIGNATURES, RankInputs, Signature, get_signature
from cpinspect.core.batch import PackedBatch
from cpinspect.core.errors import InputError
from cpinspect.core.layout import make_layout
from cpinspect.core.loading import load_batch
from cpinspect.core.oracle import expected_rows, global_positions
from cpinspect.core.ranges import format_ranges
from cpinspect.core.tokens import TokenConfig, token_config
from cpinspect.groups.callsite import error_site, short_path
from cpinspect.groups.simulated import CollectiveCall, RankState, SpmdError, _CollectiveAbort, execute_spmd

PASS, WRONG_ROWS, WRONG_LENGTH, BAD_RETURN = "pass", "wrong-rows", "wrong-length", "bad-return"
EXCEPTION, DIVERGENCE, TIMEOUT = "exception", "divergence", "timeout"
RANK_DEPENDENT = "rank-dependent-collectives"
SEVERITY = (PASS, WRONG_ROWS, WRONG_LENGTH, BAD_RETURN, EXCEPTION, DIVERGENCE, TIMEOUT)
DEFAULT_CPS = (2, 3, 4, 8)
DEFAULT_TIMEOUT_S = 5.0
BatchInput = Union[str, os.PathLike, PackedBatch]


# ---------------------------------------------------------------- loading the user's function


def load_function(spec: str) -> Callable[..., Any]:
    """``path/to/file.py:function`` or ``package.module:function`` (``Class.method`` allowed)."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise InputError(
            f"{spec!r} does not name a function",
            where="the IMPLEMENTATION argument",
            fix="write path/to/file.py:function or package.module:function",
        )
    looks_like_file = module_part.endswith(".py") or "/" in module_part or os.sep in module_part
    module = _import_file(Path(module_part)) if looks_like_file else _import_module(module_part)
    obj: Any = module
    for name in attr.split("."):
        if not hasattr(obj, name):
            found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise InputError(
                f"{module_part} has no attribute {attr!r}",
                where=spec,
                fix=f"name one of its callables: {', '.join(found[:12]) or '(none defined)'}",
            )
        obj = getattr(obj, name)
    if not callable(obj):
        raise InputError(
            f"{spec} is a {type(obj).__name__}, not a function",
            where=spec,
            fix="point at the selection function itself",
        )
    return obj


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"the file {path} does not exist", where=str(path), fix="check the path before the ':'")
    name = f"_cpinspect_user_{path.stem}_{abs(hash(str(path.resolve()))):x}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InputError(f"{path} cannot be imported as Python", where=str(path), fix="pass a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = str(path.resolve().parent)
    if folder not in sys.path:  # lets the file import its neighbours, as `python file.py` would
        sys.path.insert(0, folder)
    _execute_import(lambda: spec.loader.exec_module(module), str(path))  # type: ignore[union-attr]
    return module


def _import_module(name: str) -> Any:
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    return _execute_import(lambda: importlib.import_module(name), name)


def _execute_import(load: Callable[[], Any], what: str) -> Any:
    try:
        return load()
    except SyntaxError as exc:
        raise InputError(f"{what} does not import: SyntaxError: {exc.msg}", where=f"{exc.filename}:{exc.lineno}",
                         fix="fix the syntax error") from None
    except ModuleNotFoundError as exc:
        missing = exc.name or str(exc)
        fix = ("pass a file path (path/to/file.py:function), or run from the folder that holds the package"
               if what.startswith(str(missing)) else f"install {missing} in this environment")
        raise InputError(f"importing {what} failed: No module named {missing!r}", where=error_site(exc, include_cpinspect=False) or what,
                         fix=fix) from None
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - any import-time failure of user code is a usage error
        raise InputError(f"importing {what} raised {type(exc).__name__}: {exc}", where=error_site(exc, include_cpinspect=False) or what,
                         fix=f"make {what} importable on its own (run it with python to see the traceback)") from None




# ---------------------------------------------------------------- running one case


@dataclass
class _Returned:
    """What a rank's call gave back, and the line the user's function returned from."""

    value: Any
    site: str


_IN_RANK = threading.local()


class _ReturnSite:
    """Records where ``fn`` returns, through a per-thread profile hook (for "returned at file:line")."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        target = getattr(fn, "__func__", fn)
        method = vars(type(target)).get("__call__")  # a callable object: its __call__ is the function
        self.code: types.CodeType | None = getattr(target, "__code__", None) or getattr(method, "__code__", None)
        self.site = ""

    def _profile(self, frame: types.FrameType, event: str, arg: Any) -> None:
        code = frame.f_code
        if event == "return" and code is self.code:
            self.site = f"{short_path(os.path.abspath(code.co_filename))}:{frame.f_lineno}"

    def __enter__(self) -> _ReturnSite:
        if self.code is not None:
            sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.setprofile(None)


def _rank_program(group: Any, adapter: Callable[..., Any], fn: Callable[..., Any], local_masks: torch.Tensor,
                  cu: torch.Tensor, logical: torch.Tensor, count: int, threads: list[int]) -> _Returned:
    """What each simulated rank runs: fresh copies of its inputs, then the user's function."""
    threads.append(threading.get_ident())
    rank = group.rank()
    inputs = RankInputs(local_masks[rank].clone(), cu.clone(), logical.clone(), count)
    _IN_RANK.active = True
    try:
        with _ReturnSite(fn) as returned:
            value = adapter(fn, inputs, group)
    finally:
        _IN_RANK.active = False
    return _Returned(value, returned.site)


@contextlib.contextmanager
def keyword_apply_rejected(enabled: bool = True) -> Iterator[None]:
    """Inside simulated ranks, make ``autograd.Function.apply(..., kw=...)`` fail as older torch does.

    torch releases before pytorch/pytorch#182206 raise ``TypeError: apply() takes no keyword
    arguments`` (Megatron-Bridge #4391, #4784: ``cp_group=`` passed to the vision all-gather); newer
    ones accept it, so a check on a new torch would miss a crash on the torch a training stack pins.
    """
    if not enabled:
        yield
        return
    function_cls = torch.autograd.Function
    original = function_cls.__dict__["apply"]

    def strict_apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        if kwargs and getattr(_IN_RANK, "active", False):
            names = ", ".join(kwargs)
            raise TypeError(
                f"{cls.__name__}.apply() was called with keyword argument(s) {names}: apply() takes no keyword "
                f"arguments on torch releases before pytorch/pytorch#182206, so this crashes there "
                f"(Megatron-Bridge #4391); pass {names} positionally"
            )
        return original.__get__(None, cls)(*args, **kwargs)

    function_cls.apply = classmethod(strict_apply)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        function_cls.apply = original  # type: ignore[method-assign]


def _abandon(threads: Sequence[int]) -> None:
    """Raise SystemExit inside rank threads still stuck in user code after a timeout (best effort)."""
    alive = {t.ident for t in threading.enumerate() if t.is_alive()}
    for ident in threads:
        if ident in alive:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(SystemExit))


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
        return self.verdict in (PASS, WRONG_ROWS, WRONG_LENGTH, BAD_RETURN)

    def detail_lines(self) -> list[str]:
        lines = [self.summary] if self.summary else []
        return lines + [r.message for r in self.ranks if r.verdict != PASS or not self.completed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case.name, "kind": self.case.kind, "cp": self.case.cp, "segments": self.case.segment_lengths,
            "tokens": self.case.total_tokens, "vision_tokens": self.case.vision_tokens, "verdict": self.verdict,
            "summary": self.summary, "ranks": [r.to_dict() for r in self.ranks],
        }


def run_case(fn: Callable[..., Any], case: Case, signature: Signature | str = "default", *,
             timeout: float = DEFAULT_TIMEOUT_S, strict_apply: bool = True) -> CaseResult:
    """Run ``fn`` on every rank of ``case`` and judge each rank against the oracle."""
    signature = get_signature(signature) if isinstance(signature, str) else signature
    local_masks = case.local_masks()
    cu = case.cu_seqlens.to(torch.int32)
    logical = case.logical_or_physical.to(torch.int32)
    threads: list[int] = []
    with keyword_apply_rejected(strict_apply):
        states, failure = execute_spmd(case.cp, _rank_program, signature.call, fn, local_masks, cu, logical,
                                       case.vision_embed_count, threads, timeout=timeout)
    result = judge(case, states, failure)  # before abandoning: a stopped thread updates its state
    if _call_mismatch(states):
        result.summary += (f"; the call itself failed: does the function take the {signature.name!r} signature? "
                           f"(--signature: {', '.join(SIGNATURES)})")
    if failure is not None and failure.kind == "timeout":
        _abandon(threads)
    return result


def _call_mismatch(states: list[RankState]) -> bool:
    """Every rank raised TypeError before entering user code: the signature does not fit."""
    return all(isinstance(s.error, TypeError) and not error_site(s.error, include_cpinspect=False) for s in states)


def judge(case: Case, states: list[RankState], failure: SpmdError | None) -> CaseResult:
    """Turn the ranks' final states into verdicts (see the module docstring for the order)."""
    expected = [expected_rows(case.vision_mask, global_positions("zigzag", case.cu_seqlens, case.cp, r))
                for r in range(case.cp)]
    raised = [s for s in states if s.status == "raised" and not isinstance(s.error, _CollectiveAbort)]
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
    ranks = [RankVerdict(s.rank, verdict, _state_line(s), rows.tolist(), calls=list(s.calls))
             for s, rows in zip(states, expected)]
    return CaseResult(case, verdict, summary, ranks)


def _state_line(state: RankState) -> str:
    """Where one rank stood when the case stopped, with ``file:line``."""
    done = f"after {len(state.calls)} collective(s)"
    if isinstance(state.error, _CollectiveAbort) or state.status == "waiting":
        return f"rank {state.rank}: waiting in {state.calls[-1].describe()}" if state.calls else (
            f"rank {state.rank}: stopped {done}")
    if state.status == "raised":
        site = error_site(state.error, include_cpinspect=False) if state.error is not None else ""
        where = f" at {site or state.error_site}" if site or state.error_site else ""
        return f"rank {state.rank}: raised {type(state.error).__name__}: {state.error}{where} {done}"
    if state.status == "returned":
        site = state.value.site if isinstance(state.value, _Returned) and state.value.site else ""
        return f"rank {state.rank}: returned{f' at {site}' if site else ''} {done}"
    return f"rank {state.rank}: still running in its own code {done} (stuck before its next collective?)"


def _exception_summary(raised: list[RankState], states: list[RankState]) -> str:
    if len(raised) == len(states):
        return f"all {len(states)} ranks raised together: no rank is left waiting in a collective"
    others = [s for s in states if s not in raised]
    waiting = [s for s in others if isinstance(s.error, _CollectiveAbort) and s.calls]
    hang = "; ".join(f"rank {s.rank} in {s.calls[-1].describe()}" for s in waiting) if waiting else (
        "the others at their next collective")
    ids = ", ".join(str(s.rank) for s in raised)
    return f"only rank(s) {ids} of {len(states)} raised; in a real job the others would hang: {hang}"


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
        self.layout = make_layout(case.cu_seqlens, case.cp)
        self.local_masks = case.local_masks()

    def describe(self, rank: int, verdict: RankVerdict, got: torch.Tensor, expected: torch.Tensor) -> str:
        """`` (first difference at ...: segment s chunk c ...)`` for the first differing vision token."""
        index = verdict.first_difference
        if index is None:
            return ""
        layout = self.layout
        local_position = int(torch.nonzero(self.local_masks[rank]).view(-1)[index])
        global_position = int(layout.global_indices(rank)[local_position])
        ends = layout.piece_start + layout.piece_len
        piece = int(torch.searchsorted(ends, torch.tensor(global_position), right=True))
        verdict.segment, verdict.chunk = int(layout.piece_segment[piece]), int(layout.piece_chunk[piece])
        return (f" (first difference at its vision token {index}: local position {local_position}, global position "
                f"{global_position}, segment {verdict.segment} chunk {verdict.chunk}: expected row "
                f"{int(expected[index])}, got {int(got[index])})")


def _compare(places: _Places, state: RankState, expected: torch.Tensor) -> RankVerdict:
    value = state.value.value if isinstance(state.value, _Returned) else state.value
    got, problem = _as_rows(value)
    verdict = RankVerdict(state.rank, PASS, f"rank {state.rank}: ok", expected.tolist(), calls=list(state.calls))
    if got is None:
        verdict.verdict, verdict.message = BAD_RETURN, f"rank {state.rank}: {problem}"
        return verdict
    verdict.got = got.tolist()
    shown = f"expected {format_ranges(expected)}, got {format_ranges(got)}"
    common = min(got.numel(), expected.numel())
    differ = torch.nonzero(got[:common] != expected[:common]).view(-1)
    if differ.numel():
        verdict.first_difference = int(differ[0])
    where = places.describe(state.rank, verdict, got, expected)
    if got.numel() != expected.numel():
        verdict.verdict = WRONG_LENGTH
        verdict.message = (f"rank {state.rank}: wrong length: {got.numel()} rows for {expected.numel()} local vision "
                           f"token(s); {shown}{where}")
    elif verdict.first_difference is not None:
        verdict.verdict = WRONG_ROWS
        verdict.message = f"rank {state.rank}: wrong rows: {shown}{where}"
    return verdict


# ---------------------------------------------------------------- rank-uniform control flow


@dataclass
class Uniformity:
    """Result of perturbing rank-local masks of cases that ran without divergence."""

    runs: int = 0
    finding: str | None = None
    witness: CaseResult | None = None


def mask_variants(case: Case) -> Iterator[tuple[str, Case]]:
    """Same cu_seqlens, cp and embedding count; only which rank holds the vision tokens differs."""
    owner = case.owner_of_positions()
    holders = sorted(set(owner[case.vision_mask].tolist()))
    for rank in dict.fromkeys([holders[0], holders[-1]]) if holders else []:
        moved = _move_vision(case, owner != rank)
        if moved is not None:
            yield f"rank {rank} holds no vision token", moved
    concentrated = _move_vision(case, owner == 0)
    if concentrated is not None and holders != [0]:
        yield "rank 0 holds every vision token", concentrated


def _move_vision(case: Case, allowed: torch.Tensor) -> Case | None:
    """The case with its vision tokens packed into the first ``allowed`` positions (None if too few)."""
    free = torch.nonzero(allowed).view(-1)
    if free.numel() < case.vision_tokens:
        return None
    mask = torch.zeros_like(case.vision_mask)
    mask[free[: case.vision_tokens]] = True
    return case.with_mask(mask)


def check_uniformity(fn: Callable[..., Any], signature: Signature, results: Sequence[CaseResult], *,
                     timeout: float, strict_apply: bool, deadline: float, max_bases: int = 8) -> Uniformity:
    """Rerun cases that did not diverge with rank-local masks moved around; divergence means the
    collective sequence follows rank-local data (an early return on an empty mask, say)."""
    bases = [r for r in results if r.completed and r.case.cp > 1 and r.case.vision_tokens > 0]
    per_cp: dict[int, list[CaseResult]] = {}
    for result in bases:
        if len(per_cp.setdefault(result.case.cp, [])) < 2:
            per_cp[result.case.cp].append(result)
    chosen = [r for group in per_cp.values() for r in group][:max_bases]
    uniformity = Uniformity()
    for base in chosen:
        for label, variant in mask_variants(base.case):
            if time.monotonic() > deadline:
                return uniformity
            run = run_case(fn, replace(variant, name=f"{base.case.name}, {label}"), signature, timeout=timeout,
                           strict_apply=strict_apply)
            uniformity.runs += 1
            if run.verdict in (DIVERGENCE, TIMEOUT) or run.partial:
                uniformity.finding = (
                    f"{base.case.name} ({base.case.describe()}) ran without divergence, but with its vision tokens "
                    f"moved so that {label} (same cu_seqlens, cp and {base.case.vision_embed_count} embeddings) "
                    f"the ranks disagree ({run.verdict}): the collective sequence follows rank-local data. Control "
                    "flow before a collective must depend only on what every rank shares (cu_seqlens, cp, "
                    "vision_embed_count) or has exchanged"
                )
                uniformity.witness = run
                return uniformity
    return uniformity


# ---------------------------------------------------------------- the whole check


@dataclass
class ShrunkFailure:
    """A failure shrunk to a smallest batch, saved where a replay can find it."""

    verdict: str
    original: Case
    result: CaseResult
    attempts: int
    path: Path | None
    commands: list[str]


@dataclass
class CheckReport:
    """Everything ``cpinspect check`` found; :meth:`text` is the report the CLI and pytest helper show."""

    target: str
    signature: str
    cps: list[int]
    seed: int
    results: list[CaseResult]
    uniformity: Uniformity
    shrunk: list[ShrunkFailure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if not r.ok]

    @property
    def ok(self) -> bool:
        return not self.failures and self.uniformity.finding is None

    def verdict_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for result in self.results:
            counts[result.verdict] = counts.get(result.verdict, 0) + 1
        if self.uniformity.finding:
            counts[RANK_DEPENDENT] = 1
        return counts

    def text(self) -> str:
        return "\n".join(report_lines(self))

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target, "signature": self.signature, "cp": self.cps, "seed": self.seed,
            "cases": len(self.results), "ok": self.ok, "verdicts": self.verdict_counts(),
            "results": [r.to_dict() if not r.ok else {"case": r.case.name, "cp": r.case.cp, "verdict": PASS}
                        for r in self.results],
            "rank_uniform": {"runs": self.uniformity.runs, "finding": self.uniformity.finding},
            "shrunk": [{"verdict": s.verdict, "from": s.original.name, "case": s.result.to_dict(),
                        "path": str(s.path) if s.path else None, "replay": s.commands} for s in self.shrunk],
            "notes": self.notes, "seconds": round(self.elapsed, 3),
        }


def report_lines(report: CheckReport) -> list[str]:
    """Plain-text report: a summary, then each failing verdict with its smallest case and replay."""
    cps = ", ".join(map(str, report.cps))
    lines = [f"cpinspect check {report.target} (signature {report.signature}; cp {cps}; seed {report.seed})"]
    failures = report.failures
    counts = ", ".join(f"{v} {n}" for v, n in sorted(report.verdict_counts().items()) if v != PASS)
    if report.ok:
        uniform = (f"collectives are rank-uniform ({report.uniformity.runs} perturbed run(s))" if report.uniformity.runs
                   else "rank-uniformity not checked (no clean case with cp > 1 and vision tokens)")
        lines.append(f"✓ all {len(report.results)} case(s) match the oracle on every rank; {uniform}")
    else:
        lines.append(f"✗ {len(failures)} of {len(report.results)} case(s) failed ({counts})")
    shrunk = {s.verdict: s for s in report.shrunk}
    for verdict in sorted({r.verdict for r in failures}, key=SEVERITY.index, reverse=True):
        group = [r for r in failures if r.verdict == verdict]
        lines.append(f"✗ {verdict}: {len(group)} case(s); first: {group[0].case.name}: {group[0].case.describe()}")
        lines += _failure_block(group[0], shrunk.get(verdict))
    if report.uniformity.finding:
        lines.append(f"✗ {RANK_DEPENDENT}: {report.uniformity.finding}")
        witness = report.uniformity.witness
        lines += _failure_block(witness, shrunk.get(RANK_DEPENDENT)) if witness else []
    lines += [f"note: {note}" for note in report.notes]
    return lines


def _failure_block(first: CaseResult, shrunk: ShrunkFailure | None) -> list[str]:
    shown = shrunk.result if shrunk else first
    lines = []
    if shrunk:
        lines.append(f"  smallest failing batch ({shrunk.attempts} shrink run(s)): {shown.case.describe()}")
    lines += [f"    {line}" for line in shown.detail_lines()]
    if shrunk and shrunk.path:
        lines.append(f"  {'saved':<9}{shrunk.path}")
        lines += [f"  {label:<9}{command}" for label, command in zip(("replay", "expected"), shrunk.commands)]
    return lines


def run_check(
    fn: Callable[..., Any],
    *,
    cp: Sequence[int] | int = DEFAULT_CPS,
    cases: int = 100,
    seed: int = 0,
    signature: str = "default",
    batches: Sequence[BatchInput] = (),
    timeout: float = DEFAULT_TIMEOUT_S,
    max_seconds: float = 120.0,
    shrink: bool = True,
    save_dir: str | os.PathLike | None = None,
    target: str | None = None,
    tokens: TokenConfig | None = None,
    strict_apply: bool = True,
    replay_flags: Sequence[str] = (),
) -> CheckReport:
    """Check ``fn`` on ``cases`` seeded cases per the cp list plus ``batches``; never hangs.

    Stops generating cases after ``max_seconds`` or after the first case that timed out (each
    further one would cost another ``timeout``). Failures are shrunk and, with ``save_dir``, saved.
    """
    started = time.monotonic()
    deadline = started + max_seconds
    cps = [cp] if isinstance(cp, int) else list(cp)
    sig = get_signature(signature)
    tokens = tokens or token_config()
    _validate(cps, cases, timeout)
    todo, notes = _batch_cases(batches, cps, tokens)
    todo += generate_cases(cps, cases, seed, tokens)
    results: list[CaseResult] = []
    for index, case in enumerate(todo):
        if time.monotonic() > deadline:
            notes.append(f"stopped after {index} of {len(todo)} case(s): --max-time {max_seconds:g} s was reached")
            break
        results.append(run_case(fn, case, sig, timeout=timeout, strict_apply=strict_apply))
        if results[-1].verdict == TIMEOUT:
            notes.append(f"stopped after case {index + 1} of {len(todo)}: it timed out, and every further case "
                         f"could cost {timeout:g} s too; fix the hang first")
            break
    hung = bool(results) and results[-1].verdict == TIMEOUT
    uniformity = Uniformity() if hung else check_uniformity(
        fn, sig, results, timeout=timeout, strict_apply=strict_apply, deadline=deadline)
    report = CheckReport(target or _name_of(fn), signature, cps, seed, results, uniformity, notes=notes)
    if shrink:
        floor = 1 if 1 in cps else min(2, min(cps))
        report.shrunk = _shrink_failures(fn, sig, report, floor, timeout, strict_apply, save_dir, replay_flags)
    report.elapsed = time.monotonic() - started
    return report


def _validate(cps: list[int], cases: int, timeout: float) -> None:
    if not cps or any(c < 1 for c in cps):
        raise InputError(f"cp values must be at least 1, got {cps}", where="--cp", fix="pass e.g. --cp 2,3,4,8")
    if cases < 0:
        raise InputError(f"--cases is {cases}", where="--cases", fix="pass 0 or more")
    if timeout <= 0:
        raise InputError(f"--timeout is {timeout:g} s", where="--timeout", fix="pass a positive number of seconds")


def _batch_cases(batches: Sequence[BatchInput], cps: list[int], tokens: TokenConfig) -> tuple[list[Case], list[str]]:
    cases: list[Case] = []
    notes: list[str] = []
    for source in batches:
        batch = source if isinstance(source, PackedBatch) else load_batch(source)
        found, skipped = cases_from_batch(batch, cps, tokens)
        cases += found
        notes += skipped
    return cases, notes


def _name_of(fn: Callable[..., Any]) -> str:
    """``module:qualname``, or ``path/file.py:qualname`` for a function loaded from a file."""
    module = getattr(fn, "__module__", None) or "?"
    name = getattr(fn, "__qualname__", None) or repr(fn)
    path = getattr(sys.modules.get(module), "__file__", None)
    if path and (module == "__main__" or module.startswith("_cpinspect_user_")):
        return f"{short_path(path)}:{name}"
    return f"{module}:{name}"


def _shrink_failures(fn: Callable[..., Any], sig: Signature, report: CheckReport, floor: int, timeout: float,
                     strict_apply: bool, save_dir: str | os.PathLike | None,
                     replay_flags: Sequence[str]) -> list[ShrunkFailure]:
    """Shrink the first failure of each verdict (a hang is not shrunk: each try could cost a timeout)."""
    firsts: dict[str, CaseResult] = {}
    for result in report.failures:
        firsts.setdefault(result.verdict, result)
    targets = [(v, r) for v, r in firsts.items() if v != TIMEOUT][:3]
    if report.uniformity.witness is not None and report.uniformity.witness.verdict != TIMEOUT:
        targets.append((RANK_DEPENDENT, report.uniformity.witness))
    shrunk = []
    for label, result in targets:
        verdict = result.verdict

        hung: list[bool] = []

        def still_fails(candidate: Case, verdict: str = verdict, hung: list[bool] = hung) -> bool:
            if hung:  # after one hang, trying more candidates could cost a timeout each
                return False
            outcome = run_case(fn, candidate, sig, timeout=timeout, strict_apply=strict_apply).verdict
            hung.extend([True] if outcome == TIMEOUT else [])
            return outcome == verdict

        outcome: ShrinkResult = shrink_case(result.case, still_fails, min_cp=floor)
        final = run_case(fn, outcome.case, sig, timeout=timeout, strict_apply=strict_apply)
        path = save_case(outcome.case, Path(save_dir), f"{_stem(report.target)}-{label}") if save_dir else None
        check_flags = () if strict_apply else ("--allow-apply-keywords",)
        commands = replay_commands(report.target, path, outcome.case.cp, report.signature, replay_flags,
                                   check_flags) if path else []
        shrunk.append(ShrunkFailure(label, result.case, final, outcome.attempts, path, commands))
    return shrunk


def _stem(target: str) -> str:
    name = target.rpartition(":")[2] or target
    base = Path(target.rpartition(":")[0]).stem if ":" in target else ""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in (f"{base}.{name}" if base else name))
