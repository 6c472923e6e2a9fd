"""Issue 14's failure classes: each hypothesis confirmed by the numbers it predicts, on the stack's batch.

Expected numbers are hand arithmetic over the example's construction (segment lengths, chunk
bounds, grid sizes) or the literal layouts of tests/literal.py, never cpinspect's own layout code.
"""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cpinspect.cli.app import app
from cpinspect.core.tokens import IMAGE_PAD, VISION_START, token_config
from cpinspect.core.valid_only import valid_only_cuts
from cpinspect.diagnose.api import diagnose_batch
from cpinspect.diagnose.rope_hypotheses import local_rope_length
from tests import literal

ROOT = Path(__file__).resolve().parents[2]
BROKEN = ROOT / "examples" / "broken"
runner = CliRunner()
QWEN25 = token_config("qwen2.5-vl")


def confirmed(report):
    return [f.code for f in report.findings if f.status == "confirmed"]


# --------------------------------------------------------------------------- class 4: VALID_ONLY_ROW


def test_valid_only_cuts_by_hand():
    # valid 5 at cp 2: padded 8, chunks of 2 at offsets 0, 2, 4, 6: chunk 2 holds 1 token, chunk 3 none
    cuts = valid_only_cuts([8, 5], 2)
    assert [(c.segment, c.chunk, c.rank, c.size, c.received) for c in cuts] == [(1, 2, 1, 2, 1), (1, 3, 0, 2, 0)]
    assert valid_only_cuts([8, 12, 4], 2) == []  # already multiples of 2·cp: nothing short


def test_valid_only_row_names_rank_0_chunk_3_of_segment_1():
    directory = BROKEN / "valid_only_row"
    batch = torch.load(directory / "batch.pt", weights_only=True)
    assert batch["input_ids"].numel() == int(batch["cu_seqlens"][-1]) == 64 < int(batch["cu_seqlens_padded"][-1])
    report = diagnose_batch(directory / "batch.pt", 2, tokens=QWEN25, error_text=(directory / "error.txt").read_text())
    assert confirmed(report) == ["VALID_ONLY_ROW"]
    cause = report.causes[0]
    # literal zigzag over the padded bounds [0, 40, 48, 72]: rank 0 holds segment 1's offsets 6-7 (global 46, 47)
    rank0 = literal.zigzag_indices([0, 40, 48, 72], 2)[0]
    assert 46 in rank0 and 47 in rank0
    assert (cause.rank, cause.segment, cause.chunk) == (0, 1, 3)
    assert "offsets 6-7" in cause.message and "holds 0" in cause.message


def test_the_expanded_size_error_on_a_padded_row_is_not_valid_only():
    text = (BROKEN / "valid_only_row" / "error.txt").read_text()
    report = diagnose_batch(ROOT / "examples" / "qwen3vl_packed.pt", 2, error_text=text)
    assert "VALID_ONLY_ROW" not in confirmed(report)
    assert any(f.code == "UNEXPLAINED" for f in report.findings)


# --------------------------------------------------------------------------- class 1: MROPE_LOCAL_ROW


def test_local_rope_length_walks_the_upstream_loop():
    t, s, i, v = 1, VISION_START, IMAGE_PAD, -1
    # text, start, 3 of an item's 8 placeholders at the end of the row: 2 text + 8 positions = 10, 5 tokens
    assert local_rope_length([t, s, i, i, i], [8], [], IMAGE_PAD, v, VISION_START) == 2 + 8
    # a whole item: positions = tokens
    assert local_rope_length([t, s, i, i, t, t], [2], [], IMAGE_PAD, v, VISION_START) == 6
    # orphan placeholders without their start count as text
    assert local_rope_length([i, i, t], [8], [], IMAGE_PAD, v, VISION_START) == 3
    # the jump past a long item swallows the text behind it: 2 + 8, st = 10 > 7 tokens
    assert local_rope_length([t, s, i, i, t, t, t], [8], [], IMAGE_PAD, v, VISION_START) == 10


def test_mrope_local_row_names_rank_1_and_both_lengths():
    directory = BROKEN / "mrope_local_row"
    result = runner.invoke(app, ["diagnose", str(directory / "batch.pt"), "--cp", "2", "--model", "qwen2.5-vl",
                                 "--error-file", str(directory / "error.txt"), "--json"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    cause = doc["findings"][0]
    assert cause["code"] == "MROPE_LOCAL_ROW" and cause["rank"] == 1
    # rank 1 holds chunks 1 and 2 of both segments (literal zigzag): 16 + 32 = 48 tokens
    assert len(literal.zigzag_indices([0, 32, 96], 2)[1]) == 48
    assert "local row of 48 tokens" in cause["message"] and "builds 53 positions" in cause["message"]
    assert "recompute from this row's grids" not in result.stdout


def test_the_local_row_error_with_other_numbers_is_not_confirmed():
    directory = BROKEN / "mrope_local_row"
    text = "RuntimeError: shape mismatch: value tensor of shape [3, 54] cannot be broadcast to indexing result of " \
           "shape [3, 48]"
    report = diagnose_batch(directory / "batch.pt", 2, tokens=QWEN25, error_text=text)
    assert "MROPE_LOCAL_ROW" not in confirmed(report)


# --------------------------------------------------------------------------- class 3: DOUBLE_SHARDED


def _literal_double(cu, cp, rank):
    first = literal.zigzag_indices(cu, cp)[rank]
    second = literal.zigzag_indices([c // cp for c in cu], cp)[rank]
    return [first[i] for i in second]


def test_a_zigzag_of_a_zigzag_is_the_cp_squared_zigzag_by_the_literal_layouts():
    from cpinspect.diagnose.double_sharded import equivalent_ranks

    cu = [0, 72, 144, 168]
    squared = literal.zigzag_indices(cu, 4)
    expected = [squared.index(_literal_double(cu, 2, r)) for r in range(2)]
    assert expected == [0, 3]
    assert equivalent_ranks(torch.tensor(cu), 2) == expected


def test_double_sharded_files_name_the_cp4_ranks_and_explain_the_sizes():
    directory = BROKEN / "double_sharded"
    shards = [torch.load(directory / f"rank{r}.pt", weights_only=True) for r in range(2)]
    cu = shards[0]["cu_seqlens_padded"].tolist()
    assert [s["input_ids"].numel() for s in shards] == [cu[-1] // 4] * 2
    report = diagnose_batch(directory, 2, error_text=(directory / "error.txt").read_text())
    assert confirmed(report) == ["DOUBLE_SHARDED"]
    message = report.causes[0].message
    assert "rank 0 = cp-4 rank 0, rank 1 = cp-4 rank 3" in message
    assert f"expected size {cu[-1] // 2}, got size {cu[-1] // 4}" in message


def test_files_of_a_cp4_run_given_as_cp4_are_still_missing_files_not_double_sharded():
    from cpinspect.core.errors import InputError

    directory = BROKEN / "double_sharded"
    try:
        report = diagnose_batch(directory, 4)
    except InputError as exc:
        assert "missing rank files" in exc.fix
    else:
        assert "DOUBLE_SHARDED" not in confirmed(report)


# --------------------------------------------------------------------------- class 2: ROPE_SEGMENT_OFFSET_MISSING


def _offset_case():
    directory = BROKEN / "rope_segment_offset_missing"
    return directory, [torch.load(directory / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_the_megatron_5243_vectors_by_the_literal_layout():
    """cu [0, 4, 8], cp 2: rank 0 must take columns [0, 3, 4, 7]; without the offset it takes [0, 3, 0, 3]."""
    rank0 = literal.zigzag_indices([0, 4, 8], 2)[0]
    assert rank0 == [0, 3, 4, 7]
    assert [g - (0 if g < 4 else 4) for g in rank0] == [0, 3, 0, 3]


def test_offsetless_positions_are_named_with_the_columns_taken():
    directory, shards = _offset_case()
    report = diagnose_batch(directory, 2)
    assert confirmed(report) == ["ROPE_SEGMENT_OFFSET_MISSING"]
    assert not any(f.code == "MROPE_MISMATCH" for f in report.findings)
    cu = shards[0]["cu_seqlens_padded"].tolist()
    rank0 = literal.zigzag_indices(cu, 2)[0]
    segment1 = [g for g in rank0 if g >= cu[1]][:6]
    message = report.causes[0].message
    assert f"table columns {[g - cu[1] for g in segment1]} for its segment-1 tokens {segment1}" in message


def test_positions_taken_at_the_global_indices_are_not_the_offset_bug(tmp_path):
    from cpinspect.core.mrope import row_positions

    directory, shards = _offset_case()
    cu = shards[0]["cu_seqlens_padded"]
    indices = literal.zigzag_indices(cu.tolist(), 2)
    full = torch.empty(int(cu[-1]), dtype=torch.long)
    for rank, shard in enumerate(shards):
        full[indices[rank]] = shard["input_ids"].reshape(-1)
    table = row_positions(full, cu, token_config("qwen3-vl"), image_grid_thw=shards[0]["image_grid_thw"],
                          logical_cu_seqlens=shards[0]["cu_seqlens"])
    for rank, shard in enumerate(shards):
        fixed = dict(shard)
        fixed["position_ids"] = table[:, indices[rank]].unsqueeze(1)
        torch.save(fixed, tmp_path / f"rank{rank}.pt")
    report = diagnose_batch(tmp_path, 2)
    assert report.exit_code == 0, confirmed(report)


def _text_rank_files(folder, cu, key, values, logical=None):
    """Text-only rank files of a zigzag cut (the literal layout), each with its ``values`` under ``key``."""
    indices = literal.zigzag_indices(cu, len(values))
    ids = torch.arange(1000, 1000 + cu[-1])
    for rank, held in enumerate(indices):
        shard = {"input_ids": ids[held].view(1, -1), "cu_seqlens_padded": torch.tensor(cu, dtype=torch.int32),
                 "cu_seqlens": torch.tensor(logical or cu, dtype=torch.int32), key: torch.tensor(values[rank])}
        torch.save(shard, folder / f"rank{rank}.pt")
    return folder


def test_the_megatron_5243_rope_indices_are_confirmed_and_the_global_ones_are_not(tmp_path):
    """The issue's own vectors: cu [0, 4, 8], cp 2, rank 0 selects [0, 3, 0, 3] where [0, 3, 4, 7] is right."""
    cu = [0, 4, 8]
    right = literal.zigzag_indices(cu, 2)
    wrong = [[g - (0 if g < 4 else 4) for g in held] for held in right]
    assert (right[0], wrong[0]) == ([0, 3, 4, 7], [0, 3, 0, 3])
    (tmp_path / "bug").mkdir()
    (tmp_path / "ok").mkdir()
    report = diagnose_batch(_text_rank_files(tmp_path / "bug", cu, "rope_indices", wrong), 2)
    assert confirmed(report) == ["ROPE_SEGMENT_OFFSET_MISSING"]
    assert "rank 0 selects table rows [0, 3] for its segment-1 tokens at global [4, 7]" in report.causes[0].message
    fine = diagnose_batch(_text_rank_files(tmp_path / "ok", cu, "rope_indices", right), 2)
    assert "ROPE_SEGMENT_OFFSET_MISSING" not in confirmed(fine)


def _offsets(cu, held):
    return [g - max(c for c in cu[:-1] if c <= g) for g in held]


@pytest.mark.parametrize("shape", ["[n]", "[1, n]"])
def test_1d_position_ids_read_at_the_offsets_are_confirmed(tmp_path, shape):
    """1-D RoPE: the per-segment position table (each segment from 0) taken at the offsets, not the indices."""
    cu = [0, 8, 32, 44]  # a short first segment: offsets past 8 land in segment 1 of the table
    table = [o for a, b in zip(cu, cu[1:]) for o in range(b - a)]
    held = literal.zigzag_indices(cu, 2)
    wrong = [[table[o] for o in _offsets(cu, h)] for h in held]
    values = [w if shape == "[n]" else [w] for w in wrong]
    report = diagnose_batch(_text_rank_files(tmp_path, cu, "position_ids", values), 2)
    assert confirmed(report) == ["ROPE_SEGMENT_OFFSET_MISSING"]
    # rank 0 holds chunks 0 and 3 of every segment: segment 0 (chunks of 2) gives local 0-3; segment 1 (chunks of 6)
    # global 8-13 (local 4-9, offsets 0-5, all inside segment 0's table part: right) and 26-31 (local 10-15, offsets
    # 18-23): the first wrong one is local 10, global 26, reading table[18], segment 1's offset 10
    message = report.causes[0].message
    assert "1-D position_ids" in message and "local token 10 (global 26, segment 1)" in message
    assert "it has position 10 (entry 18, a token of segment 1) where 18 is right" in message
    assert (report.causes[0].rank, report.causes[0].segment) == (0, 1)


def test_1d_positions_taken_at_the_global_indices_are_not_the_offset_bug(tmp_path):
    cu = [0, 8, 32, 44]
    right = [_offsets(cu, h) for h in literal.zigzag_indices(cu, 2)]  # table[g] = g's offset in its segment
    report = diagnose_batch(_text_rank_files(tmp_path, cu, "position_ids", right), 2)
    assert "ROPE_SEGMENT_OFFSET_MISSING" not in confirmed(report)


def test_1d_positions_of_equal_segments_cannot_tell_the_bug_and_are_not_confirmed(tmp_path):
    """cu [0, 4, 8]: every offset lies in segment 0, whose positions equal the right ones: nothing to see."""
    cu = [0, 4, 8]
    wrong = [_offsets(cu, h) for h in literal.zigzag_indices(cu, 2)]
    report = diagnose_batch(_text_rank_files(tmp_path, cu, "position_ids", wrong), 2)
    assert "ROPE_SEGMENT_OFFSET_MISSING" not in confirmed(report)


@pytest.mark.parametrize("rank", [0, 1])
def test_one_rank_file_with_its_rank_is_enough_for_the_1d_form(tmp_path, rank):
    cu = [0, 8, 32, 44]
    table = [o for a, b in zip(cu, cu[1:]) for o in range(b - a)]
    held = literal.zigzag_indices(cu, 2)
    wrong = [[table[o] for o in _offsets(cu, h)] for h in held]
    _text_rank_files(tmp_path, cu, "position_ids", wrong)
    report = diagnose_batch(tmp_path / f"rank{rank}.pt", 2, rank=rank)
    assert report.form == "one rank" and confirmed(report) == ["ROPE_SEGMENT_OFFSET_MISSING"]
    assert report.causes[0].message.startswith(f"rank {rank}'s 1-D position_ids")
    unknown = diagnose_batch(tmp_path / f"rank{rank}.pt", 2)  # which rank's tokens? not guessed
    assert confirmed(unknown) == [] and any(f.code == "SKIPPED" and "--rank" in f.hint for f in unknown.findings)
    right = [_offsets(cu, h) for h in held]
    _text_rank_files(tmp_path, cu, "position_ids", right)
    assert confirmed(diagnose_batch(tmp_path / f"rank{rank}.pt", 2, rank=rank)) == []


def test_the_1d_example_and_a_view_error_are_tied_without_cannot_show():
    directory = BROKEN / "rope_segment_offset_missing_1d"
    shards = [torch.load(directory / f"rank{r}.pt", weights_only=True) for r in range(2)]
    n = shards[0]["input_ids"].numel()
    total = 2 * n
    text = f"[rank0]: RuntimeError: shape '[1, {total}, 1, 64]' is invalid for input of size {n * 64}"
    report = diagnose_batch(directory, 2, error_text=text)
    assert confirmed(report) == ["ROPE_SEGMENT_OFFSET_MISSING"] and report.exit_code == 1
    (view,) = [f for f in report.findings if f.code == "ERROR_RECOGNISED"]
    assert "cannot show" not in view.message
    assert f"the view wants {total} tokens x 64 (the full row's tokens), the tensor holds {n * 64} = {n} x 64" in (
        view.message)


# --------------------------------------------------------------------------- class 5: LAYOUT_MISMATCH from positions


def _text_shards(layout):
    """Text-only rank rows with per-segment positions, cut by the literal layouts of tests/literal.py."""
    cu = [0, 44, 72, 92, 156]
    ids = torch.arange(1000, 1156)
    indices = literal.zigzag_indices(cu, 2) if layout == "zigzag" else literal.contiguous_indices(cu[-1], 2)
    shards = []
    for held in indices:
        offsets = torch.tensor([g - max(c for c in cu if c <= g) for g in held])
        shards.append({"input_ids": ids[held].view(1, -1), "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
                       "position_ids": offsets.expand(3, -1).unsqueeze(1).clone()})
    return shards


def test_contiguous_data_under_a_zigzag_consumer_is_named_from_the_positions():
    report = diagnose_batch(_text_shards("contiguous"), 2)
    assert confirmed(report) == ["LAYOUT_MISMATCH"]
    assert "--layout contiguous" in report.causes[0].hint
    # rank 1 of the literal contiguous cut starts at global 78, offset 78 - 72 = 6 in segment 2
    assert "rank 1 starts at position 6" in report.causes[0].message


def test_zigzag_data_under_a_zigzag_consumer_passes():
    report = diagnose_batch(_text_shards("zigzag"), 2)
    assert report.exit_code == 0, confirmed(report)


# --------------------------------------------------------------------------- class 8: recognised error texts

EXAMPLE = ROOT / "examples" / "qwen3vl_packed.pt"


def test_a_cp_group_size_error_is_a_cp_size_mismatch_from_its_own_numbers():
    text = "[rank1]: RuntimeError: Context-parallel group has rank 1 and size 2, but rank 1 and size 4 were requested."
    report = diagnose_batch(EXAMPLE, 2, error_text=text)
    assert confirmed(report) == ["CP_SIZE_MISMATCH"] and "size 2 != 4" in report.causes[0].message


@pytest.mark.parametrize("text, words", [
    ("ValueError: Pre-sharded packed CP metadata must start at token offset 0.", "cu_seqlens_q"),
    ("ValueError: Pre-sharded packed CP inputs require explicit rank-local 3D MRoPE position_ids.", "position_ids"),
    ("IndexError: Dimension out of range (expected to be in range of [-1, 0], but got 1)", "attention_mask"),
    ("op.preamble.length <= op.nbytes. 24 vs 16", "cpinspect check"),
    ("ValueError: Pre-sharded packed CP inputs require every physical segment length to be divisible by 2 * cp_size.",
     "cu_seqlens_padded"),
])
def test_recognised_errors_the_batch_cannot_show_say_what_would_and_exit_1(text, words):
    result = runner.invoke(app, ["diagnose", str(EXAMPLE), "--cp", "2", "--error", text])
    assert result.exit_code == 1, result.output
    assert "ERROR_RECOGNISED" in result.output and words in result.output.replace("\n", " ")
    assert "nothing wrong found" not in result.output


def test_the_nccl_watchdog_numel_names_the_count_all_gather():
    # the bundled example has 4 segments: each rank's count all-gather sends 2 x 4 = 8 values
    segments = int(torch.load(EXAMPLE, weights_only=True)["cu_seqlens"].numel()) - 1
    text = (f"[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, OpType=ALLGATHER, "
            f"NumelIn={2 * segments}, NumelOut={4 * segments}, Timeout(ms)=600000) ran for 600008 milliseconds")
    report = diagnose_batch(EXAMPLE, 2, error_text=text)
    (finding,) = [f for f in report.findings if f.code == "ERROR_RECOGNISED"]
    assert "= 2 ranks" in finding.message and "vision-count all-gather" in finding.message
    assert report.exit_code == 1


def test_slime_rank_tokens_is_explained_like_a_size_mismatch():
    total = int(torch.load(EXAMPLE, weights_only=True)["cu_seqlens_padded"][-1])  # the physical row
    text = f"AssertionError: CP rank 0 has {total} tokens, expected {total // 2} from cu_seqlens"
    report = diagnose_batch(EXAMPLE, 2, error_text=text)
    assert confirmed(report) == ["CP_SIZE_MISMATCH"]


def test_an_unrecognised_error_is_named_in_the_header():
    result = runner.invoke(app, ["diagnose", str(EXAMPLE), "--cp", "2", "--error", "something odd happened"])
    assert "none given" not in result.output and "not recognised" in result.output


def test_two_files_of_a_cp4_run_read_with_cp2_are_not_taken_for_double_sharding():
    """cp-4 ranks 0 and 1 (files missing) break vision spans where a second split would put them."""
    from cpinspect.core.errors import InputError
    from cpinspect.core.synth import shard_batch

    full = torch.load(BROKEN / "double_sharded" / "rank0.pt", weights_only=True)  # cu and grids only
    directory = BROKEN / "double_sharded"
    shards = [torch.load(directory / f"rank{r}.pt", weights_only=True) for r in range(2)]
    cu = full["cu_seqlens_padded"].tolist()
    indices = literal.zigzag_indices(cu, 4)
    row = torch.full((cu[-1],), -1, dtype=torch.long)
    for shard, q in zip(shards, (0, 3)):  # the double-sharded files are cp-4 ranks 0 and 3
        row[indices[q]] = shard["input_ids"].reshape(-1)
    assert (row[indices[1]] == -1).all()  # cp-4 rank 1's tokens are nowhere in the files
    wrong = shard_batch({"input_ids": torch.where(row < 0, 0, row).view(1, -1), "cu_seqlens": full["cu_seqlens"],
                         "cu_seqlens_padded": full["cu_seqlens_padded"], "image_grid_thw": full["image_grid_thw"]},
                        4)[:2]
    try:
        report = diagnose_batch(wrong, 2)
    except InputError as exc:
        assert "missing rank files" in exc.fix
    else:
        assert "DOUBLE_SHARDED" not in confirmed(report)


# --------------------------------------------------------------------------- class 6: the registration point


def test_an_added_hypothesis_is_tested_like_the_built_in_ones():
    from cpinspect.diagnose.hypotheses import EXTRA_HYPOTHESES
    from cpinspect.diagnose.prediction import Prediction

    def tp_split(scene, observed):  # a stand-in for CP_SPLIT_MISSING: predicts (168, 84) on this batch
        return [Prediction("CP_SIZE_MISMATCH", scene.total_tokens // 2, scene.total_tokens // 4, "tp ratio", "")]

    text = "RuntimeError: Sizes of tensors must match except in dimension 0. Expected size 168 but got size 84"
    assert confirmed(diagnose_batch(EXAMPLE, 2, error_text=text)) == []  # no built-in cause fits 336/2 vs 336/4
    EXTRA_HYPOTHESES.append(tp_split)
    try:
        report = diagnose_batch(EXAMPLE, 2, error_text=text)
    finally:
        EXTRA_HYPOTHESES.remove(tp_split)
    assert confirmed(report) == ["CP_SIZE_MISMATCH"] and "tp ratio" in report.causes[0].message


def test_mrope_local_row_silent_form_and_its_correct_counterpart(tmp_path):
    from cpinspect.core.mrope import row_positions

    directory = BROKEN / "mrope_local_row_positions"
    report = diagnose_batch(directory, 2)
    assert confirmed(report) == ["MROPE_LOCAL_ROW"] and not any(f.code == "MROPE_MISMATCH" for f in report.findings)
    shards = [torch.load(directory / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # rank 1's first token is global 16 (literal zigzag), but its stored position is 0
    assert literal.zigzag_indices([0, 64, 96], 2)[1][0] == 16 and int(shards[1]["position_ids"][0, 0, 0]) == 0
    indices = literal.zigzag_indices([0, 64, 96], 2)
    full = torch.empty(96, dtype=torch.long)
    for rank, shard in enumerate(shards):
        full[indices[rank]] = shard["input_ids"].reshape(-1)
    table = row_positions(full, torch.tensor([0, 64, 96]), token_config("qwen3-vl"),
                          image_grid_thw=shards[0]["image_grid_thw"])
    for rank, shard in enumerate(shards):
        torch.save({**shard, "position_ids": table[:, indices[rank]].unsqueeze(1)}, tmp_path / f"rank{rank}.pt")
    assert diagnose_batch(tmp_path, 2).exit_code == 0
