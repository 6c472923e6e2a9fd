"""Audio in diagnose (issue 13 item 5, issue 14 class 8): per-item audio rows, AUDIO_COUNT_MISMATCH, the breakdown.

Oracles: the rows per item come from transformers' own ``_get_feat_extract_output_lengths`` (skipped where the
installed transformers lacks it); what each rank holds from tests/literal.py's zigzag; which causes fit a pair
of numbers from the causes' definitions written out here in plain Python.
"""

import importlib.util
import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cpinspect.cli.app import app
from cpinspect.core.audio_items import counted_together
from cpinspect.core.tokens import AUDIO_PAD, IMAGE_PAD, VIDEO_PAD, audio_tokens, token_config
from cpinspect.diagnose.api import diagnose_batch
from tests.literal import zigzag_indices

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
OMNI = token_config("qwen3-omni")


def _generator():
    spec = importlib.util.spec_from_file_location("make_broken", ROOT / "examples" / "make_broken.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BROKEN = _generator()


def transformers_rule(model: str):
    """The per-item rows of ``model`` as transformers computes them (its own function, not ours)."""
    if model == "qwen3-omni":
        omni = pytest.importorskip("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")
        return lambda n: int(omni._get_feat_extract_output_lengths(torch.tensor([n]))[0])
    omni = pytest.importorskip("transformers.models.qwen2_5_omni.modeling_qwen2_5_omni")
    return lambda n: int(omni.Qwen2_5OmniAudioEncoder._get_feat_extract_output_lengths(None, torch.tensor([n]))[1][0])


def _codes(report, status="confirmed"):
    return {f.code for f in report.findings if f.status == status}


def _random_segments(rng: random.Random):
    segments = []
    for _ in range(rng.randint(1, 3)):
        items = [("text", rng.randint(1, 30))]
        for _ in range(rng.randint(1, 4)):
            kind = rng.choice(["audio", "audio", "audio", "image", "text"])
            items.append(("audio", [rng.randint(20, 700)]) if kind == "audio" else
                         ("image", (1, 2 * rng.randint(1, 4), 2 * rng.randint(1, 4))) if kind == "image" else
                         ("text", rng.randint(1, 20)))
        segments.append(tuple(items))
    if not any(kind == "audio" for seg in segments for kind, _ in seg):
        segments[0] = segments[0] + (("audio", [rng.randint(20, 700)]),)
    return segments


# --------------------------------------------------------------------------- rows per item


@pytest.mark.parametrize("model", ["qwen2.5-omni", "qwen3-omni"])
def test_rows_per_item_equal_transformers_and_the_correct_batch_is_consistent(model):
    rule = transformers_rule(model)
    batch = BROKEN.omni_batch(model=model)
    lengths = batch["audio_feature_lengths"].tolist()
    report = diagnose_batch(batch, 2, tokens=token_config(model))
    assert report.exit_code == 0, [f.message for f in report.findings]
    line = next(f.message for f in report.findings if f.code == "CONSISTENT" and f.message.startswith("audio:"))
    assert f"all {len(lengths)} item(s)" in line and f"({sum(rule(n) for n in lengths)} rows" in line
    assert report.summary["modalities"]["rows"]["audio"] == sum(rule(n) for n in lengths)


def test_feature_attention_mask_gives_the_same_lengths_as_audio_feature_lengths():
    batch = BROKEN.omni_batch(rule="qwen2.5-omni")
    lengths = batch.pop("audio_feature_lengths").tolist()
    mask = torch.zeros(len(lengths), max(lengths) + 7, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    report = diagnose_batch({**batch, "feature_attention_mask": mask}, 2, tokens=OMNI)
    finding = next(f for f in report.findings if f.code == "AUDIO_COUNT_MISMATCH")
    rule = transformers_rule("qwen3-omni")
    assert finding.status == "confirmed" and f"yield {rule(lengths[0])} rows" in finding.message
    assert "qwen2.5-omni's count instead, a stale formula" in finding.message


def test_a_malformed_feature_attention_mask_is_exit_2(tmp_path):
    batch = BROKEN.omni_batch()
    batch.pop("audio_feature_lengths")
    torch.save({**batch, "feature_attention_mask": torch.full((4, 10), 2)}, tmp_path / "b.pt")
    result = runner.invoke(app, ["diagnose", str(tmp_path / "b.pt"), "--cp", "2", "--model", "qwen3-omni"])
    assert result.exit_code == 2 and "feature_attention_mask must be" in result.output
    assert "Traceback" not in result.output


def test_counted_together_finds_exactly_the_partitions_a_brute_force_finds():
    rng = random.Random(7)
    for _ in range(200):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(2, 5))]
        spans = rng.randint(1, len(lengths) - 1)
        cuts = sorted(rng.sample(range(1, len(lengths)), spans - 1))
        bounds = [0, *cuts, len(lengths)]
        placeholders = [audio_tokens("qwen3-omni", sum(lengths[a:b])) for a, b in zip(bounds, bounds[1:])]
        if rng.random() < 0.3:
            placeholders[0] += 1
        brute = [list(zip((0, *c), (*c, len(lengths))))
                 for c in itertools.combinations(range(1, len(lengths)), spans - 1)
                 if [audio_tokens("qwen3-omni", sum(lengths[a:b])) for a, b in zip((0, *c), (*c, len(lengths)))]
                 == placeholders]
        found = counted_together(placeholders, lengths, "qwen3-omni")
        assert (found is None) == (not brute)
        if found is not None:
            assert found in brute


# --------------------------------------------------------------------------- the hypotheses


def _literal_causes(batch: dict, cp: int, model: str, other: str) -> dict[tuple[int, int], set[str]]:
    """Which causes predict which (tokens, features) on a correct batch, from their definitions."""
    rule, stale = transformers_rule(model), transformers_rule(other)
    ids = batch["input_ids"].view(-1).tolist()
    cu = batch["cu_seqlens_padded"].tolist()
    lengths = batch["audio_feature_lengths"].tolist()
    placeholders = sum(i == AUDIO_PAD for i in ids)
    rows = sum(rule(n) for n in lengths)
    segment_of = []  # the segment of each audio item: the segment of its first placeholder
    for g, token in enumerate(ids):
        if token == AUDIO_PAD and (g == 0 or ids[g - 1] != AUDIO_PAD):
            segment_of.append(next(s for s in range(len(cu) - 1) if cu[s] <= g < cu[s + 1]))
    per_segment: dict[int, int] = {}
    for s, n in zip(segment_of, lengths):
        per_segment[s] = per_segment.get(s, 0) + n
    causes: dict[tuple[int, int], set[str]] = {}
    stale_rows = sum(stale(n) for n in lengths)
    if stale_rows not in (placeholders, rows):
        causes.setdefault((placeholders, stale_rows), set()).add("stale")
    per_row = sum(rule(n) for n in per_segment.values())
    if per_row not in (placeholders, rows):
        causes.setdefault((placeholders, per_row), set()).add("per row")
    if cp > 1:
        for held in zigzag_indices(cu, cp):
            local = sum(ids[g] == AUDIO_PAD for g in held)
            if local != placeholders:
                causes.setdefault((local, rows), set()).add("cp")
    return causes


@pytest.mark.parametrize("seed", range(12))
def test_a_cause_is_confirmed_only_when_exactly_one_fits_the_numbers(seed):
    rng = random.Random(seed)
    model, other = rng.choice([("qwen3-omni", "qwen2.5-omni"), ("qwen2.5-omni", "qwen3-omni")])
    cp = rng.choice([1, 2, 3, 4])
    batch = BROKEN.omni_batch(_random_segments(rng), model=model, multiple=2 * cp, seed=seed)
    causes = _literal_causes(batch, cp, model, other)
    placeholders = int((batch["input_ids"] == AUDIO_PAD).sum())
    unexplained = (placeholders + 1000, placeholders + 1001)
    for (tokens, features), fitting in [*causes.items(), (unexplained, set())]:
        text = f"ValueError: Audio features and audio tokens do not match: tokens={tokens}, features={features}"
        report = diagnose_batch(batch, cp, tokens=token_config(model), error_text=text)
        audio = [f for f in report.findings if f.code == "AUDIO_COUNT_MISMATCH"]
        assert not _codes(report) - {"AUDIO_COUNT_MISMATCH"}, (seed, _codes(report))
        if len(fitting) == 1:
            assert [f.status for f in audio] == ["confirmed"], (seed, fitting, [f.message for f in audio])
        elif fitting:
            assert audio and {f.status for f in audio} == {"possible"}, (seed, fitting, [f.message for f in audio])
        else:
            assert not audio and "UNEXPLAINED" in _codes(report, "info"), (seed, [f.message for f in audio])


def test_the_features_side_counted_per_row_and_the_stale_formula_are_told_apart():
    segments = BROKEN.OMNI_SEGMENTS
    two_items = (("text", 17), ("audio", [173]), ("text", 9), ("audio", [250]), ("text", 30))
    batch = BROKEN.omni_batch((segments[0], two_items, segments[2]))  # segment 1: two items, 173 and 250 frames
    rule, stale = transformers_rule("qwen3-omni"), transformers_rule("qwen2.5-omni")
    lengths = batch["audio_feature_lengths"].tolist()
    per_row = rule(250) + rule(173 + 250) + rule(96)
    tokens = sum(rule(n) for n in lengths)
    assert per_row != tokens
    for features, words in ((per_row, "once per packed row"), (sum(stale(n) for n in lengths), "stale formula")):
        text = f"Audio features and audio tokens do not match: tokens={tokens}, features={features}"
        report = diagnose_batch(batch, 2, tokens=OMNI, error_text=text)
        found = [f for f in report.findings if f.code == "AUDIO_COUNT_MISMATCH"]
        assert [f.status for f in found] == ["confirmed"] and words in found[0].message, found


def test_the_cp_cause_names_the_rank_and_a_rank_that_does_not_fit_is_only_possible():
    batch = BROKEN.omni_batch()
    held = [sum(batch["input_ids"].view(-1)[g] == AUDIO_PAD for g in h)
            for h in zigzag_indices(batch["cu_seqlens_padded"].tolist(), 2)]
    text = f"Audio features and audio tokens do not match: tokens={int(held[0])}, features=130"
    report = diagnose_batch(batch, 2, tokens=OMNI, error_text=text)
    assert [(f.status, f.rank) for f in report.findings if f.code == "AUDIO_COUNT_MISMATCH"] == [("confirmed", 0)]
    report = diagnose_batch(batch, 2, tokens=OMNI, error_text="[rank1]: " + text)
    assert [f.status for f in report.findings if f.code == "AUDIO_COUNT_MISMATCH"] == ["possible"]


def test_without_numbers_or_without_audio_the_error_is_only_recognised():
    batch = BROKEN.omni_batch()
    bare = diagnose_batch(batch, 2, tokens=OMNI, error_text="Audio features and audio tokens do not match")
    assert "ERROR_RECOGNISED" in {f.code for f in bare.findings} and not _codes(bare)
    vl = diagnose_batch(ROOT / "examples" / "qwen3vl_packed.pt", 2,
                        error_text="Audio features and audio tokens do not match: tokens=75, features=130")
    assert "ERROR_RECOGNISED" in {f.code for f in vl.findings} and not _codes(vl) and vl.exit_code == 1


# --------------------------------------------------------------------------- breakdown, simulate, positions


def test_the_breakdown_equals_literal_counts_per_rank_and_is_drawn(tmp_path):
    batch = BROKEN.omni_batch()
    torch.save(batch, tmp_path / "omni.pt")
    result = runner.invoke(app, ["diagnose", str(tmp_path / "omni.pt"), "--cp", "2", "--model", "qwen3-omni",
                                 "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    ids = batch["input_ids"].view(-1).tolist()
    held = zigzag_indices(batch["cu_seqlens_padded"].tolist(), 2)
    assert doc["modalities"]["ranks"] == [{"image": sum(ids[g] == IMAGE_PAD for g in h),
                                           "video": sum(ids[g] == VIDEO_PAD for g in h),
                                           "audio": sum(ids[g] == AUDIO_PAD for g in h)} for h in held]
    rule = transformers_rule("qwen3-omni")
    assert doc["modalities"]["rows"] == {"image": 16 * 20 // 4, "video": 2 * 12 * 16 // 4,
                                         "audio": sum(rule(n) for n in batch["audio_feature_lengths"].tolist())}
    shown = runner.invoke(app, ["diagnose", str(tmp_path / "omni.pt"), "--cp", "2", "--model", "qwen3-omni",
                                "--no-color"])
    text = " ".join(shown.output.replace("│", " ").split())
    audio = doc["modalities"]["ranks"]
    assert (f"audio: {audio[0]['audio']} tokens on rank 0, {audio[1]['audio']} on rank 1; "
            f"{doc['modalities']['rows']['audio']} rows (audio_feature_lengths, qwen3-omni's rule)") in text
    plain = runner.invoke(app, ["diagnose", "examples/qwen3vl_packed.pt", "--cp", "2", "--json"])
    assert "modalities" not in json.loads(plain.stdout)


def test_simulate_counts_the_audio_rows_from_the_lengths(tmp_path):
    for rule, code in (("qwen3-omni", 0), ("qwen2.5-omni", 1)):
        batch = BROKEN.omni_batch(rule=rule)
        torch.save(batch, tmp_path / "omni.pt")
        result = runner.invoke(app, ["simulate", str(tmp_path / "omni.pt"), "--cp", "2", "--model", "qwen3-omni",
                                     "--json"])
        assert result.exit_code == code, result.output
        doc = json.loads(result.stdout)
        audio_rows = sum(transformers_rule("qwen3-omni")(n) for n in batch["audio_feature_lengths"].tolist())
        assert doc["vision_embed_count"] == 80 + 96 + audio_rows
        assert doc["vision_tokens"] == 80 + 96 + int((batch["input_ids"] == AUDIO_PAD).sum())


def transformers_rope(model: str, ids: torch.Tensor, image_grid_thw: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """``[3, T]`` positions of one sample from transformers' own Omni ``get_rope_index`` (skipped if absent)."""
    import types

    if model == "qwen2.5-omni":
        omni = pytest.importorskip("transformers.models.qwen2_5_omni.modeling_qwen2_5_omni")
        config = pytest.importorskip("transformers.models.qwen2_5_omni.configuration_qwen2_5_omni")
        owner, thinker = omni.Qwen2_5OmniPreTrainedModelForConditionalGeneration, config.Qwen2_5OmniThinkerConfig()
    else:
        omni = pytest.importorskip("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")
        config = pytest.importorskip("transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe")
        owner, thinker = omni.Qwen3OmniMoePreTrainedModelForConditionalGeneration, config.Qwen3OmniMoeThinkerConfig()
    names = ("image_token_id", "video_token_id", "audio_token_id", "audio_start_token_id", "position_id_per_seconds")
    # vision_start_token_id is not on the thinker config (the talker's is 151652); the rest is the thinker's own
    settings = types.SimpleNamespace(**{n: getattr(thinker, n) for n in names}, vision_start_token_id=151652,
                                     seconds_per_chunk=2, audio_config=types.SimpleNamespace(n_window=50))
    model_like = types.SimpleNamespace(spatial_merge_size=2, config=settings)
    model_like.get_llm_pos_ids_for_vision = types.MethodType(owner.get_llm_pos_ids_for_vision, model_like)
    positions, _ = owner.get_rope_index(model_like, ids.view(1, -1), image_grid_thw=image_grid_thw,
                                        attention_mask=torch.ones(1, ids.numel(), dtype=torch.long),
                                        audio_seqlens=torch.tensor(lengths))
    return positions.reshape(3, -1).long()


@pytest.mark.parametrize("model", ["qwen2.5-omni", "qwen3-omni"])
def test_omni_positions_of_text_images_and_audio_equal_transformers_and_are_checked(model):
    segments = ((("text", 40), ("image", (1, 16, 20)), ("text", 21), ("audio", [250]), ("text", 30),
                 ("image", (1, 4, 6)), ("audio", [96]), ("text", 5)),
                (("text", 9), ("audio", [173]), ("text", 3), ("image", (1, 8, 8)), ("text", 11)))
    batch = BROKEN.omni_batch(segments, model=model)
    ids, logical, padded = batch["input_ids"].view(-1), batch["cu_seqlens"].tolist(), batch["cu_seqlens_padded"]
    grids, lengths = batch["image_grid_thw"], batch["audio_feature_lengths"].tolist()
    per_sample = [(0, 2, 0, 2), (2, 3, 2, 3)]  # (first image, end, first audio, end) of each sample
    positions = torch.zeros(3, ids.numel(), dtype=torch.long)
    for s, (i0, i1, a0, a1) in enumerate(per_sample):
        start, end = int(padded[s]), int(padded[s]) + logical[s + 1] - logical[s]
        positions[:, start:end] = transformers_rope(model, ids[start:end], grids[i0:i1], lengths[a0:a1])
    good = diagnose_batch({**batch, "position_ids": positions.unsqueeze(1)}, 2, tokens=token_config(model))
    assert report_ok(good) and not [f for f in good.findings if f.code == "SKIPPED"]
    shifted = positions.clone()
    shifted[:, 60:] += 1
    bad = diagnose_batch({**batch, "position_ids": shifted.unsqueeze(1)}, 2, tokens=token_config(model))
    assert "MROPE_MISMATCH" in _codes(bad)


def report_ok(report) -> bool:
    return report.exit_code == 0 and not _codes(report)


def test_omni_video_position_ids_are_not_judged_by_a_rule_cpinspect_does_not_model():
    batch = BROKEN.omni_batch()  # segment 2 holds a video
    total = batch["input_ids"].numel()
    positions = torch.arange(total).expand(3, 1, total).clone()
    report = diagnose_batch({**batch, "position_ids": positions}, 2, tokens=OMNI)
    skipped = [f.message for f in report.findings if f.code == "SKIPPED"]
    assert skipped and "video positions rule (time-aligned t, audio interleaved with the video) is not" in skipped[0]
    assert not {c for c in _codes(report) if c.startswith(("MROPE", "ROPE"))} and report.exit_code == 0
    assert not [f for f in diagnose_batch(batch, 2, tokens=OMNI).findings if f.code == "SKIPPED"]


def test_an_omni_batch_with_images_video_and_audio_goes_through_simulate_positions_and_diagnose(tmp_path):
    torch.save(BROKEN.omni_batch(), tmp_path / "omni.pt")
    shown = runner.invoke(app, ["simulate", str(tmp_path / "omni.pt"), "--cp", "2", "--model", "qwen3-omni",
                                "--positions", "--no-color"])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.replace("│", " ").split())
    assert "✓ OK: all 2 rank(s) select exactly the oracle's rows" in text and "mRoPE positions (qwen3-omni" in text
    assert "gives an audio-only item sequential positions like text" in text
    assert "qwen3-omni video mRoPE positions (time-aligned t, audio interleaved with the video) are not" in text
    assert runner.invoke(app, ["diagnose", str(tmp_path / "omni.pt"), "--cp", "2", "--model", "qwen3-omni"]
                         ).exit_code == 0
    no_video = BROKEN.omni_batch(BROKEN.OMNI_SEGMENTS[:2])
    torch.save(no_video, tmp_path / "audio.pt")
    plain = runner.invoke(app, ["simulate", str(tmp_path / "audio.pt"), "--cp", "2", "--model", "qwen3-omni",
                                "--positions", "--no-color"])
    assert plain.exit_code == 0 and "video mRoPE positions" not in " ".join(plain.output.replace("│", " ").split())


def test_one_rank_file_with_the_items_lengths_tests_the_cp_cause(tmp_path):
    from cpinspect.core.synth import shard_batch

    batch = BROKEN.omni_batch()
    rank1 = shard_batch(batch, 2)[1]
    rank1["audio_feature_lengths"] = batch["audio_feature_lengths"]
    held = int((rank1["input_ids"] == AUDIO_PAD).sum())
    rows = sum(transformers_rule("qwen3-omni")(n) for n in batch["audio_feature_lengths"].tolist())
    assert held == sum(batch["input_ids"].view(-1)[g] == AUDIO_PAD
                       for g in zigzag_indices(batch["cu_seqlens_padded"].tolist(), 2)[1])
    text = f"[rank1]: Audio features and audio tokens do not match: tokens={held}, features={rows}"
    report = diagnose_batch(rank1, 2, tokens=OMNI, error_text=text)
    assert [f.status for f in report.findings if f.code == "AUDIO_COUNT_MISMATCH"] == ["confirmed"]
    rank1.pop("audio_feature_lengths")
    report = diagnose_batch(rank1, 2, tokens=OMNI, error_text=text)
    assert "ERROR_RECOGNISED" in {f.code for f in report.findings} and not _codes(report)


@pytest.mark.parametrize("source", ["--embeds", "vision_embed_count"])
def test_the_vision_encoder_rows_are_compared_with_the_vision_placeholders_only(tmp_path, source):
    batch = BROKEN.omni_batch()
    vision = int(((batch["input_ids"] == IMAGE_PAD) | (batch["input_ids"] == VIDEO_PAD)).sum())
    for rows, code in ((vision, 0), (vision - 4, 1)):
        saved = {**batch, "vision_embed_count": torch.tensor(rows)} if source != "--embeds" else batch
        torch.save(saved, tmp_path / "omni.pt")
        extra = ["--embeds", str(rows)] if source == "--embeds" else []
        result = runner.invoke(app, ["diagnose", str(tmp_path / "omni.pt"), "--cp", "2", "--model", "qwen3-omni",
                                     *extra, "--json"])
        confirmed = {f["code"] for f in json.loads(result.stdout)["findings"] if f["status"] == "confirmed"}
        assert (result.exit_code, confirmed) == (code, {"EMBED_COUNT_MISMATCH"} if code else set()), result.output
    simulated = runner.invoke(app, ["simulate", str(tmp_path / "omni.pt"), "--cp", "2", "--model", "qwen3-omni",
                                    "--json"])
    if source == "vision_embed_count":  # the vision encoder's rows plus the audio items' rows
        audio_rows = sum(transformers_rule("qwen3-omni")(n) for n in batch["audio_feature_lengths"].tolist())
        assert json.loads(simulated.stdout)["vision_embed_count"] == vision - 4 + audio_rows
