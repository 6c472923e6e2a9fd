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
from dataclasses import dataclass

import torch

from cpinspect.core.layout import LAYOUTS
from cpinspect.core.ranges import format_ranges
from cpinspect.diagnose.audits import embed_mismatch
from cpinspect.diagnose.errortext import ObservedError
from cpinspect.diagnose.report import DiagnosisFinding, cause, info
from cpinspect.diagnose.scene import LAYOUT_WORDS, Scene

NOT_SELECTED_HINT = (
    "select this rank's rows before the scatter: the count all-gather selection "
    "(cpinspect.local_vision_rows, Megatron-Bridge's pre-sharded path from PR #4917 with miles#1308) gives "
    "each rank exactly its rows; or hand the model the full row and shard after the scatter"
)

OTHER_CPS = range(1, 17)


@dataclass(frozen=True)
class Prediction:
    """What one candidate cause predicts the error reports: ``tokens`` positions, ``rows`` rows."""

    code: str
    tokens: int | None
    rows: int | None
    story: str
    hint: str
    rank: int | None = None
    scope: str = "rank"
    segment: int | None = None
    cost: int = 0  # assumptions changed beyond the data as given: the simplest matching cause wins
    variant: str = ""  # which alternative (layout, cp) the prediction assumes


def explain(scene: Scene, observed: ObservedError, findings: list[DiagnosisFinding]) -> list[DiagnosisFinding]:
    """Test every hypothesis against ``observed``; fold the verdicts into ``findings``."""
    if observed.kind == "apply_kwarg":
        return findings + [_apply_kwarg()]
    if observed.kind == "not_divisible":
        return findings + _explain_divisible(scene, observed)
    if observed.kind == "cat_sizes":
        return _merge(findings, _explain_sizes(scene, observed), scene, observed)
    if observed.kind == "position_shape":
        return _merge(findings, _explain_positions(scene, observed), scene, observed)
    return _merge(findings, _explain_counts(scene, observed), scene, observed)


def _apply_kwarg() -> DiagnosisFinding:
    return cause(
        "APPLY_KWARG",
        "on the torch releases training stacks run, autograd Function.apply() takes positional arguments only: a "
        "keyword such as cp_group= raises this TypeError when the call is reached (Megatron-Bridge#4391, #4784: "
        "AllGatherVisionEmbeddings.apply(..., cp_group=...) under vision_dp_when_cp); the batch is not involved",
        "pass the group positionally: AllGatherVisionEmbeddings.apply(embeds, seqlens, cp_group); a custom "
        "Function can take keywords in a small wrapper that calls apply positionally")


def _explain_divisible(scene: Scene, observed: ObservedError) -> list[DiagnosisFinding]:
    length, cp = observed.get("length"), observed.get("cp")
    if length is None or cp is None:
        return []
    lengths = (scene.cu[1:] - scene.cu[:-1]).tolist()
    where = ("the packed row" if length in (scene.total_tokens, scene.batch.row_tokens)
             else f"segment {lengths.index(length)}" if length in lengths else None)
    if where is None:
        return [info("UNEXPLAINED", f"the error names a length of {length}; no segment or row of this batch has it "
                      f"(row {scene.total_tokens}, segments {lengths[:8]})")]
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
    rows, _ = scene.embed_rows()
    for rank, held in scene.actual_held().items():
        if rows is not None and pair == {rows, held} and rows != held:
            predictions.append(Prediction(
                "PRESHARDED_ROWS_NOT_SELECTED", held, rows,
                f"{rows} = every vision embedding row and {held} = the vision tokens rank {rank} holds: all rows met "
                "one rank's positions", NOT_SELECTED_HINT, rank=rank if rank >= 0 else None))
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
    return [dataclasses.replace(p, tokens=index, rows=value) for p in predictions]


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
        return predictions + _logical_predictions(scene, gathered=True)
    return (predictions + _not_selected_predictions(scene) + _layout_mix_predictions(scene)
            + _logical_predictions(scene, gathered=False))


def _all_rows(scene: Scene) -> dict[int, str]:
    """Row counts an encoder could have offered for the whole micro-batch, with their meaning."""
    out: dict[int, str] = {}
    rows, label = scene.embed_rows()
    grids, placeholders = scene.grid_rows(), scene.placeholders
    for value, text in ((placeholders, "the batch's vision placeholders"), (grids, "Σ t·h·w/4 of the grids"),
                        (rows, label)):
        if value is not None and value not in out:
            out[value] = f"{value} = {text}"
    return out


def _not_selected_predictions(scene: Scene) -> list[Prediction]:
    """All rows scattered into one rank's positions, under the data's cut and every other one.

    A rank that holds every vision token (always so at cp 1) has nothing to select: there, a count
    mismatch is the grids' or the encoder's, not the selection's.
    """
    predictions = []
    everything = scene.placeholders
    for rows, meaning in _all_rows(scene).items():
        if scene.cp > 1:
            predictions += [_not_selected(scene, rank, held, rows, meaning)
                            for rank, held in scene.actual_held().items() if held != everything]
        if scene.full_mask is None:
            continue
        for kind in LAYOUTS:
            for cp in OTHER_CPS[1:]:
                if (kind, cp) == (scene.data_layout, scene.cp):
                    continue
                predictions += [_not_selected_elsewhere(scene, kind, cp, rank, held, rows, meaning)
                                for rank, held in enumerate(scene.held(kind, cp) or []) if held != everything]
    return predictions


def _not_selected(scene: Scene, rank: int, held: int, rows: int, meaning: str) -> Prediction:
    who = f"rank {rank}" if rank >= 0 else "this rank"
    detail = _rank_detail(scene, rank)
    story = (f"{who} holds {held} vision tokens{detail}; all {rows} embedding rows ({meaning}) were scattered into "
             f"them: rows were not selected for this rank (each of the {scene.cp} ranks must scatter only its own "
             "rows)")
    return Prediction("PRESHARDED_ROWS_NOT_SELECTED", held, rows, story, NOT_SELECTED_HINT,
                      rank=rank if rank >= 0 else None)


def _rank_detail(scene: Scene, rank: int) -> str:
    if scene.result is None or rank < 0 or rank >= len(scene.result.ranks):
        return ""
    rows = scene.result.ranks[rank].selected_rows
    return f" (its own rows would be {format_ranges(rows, limit=4)})" if rows.numel() else ""


def _not_selected_elsewhere(scene: Scene, kind: str, cp: int, rank: int, held: int, rows: int,
                            meaning: str) -> Prediction:
    if cp != scene.cp:
        story = (f"the numbers fit cp={cp}, not cp={scene.cp}: rank {rank} of {cp} holds {held} vision tokens under "
                 f"{kind}, and all {rows} rows ({meaning}) were scattered into them; at cp={scene.cp} the ranks hold "
                 f"{_held_text(scene.held(scene.data_layout, scene.cp))}")
        return Prediction("CP_SIZE_MISMATCH", held, rows, story,
                          f"use one cp everywhere: the data was cut for cp={cp} (context_parallel_size, cpinspect "
                          "--cp)",
                          rank=rank, cost=2, variant=f"{kind} cp={cp}")
    story = (f"the data was cut with {LAYOUT_WORDS[kind]}: rank {rank} then holds {held} vision tokens, and all "
             f"{rows} rows "
             f"({meaning}) were scattered into them; under {scene.data_layout} rank {rank} would hold "
             f"{_held_text(scene.held(scene.data_layout, scene.cp), rank)}")
    return Prediction("LAYOUT_MISMATCH", held, rows, story,
                      f"shard the data the way the model does ({LAYOUT_WORDS[scene.layout]})", rank=rank, cost=2,
                      variant=f"{kind} cp={cp}")


def _held_text(counts: list[int] | None, rank: int | None = None) -> str:
    if counts is None:
        return "(cannot be cut)"
    if rank is not None:
        return str(counts[rank])
    return ", ".join(f"rank {r}: {c}" for r, c in enumerate(counts[:8])) + (", ..." if len(counts) > 8 else "")


def _layout_mix_predictions(scene: Scene) -> list[Prediction]:
    """Mask cut one way, rows cut another (e.g. deepstack rows per sequence, hidden states per document)."""
    predictions = []
    for mask_kind in LAYOUTS:
        for rows_kind in LAYOUTS:
            mask_counts, row_counts = scene.held(mask_kind, scene.cp), scene.held(rows_kind, scene.cp)
            if mask_kind == rows_kind or mask_counts is None or row_counts is None:
                continue
            for rank, (held, rows) in enumerate(zip(mask_counts, row_counts)):
                if held == rows:
                    continue
                predictions.append(Prediction(
                    "LAYOUT_MISMATCH", held, rows,
                    f"rank {rank} holds {held} vision tokens under {LAYOUT_WORDS[mask_kind]}, but the {rows} rows "
                    f"offered to it are the rows of the tokens it would hold under {LAYOUT_WORDS[rows_kind]}: the mask "
                    f"and the embeddings were split with different layouts (per-sequence vs per-document mix-up)",
                    f"cut the vision mask, the embeddings and the deepstack rows with one layout ({scene.layout}); "
                    "split_deepstack_embs/split_data_cp_rank are per-sequence (BSHD), THD needs the per-document "
                    "indices", rank=rank, cost=1, variant=f"{mask_kind}/{rows_kind}"))
    return predictions


def _logical_predictions(scene: Scene, *, gathered: bool) -> list[Prediction]:
    """Count-gather selection run with the logical boundaries on rows cut with the physical ones."""
    logical = scene.batch.logical_cu_seqlens
    if logical is None or torch.equal(logical, scene.cu) or scene.result is None or scene.data_layout != "zigzag":
        return []
    counted = _counts_in_logical_chunks(scene, logical)
    held = scene.held("zigzag", scene.cp) or []
    rows, _ = scene.embed_rows()
    seg = int(torch.nonzero((logical[1:] - logical[:-1]) != (scene.cu[1:] - scene.cu[:-1]))[0])
    why = (f"the selection counted vision tokens per chunk with the logical cu_seqlens (chunk = real length / "
           f"{2 * scene.cp} at offset logical start / {scene.cp}) on rows cut with the physical ones (segment {seg} "
           "is padded), so chunk boundaries shift")
    hint = "give the selection the physical boundaries (cu_seqlens_padded), the ones the rows were cut with"
    if gathered:
        if sum(counted) == sum(held):
            return []
        return [Prediction("LOGICAL_CU_AS_PHYSICAL", sum(counted), rows,
                           f"{why}: the ranks then count {' + '.join(map(str, counted))} = {sum(counted)} vision "
                           f"tokens instead of {sum(held)}", hint, scope="all ranks", segment=seg, cost=1)]
    return [Prediction("LOGICAL_CU_AS_PHYSICAL", h, c,
                       f"{why}: rank {r} holds {h} vision tokens but selects {c} rows", hint, rank=r, segment=seg,
                       cost=1)
            for r, (h, c) in enumerate(zip(held, counted))]


def _counts_in_logical_chunks(scene: Scene, logical: torch.Tensor) -> list[int]:
    """Per rank: vision tokens inside the local chunks that logical boundaries would define."""
    assert scene.result is not None
    cp = scene.cp
    masks = torch.stack([r.local_mask for r in scene.result.ranks]).to(torch.long)
    prefix = torch.cat([torch.zeros(cp, 1, dtype=torch.long), torch.cumsum(masks, 1)], dim=1)
    local_start = logical[:-1] // cp
    chunk = (logical[1:] - logical[:-1]) // (2 * cp)
    length = masks.shape[1]
    start = local_start.clamp(max=length)
    end = (local_start + 2 * chunk).clamp(max=length)
    return (prefix[:, end] - prefix[:, start]).sum(dim=1).tolist()


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


def _merge(findings: list[DiagnosisFinding], predictions: list[Prediction], scene: Scene,
           observed: ObservedError) -> list[DiagnosisFinding]:
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
    fallback = _embed_fallback(scene, tokens, rows)
    if fallback is not None:
        return findings + [fallback]
    partial = [p for p in predictions if p.rows == rows and p.code == "PRESHARDED_ROWS_NOT_SELECTED"]
    verdict = [cause(
        "PRESHARDED_ROWS_NOT_SELECTED",
        f"all {rows} embedding rows were offered to one rank, as when rows are not selected per rank "
        f"({_all_rows(scene)[rows]}), but no rank holds {tokens} vision tokens at cp={scene.cp} "
        f"({_held_text(scene.held(scene.data_layout, scene.cp))}); the error may come from another micro-batch",
        NOT_SELECTED_HINT, status="possible")] if partial and rows is not None else []
    return findings + verdict + [_unexplained(scene, observed)]


def _observed_pair(observed: ObservedError) -> tuple[int | None, int | None]:
    if observed.kind == "cat_sizes":
        return observed.get("expected"), observed.get("got")
    if observed.kind == "position_shape":
        return observed.get("index_length"), observed.get("value_length")
    return observed.get("tokens"), observed.get("rows")


def _with_confirmed(findings: list[DiagnosisFinding], confirmed: list[Prediction], scene: Scene,
                    observed: ObservedError) -> list[DiagnosisFinding]:
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
    labels = {"cat_sizes": ("expected size", "got size"), "position_shape": ("positions to fill", "positions given"),
              "gathered_count": ("gathered vision tokens", "embeddings")}
    first, second = labels.get(observed.kind, ("tokens", "rows"))
    rank = f" on rank {observed.rank}" if observed.rank is not None else ""
    return f"{first} {tokens}, {second} {rows}{rank}"


def _logical_companion(scene: Scene) -> list[DiagnosisFinding]:
    logical = scene.batch.logical_cu_seqlens
    if logical is None or torch.equal(logical, scene.cu) or scene.form == "full":
        return []
    return [cause(
        "LOGICAL_CU_AS_PHYSICAL",
        f"if the model was given the logical cu_seqlens (ending at {int(logical[-1])}) instead of the physical ones "
        f"(ending at {scene.total_tokens} = {scene.cp} x {scene.batch.row_tokens}), its pre-sharded test fails and it "
        "scatters all rows into the local row: the same numbers",
        "pass cu_seqlens_padded (the physical boundaries) to the model as well", status="possible")]


def _possible(prediction: Prediction, caveat: str) -> DiagnosisFinding:
    return cause(prediction.code, f"{prediction.story}; {caveat}", prediction.hint, status="possible",
                  rank=prediction.rank, segment=prediction.segment)


def _embed_fallback(scene: Scene, tokens: int | None, rows: int | None) -> DiagnosisFinding | None:
    """The tokens are exactly the row's placeholders: then the rows are what differs."""
    placeholders = scene.placeholders
    if placeholders is None or tokens != placeholders or rows is None or rows == placeholders:
        return None
    if any(scene.issues.values()):
        return None
    finding = embed_mismatch(scene, rows, "the error", placeholders)
    return dataclasses.replace(finding, message=f"the error's {tokens} tokens are exactly the batch's placeholders; "
                                                f"{finding.message}")


def _unexplained(scene: Scene, observed: ObservedError) -> DiagnosisFinding:
    held = scene.actual_held()
    held_text = ", ".join(f"rank {r}: {c}" if r >= 0 else f"this rank: {c}" for r, c in list(held.items())[:8])
    rows = ", ".join(_all_rows(scene).values()) or "unknown"
    return info("UNEXPLAINED",
                 f"no simulated cause reproduces {_numbers_text(observed)} on this batch at cp={scene.cp}: ranks hold "
                 f"{held_text or 'unknown'} vision tokens; whole-batch row counts: {rows}",
                 "check that the batch is the failing step's micro-batch (same rank files, same cp)")
