"""Per-segment mRoPE positions against Hugging Face's own get_rope_index, a literal per-token
reimplementation of the transformers<5 / Megatron-Bridge rules, published vectors, and the checks
of a batch's own position_ids."""

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cpinspect.cli.app import app
from cpinspect.core.errors import InputError
from cpinspect.core.loading import load_batch
from cpinspect.core.mrope import row_positions
from cpinspect.core.oracle import global_positions
from cpinspect.core.position_check import check_position_ids, compare_position_ids
from cpinspect.core.synth import build_batch, demo_batch_dict, shard_batch
from cpinspect.core.tokens import token_config

MODELS = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


# --------------------------------------------------------------------------- random packed rows


def random_row(seed, model, *, segments=None, pad=True):
    """A full row of random segments (text, images, videos) with physical padding, and its spec."""
    rng = random.Random(seed)
    spec = []
    for _ in range(segments or rng.randint(1, 4)):
        items = [("text", rng.randint(0, 6))]
        for _ in range(rng.randint(0, 3)):
            if rng.random() < 0.5:
                items.append(("image", (1, 2 * rng.randint(1, 4), 2 * rng.randint(1, 4))))
            else:
                items.append(("video", (rng.randint(1, 4), 2 * rng.randint(1, 3), 2 * rng.randint(1, 3))))
            items.append(("text", rng.randint(1, 5)))
        spec.append([i for i in items if i != ("text", 0)])
    tokens = token_config(model)
    logical = build_batch(spec, tokens=tokens, seed=seed)["cu_seqlens"]
    lengths = (logical[1:] - logical[:-1]).tolist()
    physical = [n + (rng.randint(0, 3) if pad else 0) for n in lengths]
    batch = build_batch(spec, physical, tokens=tokens, seed=seed)
    videos = batch["video_grid_thw"].shape[0]
    batch["second_per_grid_ts"] = torch.tensor([rng.choice([0.5, 1.0, 1.5, 2.0, 0.25]) for _ in range(videos)])
    return batch, spec


def per_segment_grids(batch, spec):
    """Split the row's grids (and seconds) into the slices each segment consumes."""
    images, videos = iter(batch["image_grid_thw"]), iter(batch["video_grid_thw"])
    seconds = iter(batch["second_per_grid_ts"])
    out = []
    for items in spec:
        img = [next(images) for kind, _ in items if kind == "image"]
        vid = [next(videos) for kind, _ in items if kind == "video"]
        sec = [next(seconds) for kind, _ in items if kind == "video"]
        out.append((torch.stack(img) if img else None, torch.stack(vid) if vid else None,
                    torch.stack(sec) if sec else None))
    return out


def ours(batch, model, convention, *, seconds=True):
    return row_positions(batch["input_ids"].reshape(-1), batch["cu_seqlens_padded"].long(), token_config(model),
                         image_grid_thw=batch["image_grid_thw"], video_grid_thw=batch["video_grid_thw"],
                         logical_cu_seqlens=batch["cu_seqlens"].long(),
                         second_per_grid_ts=batch["second_per_grid_ts"] if seconds else None, convention=convention)


# --------------------------------------------------------------------------- Hugging Face oracle


@pytest.fixture(scope="module")
def hf_models():
    """Objects carrying just ``config`` and the two methods get_rope_index uses (no weights, no hub)."""
    pytest.importorskip("transformers")
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    def bare(model_class, config):
        holder = type("RopeOnly", (), {"get_rope_index": model_class.get_rope_index,
                                       "get_vision_position_ids": model_class.get_vision_position_ids})()
        holder.config = config
        return holder

    return {
        "qwen2-vl": bare(Qwen2VLModel, Qwen2VLConfig()),
        "qwen2.5-vl": bare(Qwen2_5_VLModel, Qwen2_5_VLConfig(vision_config={"tokens_per_second": 2})),
        "qwen3-vl": bare(Qwen3VLModel, Qwen3VLConfig()),
    }


def hf_positions(hf, model, batch, spec, *, seconds=True):
    """HF get_rope_index called once per physical segment, pads masked out, concatenated."""
    tokens = token_config(model)
    ids = batch["input_ids"].reshape(-1)
    physical, logical = batch["cu_seqlens_padded"].tolist(), batch["cu_seqlens"].tolist()
    parts = []
    for s, (images, videos, sec) in enumerate(per_segment_grids(batch, spec)):
        row = ids[physical[s]:physical[s + 1]][None]
        if logical[s + 1] == logical[s]:  # HF cannot take a row without real tokens: all padding (0)
            parts.append(torch.zeros(3, row.shape[1], dtype=torch.long))
            continue
        kinds = (row == tokens.image_token_id).int() + 2 * (row == tokens.video_token_id).int()
        mask = torch.zeros_like(row)
        mask[0, : logical[s + 1] - logical[s]] = 1
        extra = {"second_per_grid_ts": sec} if model == "qwen2.5-vl" and seconds else {}
        positions, _ = hf[model].get_rope_index(row, kinds, image_grid_thw=images, video_grid_thw=videos,
                                                attention_mask=mask, **extra)
        parts.append(positions[:, 0])
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("seed", range(6))
def test_packed_rows_match_hf_get_rope_index_per_segment(hf_models, model, seed):
    batch, spec = random_row(seed, model)
    expected = hf_positions(hf_models, model, batch, spec)
    assert torch.equal(ours(batch, model, "transformers"), expected)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("seed", range(100, 104))
def test_single_segment_rows_match_hf_get_rope_index(hf_models, model, seed):
    batch, spec = random_row(seed, model, segments=1, pad=False)
    assert torch.equal(ours(batch, model, "transformers"), hf_positions(hf_models, model, batch, spec))


def test_qwen25_without_seconds_matches_hf_default(hf_models):
    batch, spec = random_row(3, "qwen2.5-vl")
    assert batch["video_grid_thw"].shape[0] > 0
    assert torch.equal(ours(batch, "qwen2.5-vl", "transformers", seconds=False),
                       hf_positions(hf_models, "qwen2.5-vl", batch, spec, seconds=False))


# --------------------------------------------------------------------------- the transformers<5 / Bridge rules


def literal_bridge_positions(batch, model, tps=2):
    """Token by token, list by list: the rules of reference §4.3 as Megatron-Bridge rope.py vendors them."""
    tokens = token_config(model)
    ids = batch["input_ids"].reshape(-1).tolist()
    physical, logical = batch["cu_seqlens_padded"].tolist(), batch["cu_seqlens"].tolist()
    images = iter(batch["image_grid_thw"].tolist())
    videos, seconds = [], []
    for (t, h, w), sec in zip(batch["video_grid_thw"].tolist(), batch["second_per_grid_ts"].tolist()):
        frames = [(1, h, w)] * t if model == "qwen3-vl" else [(t, h, w)]
        videos += frames
        seconds += [sec] * len(frames)
    videos, seconds = iter(videos), iter(seconds)
    out = [[1] * len(ids) for _ in range(3)]
    for s in range(len(physical) - 1):
        p, end, next_pos = physical[s], physical[s] + logical[s + 1] - logical[s], 0
        while p < end:
            if ids[p] not in (tokens.image_token_id, tokens.video_token_id):
                for axis in range(3):
                    out[axis][p] = next_pos
                next_pos, p = next_pos + 1, p + 1
                continue
            is_video = ids[p] == tokens.video_token_id
            t, h, w = next(videos) if is_video else next(images)
            step = int(next(seconds)) * tps if is_video else 1  # as_tensor(sec, dtype=long) truncates
            if model == "qwen2.5-vl" and not is_video:
                step = 0
            if model != "qwen2.5-vl":
                step = 1
            base, largest = next_pos, next_pos
            for ti in range(t):
                for hi in range(h // 2):
                    for wi in range(w // 2):
                        triple = (base + ti * step, base + hi, base + wi)
                        for axis in range(3):
                            out[axis][p] = triple[axis]
                        largest, p = max(largest, *triple), p + 1
            next_pos = largest + 1
    return torch.tensor(out)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("seed", range(8))
def test_bridge_convention_matches_literal_rules(model, seed):
    batch, _ = random_row(seed, model)
    assert torch.equal(ours(batch, model, "bridge"), literal_bridge_positions(batch, model))


def test_bridge_vector_video_tokens_use_video_grid():
    """Megatron-Bridge test_get_rope_index_video_tokens_use_video_grid (reference §4.3)."""
    tokens = token_config("qwen2-vl")
    v = tokens.video_token_id
    ids = torch.tensor([10, tokens.vision_start_token_id, v, v, v, v, 11])
    positions = row_positions(ids, torch.tensor([0, 7]), tokens, video_grid_thw=torch.tensor([[1, 4, 4]]))
    assert positions[:, 2:6].tolist() == [[2, 2, 2, 2], [2, 2, 3, 3], [2, 3, 2, 3]]


def test_bridge_vector_flat_packed_resets_positions_per_segment():
    """Megatron-Bridge test_get_rope_index_flat_packed_resets_positions_per_segment: seq1 at 8..10 gets 0, 1, 2."""
    ids = torch.tensor([1, 2, 3, 4, 5, 0, 0, 0, 20, 21, 22, 0])
    positions = row_positions(ids, torch.tensor([0, 8, 12]), token_config(),
                              logical_cu_seqlens=torch.tensor([0, 5, 8]))
    assert positions[:, 8:11].tolist() == [[0, 1, 2]] * 3
    assert positions[:, 5:8].tolist() == [[1, 1, 1]] * 3  # alignment gaps keep position 1


def test_conventions_differ_only_where_documented():
    batch, _ = random_row(5, "qwen3-vl")
    bridge, hf5 = ours(batch, "qwen3-vl", "bridge"), ours(batch, "qwen3-vl", "transformers")
    real = torch.ones(bridge.shape[1], dtype=torch.bool)
    cu, logical = batch["cu_seqlens_padded"].tolist(), batch["cu_seqlens"].tolist()
    for s in range(len(cu) - 1):
        real[cu[s] + logical[s + 1] - logical[s]: cu[s + 1]] = False
    assert torch.equal(bridge[:, real], hf5[:, real])  # Qwen3-VL: only the pad value differs
    assert (bridge[:, ~real] == 1).all() and (hf5[:, ~real] == 0).all()


def test_grid_and_placeholders_disagree_is_input_error():
    batch = demo_batch_dict()
    with pytest.raises(InputError, match="accounts for"):
        row_positions(batch["input_ids"].reshape(-1), batch["cu_seqlens_padded"].long(), token_config(),
                      image_grid_thw=batch["image_grid_thw"][:2], video_grid_thw=batch["video_grid_thw"])


# --------------------------------------------------------------------------- per-rank slices and the CLI


def test_json_positions_are_the_full_rows_at_each_ranks_global_indices(hf_models, tmp_path):
    unpadded, spec = random_row(11, "qwen3-vl", segments=3, pad=False)
    lengths = (unpadded["cu_seqlens"][1:] - unpadded["cu_seqlens"][:-1]).tolist()
    batch = build_batch(spec, [-(-n // 4) * 4 + 4 for n in lengths], seed=11)  # divisible by 2*cp, with padding
    torch.save(batch, tmp_path / "b.pt")
    out = CliRunner().invoke(app, ["simulate", str(tmp_path / "b.pt"), "--cp", "2", "--positions", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    batch["second_per_grid_ts"] = torch.zeros(batch["video_grid_thw"].shape[0])
    full = hf_positions(hf_models, "qwen3-vl", batch, spec)
    full[:, ~_real(batch)] = 1  # the default (Bridge) convention's pad value
    for rank in range(2):
        index = global_positions("zigzag", batch["cu_seqlens_padded"].long(), 2, rank)
        assert doc["ranks"][rank]["positions"] == full[:, index].tolist()


def _real(batch):
    cu, logical = batch["cu_seqlens_padded"].tolist(), batch["cu_seqlens"].tolist()
    real = torch.ones(cu[-1], dtype=torch.bool)
    for s in range(len(cu) - 1):
        real[cu[s] + logical[s + 1] - logical[s]: cu[s + 1]] = False
    return real


def test_positions_view_shows_item_ranges_per_rank():
    out = CliRunner().invoke(app, ["simulate", str(EXAMPLES / "qwen3vl_packed.pt"), "--cp", "2", "--positions",
                                   "--no-color"], env={"COLUMNS": "140"})
    assert out.exit_code == 0, out.output
    # rank 0 holds chunks 0 and 3 of the 64-token image 0 (16 x 16 patches -> 8 x 8 tokens at position 15)
    assert "16 of 64 tokens   t 15   h 15-22   w 15-22" in out.output
    assert "48 of 64 tokens   t 15   h 16-22   w 15-22" in out.output
    assert "(the batch carries no position_ids to check)" in out.output


# --------------------------------------------------------------------------- checking a batch's position_ids


def demo_positions(*, whole_row=False, convention="bridge"):
    batch = demo_batch_dict()
    return batch, row_positions(batch["input_ids"].reshape(-1), batch["cu_seqlens_padded"].long(), token_config(),
                                image_grid_thw=batch["image_grid_thw"], video_grid_thw=batch["video_grid_thw"],
                                logical_cu_seqlens=batch["cu_seqlens"].long(), whole_row=whole_row,
                                convention=convention)


def codes(findings):
    return [f.code for f in findings]


def test_correct_full_row_position_ids_pass_in_both_shapes():
    batch, positions = demo_positions()
    for stored in (positions.view(3, 1, -1), positions):
        batch["position_ids"] = stored
        assert check_position_ids(load_batch(batch), 2) == []


def test_transformers5_convention_is_accepted_and_named():
    tokens = token_config("qwen2.5-vl")
    batch = build_batch([[("text", 3), ("video", (4, 2, 2)), ("text", 4)]], [16], tokens=tokens)
    batch["second_per_grid_ts"] = torch.tensor([0.5])  # Bridge truncates to 0, transformers 5 spaces t by 1
    args = (batch["input_ids"].reshape(-1), batch["cu_seqlens_padded"].long(), tokens)
    kwargs = dict(video_grid_thw=batch["video_grid_thw"], second_per_grid_ts=batch["second_per_grid_ts"])
    bridge = row_positions(*args, convention="bridge", **kwargs)
    hf5 = row_positions(*args, convention="transformers", **kwargs)
    assert not torch.equal(bridge[:, :11], hf5[:, :11])
    batch["position_ids"] = hf5.view(3, 1, -1)
    check = compare_position_ids(load_batch(batch), 2, tokens=tokens)
    assert check.findings == [] and check.statuses == ["ok (transformers>=5 convention)"]


def test_whole_row_positions_are_not_per_segment():
    batch, positions = demo_positions(whole_row=True)
    batch["position_ids"] = positions.view(3, 1, -1)
    assert codes(check_position_ids(load_batch(batch), 2)) == ["MROPE_NOT_PER_SEGMENT"]


def test_presharded_zigzag_slices_pass_and_contiguous_slices_do_not():
    batch, positions = demo_positions()
    shards = shard_batch(batch, 2)
    for rank, shard in enumerate(shards):
        index = global_positions("zigzag", batch["cu_seqlens_padded"].long(), 2, rank)
        shard["position_ids"] = positions[:, index].view(3, 1, -1)
    assert check_position_ids(load_batch(shards), 2) == []
    for shard, part in zip(shards, positions.chunk(2, dim=1)):
        shard["position_ids"] = part.reshape(3, 1, -1)
    findings = check_position_ids(load_batch(shards), 2)
    assert codes(findings) == ["MROPE_WRONG_SLICE"]
    assert "contiguous layout, not zigzag" in findings[0].message


def test_unsliced_and_wrong_dim_position_ids_are_wrong_slices():
    batch, positions = demo_positions()
    shards = shard_batch(batch, 2)
    for shard in shards:
        shard["position_ids"] = positions.view(3, 1, -1)
    findings = check_position_ids(load_batch(shards), 2)
    assert codes(findings) == ["MROPE_WRONG_SLICE"] and "not sliced" in findings[0].message
    # [3, 1, T] split on dim 1 (the batch dim, Automodel #1482): rank 0 keeps everything, rank 1 nothing
    for shard, part in zip(shards, torch.tensor_split(positions.view(3, 1, -1), 2, dim=1)):
        shard["position_ids"] = part.clone()
    findings = check_position_ids(load_batch(shards), 2)
    assert codes(findings) == ["MROPE_WRONG_SLICE"]
    assert "rank 1 holds [3, 0, 336]: cut on a dim other than the token dim" in findings[0].message


def test_mismatch_names_the_first_differing_token_with_rank_segment_and_chunk():
    batch, positions = demo_positions()
    broken = positions.clone()
    broken[2, 250] += 1  # global token 250: segment 2 (tokens 144..287), chunk 2 of [144+36k), rank 1
    shards = shard_batch(batch, 2)
    for rank, shard in enumerate(shards):
        index = global_positions("zigzag", batch["cu_seqlens_padded"].long(), 2, rank)
        shard["position_ids"] = broken[:, index].view(3, 1, -1)
    (finding,) = check_position_ids(load_batch(shards), 2)
    local = int(torch.nonzero(global_positions("zigzag", batch["cu_seqlens_padded"].long(), 2, 1) == 250))
    assert finding.code == "MROPE_MISMATCH"
    assert (finding.rank, finding.segment, finding.chunk) == (1, 2, 2)
    assert f"local token {local} (global 250)" in finding.message and "axis w" in finding.message


def test_pad_tokens_are_not_compared():
    batch, positions = demo_positions()
    positions = positions.clone()
    positions[:, ~_real(batch)] = 777
    batch["position_ids"] = positions.view(3, 1, -1)
    assert check_position_ids(load_batch(batch), 2) == []


def test_one_dimensional_presharded_positions_are_reported():
    batch, _ = demo_positions()
    shards = shard_batch(batch, 2)
    for shard in shards:
        shard["position_ids"] = torch.arange(168).view(1, -1)
    findings = check_position_ids(load_batch(shards), 2)
    assert codes(findings) == ["MROPE_MISMATCH", "MROPE_MISMATCH"]
    assert "require explicit rank-local 3D MRoPE position_ids" in findings[0].message


def test_batch_without_position_ids_has_nothing_to_check():
    assert check_position_ids(load_batch(demo_batch_dict()), 2) == []
