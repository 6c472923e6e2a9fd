"""Diagnose a CP + vision failure: turn the numbers of an error into a cause, by simulation.

Public API (stable: ``cpinspect analyze`` reuses it)::

    from cpinspect.diagnose import diagnose_batch, DiagnoseReport
    from cpinspect.views.diagnose import render_report
    report = diagnose_batch(batch, cp, layout="zigzag", tokens=None, error_text=None, embeds=None,
                            rank=None, timeout=10.0)
    report.findings   # list[Finding]: code, status (confirmed|possible|info), severity,
                      #   message, rank, segment, chunk, hint
    report.observed   # dict: the numbers parsed from the error text (and ``embeds``)
    report.exit_code  # 0 nothing wrong found, 1 a cause confirmed, the batch inconsistent or an error recognised
    report.to_dict()  # the --json document {ok, observed, findings: [...]} (plus cp, layout, input)
    render_report(report, console)

``batch`` is a :class:`~cpinspect.core.batch.PackedBatch` (a full row, every rank's pre-sharded row,
or one rank's row) or anything :func:`~cpinspect.core.loading.load_batch` accepts (a path, a dict, a
list; a stacked ``[B, T]`` id tensor is concatenated and reported as BATCH_NOT_FLAT).
``error_text`` is the message or a pasted log (the last recognised line wins), or an
:class:`~cpinspect.diagnose.errortext.ObservedError` already read from a log file. ``embeds`` is the
number of rows the vision encoder produced, if known. ``rank`` is the rank that raised (else the
log's ``[rankN]:`` prefix). Bad input raises :class:`~cpinspect.core.errors.InputError`.

How it works. A :class:`Scene` is built once: the batch's form for ``cp`` (rows cut for another
cp are themselves a finding, CP_SIZE_MISMATCH, and the diagnosis goes on with the rows' cp), the
full row and its vision mask, the core simulation (:func:`cpinspect.simulation.run.simulate`), and the
vision spans against the grids. *Audits* report what needs no observed number. *Hypotheses*
predict the two counts an error reports, each from a simulation of one candidate cause on this
batch (e.g. "rows were not selected: rank r fills its held vision tokens with all E rows",
with what rank r holds taken from :func:`cpinspect.core.layout.make_layout` under every layout and cp
that can cut the row); a prediction equal to the observed pair is *confirmed*, one that matches
only one of the two numbers is *possible*. Then :data:`EXTRA_CHECKS` run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cpinspect.core.batch import BatchSource, PackedBatch
from cpinspect.core.errors import InputError
from cpinspect.core.findings import Finding
from cpinspect.core.layout import LAYOUTS
from cpinspect.core.loading import load_batch
from cpinspect.core.position_check import check_position_ids
from cpinspect.core.tokens import TokenConfig, token_config
from cpinspect.diagnose.audio import audio_findings, breakdown, positions_unknown
from cpinspect.diagnose.audits import audit, consistent
from cpinspect.diagnose.errortext import ObservedError, parse_error_text
from cpinspect.diagnose.hypotheses import explain
from cpinspect.diagnose.report import (
    CAUSE_CODES,
    INFO_CODES,
    STATUSES,
    DiagnoseReport,
    clip,
    info,
)
from cpinspect.diagnose.rope_hypotheses import local_row_position_findings
from cpinspect.diagnose.rope_offsets import segment_offset_findings
from cpinspect.diagnose.scene import Scene, build_scene

__all__ = [
    "CAUSE_CODES", "EXTRA_CHECKS", "INFO_CODES", "STATUSES", "DiagnoseReport", "diagnose_batch",
]

# --------------------------------------------------------------------------- extra checks
ExtraCheck = Callable[..., list[Finding]]
EXTRA_CHECKS: list[ExtraCheck] = [check_position_ids]
"""Checks that run after the built-in ones, as ``check(batch, cp, layout=..., tokens=...)``
returning :class:`~cpinspect.core.findings.Finding` objects (problems become confirmed findings, the rest
info); each must return ``[]`` when it does not apply. The batch's own mRoPE ``position_ids`` are
checked here."""


def diagnose_batch(
    batch: PackedBatch | BatchSource,
    cp: int,
    *,
    layout: str = "zigzag",
    tokens: TokenConfig | None = None,
    error_text: str | ObservedError | None = None,
    embeds: int | None = None,
    rank: int | None = None,
    timeout: float = 10.0,
    tp: int | None = None,
    sequence_parallel: bool | None = None,
) -> DiagnoseReport:
    """Audit ``batch`` for ``cp`` ranks and explain ``error_text`` by simulating candidate causes.

    See the module docstring for the report's fields. Never modifies the caller's tensors.
    """
    tokens = tokens or token_config()
    _check_options(cp, layout, embeds, rank)
    loaded = batch if isinstance(batch, PackedBatch) else load_batch(batch, stacked="concatenate")
    observed = error_text if isinstance(error_text, ObservedError) or error_text is None else parse_error_text(
        error_text)
    findings: list[Finding] = []
    if isinstance(error_text, str) and observed is None:
        findings.append(info("ERROR_NOT_RECOGNISED", f"the error text matched none of the known forms: "
                              f"{clip(error_text)!r}", "paste the line with the numbers (see the README's list)"))
    scene, form_findings = build_scene(loaded, cp, layout, tokens, embeds=embeds, rank=rank, timeout=timeout)
    scene.tp, scene.sequence_parallel = tp, sequence_parallel  # narrow CP_/SP_SPLIT_MISSING (diagnose.parallel_sizes)
    if rank is None and observed is not None:
        scene.rank = observed.rank  # a log's rank may lie beyond cp: itself a sign of another cp
    findings += form_findings + audit(scene) + audio_findings(scene) + _vision_dp_findings(scene, timeout)
    if observed is not None:
        findings = explain(scene, observed, findings)
    unknown = positions_unknown(scene)  # the Omni audio positions rule is not modelled: no position verdicts
    findings += _extra_findings(scene, skip=(check_position_ids,) if unknown else ()) + unknown + (
        [] if unknown else segment_offset_findings(scene) + local_row_position_findings(scene))
    findings = _fold_same_root(findings)
    findings += consistent(scene, findings)
    return DiagnoseReport(_ordered(findings), _observed_dict(observed, embeds, scene.rank), scene.cp, scene.layout,
                          scene.form, loaded.source, _summary(scene))


# A confirmed cause that explains another finding's symptom replaces it (cause -> symptoms it explains).
POSITION_CODES = ("MROPE_MISMATCH", "MROPE_WRONG_SLICE", "MROPE_NOT_PER_SEGMENT",
                  "ROPE_MISMATCH", "ROPE_WRONG_SLICE", "ROPE_NOT_PER_SEGMENT")  # core/position_check.py (--rope 1d)
EXPLAINS = {
    "VALID_ONLY_ROW": ("SEGMENT_NOT_DIVISIBLE",),
    "ROPE_SEGMENT_OFFSET_MISSING": POSITION_CODES,
    "MROPE_LOCAL_ROW": POSITION_CODES,
}


def _fold_same_root(findings: list[Finding]) -> list[Finding]:
    confirmed = {f.code for f in findings if f.status == "confirmed"}
    hidden = {code for root in confirmed for code in EXPLAINS.get(root, ())}
    # a confirmed cause replaces the simulation's note of the same code (VISION_DP_PLACEHOLDER)
    return [f for f in findings if f.code not in hidden and not (f.status == "info" and f.code in confirmed)]


VISION_DP_KEYS = ("vision_requires_grad", "vision_dp_ranks", "vision_dp_placeholder")


def _vision_dp_findings(scene: Scene, timeout: float) -> list[Finding]:
    """Vision DP under CP (issue 14 class 7), when the batch describes its vision-DP run."""
    if scene.result is None or not any(key in extra for extra in scene.batch.extra for key in VISION_DP_KEYS):
        return []
    from cpinspect.simulation.vision_dp import VisionDPExtension

    extension = VisionDPExtension(scene.batch, timeout=timeout)
    extension.run(scene.result)
    return [finding.weighed() for finding in extension.findings]


def _check_options(cp: int, layout: str, embeds: int | None, rank: int | None) -> None:
    if cp < 1:
        raise InputError(f"cp is {cp}, but it must be at least 1", where="--cp",
                         fix="pass the context-parallel size of the run (--cp 2, --cp 4, ...)")
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}", where="--layout", fix=f"use one of {', '.join(LAYOUTS)}")
    if embeds is not None and embeds < 0:
        raise InputError(f"--embeds is {embeds}, but a number of embedding rows cannot be negative", where="--embeds",
                         fix="pass the row count of the vision encoder's output (vision_embeds.shape[0])")
    if rank is not None and not 0 <= rank < max(cp, 1) and cp >= 1:
        raise InputError(f"--rank {rank} is out of range for cp={cp}", where="--rank", fix=f"pick 0..{cp - 1}")


def _observed_dict(observed: ObservedError | None, embeds: int | None, rank: int | None) -> dict[str, Any]:
    out = observed.to_dict() if observed is not None else {}
    if embeds is not None:
        out["embeds"] = embeds
    if rank is not None:
        out["rank"] = rank
    return out


def _summary(scene: Scene) -> dict[str, Any]:
    rows, label = scene.embed_rows()
    return {
        "tokens": scene.total_tokens, "segments": scene.batch.num_segments, "row_tokens": scene.batch.row_tokens,
        "rank_files": len(scene.batch.rows) if scene.batch.per_rank_files else 0,
        "vision_tokens": scene.placeholders, "embed_rows": rows, "embed_rows_from": label,
        "held": scene.actual_held(), "requested_cp": scene.requested_cp, "data_layout": scene.data_layout,
        "modalities": breakdown(scene),
    }


def _ordered(findings: list[Finding]) -> list[Finding]:
    """Confirmed causes first (in CAUSE_CODES order), then possible ones, then info."""
    rank_of = {code: i for i, code in enumerate(CAUSE_CODES)}
    key = {"confirmed": 0, "possible": 1, "info": 2}
    return sorted(findings, key=lambda f: (key[f.status or "info"], f.code == "CONSISTENT", rank_of.get(f.code, 99)))


def _extra_findings(scene: Scene, skip: tuple[ExtraCheck, ...] = ()) -> list[Finding]:
    """Run :data:`EXTRA_CHECKS` (but ``skip``); one that cannot run on this input says so instead of failing."""
    out = []
    for check in (c for c in EXTRA_CHECKS if c not in skip):
        try:
            found = check(scene.batch, scene.cp, layout=scene.data_layout, tokens=scene.tokens)
        except InputError as exc:
            name = getattr(check, "__name__", "check")
            out.append(info("SKIPPED", f"{name} could not run on this input: {exc.what}"))
            continue
        out.extend(finding.weighed() for finding in found)
    return out
