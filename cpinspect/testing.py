"""A pytest helper: check your own selection function in your own test suite.

    from cpinspect.testing import assert_selection_matches

    def test_my_selection():
        assert_selection_matches(select_rows, cp=[2, 4], cases=200, seed=0)

On failure it raises ``AssertionError`` whose message is the ``cpinspect check`` report, with the
failure shrunk to a smallest batch saved under ``save_dir`` (a fresh temporary folder by default)
and the command that replays it.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cpinspect.check import DEFAULT_CPS, DEFAULT_TIMEOUT_S, BatchInput, CheckReport, run_check


def assert_selection_matches(
    fn: Callable[..., Any],
    *,
    cp: Sequence[int] | int = DEFAULT_CPS,
    cases: int = 100,
    seed: int = 0,
    signature: str = "default",
    batches: Sequence[BatchInput] = (),
    timeout: float = DEFAULT_TIMEOUT_S,
    max_seconds: float = 120.0,
    save_dir: str | os.PathLike | None = None,
    allow_apply_keywords: bool = False,
    layout: str = "zigzag",
) -> CheckReport:
    """Assert that ``fn`` selects exactly the oracle's rows on every rank, rank-uniformly.

    Same cases, verdicts and report as ``cpinspect check`` (``cp``, ``cases``, ``seed``,
    ``signature``, ``batches`` and ``layout`` mean what the CLI options do). Returns the report when it passes.
    """
    # created only if a failure is saved, so a passing test leaves nothing behind
    folder = save_dir if save_dir is not None else Path(tempfile.gettempdir()) / f"cpinspect-{uuid.uuid4().hex[:12]}"
    report = run_check(
        fn, cp=cp, cases=cases, seed=seed, signature=signature, batches=batches, timeout=timeout,
        max_seconds=max_seconds, save_dir=folder, strict_apply=not allow_apply_keywords, layout=layout,
    )
    if not report.ok:
        raise AssertionError(report.text())
    return report
