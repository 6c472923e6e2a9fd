"""Findings: what a check concluded, with a stable code, a place and a fix (no torch here).

One type for every report. ``status`` is set where a diagnosis weighs causes: ``confirmed`` (the
numbers match exactly, or the batch shows it), ``possible`` (one number matches), ``info``
(context, or a check that passed: ``CONSISTENT``); plain checks leave it ``None``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Finding:
    """One conclusion. ``rank``/``segment``/``chunk`` are ``None`` where they do not apply."""

    code: str
    severity: str
    message: str
    hint: str = ""
    rank: int | None = None
    segment: int | None = None
    chunk: int | None = None
    status: str | None = None

    @property
    def is_problem(self) -> bool:
        return self.severity in ("error", "warning")

    @property
    def is_cause(self) -> bool:
        """A confirmed problem: what makes a diagnosis exit 1."""
        return self.status == "confirmed" and self.is_problem

    def weighed(self) -> Finding:
        """This finding as a diagnosis states it: problems confirmed, the rest info."""
        return dataclasses.replace(self, status="confirmed" if self.is_problem else "info")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: simulate's schema, or diagnose's (status second, hint last) when weighed."""
        place = {"rank": self.rank, "segment": self.segment, "chunk": self.chunk}
        if self.status is None:
            return {"code": self.code, "severity": self.severity, "message": self.message, "hint": self.hint, **place}
        return {"code": self.code, "status": self.status, "severity": self.severity, "message": self.message,
                **place, "hint": self.hint}
