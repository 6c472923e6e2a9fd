"""The diagnosis' findings and report: plain values, no torch, so views and JSON need nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cpinspect.core.findings import Finding

STATUSES = ("confirmed", "possible", "info")
CAUSE_CODES = (
    "APPLY_KWARG", "BATCH_NOT_FLAT", "CP_SIZE_MISMATCH", "LOGICAL_CU_AS_PHYSICAL", "LAYOUT_MISMATCH",
    "PRESHARDED_ROWS_NOT_SELECTED", "SEGMENT_NOT_DIVISIBLE", "TOKEN_ID_MISMATCH", "TRUNCATED_VISION_SPAN",
    "GRID_TOKEN_MISMATCH", "EMBED_COUNT_MISMATCH", "VALID_ONLY_ROW", "MROPE_LOCAL_ROW", "DOUBLE_SHARDED",
    "ROPE_SEGMENT_OFFSET_MISSING", "VISION_DP_EMPTY_RANK_SKIPS_COLLECTIVE", "AUDIO_COUNT_MISMATCH",
    "CP_SPLIT_MISSING", "SP_SPLIT_MISSING", "VISION_DP_PLACEHOLDER",
)
INFO_CODES = ("CONSISTENT", "UNEXPLAINED", "ERROR_NOT_RECOGNISED", "SKIPPED", "ERROR_RECOGNISED")


@dataclass
class DiagnoseReport:
    """What :func:`diagnose_batch` concluded, with the context the view shows."""

    findings: list[Finding]
    observed: dict[str, Any]
    cp: int
    layout: str
    form: str
    source: str = "<dict>"
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 1 if self.causes or self.recognised_failure else 0

    @property
    def recognised_failure(self) -> bool:
        """An error recognised whose cause this batch cannot show (ERROR_RECOGNISED), or whose numbers no
        simulated cause reproduces on it (UNEXPLAINED): still a failure (exit 1), never "nothing wrong"."""
        return any(f.code in ("ERROR_RECOGNISED", "UNEXPLAINED") for f in self.findings)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def causes(self) -> list[Finding]:
        return [f for f in self.findings if f.is_cause]

    def to_dict(self) -> dict[str, Any]:
        modalities = {"modalities": self.summary["modalities"]} if self.summary.get("modalities") else {}
        return {"ok": self.ok, "cp": self.cp, "layout": self.layout, "input": self.form, **modalities,
                "observed": self.observed, "findings": [f.to_dict() for f in self.findings]}


def cause(code: str, message: str, hint: str, *, status: str = "confirmed", rank: int | None = None,
          segment: int | None = None, chunk: int | None = None) -> Finding:
    """A cause: ``confirmed`` ones are errors (exit 1), ``possible`` ones warnings (no exit change)."""
    return Finding(code, "error" if status == "confirmed" else "warning", message, hint, rank, segment, chunk,
                   status)


def info(code: str, message: str, hint: str = "") -> Finding:
    return Finding(code, "info", message, hint, status="info")


def clip(text: str, limit: int = 120) -> str:
    """One line of at most ``limit`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
