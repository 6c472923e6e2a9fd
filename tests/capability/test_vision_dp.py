"""The vision-DP split, its embedding all-gather and backward all-reduce on simulated ranks, and the
findings VISION_DP_ORDER, VISION_DP_EMPTY_RANK_SKIPS_COLLECTIVE and DEEPSTACK_NOT_SELECTED."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cpinspect.cli.app import app
from cpinspect.core.errors import InputError
from cpinspect.core.loading import load_batch
from cpinspect.core.synth import build_batch, demo_batch_dict, shard_batch
from cpinspect.core.tokens import token_config
from cpinspect.core.vision_items import find_vision_items
from cpinspect.groups.simulated import execute_spmd, run_spmd
from cpinspect.simulation.run import simulate
from cpinspect.simulation.vision_dp import VisionDPExtension
from cpinspect.simulation.vision_dp_split import (
    all_gather_vision_embeddings,
    plan_vision_dp,
    reduce_vision_grad,
    split_by_count,
)

TWO_IMAGES = (
    (("text", 6), ("image", (1, 4, 4)), ("text", 6)),
    (("text", 10), ("image", (1, 4, 8)), ("text", 10)),
)


def items_of(batch, model="qwen3-vl"):
    tokens = token_config(model)
    return find_vision_items(batch["input_ids"].reshape(-1), batch["cu_seqlens_padded"].long(), tokens,
                             image_grid_thw=batch["image_grid_thw"], video_grid_thw=batch["video_grid_thw"],
                             split_video_frames=model == "qwen3-vl")


def run_extension(batch, cp, **simulate_args):
    loaded = load_batch(batch)
    result = simulate(loaded, cp, **simulate_args)
    ext = VisionDPExtension(loaded, timeout=5.0)
    ext.run(result)
    return ext, result


# --------------------------------------------------------------------------- the split


@pytest.mark.parametrize("cp", range(1, 9))
@pytest.mark.parametrize("items", [0, 1, 2, 5, 7, 8, 13])
def test_count_split_matches_numpy_array_split(items, cp):
    """Earlier ranks take the remainder: the same sizes as numpy.array_split."""
    expected = [len(part) for part in np.array_split(np.arange(items), cp)]
    assert split_by_count(items, cp).tolist() == expected


def test_get_vision_cp_data_vector():
    """Megatron-Bridge test: grids [[1,2,4],[1,2,2]] over 2 ranks -> rank 0 gets 8 patch rows, rank 1 gets 4."""
    batch = build_batch([[("image", (1, 2, 4)), ("image", (1, 2, 2))]], [8])
    plan = plan_vision_dp(items_of(batch), 2, 4)
    assert plan.patches_per_rank.tolist() == [8, 4]
    assert plan.rows_per_rank.tolist() == [2, 1]


def test_qwen3_video_frames_are_items_and_qwen2_videos_are_whole():
    spec = [[("text", 3), ("video", (3, 4, 4)), ("text", 2), ("image", (1, 4, 4)), ("text", 2)]]
    qwen3 = plan_vision_dp(items_of(build_batch(spec), "qwen3-vl"), 2, 4)
    assert [qwen3.items.label(i) for i in range(qwen3.items.count)] == [
        "video 0 frame 0", "video 0 frame 1", "video 0 frame 2", "image 0"]
    assert qwen3.item_rank.tolist() == [0, 0, 1, 1] and qwen3.rows_per_rank.tolist() == [8, 8]
    tokens = token_config("qwen2-vl")
    qwen2 = plan_vision_dp(items_of(build_batch(spec, tokens=tokens), "qwen2-vl"), 2, 4)
    assert qwen2.items.count == 2 and qwen2.patches_per_rank.tolist() == [48, 16]


# --------------------------------------------------------------------------- the collectives


def test_uneven_all_gather_returns_every_ranks_rows_in_rank_order_and_the_empty_rank_takes_part():
    rows = torch.tensor([2, 3, 0])
    parts = [torch.arange(10 * r, 10 * r + n).view(-1, 1) for r, n in enumerate(rows.tolist())]

    def program(group):
        return all_gather_vision_embeddings(parts[group.rank()], rows, group).view(-1).tolist()

    states, failure = execute_spmd(3, program, timeout=5.0)
    assert failure is None
    assert [s.value for s in states] == [[0, 1, 10, 11, 12]] * 3
    assert [[c.op for c in s.calls] for s in states] == [["all_gather"]] * 3  # rank 2 (0 rows) included


def test_backward_all_reduces_then_keeps_own_rows():
    """Megatron-Bridge mocked vector: seqlens [[2],[3]], hidden 4, peer_grad[i,:] = i -> (1 + i) sliced."""
    rows = torch.tensor([2, 3])
    grads = [torch.ones(5, 4), torch.arange(5.0).view(-1, 1).expand(5, 4).clone()]

    def program(group):
        return reduce_vision_grad(grads[group.rank()], rows, group)

    rank0, rank1 = run_spmd(2, program, timeout=5.0)
    assert rank0.tolist() == [[1.0] * 4, [2.0] * 4]
    assert rank1.tolist() == [[3.0] * 4, [4.0] * 4, [5.0] * 4]


# --------------------------------------------------------------------------- the extension


@pytest.mark.parametrize("cp", [1, 2, 3, 4, 6])
def test_demo_gathers_in_natural_order_and_feeds_the_selection(cp):
    ext, result = run_extension(demo_batch_dict(), cp)
    assert ext.natural_order and ext.selection_fed
    # 5 items (3 images, 2 video frames): at cp 6 rank 5 encodes none and is flagged, else nothing is
    assert [f.code for f in ext.findings if f.is_problem] == (["VISION_DP_EMPTY_RANK"] if cp > 5 else [])
    natural = torch.cat([v.natural_rows for v in ext.ranks])
    assert torch.equal(natural, torch.arange(124))
    assert all(v.grad_ok for v in ext.ranks)  # every encoded row gets gradient from exactly one rank


def test_zero_item_rank_takes_part_in_every_collective():
    ext, _ = run_extension(build_batch(TWO_IMAGES, (24, 40)), 4)
    (warning,) = ext.findings  # issue 14 class 7: flagged even without vision_requires_grad
    assert (warning.code, warning.severity, warning.rank) == ("VISION_DP_EMPTY_RANK", "warning", 2)
    assert "rank(s) 2, 3 encode no vision item" in warning.message and "all_reduce" in warning.message
    assert [v.items for v in ext.ranks] == [["image 0"], ["image 1"], [], []]
    assert ext.plan.rows_per_rank.tolist() == [4, 8, 0, 0]
    assert all(v.collectives == ["all_gather x4 [8, 1]", "all_reduce x4 [12, 1]"] for v in ext.ranks)


def test_empty_rank_without_grad_skips_the_backward_collective():
    batch = build_batch(TWO_IMAGES, (24, 40))
    batch["vision_requires_grad"] = torch.tensor([True, True, False, False])
    ext, _ = run_extension(batch, 4)
    (finding,) = [f for f in ext.findings if f.is_problem]
    assert finding.code == "VISION_DP_EMPTY_RANK_SKIPS_COLLECTIVE" and finding.rank == 2
    assert "rank(s) 2, 3 encode no vision item" in finding.message
    assert "all_reduce" in finding.message


def test_rank_with_items_skipping_backward_is_a_plain_divergence():
    batch = build_batch(TWO_IMAGES, (24, 40))
    batch["vision_requires_grad"] = torch.tensor([False, True, True, True])
    ext, _ = run_extension(batch, 4)
    assert [f.code for f in ext.findings] == ["COLLECTIVE_DIVERGENCE"]


def test_round_robin_assignment_breaks_natural_order():
    batch = demo_batch_dict()
    batch["vision_dp_ranks"] = torch.tensor([0, 1, 0, 1, 0])
    ext, result = run_extension(batch, 2)
    order = [f for f in ext.findings if f.code == "VISION_DP_ORDER"]
    assert len(order) == 1 and not ext.natural_order and not ext.selection_fed
    # rank 0 encodes image 0 (rows 0-63), video frame 1 (80-95), image 2 (120-123): gathered row 64 is row 80
    assert "gathered row 64 is natural row 80 (video 0 frame 1)" in order[0].message


def test_contiguous_custom_assignment_keeps_natural_order():
    batch = demo_batch_dict()
    batch["vision_dp_ranks"] = torch.tensor([0, 0, 0, 0, 1])
    ext, _ = run_extension(batch, 2)
    assert ext.ok and ext.natural_order


def test_bad_assignment_is_input_error():
    batch = demo_batch_dict()
    batch["vision_dp_ranks"] = torch.tensor([0, 1, 2])
    with pytest.raises(InputError, match="one CP rank in 0..1 for each of the 5 vision item"):
        run_extension(batch, 2)


def test_full_deepstack_tensors_are_not_selected():
    shards = shard_batch(demo_batch_dict(), 2)
    for shard in shards:
        shard["deepstack_rows"] = torch.tensor([124, 124, 124])
    ext, _ = run_extension(shards, 2)
    (finding,) = [f for f in ext.findings if f.is_problem]
    assert finding.code == "DEEPSTACK_NOT_SELECTED"
    assert "rank 0 passes the full deepstack tensors with [124, 124, 124] rows but holds 31" in finding.message


def test_selected_deepstack_counts_pass():
    batch = demo_batch_dict()
    batch["deepstack_rows"] = torch.tensor([[31, 31, 31], [93, 93, 93]])
    ext, _ = run_extension(batch, 2)
    assert not [f for f in ext.findings if f.is_problem]


# --------------------------------------------------------------------------- mixed images and videos


def literal_runs(ids, token_id):
    runs, previous = 0, None
    for token in ids:
        if token == token_id and previous != token_id:
            runs += 1
        previous = token
    return runs


def test_mixed_presharded_row_works_and_shows_the_upstream_run_count_per_rank():
    full = demo_batch_dict()  # 3 images and one 2-frame video: sum(t) = 5
    shards = shard_batch(full, 2)
    ext, result = run_extension(shards, 2)
    assert result.ok and ext.natural_order and ext.selection_fed
    tokens = token_config()
    for view, shard in zip(ext.ranks, shards):
        ids = shard["input_ids"].reshape(-1).tolist()
        assert view.run_count.image_runs == literal_runs(ids, tokens.image_token_id)
        assert view.run_count.video_runs == literal_runs(ids, tokens.video_token_id)
        assert view.run_count.expected == 5
    assert (ext.ranks[0].run_count.runs, ext.ranks[0].run_count.passes) == (3, False)
    assert [f.code for f in ext.findings] == ["REORGANIZE_RUNS_MISMATCH"] and ext.ok  # info only


def test_mixed_full_row_passes_the_run_count_on_every_rank():
    ext, _ = run_extension(demo_batch_dict(), 2)
    assert all(v.run_count.passes for v in ext.ranks) and ext.findings == []


def test_cli_json_has_vision_dp_per_rank():
    out = CliRunner().invoke(app, ["simulate", "--cp", "4", "--vision-dp", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["vision_dp"]["items_per_rank"] == [2, 1, 1, 1]
    assert doc["vision_dp"]["rows_per_rank"] == [80, 16, 24, 4]
    assert doc["ranks"][0]["vision_dp"]["items"] == ["image 0", "video 0 frame 0"]
    assert doc["vision_dp"]["natural_order"] is True


def test_the_divergence_report_does_not_depend_on_which_rank_arrives_first():
    """Issue 14 class 9: two runs of the same command give the same collectives table and message."""
    batch = build_batch(TWO_IMAGES, (24, 40))
    batch["vision_requires_grad"] = torch.tensor([True, True, False, False])
    seen = set()
    for _ in range(8):
        ext, _ = run_extension(batch, 4)
        seen.add((tuple(tuple(v.collectives) for v in ext.ranks), tuple(f.message for f in ext.findings)))
    assert len(seen) == 1
    (collectives, messages), = seen
    assert collectives[0] == collectives[1] == ("all_gather x4 [8, 1]", "all_reduce x1 [12, 1]")
    assert collectives[2] == collectives[3] == ("all_gather x4 [8, 1]",)
    assert "rank(s) 0, 1 wait in all_reduce" in messages[0] and "rank(s) 2, 3 returned" in messages[0]


def test_a_1x1_placeholder_on_empty_ranks_keeps_them_in_the_backward_all_reduce():
    """Nemotron Omni vision_dp_over_cp / Megatron-LM#7315: the fallback image, simulated."""
    batch = build_batch(TWO_IMAGES, (24, 40))
    batch["vision_requires_grad"] = torch.tensor([True, True, False, False])
    batch["vision_dp_placeholder"] = torch.tensor([True, True, True, True])  # only empty ranks use it
    ext, _ = run_extension(batch, 4)
    assert ext.ok and ext.natural_order and ext.selection_fed
    assert [f.code for f in ext.findings] == ["VISION_DP_PLACEHOLDER"]
    assert ext.placeholder == [False, False, True, True]
    assert all(v.collectives == ["all_gather x4 [8, 1]", "all_reduce x4 [12, 1]"] for v in ext.ranks)
    assert ext.plan.rows_per_rank.tolist() == [4, 8, 0, 0]  # the placeholder's row is not gathered
    assert ext.ranks[2].patches == 4 and "1x1 placeholder" in ext.ranks[2].items[0]
