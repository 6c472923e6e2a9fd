"""--rope 1d: 1-D RoPE position_ids checked as each token's offset in its segment (issue 14 follow-up).

Every expected value is written out by hand for Megatron-LM#5243's packing: cu_seqlens [0, 4, 8],
cp 2, zigzag, so rank 0 holds global tokens [0, 3, 4, 7] (offsets [0, 3, 0, 3]) and rank 1 holds
[1, 2, 5, 6] (offsets [1, 2, 1, 2]).
"""

import json

import pytest
import torch
from typer.testing import CliRunner

from cpinspect.cli.app import app
from cpinspect.core.errors import InputError
from cpinspect.core.loading import load_batch
from cpinspect.core.position_check import check_position_ids, compare_position_ids
from cpinspect.core.tokens import token_config

ONE_D = token_config("qwen3-vl", rope="1d")
CU = torch.tensor([0, 4, 8], dtype=torch.int32)
HELD = {0: [0, 3, 4, 7], 1: [1, 2, 5, 6]}  # zigzag at cp 2: chunks r and 3 - r of each segment, by hand
IDS = list(range(1000, 1008))  # plain text ids


def rank_files(positions, shape=(1, -1)):
    return [{"input_ids": torch.tensor([[IDS[g] for g in HELD[r]]]), "cu_seqlens": CU,
             "position_ids": torch.tensor(positions[r]).view(*shape)} for r in (0, 1)]


def codes(findings):
    return [f.code for f in findings]


def test_correct_per_rank_1d_positions_give_no_finding():
    check = compare_position_ids(load_batch(rank_files({0: [0, 3, 0, 3], 1: [1, 2, 1, 2]})), 2, tokens=ONE_D)
    assert check.findings == [] and check.statuses == ["ok", "ok"]
    # [n] instead of [1, n] is 1-D too
    assert check_position_ids(load_batch(rank_files({0: [0, 3, 0, 3], 1: [1, 2, 1, 2]}, (-1,))), 2,
                              tokens=ONE_D) == []


def test_without_the_flag_1d_positions_say_3d_was_expected_and_name_the_flag():
    findings = check_position_ids(load_batch(rank_files({0: [0, 3, 0, 3], 1: [1, 2, 1, 2]})), 2,
                                  tokens=token_config("qwen3-vl"))
    assert codes(findings) == ["MROPE_MISMATCH", "MROPE_MISMATCH"]
    assert "expected 3-D mRoPE [3, 1, 4] for qwen3-vl" in findings[0].message
    assert "if this model uses 1-D RoPE, pass --rope 1d" in findings[0].message


def test_the_table_read_without_the_segment_offset_is_a_1d_mismatch_at_the_first_wrong_token():
    # rank 1 holds global 5 and 6 of segment 1 (offsets 1, 2); here its last token says 3
    findings = check_position_ids(load_batch(rank_files({0: [0, 3, 0, 3], 1: [1, 2, 1, 3]})), 2, tokens=ONE_D)
    assert codes(findings) == ["ROPE_MISMATCH"]
    f = findings[0]
    assert (f.rank, f.segment) == (1, 1)
    assert "local token 3 (global 6), segment 1: got 3, expected 2" in f.message


def test_positions_counting_over_the_whole_row_are_not_per_segment():
    findings = check_position_ids(load_batch(rank_files({0: [0, 3, 4, 7], 1: [1, 2, 5, 6]})), 2, tokens=ONE_D)
    assert codes(findings) == ["ROPE_NOT_PER_SEGMENT"] and findings[0].message.startswith("rank(s) 0, 1:")


def test_positions_sliced_contiguously_are_a_wrong_slice():
    # a contiguous cut of the row: rank 0 holds 0..3 (offsets 0..3), rank 1 holds 4..7 (offsets 0..3)
    findings = check_position_ids(load_batch(rank_files({0: [0, 1, 2, 3], 1: [0, 1, 2, 3]})), 2, tokens=ONE_D)
    assert codes(findings) == ["ROPE_WRONG_SLICE"] and "contiguous layout, not zigzag" in findings[0].message


def test_full_row_1d_positions_with_pads_ignored():
    row = {"input_ids": torch.tensor([IDS]), "cu_seqlens": torch.tensor([0, 3, 6], dtype=torch.int32),
           "cu_seqlens_padded": CU}
    right = dict(row, position_ids=torch.tensor([[0, 1, 2, 99, 0, 1, 2, 99]]))  # 99 at the pad tokens 3 and 7
    assert check_position_ids(load_batch(right), 2, tokens=ONE_D) == []
    whole = dict(row, position_ids=torch.tensor([[0, 1, 2, 99, 4, 5, 6, 99]]))  # the global index: not restarted
    assert codes(check_position_ids(load_batch(whole), 2, tokens=ONE_D)) == ["ROPE_NOT_PER_SEGMENT"]
    counted = dict(row, position_ids=torch.tensor([[0, 1, 2, 99, 3, 4, 5, 99]]))  # real tokens counted on
    (finding,) = check_position_ids(load_batch(counted), 2, tokens=ONE_D)
    assert finding.code == "ROPE_MISMATCH" and "token 4, segment 1: got 3, expected 0" in finding.message
    three_d = dict(row, position_ids=torch.zeros(3, 1, 8, dtype=torch.long))
    (finding,) = check_position_ids(load_batch(three_d), 2, tokens=ONE_D)
    assert finding.code == "ROPE_MISMATCH" and "not 1-D RoPE [1, 8] or [8] (--rope 1d)" in finding.message


def test_diagnose_rope_1d_on_the_cli(tmp_path):
    runner = CliRunner()
    for r, shard in enumerate(rank_files({0: [0, 3, 0, 3], 1: [1, 2, 1, 2]})):
        torch.save(shard, tmp_path / f"rank{r}.pt")
    result = runner.invoke(app, ["diagnose", str(tmp_path), "--rope", "1d", "--json"])
    assert result.exit_code == 0, result.output
    assert not any("ROPE" in f["code"] for f in json.loads(result.stdout)["findings"])
    result = runner.invoke(app, ["diagnose", str(tmp_path), "--json"])
    doc = json.loads(result.stdout)
    assert any("pass --rope 1d" in f["message"] for f in doc["findings"] if f["code"] == "MROPE_MISMATCH")
    result = runner.invoke(app, ["diagnose", str(tmp_path), "--rope", "2d"])
    assert result.exit_code == 2 and "unknown rope kind '2d'" in result.output


def test_an_unknown_rope_kind_is_bad_input():
    with pytest.raises(InputError, match="--rope mrope"):
        token_config("qwen3-vl", rope="3d")
