"""AUDIO_COUNT_MISMATCH: "Audio features and audio tokens do not match: tokens=T, features=F" (Megatron-Bridge
#5256, issue 13 item 5) on a Qwen-Omni batch.

The audit compares every audio item's placeholders with the rows its mel frames yield under the model's
rule (:mod:`cpinspect.core.audio_items`). The hypotheses each predict ``(tokens, features)`` on this batch:

* a stale formula: the other Omni model's rule, on the features side (``F`` = Σ other(L)) or on the
  placeholder side (every item holds other(L) placeholders, ``F`` = Σ rule(L));
* a count per row instead of per audio item: the placeholders of several items counted once from their
  summed frames, or the features' lengths taken per segment (a packed row's mask summed);
* CP: one rank's audio placeholders counted against every item's features (``T`` = what the rank holds).

Each is one prediction at cost 1, so :func:`cpinspect.diagnose.hypotheses.explain` confirms a cause only
when exactly one fits, reports each as possible when several do, and "unexplained" when none does.
The per-modality breakdown (:func:`breakdown`) reuses simulate's per-rank counts.
"""

from __future__ import annotations

from typing import Any

from cpinspect.core.audio_items import (
    AUDIO_RULES,
    AudioItems,
    audio_lengths,
    counted_together,
    find_audio_items,
    modality_rows,
)
from cpinspect.core.findings import Finding
from cpinspect.core.tokens import audio_tokens
from cpinspect.diagnose.errortext import ObservedError
from cpinspect.diagnose.prediction import Prediction
from cpinspect.diagnose.report import cause, info
from cpinspect.diagnose.scene import Scene

CODE = "AUDIO_COUNT_MISMATCH"
HINT_RULE = ("expand every audio item to as many placeholders as the model's own rule gives for its mel frames "
             "(transformers' _get_feat_extract_output_lengths of the model you train), and compute the encoder's "
             "lengths with the same rule")
HINT_ITEM = ("count placeholders once per audio item (feature_attention_mask with one row per item, or "
             "audio_feature_lengths per item), never from a row's summed frames: the rule is not additive")
HINT_CP = ("compare a CP rank's audio placeholders with its own share of the audio rows (select them per rank, as "
           "vision rows are), or count the placeholders on the full row before the CP split")


def scene_audio(scene: Scene) -> AudioItems | None:
    """The full row's audio items (None without an Omni preset or without the full row)."""
    if scene.full_ids is None:
        return None
    return find_audio_items(scene.full_ids, scene.cu, scene.tokens, scene.batch)


def audio_testable(scene: Scene, observed: ObservedError) -> bool:
    """True when the audio error's two numbers can be tested on this batch (it has audio placeholders)."""
    if observed.kind != "audio_count" or observed.get("tokens") is None or observed.get("rows") is None:
        return False
    audio = scene_audio(scene)
    if audio is None and scene.form == "one rank":  # one rank's row: the CP cause needs the items' lengths
        return scene.tokens.audio_token_id is not None and audio_lengths(scene.batch) is not None
    return audio is not None and audio.count > 0


def _one_rank_predictions(scene: Scene) -> list[Prediction]:
    """One rank's file: its own audio placeholders against every item's rows (from the batch's lengths)."""
    found = audio_lengths(scene.batch)
    if found is None or scene.tokens.audio_token_id is None:
        return []
    lengths, key = found
    total = sum(audio_tokens(scene.tokens.model, n) for n in lengths)
    held = int((scene.batch.rows[0] == scene.tokens.audio_token_id).sum())
    if held == total:
        return []
    return [Prediction(CODE, held, total, f"{held} = the audio placeholders of this rank's row and {total} = the rows "
                       f"the {len(lengths)} items' mel frames ({key}) yield under {scene.tokens.model}'s rule: one CP "
                       "rank's placeholders were counted against every item's features", HINT_CP, cost=1,
                       variant="cp-local")]


def audio_findings(scene: Scene) -> list[Finding]:
    """The audit: each audio item's placeholders against the rows its frames yield (needs the batch's lengths)."""
    audio = scene_audio(scene)
    if audio is None or audio.lengths is None or not (audio.count or audio.lengths):
        return []
    rows = audio.rows() or []
    total, model, key = sum(rows), audio.model, audio.key
    if not audio.per_item:
        groups = counted_together(audio.placeholders, audio.lengths, model)
        if groups is not None and audio.total_placeholders != total:
            return [cause(CODE, _together_text(audio, groups) + f"; the encoder yields {total} rows for the items one "
                          "by one", HINT_ITEM, segment=audio.segment[_first_group(groups)])]
        text = (f"the row has {audio.count} audio span(s) with {audio.total_placeholders} placeholders, but {key} "
                f"describes {len(audio.lengths)} item(s) that yield {total} rows under {model}'s rule")
        if audio.total_placeholders != total:
            return [cause(CODE, text, HINT_RULE)]
        return [info("CONSISTENT", f"audio: {audio.total_placeholders} placeholders = {total} rows in total ({key}, "
                                   f"{model}'s rule); the {audio.count} span(s) cannot be paired with the "
                                   f"{len(audio.lengths)} item(s) one by one")]
    bad = [i for i, (held, want) in enumerate(zip(audio.placeholders, rows)) if held != want]
    if not bad:
        return [info("CONSISTENT", f"audio: all {audio.count} item(s) hold as many placeholders as their mel frames "
                                   f"yield rows under {model}'s rule ({total} rows, from {key})")]
    first = bad[0]
    rank, segment, chunk = scene.locate(audio.first_token[first])
    text = (f"audio item {first} (segment {audio.segment[first]}, from token {audio.first_token[first]}) holds "
            f"{audio.placeholders[first]} placeholders, but its {audio.lengths[first]} mel frames ({key}) yield "
            f"{rows[first]} rows under {model}'s rule; {len(bad)} of {audio.count} items differ "
            f"({audio.total_placeholders} placeholders, {total} rows)")
    stale = _stale_rules(audio)
    if stale:
        text += f": every item holds {stale[0]}'s count instead, a stale formula"
    return [cause(CODE, text, HINT_RULE, rank=rank, segment=segment, chunk=chunk)]


def audio_predictions(scene: Scene, observed: ObservedError) -> list[Prediction]:
    """The hypotheses of the module docstring, for an audio error's ``(tokens, features)``."""
    if not audio_testable(scene, observed):
        return []
    audio = scene_audio(scene)
    if audio is None:
        return _one_rank_predictions(scene)
    placeholders, model = audio.total_placeholders, audio.model
    rows = audio.rows()
    total = sum(rows) if rows is not None else placeholders
    where = (f"{total} = the rows the {len(rows)} items' mel frames yield under {model}'s rule" if rows is not None
             else f"{total} = one row per audio placeholder (the batch carries no audio lengths)")
    predictions = _stale_predictions(audio, placeholders, total) + _per_row_predictions(audio, placeholders, total)
    if scene.cp > 1 and scene.result is not None:
        for rank, held in enumerate(m.get("audio", 0) for m in scene.result.modalities()):
            if held != placeholders:
                predictions.append(Prediction(
                    CODE, held, total, f"{held} = the audio placeholders rank {rank} holds under {scene.data_layout} "
                    f"(of {placeholders} in the row, {held / max(placeholders, 1):.2f} of them) and {where}: one CP "
                    "rank's placeholders were counted against every item's features", HINT_CP, rank=rank, cost=1,
                    variant="cp-local"))
    return predictions


def _stale_predictions(audio: AudioItems, placeholders: int, total: int) -> list[Prediction]:
    out: list[Prediction] = []
    if audio.lengths is None:
        return out
    frames = f"the {len(audio.lengths)} items' mel frames"
    for other in AUDIO_RULES:
        if other == audio.model:
            continue
        stale = sum(audio.rows(other) or [])
        if stale not in (placeholders, total):
            out.append(Prediction(
                CODE, placeholders, stale, f"{placeholders} = the row's audio placeholders and {stale} = {other}'s "
                f"rule over {frames} ({audio.model}'s gives {total}): the features' lengths were computed with the "
                "stale formula", HINT_RULE, scope="any", cost=1, variant=f"stale formula ({other}) for the features"))
        if other in _stale_rules(audio) and placeholders != total:
            out.append(Prediction(
                CODE, placeholders, total, f"{placeholders} = {other}'s rule over {frames}, item by item (the stale "
                f"formula expanded the placeholders) and {total} = {audio.model}'s rule over them (the encoder's rows)",
                HINT_RULE, scope="any", cost=1, variant=f"stale formula ({other}) for the placeholders"))
    return out


def _per_row_predictions(audio: AudioItems, placeholders: int, total: int) -> list[Prediction]:
    if audio.lengths is None:
        return []
    out = []
    groups = counted_together(audio.placeholders, audio.lengths, audio.model)
    if groups is not None and placeholders != total:
        start, end = groups[_first_group(groups)]
        out.append(Prediction(CODE, placeholders, total, f"{placeholders} = the row's audio placeholders, items "
                              f"{start}..{end - 1} counted together in one span, and {total} = the rows of the "
                              f"{len(audio.lengths)} items one by one", HINT_ITEM, scope="any", cost=1,
                              variant="per row (placeholders)"))
    if audio.per_item:
        by_segment: dict[int, int] = {}
        for segment, length in zip(audio.segment, audio.lengths):
            by_segment[segment] = by_segment.get(segment, 0) + length
        per_row = sum(audio_tokens(audio.model, frames) for frames in by_segment.values())
        if per_row not in (placeholders, total):  # equal to the per-item total: not a distinct cause
            out.append(Prediction(
                CODE, placeholders, per_row, f"{placeholders} = the row's audio placeholders (one span per item) and "
                f"{per_row} = {audio.model}'s rule over each segment's summed mel frames ({len(by_segment)} "
                "segment(s)): the features' lengths were taken once per packed row, not per item", HINT_ITEM,
                scope="any", cost=1, variant="per row (features)"))
    return out


def _stale_rules(audio: AudioItems) -> list[str]:
    """The other models' rules that every item's placeholder count follows (items compared one by one)."""
    if not audio.per_item or audio.rows() == audio.placeholders:
        return []
    return [other for other in AUDIO_RULES if other != audio.model and audio.rows(other) == audio.placeholders]


def _first_group(groups: list[tuple[int, int]]) -> int:
    return next(j for j, (start, end) in enumerate(groups) if end - start > 1)


def _together_text(audio: AudioItems, groups: list[tuple[int, int]]) -> str:
    j = _first_group(groups)
    start, end = groups[j]
    frames = audio.lengths[start:end] if audio.lengths is not None else []
    return (f"the row has {audio.count} audio span(s) for {len(audio.lengths or [])} items: span {j} (segment "
            f"{audio.segment[j]}, from token {audio.first_token[j]}) holds {audio.placeholders[j]} placeholders = "
            f"{audio.model}'s rule over items {start}..{end - 1} taken together ({' + '.join(map(str, frames))} = "
            f"{sum(frames)} mel frames): placeholders counted per row, not per audio item")


def breakdown(scene: Scene) -> dict[str, Any] | None:
    """Per-modality counts for the Omni presets: tokens each rank holds (simulate's own per-rank counts) and
    the encoder rows per modality for the whole row; None for the Qwen-VL presets or without a simulation."""
    if scene.tokens.audio_token_id is None or scene.result is None or scene.full_ids is None:
        return None
    audio = scene_audio(scene)
    rows = modality_rows(scene.batch, scene.full_ids, scene.tokens, audio)
    source = (f"{audio.key}, {audio.model}'s rule" if audio is not None and audio.lengths is not None
              else "one per placeholder: no audio lengths in the batch")
    return {"ranks": scene.result.modalities(), "rows": rows, "audio_rows_from": source}


def positions_unknown(scene: Scene) -> list[Finding]:
    """SKIPPED when the batch's position_ids cannot be judged: video placeholders under an Omni preset.

    Where the Omni rule is known it is the Qwen-VL one: text, images and audio-only items (audio takes
    sequential positions, as text does) give what transformers' Qwen2.5-Omni / Qwen3-Omni ``get_rope_index``
    gives (tested). Their videos are not modelled: time-aligned ``t`` (``position_id_per_seconds``) and audio
    interleaved with the video (``use_audio_in_video``).
    """
    if not scene.batch.position_ids or scene.tokens.audio_token_id is None:
        return []
    videos = sum(int((row == scene.tokens.video_token_id).sum()) for row in scene.batch.rows)
    if not videos:
        return []
    return [info("SKIPPED", f"the batch's position_ids were not checked: its rows hold {videos} video placeholders, "
                            f"and the {scene.tokens.model} video positions rule (time-aligned t, audio interleaved "
                            "with the video) is not modelled by cpinspect; text, images and audio-only items are")]
