"""What ``cpinspect check`` found, as data: the report, its JSON, and its lines with their kinds.

The lines are :class:`ReportLine` values (``kind`` + ``text``), not styled strings: a view picks
colours by kind (:mod:`cpinspect.views.check`), and :meth:`CheckReport.text` joins their plain
form for the pytest helper's ``AssertionError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpinspect.check.cases import Case
from cpinspect.check.uniformity import Uniformity
from cpinspect.check.verdicts import PASS, SEVERITY, CaseResult

# How each kind of line starts in plain text: the verdict marks, the indents of a failure's block.
PREFIXES = {
    "title": "",  # what was checked, with which options
    "pass": "✓ ",  # an equality that was checked on every rank
    "fail": "✗ ",  # a verdict that is not pass
    "detail": "  ",  # a failure block's own lines: its smallest batch, where it is saved, how to replay it
    "body": "    ",  # what the case said: its summary and each rank's state
    "note": "note: ",  # what the run skipped or stopped early
}


@dataclass(frozen=True)
class ReportLine:
    """One line of the report; ``kind`` is a key of :data:`PREFIXES`."""

    kind: str
    text: str

    @property
    def plain(self) -> str:
        return PREFIXES[self.kind] + self.text


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
    layout: str = "zigzag"

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
            counts[self.uniformity.verdict] = counts.get(self.uniformity.verdict, 0) + 1
        return counts

    def lines(self) -> list[ReportLine]:
        return report_lines(self)

    def text(self) -> str:
        return "\n".join(line.plain for line in self.lines())

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target, "signature": self.signature, "layout": self.layout, "cp": self.cps,
            "seed": self.seed, "cases": len(self.results), "ok": self.ok, "verdicts": self.verdict_counts(),
            "results": [r.to_dict() if not r.ok else {"case": r.case.name, "cp": r.case.cp, "verdict": PASS}
                        for r in self.results],
            "rank_uniform": {"runs": self.uniformity.runs, "finding": self.uniformity.finding,
                             "verdict": self.uniformity.verdict if self.uniformity.finding else None,
                             "skipped": self.uniformity.skipped or None},
            "shrunk": [{"verdict": s.verdict, "from": s.original.name, "case": s.result.to_dict(),
                        "path": str(s.path) if s.path else None, "replay": s.commands} for s in self.shrunk],
            "notes": self.notes, "seconds": round(self.elapsed, 3),
        }


def report_lines(report: CheckReport) -> list[ReportLine]:
    """A summary, then each failing verdict with its smallest case and replay, then the notes."""
    cps = ", ".join(map(str, report.cps))
    layout = "" if report.layout == "zigzag" else f"layout {report.layout}; "
    lines = [ReportLine("title", f"cpinspect check {report.target} (signature {report.signature}; {layout}cp {cps}; "
                                 f"seed {report.seed})")]
    failures = report.failures
    counts = ", ".join(f"{v} {n}" for v, n in sorted(report.verdict_counts().items()) if v != PASS)
    if report.ok:
        probe = report.uniformity
        uniform = (f"collectives are rank-uniform ({probe.runs} perturbed run(s)"
                   f"{f'; {probe.skipped}' if probe.skipped else ''})" if probe.runs
                   else f"rank-uniformity not checked ({probe.skipped or 'no perturbed run'})")
        lines.append(ReportLine("pass", f"all {len(report.results)} case(s) match the oracle on every rank; {uniform}"))
    else:
        probe = report.uniformity
        shared = (f"; {probe.verdict} 1 is the rank-uniformity probe's" if probe.finding
                  and any(r.verdict == probe.verdict for r in failures) else "")
        lines.append(ReportLine("fail", f"{len(failures)} of {len(report.results)} case(s) failed ({counts}{shared})"))
    shrunk = {s.verdict: s for s in report.shrunk}
    for verdict in sorted({r.verdict for r in failures}, key=SEVERITY.index, reverse=True):
        group = [r for r in failures if r.verdict == verdict]
        lines.append(ReportLine("fail", f"{verdict}: {len(group)} case(s); first: {group[0].case.name}: "
                                        f"{group[0].case.describe()}"))
        lines += _failure_block(group[0], shrunk.get(verdict))
    if report.uniformity.finding:
        lines.append(ReportLine("fail", f"{report.uniformity.verdict}: {report.uniformity.finding}"))
        witness = report.uniformity.witness
        lines += _failure_block(witness, shrunk.get(report.uniformity.shrink_label)) if witness else []
    lines += [ReportLine("note", note) for note in report.notes]
    return lines


def _failure_block(first: CaseResult, shrunk: ShrunkFailure | None) -> list[ReportLine]:
    shown = shrunk.result if shrunk else first
    lines = []
    if shrunk:
        lines.append(ReportLine("detail", f"smallest failing batch ({shrunk.attempts} shrink run(s)): "
                                          f"{shown.case.describe()}"))
    lines += [ReportLine("body", line) for line in shown.detail_lines()]
    if shrunk and shrunk.path:
        lines.append(ReportLine("detail", f"{'saved':<9}{shrunk.path}"))
        lines += [ReportLine("detail", f"{label:<9}{command}") for label, command in
                  zip(("replay", "expected"), shrunk.commands)]
    return lines
