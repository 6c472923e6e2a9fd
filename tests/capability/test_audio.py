"""Qwen-Omni audio placeholders: selected, counted and broken down per modality like image and video ones."""

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from cpinspect.cli.app import app
from cpinspect.core.tokens import AUDIO_PAD, IMAGE_PAD, VIDEO_PAD, audio_tokens
from tests.literal import expected_rows, zigzag_indices

runner = CliRunner()


def omni_batch(seed: int, cp: int) -> dict:
    rng = random.Random(seed)
    segments = []
    for _ in range(rng.randint(1, 4)):
        ids = []
        for _ in range(rng.randint(1, 4)):
            ids += [100 + rng.randrange(50)] * rng.randint(0, 9)
            ids += [rng.choice([IMAGE_PAD, VIDEO_PAD, AUDIO_PAD])] * rng.randint(1, 20)
        ids += [101] * (-len(ids) % (2 * cp))
        segments.append(ids)
    cu = [0]
    for ids in segments:
        cu.append(cu[-1] + len(ids))
    return {"input_ids": torch.tensor(sum(segments, [])).view(1, -1), "cu_seqlens": torch.tensor(cu, dtype=torch.int32)}


@pytest.mark.parametrize("seed", range(6))
def test_audio_rows_are_selected_and_broken_down_per_modality(tmp_path, seed):
    cp = 1 + seed % 4
    batch = omni_batch(seed, cp)
    torch.save(batch, tmp_path / "omni.pt")
    result = runner.invoke(app, ["simulate", str(tmp_path / "omni.pt"), "--cp", str(cp), "--model", "qwen3-omni",
                                 "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    ids = batch["input_ids"].view(-1).tolist()
    held = zigzag_indices(batch["cu_seqlens"].tolist(), cp)
    mask = [i in (IMAGE_PAD, VIDEO_PAD, AUDIO_PAD) for i in ids]
    assert [r["selected_rows"] for r in doc["ranks"]] == [expected_rows(mask, h) for h in held]
    assert doc["modalities"] == [{"image": sum(ids[g] == IMAGE_PAD for g in h),
                                  "video": sum(ids[g] == VIDEO_PAD for g in h),
                                  "audio": sum(ids[g] == AUDIO_PAD for g in h)} for h in held]


def test_an_embed_count_gap_under_an_omni_preset_points_to_the_audio_rows(tmp_path):
    batch = omni_batch(3, 2)
    batch["vision_embed_count"] = torch.tensor(1)  # surely not the placeholders' rows
    torch.save(batch, tmp_path / "omni.pt")
    result = runner.invoke(app, ["simulate", str(tmp_path / "omni.pt"), "--cp", "2", "--model", "qwen3-omni",
                                 "--no-color"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "EMBED_COUNT_MISMATCH" in text
    assert "audio placeholders take the rows of their items' audio lengths" in text
    vl = runner.invoke(app, ["simulate", str(tmp_path / "omni.pt"), "--cp", "2", "--no-color"])
    assert "audio placeholders" not in " ".join(vl.output.split())


def test_the_vl_presets_leave_audio_ids_as_text(tmp_path):
    batch = omni_batch(1, 2)
    torch.save(batch, tmp_path / "omni.pt")
    doc = json.loads(runner.invoke(app, ["simulate", str(tmp_path / "omni.pt"), "--cp", "2", "--json"]).output)
    ids = batch["input_ids"].view(-1).tolist()
    assert doc["vision_tokens"] == sum(i in (IMAGE_PAD, VIDEO_PAD) for i in ids) and "modalities" not in doc


def test_omni_batch_through_simulate_positions_and_diagnose_says_where_the_rule_is_unknown(tmp_path):
    from cpinspect.core.tokens import AUDIO_START, VISION_END, VISION_START

    ids = [100, 101, VISION_START] + [IMAGE_PAD] * 4 + [VISION_END, 102, AUDIO_START] + [AUDIO_PAD] * 7 + [103] * 3
    torch.save({"input_ids": torch.tensor(ids).view(1, -1), "cu_seqlens": torch.tensor([0, 8, 20], dtype=torch.int32),
                "image_grid_thw": torch.tensor([[1, 4, 4]])}, tmp_path / "omni.pt")
    shown = runner.invoke(app, ["simulate", str(tmp_path / "omni.pt"), "--cp", "2", "--model", "qwen3-omni",
                                "--positions", "--no-color"])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.replace("│", " ").split())
    assert "by modality" in text and "audio:" in text
    assert "gives an audio-only item sequential positions like text, as the Omni models do" in text
    diagnosed = runner.invoke(app, ["diagnose", str(tmp_path / "omni.pt"), "--cp", "2", "--model", "qwen3-omni",
                                    "--no-color"])
    assert diagnosed.exit_code == 0, diagnosed.output


@pytest.mark.parametrize("model", ["qwen2.5-omni", "qwen3-omni"])
def test_audio_token_rule_equals_transformers(model):
    lengths = torch.arange(1, 2001)
    if model == "qwen3-omni":
        omni = pytest.importorskip("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")
        want = omni._get_feat_extract_output_lengths(lengths).tolist()
    else:
        omni = pytest.importorskip("transformers.models.qwen2_5_omni.modeling_qwen2_5_omni")
        want = omni.Qwen2_5OmniAudioEncoder._get_feat_extract_output_lengths(None, lengths)[1].tolist()
    assert [audio_tokens(model, n) for n in lengths.tolist()] == want
