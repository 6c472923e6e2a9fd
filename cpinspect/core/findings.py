"""Findings: what a check concluded, with a stable code, a place and a fix (no torch here)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

SEVERITIES = ("error", "warning", "info")


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

    @property
    def is_problem(self) -> bool:
        return self.severity in ("error", "warning")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
