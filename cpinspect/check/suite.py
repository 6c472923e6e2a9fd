"""The whole check: every case on every rank, the rank-uniformity probe, failures shrunk and saved.

:func:`run_check` is what ``cpinspect check`` and :func:`cpinspect.testing.assert_selection_matches`
call; it returns a :class:`~cpinspect.check.report.CheckReport` (data only) and never hangs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from cpinspect.check.batch_cases import cases_from_batch
from cpinspect.check.cases import Case, generate_cases
from cpinspect.check.loading import target_name
from cpinspect.check.reference import Reference, preflight, reference_signature
from cpinspect.check.report import CheckReport, ShrunkFailure
from cpinspect.check.run import DEFAULT_TIMEOUT_S, run_case
from cpinspect.check.shrink import ShrinkResult, replay_commands, save_case, shrink_case
from cpinspect.check.signatures import Signature, get_signature, infer_signature
from cpinspect.check.uniformity import Uniformity, check_uniformity
from cpinspect.check.verdicts import TIMEOUT, CaseResult
from cpinspect.core.batch import PackedBatch
from cpinspect.core.errors import InputError
from cpinspect.core.hybrid import KIND as HYBRID
from cpinspect.core.layout import LAYOUTS
from cpinspect.core.loading import load_batch
from cpinspect.core.tokens import TokenConfig, token_config

DEFAULT_CPS = (2, 3, 4, 8)
BatchInput = Union[str, os.PathLike, PackedBatch]


@dataclass(frozen=True)
class _Replay:
    """Where shrunk failures are saved and the flags their replay commands carry."""

    save_dir: str | os.PathLike | None
    token_flags: Sequence[str]
    check_flags: Sequence[str]


def run_check(
    fn: Callable[..., Any],
    *,
    cp: Sequence[int] | int = DEFAULT_CPS,
    cases: int = 100,
    seed: int = 0,
    signature: str | None = "default",
    batches: Sequence[BatchInput] = (),
    timeout: float = DEFAULT_TIMEOUT_S,
    max_seconds: float = 120.0,
    shrink: bool = True,
    save_dir: str | os.PathLike | None = None,
    target: str | None = None,
    tokens: TokenConfig | None = None,
    strict_apply: bool = True,
    replay_flags: Sequence[str] = (),
    check_flags: Sequence[str] = (),
    reference: Reference | None = None,
    layout: str = "zigzag",
) -> CheckReport:
    """Check ``fn`` on ``cases`` seeded cases per the cp list plus ``batches``; never hangs.

    Stops generating cases after ``max_seconds`` or after the first case that timed out (each
    further one would cost another ``timeout``). Failures are shrunk and, with ``save_dir``, saved
    as :func:`failure_file_stem` names them. ``replay_flags`` are repeated in both replay commands
    (token options), ``check_flags`` only in the ``cpinspect check`` one (``--out DIR``). ``layout`` (a name
    of :data:`cpinspect.core.layout.LAYOUTS`) cuts every case and picks its oracle; replay commands carry it. With
    ``reference``, ``fn`` is a ``fn(group, **batch)`` program judged by its per-token output
    (:mod:`cpinspect.check.reference`), not by rows.
    """
    started = time.monotonic()
    deadline = started + max_seconds
    cps = [cp] if isinstance(cp, int) else list(cp)
    if reference is not None:  # a program judged by its output: the generic call
        sig = reference_signature(fn, signature, reference)
    else:
        sig = infer_signature(fn) if signature is None else get_signature(signature)  # None: from the parameter names
    tokens = tokens or token_config()
    _validate(cps, cases, timeout, layout)
    todo, notes = _batch_cases(batches, cps, tokens, layout)
    todo += generate_cases(cps, cases, seed, tokens, layout)
    if reference is not None:
        preflight(reference, todo)  # a reference that is not per-token: exit 2 before any case runs
        notes.append(f"each rank's output was compared with the reference {reference.describe()}")
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
    uniformity = Uniformity(skipped="a case timed out, so no perturbed case was run") if hung else check_uniformity(
        fn, sig, results, timeout=timeout, strict_apply=strict_apply, deadline=deadline)
    report = CheckReport(target or target_name(fn), sig.name, cps, seed, results, uniformity, notes=notes,
                         layout=layout)
    if shrink:
        floor = 1 if 1 in cps else min(2, min(cps))
        apply_flag = () if strict_apply else ("--allow-apply-keywords",)
        replay = _Replay(save_dir, replay_flags, (*apply_flag, *check_flags))
        report.shrunk = _shrink_failures(fn, sig, report, floor, timeout, strict_apply, replay)
    report.elapsed = time.monotonic() - started
    return report


def check_layout_name(layout: str) -> None:
    """The exit-2 error for a layout ``check`` cannot cut its cases by (before any case runs)."""
    if layout not in (*LAYOUTS, HYBRID):
        raise InputError(f"check cannot cut its cases by the {layout!r} layout", where="--layout",
                         fix=f"use one of {', '.join((*LAYOUTS, HYBRID))} (--layout-from is simulate's only)")


def _validate(cps: list[int], cases: int, timeout: float, layout: str) -> None:
    check_layout_name(layout)
    if not cps or any(c < 1 for c in cps):
        raise InputError(f"cp values must be at least 1, got {cps}", where="--cp", fix="pass e.g. --cp 2,3,4,8")
    if cases < 0:
        raise InputError(f"--cases is {cases}", where="--cases", fix="pass 0 or more")
    if timeout <= 0:
        raise InputError(f"--timeout is {timeout:g} s", where="--timeout", fix="pass a positive number of seconds")


def _batch_cases(batches: Sequence[BatchInput], cps: list[int], tokens: TokenConfig,
                 layout: str) -> tuple[list[Case], list[str]]:
    cases: list[Case] = []
    notes: list[str] = []
    for source in batches:
        batch = source if isinstance(source, PackedBatch) else load_batch(source)
        found, skipped = cases_from_batch(batch, cps, tokens, layout)
        cases += found
        notes += skipped
    return cases, notes


def _shrink_failures(fn: Callable[..., Any], sig: Signature, report: CheckReport, floor: int, timeout: float,
                     strict_apply: bool, replay: _Replay) -> list[ShrunkFailure]:
    """Shrink the first failure of each verdict (a hang is not shrunk: each try could cost a timeout)."""
    firsts: dict[str, CaseResult] = {}
    for result in report.failures:
        firsts.setdefault(result.verdict, result)
    targets = [(v, r) for v, r in firsts.items() if v != TIMEOUT][:3]
    if report.uniformity.witness is not None and report.uniformity.witness.verdict != TIMEOUT:
        targets.append((report.uniformity.shrink_label, report.uniformity.witness))
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
        path = (save_case(outcome.case, Path(replay.save_dir), failure_file_stem(report, label))
                if replay.save_dir else None)
        commands = replay_commands(report.target, path, outcome.case.cp, report.signature, replay.token_flags,
                                   replay.check_flags, layout=report.layout) if path else []
        commands = commands[:1] if sig.judge is not None else commands  # `simulate` shows rows, not outputs
        shrunk.append(ShrunkFailure(label, result.case, final, outcome.attempts, path, commands))
    return shrunk


def failure_file_stem(report: CheckReport, label: str) -> str:
    """``<file>.<function>-<verdict>[-<layout>]-cp<cps>-seed<seed>``: a run with another seed, cp list or
    layout never overwrites this run's file (``early_return.select_rows-divergence-cp2,3,4,8-seed0``; the
    layout is named unless it is zigzag)."""
    target = report.target
    name = target.rpartition(":")[2] or target
    base = Path(target.rpartition(":")[0]).stem if ":" in target else ""
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in (f"{base}.{name}" if base else name))
    layout = "" if report.layout == "zigzag" else f"-{report.layout}"
    return f"{stem}-{label}{layout}-cp{','.join(map(str, report.cps))}-seed{report.seed}"
