"""``cpinspect check``: run a user's own vision-row selection on simulated CP ranks, judge every rank.

One module per stage: ``loading`` (import the user's function), ``cases`` (generated and given
batches), ``signatures`` (how the function is called), ``run`` (one case on every rank),
``verdicts`` (each rank against the oracle), ``uniformity`` (does the collective sequence follow
rank-local data?), ``shrink`` (a smallest failing batch and its replay), ``suite`` (all of it:
:func:`run_check`) and ``report`` (what was found, as data).

The public names load lazily: the CLI imports ``cpinspect.check.signatures`` for its ``--help``
text, which must not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cpinspect.check.loading import load_function
    from cpinspect.check.report import CheckReport, ReportLine, ShrunkFailure
    from cpinspect.check.run import DEFAULT_TIMEOUT_S, keyword_apply_rejected, run_case
    from cpinspect.check.suite import DEFAULT_CPS, BatchInput, run_check
    from cpinspect.check.verdicts import CaseResult, RankVerdict

_EXPORTS = {
    "load_function": "cpinspect.check.loading",
    "CheckReport": "cpinspect.check.report",
    "ReportLine": "cpinspect.check.report",
    "ShrunkFailure": "cpinspect.check.report",
    "DEFAULT_TIMEOUT_S": "cpinspect.check.run",
    "keyword_apply_rejected": "cpinspect.check.run",
    "run_case": "cpinspect.check.run",
    "DEFAULT_CPS": "cpinspect.check.suite",
    "BatchInput": "cpinspect.check.suite",
    "run_check": "cpinspect.check.suite",
    "CaseResult": "cpinspect.check.verdicts",
    "RankVerdict": "cpinspect.check.verdicts",
}

__all__ = [
    "DEFAULT_CPS",
    "DEFAULT_TIMEOUT_S",
    "BatchInput",
    "CaseResult",
    "CheckReport",
    "RankVerdict",
    "ReportLine",
    "ShrunkFailure",
    "keyword_apply_rejected",
    "load_function",
    "run_case",
    "run_check",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cpinspect.check' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
