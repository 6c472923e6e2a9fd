"""Hypotheses: each candidate cause predicts the two counts an error reports, on this batch.

A :class:`Prediction` is ``(tokens, rows)``: the positions a scatter (or a check) had to fill and
the embedding rows offered. Predictions come from simulations of the cause: what every rank holds
when the row is cut with each layout and each cp (:func:`cpinspect.core.layout.make_layout` over the
full vision mask), the core simulation's own per-rank selection, the count all-gather run with
logical boundaries, and the row's placeholders against its grids. A prediction equal to the
observed pair is *confirmed*; one that matches the rows only is *possible*.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from cpinspect.core.findings import Finding
from cpinspect.core.valid_only import valid_only_cuts
from cpinspect.diagnose.audio import audio_predictions, audio_testable
from cpinspect.diagnose.audits import embed_mismatch
from cpinspect.diagnose.errortext import ObservedError
from cpinspect.diagnose.parallel_sizes import parallel_size_predictions
from cpinspect.diagnose.prediction import NOT_SELECTED_HINT, Prediction
from cpinspect.diagnose.recognised import KINDS as RECOGNISED_KINDS
from cpinspect.diagnose.recognised import explain_recognised
from cpinspect.diagnose.report import cause, info
from cpinspect.diagnose.rope_hypotheses import local_row_predictions
from cpinspect.diagnose.scene import Scene
from cpinspect.diagnose.selection_hypotheses import (
    all_rows,
    held_text,
    layout_mix_predictions,
    logical_predictions,
    not_selected_predictions,
)
from cpinspect.diagnose.valid_only import HINT, describe
from cpinspect.diagnose.vision_dp_placeholder import placeholder_predictions

Hypothesis = Callable[[Scene, ObservedError], list[Prediction]]
EXTRA_HYPOTHESES: list[Hypothesis] = [audio_predictions,  # AUDIO_COUNT_MISMATCH (diagnose/audio.py)
                                      placeholder_predictions]  # VISION_DP_PLACEHOLDER (vision_dp_placeholder.py)
"""More hypotheses, tested with the built-in ones on every error that names two counts: each returns
:class:`Prediction` objects for this scene and error (``[]`` when it does not apply). A new class
registers here with one line, ``EXTRA_HYPOTHESES.append(its_predictions)``; the tensor/sequence-
parallel ratios (``parallel_size_predictions``, CP_SPLIT_MISSING / SP_SPLIT_MISSING) are called
inside the count hypotheses instead, so that their predictions carry the error's expected and got
numbers as the built-in ones do."""


def _extra_predictions(scene: Scene, observed: ObservedError) -> list[Prediction]:
    return [p for hypothesis in EXTRA_HYPOTHESES for p in hypothesis(scene, observed)]


def explain(scene: Scene, observed: ObservedError, findings: list[Finding]) -> list[Finding]:
    """Test every hypothesis against ``observed``; fold the verdicts into ``findings``."""
    if observed.kind == "apply_kwarg":
        return findings + [_apply_kwarg()]
    if observed.kind == "not_divisible":
        return findings + _explain_divisible(scene, observed)
    if observed.kind in RECOGNISED_KINDS and not audio_testable(scene, observed):
        return findings + explain_recognised(scene, observed, findings)
    extra = _extra_predictions(scene, observed)
    if observed.kind == "audio_count":  # only the audio hypotheses speak to the audio encoder's count
        return _merge(findings, extra, scene, observed)
    if observed.kind in ("cat_sizes", "rank_tokens"):
        return _merge(findings, _explain_sizes(scene, observed) + extra, scene, observed)
    if observed.kind == "position_shape":
        return _merge(findings, _explain_positions(scene, observed) + extra, scene, observed)
    if observed.kind == "expanded_size":
        return _merge(findings, _explain_expanded(scene, observed) + extra, scene, observed)
    return _merge(findings, _explain_counts(scene, observed) + extra, scene, observed)


def _apply_kwarg() -> Finding:
    return cause(
        "APPLY_KWARG",
        "on the torch releases training stacks run, autograd Function.apply() takes positional arguments only: a "
        "keyword such as cp_group= raises this TypeError when the call is reached (Megatron-Bridge#4391, #4784: "
        "AllGatherVisionEmbeddings.apply(..., cp_group=...) under vision_dp_when_cp); the batch is not involved",
        "pass the group positionally: AllGatherVisionEmbeddings.apply(embeds, seqlens, cp_group); a custom "
        "Function can take keywords in a small wrapper that calls apply positionally")


def _explain_divisible(scene: Scene, observed: ObservedError) -> list[Finding]:
    length, cp = observed.get("length"), observed.get("cp")
    if length is None or cp is None:
        return []
    lengths = (scene.cu[1:] - scene.cu[:-1]).tolist()
    where = ("the packed row" if length in (scene.total_tokens, scene.batch.row_tokens)
             else f"segment {lengths.index(length)}" if length in lengths else None)
    if where is None:
        return [info("UNEXPLAINED", f"the error names a length of {length}; no segment or row of this batch has it "
                      f"(row {scene.total_tokens}, segments {lengths[:8]})",
                     "pass the batch of the failing step (the one whose packed row or segment has that length)")]
    remainder = length % (2 * cp)
    cp_one = (" With CP size 1 nothing is split at all: the zigzag mapping ran without context parallelism "
              "(slime#2376), where it must be skipped" if cp == 1 else "")
    hint = ("skip the CP mapping when cp == 1 (the check depends only on the CP size, so every rank skips it alike)"
            if cp == 1 else f"pad every segment to a multiple of {2 * cp} before CP")
    segment = lengths.index(length) if where.startswith("segment") else None
    return [cause("SEGMENT_NOT_DIVISIBLE",
                   f"{where} has {length} tokens, the length in the error; {length} mod 2·{cp} = {remainder}, so it "
                   f"cannot be cut into {2 * cp} equal zigzag chunks.{cp_one}", hint, segment=segment)]


def _explain_sizes(scene: Scene, observed: ObservedError) -> list[Prediction]:
    expected, got = observed.get("expected"), observed.get("got")
    pair = {expected, got}
    predictions: list[Prediction] = []
    total, cp = scene.total_tokens, scene.cp
    if scene.stacked is not None:
        b, s = scene.stacked
        if pair == {b * s, s}:
            predictions.append(Prediction("BATCH_NOT_FLAT", b * s, s, f"{b * s} = cu_seqlens[-1] = {b} x {s} (the "
                                          f"stacked rows) and {s} = the length of one row of input_ids [{b}, {s}]",
                                          "concatenate the rows into one [1, T] row"))
    if cp > 1 and total % cp == 0 and pair == {total, total // cp}:
        predictions.append(Prediction(
            "CP_SIZE_MISMATCH", total, total // cp,
            f"{total} = the full packed row and {total // cp} = {total} / cp {cp} = one rank's share: a tensor of the "
            f"full row (sized for cp=1) met a CP-local one; one code path skipped the CP split (as in Megatron-Bridge"
            f"#3881, where the MTP embedding applied the SP scatter but not the CP split)",
            "split that tensor over CP as well (the layout's own indices), or none of them"))
    if scene.form == "double sharded" and pair == {total // cp, total // (cp * cp)}:
        predictions.append(Prediction(
            "DOUBLE_SHARDED", total // cp, total // (cp * cp),
            f"{total // cp} = {total} / cp {cp} (a tensor split once) and {total // (cp * cp)} = {total} / {cp}² (the "
            "rows, split twice)", ""))
    rows, _ = scene.embed_rows()
    for rank, held in scene.actual_held().items():
        if rows is not None and pair == {rows, held} and rows != held:
            predictions.append(Prediction(
                "PRESHARDED_ROWS_NOT_SELECTED", held, rows,
                f"{rows} = every vision embedding row and {held} = the vision tokens rank {rank} holds: all rows met "
                "one rank's positions", NOT_SELECTED_HINT, rank=rank if rank >= 0 else None))
    predictions += parallel_size_predictions(scene, observed)  # CP_SPLIT_MISSING / SP_SPLIT_MISSING
    return [dataclasses.replace(p, tokens=expected, rows=got) for p in predictions]


def _explain_positions(scene: Scene, observed: ObservedError) -> list[Prediction]:
    value, index = observed.get("value_length"), observed.get("index_length")
    if value is None or index is None:
        return []
    predictions: list[Prediction] = []
    missing = _missing_by_segment(scene)
    lengths = (scene.cu[1:] - scene.cu[:-1]).tolist()
    logical = scene.batch.logical_cu_seqlens
    logical_lengths = (logical[1:] - logical[:-1]).tolist() if logical is not None else lengths
    for seg, gone in missing.items():
        for length in {lengths[seg], logical_lengths[seg], scene.total_tokens}:
            if index == length and value == length + gone:
                predictions.append(Prediction(
                    "TRUNCATED_VISION_SPAN", index, value,
                    f"{value} = {length} tokens of segment {seg} + the {gone} placeholder tokens the truncation cut "
                    f"off: the positions were computed from the whole grids, the row was cut to {index}",
                    "", segment=seg))
    total, cp = scene.total_tokens, scene.cp
    if cp > 1 and {value, index} == {total, total // cp}:
        predictions.append(Prediction(
            "CP_SIZE_MISMATCH", index, value,
            f"{total} = the full row and {total // cp} = {total} / cp {cp}: 3-D position ids of the full row met a "
            "CP-local row (positions not sliced with the layout's indices)",
            "slice position_ids[..., global_indices] per rank (cpinspect simulate --positions shows them)", cost=1))
    return [dataclasses.replace(p, tokens=index, rows=value) for p in predictions] + local_row_predictions(scene)


def _explain_expanded(scene: Scene, observed: ObservedError) -> list[Prediction]:
    """A chunk of ``existing`` tokens where ``target`` were expected: padded bounds cut a valid-only row."""
    if scene.cp < 2 or scene.layout != "zigzag":
        return []
    lengths = (scene.cu[1:] - scene.cu[:-1]).tolist()
    target, existing = observed.get("target"), observed.get("existing")
    return [Prediction("VALID_ONLY_ROW", cut.size, cut.received, describe(cut, scene.cp), HINT, rank=cut.rank,
                       segment=cut.segment)
            for cut in valid_only_cuts(lengths, scene.cp) if (cut.size, cut.received) == (target, existing)][:1]


def _missing_by_segment(scene: Scene) -> dict[int, int]:
    missing: dict[int, int] = {}
    for issues in scene.issues.values():
        for issue in issues:
            if issue.problem in ("truncated", "dropped") and issue.item is not None and issue.segment is not None:
                missing[issue.segment] = missing.get(issue.segment, 0) + issue.item.tokens - (issue.run_length or 0)
    return missing


def _explain_counts(scene: Scene, observed: ObservedError) -> list[Prediction]:
    predictions = _whole_row_predictions(scene, observed)
    if observed.scope == "all ranks":
        return predictions + logical_predictions(scene, gathered=True)
    return (predictions + not_selected_predictions(scene) + layout_mix_predictions(scene)
            + logical_predictions(scene, gathered=False))


def _whole_row_predictions(scene: Scene, observed: ObservedError) -> list[Prediction]:
    """The placeholders of the whole row against what the grids or the encoder promise."""
    kinds = [observed.modality] if observed.modality else ["image", "video", None]
    predictions = []
    for kind in kinds:
        tokens = scene.placeholders_of(kind) if kind else scene.placeholders
        grids = scene.grid_rows(kind)
        if tokens is None:
            continue
        code = _span_code(scene, kind)
        if grids is not None and grids != tokens and code is not None:
            what = f"{kind} " if kind else ""
            predictions.append(Prediction(
                code, tokens, grids,
                f"{tokens} = the {what}placeholder tokens in the row and {grids} = Σ t·h·w/{scene.tokens.merge_area} "
                f"of the {what}grids: the encoder makes rows for the whole grids", "", scope="any"))
    rows, label = scene.embed_rows()
    explained_by_grids = rows == scene.grid_rows()
    explicit = label in ("--embeds", "vision_embed_count")
    if explicit and rows not in (None, scene.placeholders) and not explained_by_grids:
        predictions.append(Prediction("EMBED_COUNT_MISMATCH", scene.placeholders, rows,
                                      f"{scene.placeholders} = the row's vision placeholders and {rows} = {label}",
                                      "", scope="any"))
    return predictions


def _span_code(scene: Scene, kind: str | None) -> str | None:
    kinds = [kind] if kind else ["image", "video"]
    problems = {i.problem for k in kinds for i in scene.issues.get(k, [])}
    if any(scene.foreign.get(k) for k in kinds):
        return "TOKEN_ID_MISMATCH"
    if problems & {"truncated", "dropped"}:
        return "TRUNCATED_VISION_SPAN"
    return "GRID_TOKEN_MISMATCH" if problems else None


def _merge(findings: list[Finding], predictions: list[Prediction], scene: Scene,
           observed: ObservedError) -> list[Finding]:
    """Compare predictions with ``observed``; confirmed ones join (or enrich) the audit findings."""
    tokens, rows = _observed_pair(observed)
    exact = [p for p in predictions if p.tokens == tokens and p.rows == rows]
    confirmed = [p for p in exact if scene.rank is None or p.rank is None or p.rank == scene.rank]
    if confirmed and min(p.cost for p in confirmed) == min(p.cost for p in exact):
        cheapest = min(p.cost for p in confirmed)
        confirmed = [p for p in confirmed if p.cost == cheapest]
        if cheapest and len({(p.code, p.variant) for p in confirmed}) > 1:
            first = {p.code: p for p in reversed(confirmed)}
            return findings + [_possible(p, "other causes fit the same numbers equally well") for p in first.values()]
        return _with_confirmed(findings, confirmed, scene, observed)
    if exact:
        exact = sorted(exact, key=lambda p: p.cost)
        return findings + [_possible(p, f"but the error came from rank {scene.rank}") for p in exact[:1]]
    fallback = _embed_fallback(scene, tokens, rows) if observed.kind != "audio_count" else None
    if fallback is not None:
        return findings + [fallback]
    partial = [p for p in predictions if p.rows == rows and p.code == "PRESHARDED_ROWS_NOT_SELECTED"]
    verdict = [cause(
        "PRESHARDED_ROWS_NOT_SELECTED",
        f"all {rows} embedding rows were offered to one rank, as when rows are not selected per rank "
        f"({all_rows(scene)[rows]}), but no rank holds {tokens} vision tokens at cp={scene.cp} "
        f"({held_text(scene.held(scene.data_layout, scene.cp))}); the error may come from another micro-batch",
        NOT_SELECTED_HINT, status="possible")] if partial and rows is not None else []
    return findings + verdict + [_unexplained(scene, observed)]


def _observed_pair(observed: ObservedError) -> tuple[int | None, int | None]:
    if observed.kind in ("cat_sizes", "rank_tokens"):
        return observed.get("expected"), observed.get("got")
    if observed.kind == "position_shape":
        return observed.get("index_length"), observed.get("value_length")
    if observed.kind == "expanded_size":
        return observed.get("target"), observed.get("existing")
    return observed.get("tokens"), observed.get("rows")


def _with_confirmed(findings: list[Finding], confirmed: list[Prediction], scene: Scene,
                    observed: ObservedError) -> list[Finding]:
    by_code: dict[str, list[Prediction]] = {}
    for prediction in confirmed:
        by_code.setdefault(prediction.code, []).append(prediction)
    if "LOGICAL_CU_AS_PHYSICAL" in {f.code for f in findings} and "PRESHARDED_ROWS_NOT_SELECTED" in by_code:
        by_code["LOGICAL_CU_AS_PHYSICAL"] = by_code.pop("PRESHARDED_ROWS_NOT_SELECTED")
    out = list(findings)
    for code, group in by_code.items():
        numbers = f"the error's numbers ({_numbers_text(observed)}) match: {group[0].story}"
        others = sorted({p.rank for p in group[1:] if p.rank is not None and p.rank != group[0].rank})
        if others:
            numbers += f" (the same numbers fit rank(s) {', '.join(map(str, others[:6]))})"
        existing = next((i for i, f in enumerate(out) if f.code == code and f.status == "confirmed"), None)
        if existing is not None:
            rank = out[existing].rank if out[existing].rank is not None else group[0].rank if not others else None
            out[existing] = dataclasses.replace(out[existing], message=f"{out[existing].message}; {numbers}", rank=rank)
            continue
        rank = group[0].rank if not others or scene.rank is not None else None
        out.append(cause(code, numbers, group[0].hint, rank=rank, segment=group[0].segment))
    if "PRESHARDED_ROWS_NOT_SELECTED" in by_code:
        out += _logical_companion(scene)
    return out


def _numbers_text(observed: ObservedError) -> str:
    tokens, rows = _observed_pair(observed)
    labels = {"cat_sizes": ("expected size", "got size"), "rank_tokens": ("tokens expected", "tokens held"),
              "position_shape": ("positions to fill", "positions given"),
              "gathered_count": ("gathered vision tokens", "embeddings"),
              "expanded_size": ("chunk size expected", "tokens there"), "audio_count": ("audio tokens", "features")}
    first, second = labels.get(observed.kind, ("tokens", "rows"))
    rank = f" on rank {observed.rank}" if observed.rank is not None else ""
    return f"{first} {tokens}, {second} {rows}{rank}"


def _logical_companion(scene: Scene) -> list[Finding]:
    logical = scene.batch.logical_cu_seqlens
    if logical is None or torch.equal(logical, scene.cu) or scene.form == "full":
        return []
    return [cause(
        "LOGICAL_CU_AS_PHYSICAL",
        f"if the model was given the logical cu_seqlens (ending at {int(logical[-1])}) instead of the physical ones "
        f"(ending at {scene.total_tokens} = {scene.cp} x {scene.batch.row_tokens}), its pre-sharded test fails and it "
        "scatters all rows into the local row: the same numbers",
        "pass cu_seqlens_padded (the physical boundaries) to the model as well", status="possible")]


def _possible(prediction: Prediction, caveat: str) -> Finding:
    return cause(prediction.code, f"{prediction.story}; {caveat}", prediction.hint, status="possible",
                  rank=prediction.rank, segment=prediction.segment)


def _embed_fallback(scene: Scene, tokens: int | None, rows: int | None) -> Finding | None:
    """The tokens are exactly the row's placeholders: then the rows are what differs."""
    placeholders = scene.placeholders
    if placeholders is None or tokens != placeholders or rows is None or rows == placeholders:
        return None
    if any(scene.issues.values()):
        return None
    finding = embed_mismatch(scene, rows, "the error", placeholders)
    return dataclasses.replace(finding, message=f"the error's {tokens} tokens are exactly the batch's placeholders; "
                                                f"{finding.message}")


def _unexplained(scene: Scene, observed: ObservedError) -> Finding:
    held = scene.actual_held()
    holds = ", ".join(f"rank {r}: {c}" if r >= 0 else f"this rank: {c}" for r, c in list(held.items())[:8])
    rows = ", ".join(all_rows(scene).values()) or "unknown"
    return info("UNEXPLAINED",
                 f"no simulated cause reproduces {_numbers_text(observed)} on this batch at cp={scene.cp}: ranks hold "
                 f"{holds or 'unknown'} vision tokens; whole-batch row counts: {rows}",
                 "save the failing step's micro-batch (every rank's file, with cu_seqlens_padded and the grids) and "
                 "rerun: cpinspect diagnose RANK_DIR --cp <the run's cp> --error-file train.log")
