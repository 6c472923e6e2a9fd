"""Offline analysis of a capture directory: reassemble each step's batch, rerun the oracle and the diagnosis.

``cpinspect.jobs.capture.record`` leaves one file per rank and step. Here the files are grouped by
step and CP group (the global ranks in the file's metadata), so a job with several CP groups
(data parallel x context parallel) yields one analysis per group and step. A complete group is
reassembled into the pre-sharded per-rank batch that ``cpinspect diagnose`` would read from rank
files, and diagnosed by :func:`cpinspect.diagnose.api.diagnose_batch`: the same findings and exit
code as ``diagnose``. On top of that, the rows each rank *actually selected* (captured) are
compared with the oracle's rows for the reassembled full row. Incomplete groups and steps are
named (which ranks, which steps) rather than guessed at.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cpinspect.core.compare import NATURAL_ORDER_HINT, SCATTER_HINT, compare_rows
from cpinspect.core.errors import InputError
from cpinspect.core.findings import Finding
from cpinspect.core.layout import Layout, make_layout
from cpinspect.core.loading import load_batch
from cpinspect.core.oracle import expected_rows
from cpinspect.core.ranges import format_ranges
from cpinspect.core.tokens import TokenConfig
from cpinspect.diagnose.api import DiagnoseReport, diagnose_batch
from cpinspect.jobs.capture import CapturedRank, read, scan

GroupKey = tuple[int, tuple[int, ...]]


@dataclass
class StepAnalysis:
    """One step of one CP group: which ranks were captured, the diagnosis, and the captured-row check."""

    step: int
    group_ranks: tuple[int, ...]
    cp: int
    present: list[int]
    report: DiagnoseReport | None = None
    captured: list[Finding] = field(default_factory=list)

    @property
    def missing(self) -> list[int]:
        return [r for r in range(self.cp) if r not in self.present]

    @property
    def findings(self) -> list[Finding]:
        return [*(self.report.findings if self.report else []), *self.captured]

    @property
    def exit_code(self) -> int:
        return 1 if any(f.is_cause for f in self.findings) else 0

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "group_ranks": list(self.group_ranks), "cp": self.cp, "present": self.present,
                "missing": self.missing, "ok": self.exit_code == 0 and not self.missing,
                "diagnosis": self.report.to_dict() if self.report else None,
                "captured": [f.to_dict() for f in self.captured]}


@dataclass
class AnalyzeReport:
    """Every step and group found in a capture directory, and what is missing from it."""

    directory: str
    steps: list[StepAnalysis]
    gaps: list[Finding]

    @property
    def exit_code(self) -> int:
        problems = any(f.is_cause for f in self.gaps)
        return 1 if problems or any(s.exit_code for s in self.steps) else 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "directory": self.directory, "files": sum(len(s.present) for s in self.steps),
                "missing": [f.to_dict() for f in self.gaps], "steps": [s.to_dict() for s in self.steps]}


def analyze(directory: str | Path, *, layout: str = "zigzag", tokens: TokenConfig | None = None,
            steps: list[int] | None = None, timeout: float = 10.0) -> AnalyzeReport:
    """Analyze every (or the given) step of every CP group captured in ``directory``."""
    groups = _group_files(Path(directory))
    if steps is not None:
        groups = _only_steps(groups, steps, directory)
    analyses = [_analyze_step(key, files, layout, tokens, timeout, directory) for key, files in sorted(groups.items())]
    return AnalyzeReport(str(directory), analyses, _gaps(groups, analyses))


def _group_files(directory: Path) -> dict[GroupKey, dict[int, CapturedRank]]:
    if not directory.is_dir():
        raise InputError(f"{directory} is not a directory", where=str(directory),
                         fix="pass the directory given to cpinspect.jobs.capture.record")
    paths = scan(directory)
    if not paths:
        raise InputError(
            f"{directory} holds no capture files (step*-rank*.safetensors)", where=str(directory),
            fix="enable capture in the job (CPINSPECT_CAPTURE=1 or record(..., enabled=True)) and pass its directory",
        )
    groups: dict[GroupKey, dict[int, CapturedRank]] = defaultdict(dict)
    for path in paths:
        captured = read(path)
        _check_group(captured)
        files = groups[(captured.step, captured.group_ranks)]
        if captured.cp_rank in files:
            raise InputError(
                f"two files claim CP rank {captured.cp_rank} of step {captured.step} in the group of global ranks "
                f"{list(captured.group_ranks)}: {files[captured.cp_rank].path.name} and {path.name}",
                where=str(directory), fix="keep one capture per rank and step (clear the directory between runs)",
            )
        files[captured.cp_rank] = captured
    return groups


def _check_group(captured: CapturedRank) -> None:
    if len(captured.group_ranks) != captured.cp_size or not 0 <= captured.cp_rank < captured.cp_size:
        raise InputError(
            f"{captured.path.name} says CP rank {captured.cp_rank} of {captured.cp_size}, but lists "
            f"{len(captured.group_ranks)} global ranks {list(captured.group_ranks)}",
            where=str(captured.path), fix="the file's metadata is inconsistent; re-run the capture",
        )


def _only_steps(groups: dict[GroupKey, dict[int, CapturedRank]], steps: list[int],
                directory: str | Path) -> dict[GroupKey, dict[int, CapturedRank]]:
    chosen = {key: files for key, files in groups.items() if key[0] in steps}
    if not chosen:
        present = sorted({key[0] for key in groups})
        raise InputError(f"step(s) {', '.join(map(str, steps))} are not in the capture", where=str(directory),
                         fix=f"captured steps: {_ranges(present)}")
    return chosen


def _analyze_step(key: GroupKey, files: dict[int, CapturedRank], layout: str, tokens: TokenConfig | None,
                  timeout: float, directory: str | Path) -> StepAnalysis:
    step, group_ranks = key
    analysis = StepAnalysis(step, group_ranks, len(group_ranks), sorted(files))
    if analysis.missing:
        return analysis
    ranked = [files[r] for r in range(analysis.cp)]
    try:
        batch = load_batch([_batch_dict(c) for c in ranked], stacked="concatenate")
        batch.source = f"{directory} step {step}, global ranks {list(group_ranks)}"
        analysis.report = diagnose_batch(batch, analysis.cp, layout=layout, tokens=tokens, timeout=timeout)
    except InputError as exc:  # name the step and its files, as diagnose would name the rank files
        files_text = ", ".join(c.path.name for c in ranked)
        where = f"step {step} of the CP group of global ranks {list(group_ranks)} ({files_text})"
        raise InputError(exc.what, where=f"{where}; {exc.where}" if exc.where else where, fix=exc.fix) from None
    analysis.captured = captured_row_findings(ranked, layout)
    return analysis


def _batch_dict(captured: CapturedRank) -> dict[str, torch.Tensor]:
    """The rank's tensors under the keys a pre-sharded batch file uses (selected rows are not batch data)."""
    return {k: v for k, v in captured.tensors.items() if k != "selected_rows"}


def captured_row_findings(ranked: list[CapturedRank], layout: str = "zigzag") -> list[Finding]:
    """Compare what each rank selected with the oracle's rows for the reassembled full row."""
    cu = ranked[0].tensors["cu_seqlens"].reshape(-1).to(torch.long)
    cp = len(ranked)
    try:
        plan = make_layout(cu, cp, layout)
    except InputError:
        return []  # the diagnosis already names why the row cannot be cut
    masks = [c.tensors["vision_mask"].reshape(-1).to(torch.bool) for c in ranked]
    if any(m.numel() != plan.local_tokens for m in masks):
        return []
    full_mask = torch.zeros(plan.total_tokens, dtype=torch.bool)
    full_mask[plan.all_global_indices()] = torch.stack(masks)
    findings = []
    for rank, captured in enumerate(ranked):
        if "selected_rows" not in captured.tensors:
            continue
        got = captured.tensors["selected_rows"].reshape(-1).to(torch.long)
        want = expected_rows(full_mask, plan.global_indices(rank))
        finding = _compare_rows(captured, rank, got, want, masks[rank], plan)
        if finding is not None:
            findings.append(finding)
    return findings


def _compare_rows(captured: CapturedRank, rank: int, got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor,
                  plan: Layout) -> Finding | None:
    who = f"captured at step {captured.step}: rank {rank} (global rank {captured.global_rank})"
    diff = compare_rows(got, want)
    if diff is None:
        return None
    if diff.length_differs:
        return Finding(
            "SCATTER_SHAPE_MISMATCH", "error", status="confirmed", message=
            f"{who} selected {got.numel()} rows but holds {want.numel()} vision tokens",
            rank=rank, hint=SCATTER_HINT)
    first = diff.first
    position = int(torch.nonzero(mask).view(-1)[first])
    place = plan.locate(rank, position)
    return Finding(
        "ROWS_MISMATCH", "error", status="confirmed", message=
        f"{who} selected rows that differ from the oracle at {diff.differing} of its "
        f"{want.numel()} vision tokens; first at vision token {first} (local position {position}, segment "
        f"{place.segment} chunk {place.chunk}): got row {int(got[first])}, expected {int(want[first])}",
        rank=rank, segment=place.segment, chunk=place.chunk, hint=NATURAL_ORDER_HINT)


def _gaps(groups: dict[GroupKey, dict[int, CapturedRank]], analyses: list[StepAnalysis]) -> list[Finding]:
    """CAPTURE_INCOMPLETE findings: ranks missing from a step, and steps a CP group has none of."""
    gaps = []
    for analysis in analyses:
        if analysis.missing:
            names = ", ".join(f"CP rank {r} (global rank {analysis.group_ranks[r]})" for r in analysis.missing)
            gaps.append(Finding(
                "CAPTURE_INCOMPLETE", "warning", status="confirmed", message=
                f"step {analysis.step} of the CP group of global ranks {list(analysis.group_ranks)} is missing "
                f"{names}; that step was not analyzed",
                hint="each rank writes its own file: look for a CaptureWarning in that rank's log, or whether it ran "
                     "the step"))
    all_steps = sorted({step for step, _ in groups})
    for group in sorted({ranks for _, ranks in groups}):
        absent = [s for s in all_steps if (s, group) not in groups]
        if absent:
            gaps.append(Finding(
                "CAPTURE_INCOMPLETE", "warning", status="confirmed", message=
                f"the CP group of global ranks {list(group)} has no file for step(s) {_ranges(absent)}, which other "
                "groups captured", hint="that group did not record those steps (crashed, or capture disabled there)"))
    return gaps


def _ranges(values: list[int]) -> str:
    return format_ranges(torch.tensor(values, dtype=torch.long), limit=None)
