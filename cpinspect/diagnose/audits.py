"""Audits: what the batch itself shows, without any number from an error.

Each returns :class:`~cpinspect.diagnose.report.Finding` objects with the numbers and
the place (rank, segment, chunk under the model's layout) and a concrete fix; :func:`consistent`
lists what was checked and found in order, so an audit without findings still says something.
"""

from __future__ import annotations

import torch

from cpinspect.core.findings import Finding
from cpinspect.core.layout import rule_of
from cpinspect.core.tokens import TokenConfig
from cpinspect.core.vision_items import VisionItem, placeholder_mask
from cpinspect.diagnose.report import cause, info
from cpinspect.diagnose.scene import Scene
from cpinspect.diagnose.spans import SpanIssue

FOREIGN_IDS = {
    32000: "LLaVA-1.5's <image> (image_token_index 32000 in the llava-hf configs)",
    151654: "Qwen-VL's <|vision_pad|> (vision_token_id, which the models never fill)",
}


def audit(scene: Scene) -> list[Finding]:
    """Every check that needs no number from an error: what the batch itself shows."""
    findings = _batch_not_flat(scene) + _segments(scene)
    if scene.full_ids is not None:
        findings += _span_findings(scene) + _embed_findings(scene)
    if scene.result is not None:
        findings += [f.weighed() for f in scene.result.findings
                     if f.code not in ("EMBED_COUNT_MISMATCH", "SEGMENTS_PADDED")]
    return findings


def _batch_not_flat(scene: Scene) -> list[Finding]:
    if scene.stacked is None:
        return []
    b, s = scene.stacked
    return [cause(
        "BATCH_NOT_FLAT",
        f"input_ids has shape [{b}, {s}]: {b} rows stacked on a batch dimension, but the packed THD path takes one "
        f"flat row [1, T]; cu_seqlens ends at {scene.total_tokens} = {b} x {s}, so the samples belong in one row "
        f"(Megatron-Bridge treats only input_ids.size(0) == 1 as packed THD; with {b} rows it takes the BSHD path "
        f"and every tensor sized by cu_seqlens ({scene.total_tokens}) meets one sized by the row ({s}))",
        f"concatenate the rows: input_ids.reshape(1, -1) of shape [1, {b * s}], keeping cu_seqlens as they are")]


def _segments(scene: Scene) -> list[Finding]:
    if scene.divisible or rule_of(scene.layout) != "zigzag":
        return [] if scene.divisible else [_row_not_divisible(scene)]
    cu, multiple = scene.cu, 2 * scene.cp
    lengths = cu[1:] - cu[:-1]
    bad = torch.nonzero(lengths % multiple).view(-1)
    seg = int(bad[0])
    length = int(lengths[seg])
    padded = -(-length // multiple) * multiple
    after = ("the checks below use the row padded the way frameworks pad it" if scene.form == "full"
             else "the rank rows cannot be reassembled, so the span checks are skipped")
    return [cause(
        "SEGMENT_NOT_DIVISIBLE",
        f"segment {seg} has physical length {length}, which 2·cp = {multiple} does not divide ({length} mod "
        f"{multiple} = {length % multiple}; {bad.numel()} of {lengths.numel()} segments): the {scene.layout} "
        f"split needs {multiple} equal chunks per segment, so Megatron/TransformerEngine reject it (Bridge: "
        f"'Pre-sharded packed CP inputs require "
        f"every physical segment length to be divisible by 2 * cp_size'); {after}",
        f"pad every segment to a multiple of {multiple} before CP (segment {seg}: {length} -> {padded}) and pass the "
        "padded boundaries as cu_seqlens_padded", segment=seg)]


def _row_not_divisible(scene: Scene) -> Finding:
    total, rule = scene.total_tokens, (2 * scene.cp if rule_of(scene.layout) == "sequence-zigzag" else scene.cp)
    return cause(
        "SEGMENT_NOT_DIVISIBLE",
        f"the packed row has {total} tokens, which {rule} does not divide, so the {scene.layout} layout cannot cut it "
        f"into equal pieces for cp={scene.cp}",
        f"pad the row to {-(-total // rule) * rule} tokens", segment=0)


def _span_findings(scene: Scene) -> list[Finding]:
    findings: list[Finding] = []
    for kind in ("image", "video"):
        issues = scene.issues.get(kind, [])
        if not issues:
            continue
        if scene.foreign.get(kind):
            findings.append(_token_id_finding(scene, kind))
            continue
        truncated = [i for i in issues if i.problem in ("truncated", "dropped")]
        other = [i for i in issues if i.problem not in ("truncated", "dropped")]
        if truncated:
            findings.append(_truncated_finding(scene, kind, truncated))
        if other:
            findings.append(_grid_finding(scene, kind, other))
    return findings


def _truncated_finding(scene: Scene, kind: str, issues: list[SpanIssue]) -> Finding:
    merge = scene.tokens.merge_area
    cut = next((i for i in issues if i.problem == "truncated"), None)
    dropped = [i for i in issues if i.problem == "dropped"]
    missing = sum(i.item.tokens - (i.run_length or 0) for i in issues if i.item is not None)
    if cut is not None and cut.item is not None and cut.run_start is not None and cut.run_length is not None:
        end = cut.run_start + cut.run_length
        rank, segment, chunk = scene.locate(end - 1)
        text = (f"{cut.item.describe()} promises {cut.item.arithmetic(merge)} placeholder tokens, but segment "
                f"{cut.segment} holds only {cut.run_length} of them (global tokens {cut.run_start}-{end - 1}) and its "
                f"content ends right there, at token {end}, without <|vision_end|>: the span was cut by truncation "
                f"(cutoff_len or the packing budget)")
        segment = cut.segment
    else:
        rank = segment = chunk = None
        text = "the last vision items have no placeholders left after a cut at the end of the row"
    if dropped:
        names = ", ".join(i.item.describe() for i in dropped[:3] if i.item is not None)
        text += (f"; after the cut {len(dropped)} more item(s) have no placeholders at all ({names}"
                 f"{', ...' if len(dropped) > 3 else ''})")
    text += (f"; the grids still promise all of them, so the encoder makes {missing} row(s) more than the row has "
             f"{kind} placeholders")
    return cause("TRUNCATED_VISION_SPAN", text,
                  "raise cutoff_len / the packing budget so whole vision spans fit, or drop the sample; never cut "
                  "inside <|vision_start|>...<|vision_end|> (grids and pixel_values stay whole)",
                  rank=rank, segment=segment, chunk=chunk)


def _grid_finding(scene: Scene, kind: str, issues: list[SpanIssue]) -> Finding:
    merge = scene.tokens.merge_area
    first = issues[0]
    grid_count = len(scene.items.get(kind, []))
    run_count = len(scene.runs[kind]) if kind in scene.runs else 0
    rank = segment = chunk = None
    if first.problem == "mismatch" and first.item is not None and first.run_start is not None:
        end = first.run_start + (first.run_length or 0)
        rank, segment, chunk = scene.locate(first.run_start)
        text = (f"{first.item.describe()} promises {first.item.arithmetic(merge)} placeholder tokens, but its run in "
                f"segment {first.segment} (global tokens {first.run_start}-{end - 1}) has {first.run_length}, and it "
                "is not cut at the end of its sample: the grid and the expanded placeholders come from different "
                "resizes")
    elif first.problem == "extra":
        rank, segment, chunk = scene.locate(first.run_start or 0)
        text = (f"{run_count} {kind} placeholder run(s) but only {grid_count} {kind} grid row(s): the run of "
                f"{first.run_length} tokens at global token {first.run_start} (segment {first.segment}) has no grid")
    else:
        names = ", ".join(i.item.describe() for i in issues[:3] if i.item is not None)
        text = (f"{grid_count} {kind} grid row(s) promise placeholder runs that the row does not have ({names}): "
                f"the row has {run_count} {kind} run(s) of the {scene.tokens.model} id "
                f"{_id_of(scene.tokens, kind)}")
    if len(issues) > 1:
        text += f" ({len(issues) - 1} more disagreement(s) of the same kind)"
    return cause("GRID_TOKEN_MISMATCH", text,
                  "recompute the grids with the processor that expanded the placeholders (same min/max pixels and "
                  "patch size), or re-tokenize; check --model and the token ids", rank=rank, segment=segment,
                  chunk=chunk)


def _id_of(tokens: TokenConfig, kind: str) -> int:
    return tokens.image_token_id if kind == "image" else tokens.video_token_id


def _token_id_finding(scene: Scene, kind: str) -> Finding:
    foreign = scene.foreign[kind][0]
    items = scene.items[kind]
    lengths = [item.tokens for item in items]
    shown = ", ".join(map(str, lengths[:6])) + (", ..." if len(lengths) > 6 else "")
    family = f", {FOREIGN_IDS[foreign]}" if foreign in FOREIGN_IDS else ""
    position = int(torch.nonzero(scene.full_ids == foreign)[0]) if scene.full_ids is not None else 0
    rank, segment, chunk = scene.locate(position)
    configured = _id_of(scene.tokens, kind)
    return cause(
        "TOKEN_ID_MISMATCH",
        f"the {scene.tokens.model} {kind} placeholder id {configured} appears {scene.placeholders_of(kind)} time(s), "
        f"but id {foreign}{family} forms runs of exactly the lengths the {len(items)} {kind} grid row(s) promise "
        f"([{shown}], Σ {sum(lengths)}): the batch was tokenized for another model family, so the model's mask "
        "finds no (or the wrong) vision positions",
        f"re-tokenize with the {scene.tokens.model} processor; if the model really uses id {foreign}, pass "
        f"--{kind}-token-id {foreign}", rank=rank, segment=segment, chunk=chunk)


def _embed_findings(scene: Scene) -> list[Finding]:
    """The encoder's rows (E) against the vision positions the model fills (the mask, V).

    E is ``--embeds``, else ``vision_embed_count``, else the grids' Σ t·h·w/merge². A difference is
    left to the span finding only when the placeholder ids themselves disagree with the grids
    (that finding already names the items) and the mask is the ids' own mask.
    """
    explicit, label = scene.embed_rows()
    placeholders = scene.placeholders
    if explicit is None or placeholders is None or label.startswith("one row per placeholder"):
        return []
    findings = _mask_findings(scene, explicit, label)
    if explicit == placeholders or findings:
        return findings
    spans_explain = any(scene.issues.get(kind) for kind in ("image", "video"))
    if spans_explain and scene.mask_from_ids() and explicit == scene.grid_rows():
        return []
    return [embed_mismatch(scene, explicit, label, placeholders)]


def _mask_findings(scene: Scene, rows: int, label: str) -> list[Finding]:
    """An explicit ``vision_mask`` that marks other tokens than the placeholder ids."""
    if scene.full_mask is None or scene.full_ids is None or scene.mask_from_ids():
        return []
    ids_mask = placeholder_mask(scene.full_ids, scene.tokens)
    marked, ids = int(scene.full_mask.sum()), int(ids_mask.sum())
    extra = torch.nonzero(scene.full_mask & ~ids_mask).view(-1)
    missing = torch.nonzero(ids_mask & ~scene.full_mask).view(-1)
    parts = []
    if extra.numel():
        parts.append(f"{extra.numel()} marked token(s) are not placeholders (first at global token {int(extra[0])})")
    if missing.numel():
        parts.append(f"{missing.numel()} placeholder(s) are not marked (first at global token {int(missing[0])})")
    first = int(extra[0]) if extra.numel() else int(missing[0])
    rank, segment, chunk = scene.locate(first)
    agree = f"{label} ({rows}) agrees with the ids" if rows == ids else f"the encoder produced {rows} rows ({label})"
    status = "confirmed" if marked != rows else "possible"
    return [cause(
        "EMBED_COUNT_MISMATCH",
        f"the batch's vision_mask marks {marked} tokens, but input_ids hold {ids} {scene.tokens.model} placeholder "
        f"tokens ({'; '.join(parts)}); {agree}, so the model fills {marked} vision positions with {rows} rows",
        "build vision_mask from the placeholder ids (input_ids == image_token_id | input_ids == video_token_id), or "
        "drop it from the batch", status=status, rank=rank, segment=segment, chunk=chunk)]


def embed_mismatch(scene: Scene, rows: int, label: str, placeholders: int | None) -> Finding:
    grids = scene.grid_rows()
    agree = (f"; its grids agree with the placeholders (Σ t·h·w/{scene.tokens.merge_area} = {grids})"
             if grids == placeholders else "")
    text = (f"the vision encoder produced {rows} rows ({label}), but the batch has {placeholders} vision placeholder "
            f"tokens{agree}, so the encoder's input is what differs")
    segment = None
    difference = (placeholders or 0) - rows
    match = _item_with_tokens(scene, abs(difference))
    if difference > 0:
        text += f": {placeholders} - {rows} = {difference}"
        if match is not None:
            text += f" = the tokens of {match[0].describe()} in segment {match[1]}: its pixel_values did not reach " \
                    "the encoder"
            segment = match[1]
    elif difference < 0:
        text += f": {rows} - {placeholders} = {-difference} rows too many"
        if match is not None:
            text += f" = the tokens of {match[0].describe()}: an item encoded twice?"
            segment = match[1]
    return cause("EMBED_COUNT_MISMATCH", text,
                  "pass the encoder exactly the pixel_values/grids of the items in this packed row, in row order "
                  "(images of dropped or truncated samples must be dropped too)", segment=segment)


def _item_with_tokens(scene: Scene, tokens: int) -> tuple[VisionItem, int] | None:
    """The first item whose placeholder count is ``tokens``, with its segment (aligned kinds only)."""
    for kind in ("image", "video"):
        if scene.issues.get(kind):
            continue
        runs = scene.runs.get(kind)
        for index, item in enumerate(scene.items.get(kind, [])):
            if item.tokens == tokens and runs is not None and index < len(runs):
                return item, int(runs.segment[index])
    return None


def consistent(scene: Scene, findings: list[Finding]) -> list[Finding]:
    """``CONSISTENT`` lines: what was checked and found in order (shown with or without an error)."""
    codes = {f.code for f in findings if f.status == "confirmed"}
    lines = []
    if "BATCH_NOT_FLAT" not in codes:
        lines.append(f"input: {_form_text(scene)}")
    if scene.divisible and "SEGMENT_NOT_DIVISIBLE" not in codes and scene.cp > 1:
        lines.append(_split_line(scene))
    if scene.form == "presharded" and "LAYOUT_MISMATCH" not in codes and scene.divisible and scene.spans_intact:
        lines.append(f"layout: the rank files reassemble into whole vision spans under {scene.data_layout}")
    lines += _span_lines(scene, codes)
    if scene.result is not None and not any(f.is_problem for f in scene.result.findings
                                            if f.code != "EMBED_COUNT_MISMATCH"):
        held = ", ".join(f"{int(r.local_mask.sum())}" for r in scene.result.ranks[:8])
        lines.append(f"selection: the count all-gather gives all {scene.cp} ranks exactly the oracle's rows (they hold "
                     f"{held}{', ...' if scene.cp > 8 else ''} vision tokens)")
    return [info("CONSISTENT", line) for line in lines]


def _split_line(scene: Scene) -> str:
    """What the layout cut into equal pieces: every segment (zigzag rule, hybrid CP per segment) or the whole row."""
    if scene.segment_cp is not None:
        sizes = ", ".join(map(str, sorted(set(scene.segment_cp.tolist()))))
        return (f"segments: all {scene.batch.num_segments} physical lengths split into 2·c equal chunks for their "
                f"own local cp c ({sizes}; hybrid CP over a group of {scene.cp}, the batch's local_cp_size)")
    rule = rule_of(scene.layout)
    if rule == "zigzag":
        named = "" if scene.layout == "zigzag" else f" ({scene.layout})"
        return (f"segments: all {scene.batch.num_segments} physical lengths split into 2·cp = {2 * scene.cp} equal "
                f"pieces at cp={scene.cp}{named}")
    pieces = 2 * scene.cp if rule == "sequence-zigzag" else scene.cp
    return (f"row: the {scene.total_tokens} tokens split into {pieces} equal pieces of {scene.total_tokens // pieces} "
            f"({scene.layout}, cp={scene.cp}); segment lengths need not divide")


def _form_text(scene: Scene) -> str:
    n, total = scene.batch.row_tokens, scene.total_tokens
    if scene.form == "full":
        return f"one flat full row of {total} tokens in {scene.batch.num_segments} segment(s)"
    if scene.form == "presharded":
        return f"{len(scene.batch.rows)} rank rows of {n} tokens, cu_seqlens ends at {total} = {scene.cp} x {n}"
    if scene.form == "double sharded":
        return (f"{len(scene.batch.rows)} rank rows of {n} tokens, cu_seqlens ends at {total} = {scene.cp * scene.cp} "
                f"x {n}; checks needing the full row are skipped")
    return f"one rank's row of {n} tokens (cu_seqlens ends at {total} = {scene.cp} x {n}); checks needing the " \
           "full row are skipped"


def _span_lines(scene: Scene, codes: set[str]) -> list[str]:
    if scene.full_ids is None or codes & {"TRUNCATED_VISION_SPAN", "GRID_TOKEN_MISMATCH", "TOKEN_ID_MISMATCH"}:
        return []
    items = sum(len(v) for v in scene.items.values())
    if scene.batch.image_grid_thw is None and scene.batch.video_grid_thw is None:
        return [f"vision spans: no grids in the batch, so placeholder runs are not checked against grids "
                f"({scene.placeholders} placeholders)"]
    id_count = (scene.placeholders_of("image") or 0) + (scene.placeholders_of("video") or 0)
    if any(scene.issues.get(kind) for kind in ("image", "video")) or scene.grid_rows() != id_count:
        return []
    if items == 0 and id_count == 0:
        lines = ["vision spans: none: no vision placeholder in the row and no grid row in the batch (text only)"]
    else:
        lines = [f"vision spans: all {items} placeholder run(s) match their grids (Σ t·h·w/{scene.tokens.merge_area} "
                 f"= {scene.grid_rows()} = the {id_count} placeholder ids), with the {scene.tokens.model} ids "
                 f"{scene.tokens.image_token_id}/{scene.tokens.video_token_id}"]
    explicit = scene.embeds if scene.embeds is not None else scene.batch.vision_embed_count
    if explicit is not None and explicit == scene.placeholders and "EMBED_COUNT_MISMATCH" not in codes:
        lines.append(f"embedding rows: {explicit} = the {scene.placeholders} placeholders")
    return lines
