"""diagnose reads TP/SP size mismatches: CP_SPLIT_MISSING / SP_SPLIT_MISSING, confirmed only when exactly one
explanation fits the numbers (worked out here by hand from T, cp and tp)."""

import pytest
import torch

from cpinspect.core.loading import load_batch
from cpinspect.core.parallel import ParallelSizes, alignment, missing_splits
from cpinspect.diagnose.api import diagnose_batch

TEXT = "Sizes of tensors must match except in dimension 0. Expected size {} but got size {}"


def row(total: int = 12288):
    ids = torch.full((1, total), 100)
    ids[0, 10:50] = 151655
    return load_batch({"input_ids": ids, "cu_seqlens": torch.tensor([0, 4096, total], dtype=torch.int32)})


def statuses(report, prefix="_SPLIT_MISSING"):
    return sorted((f.code, f.status) for f in report.findings if f.code.endswith(prefix))


def test_sp_scatter_without_the_cp_split_is_cp_split_missing():
    # 12,288 tokens, cp 2, tp 4, SP: T/tp = 3072 met T/(cp*tp) = 1536 (Megatron-Bridge#3881)
    report = diagnose_batch(row(), 2, error_text=TEXT.format(12288 // 4, 12288 // 8))
    assert statuses(report) == [("CP_SPLIT_MISSING", "confirmed")]
    message = next(f.message for f in report.findings if f.code == "CP_SPLIT_MISSING")
    assert "3072 = 12288 / tp 4 (SP split only)" in message and "1536 = 12288 / (cp 2 x tp 4)" in message


def test_cp_split_without_the_sp_scatter_is_sp_split_missing():
    report = diagnose_batch(row(), 2, error_text=TEXT.format(12288 // 8, 12288 // 2))  # either order
    assert statuses(report) == [("SP_SPLIT_MISSING", "confirmed")]


def test_tp_equal_to_cp_leaves_both_possible():
    report = diagnose_batch(row(), 2, error_text=TEXT.format(12288 // 2, 12288 // 4))  # tp 2 = cp 2
    assert statuses(report) == [("CP_SPLIT_MISSING", "possible"), ("SP_SPLIT_MISSING", "possible")]


@pytest.mark.parametrize("pair", [(3072, 1000), (3072, 1024), (5000, 2500)])
def test_numbers_that_fit_neither_split_confirm_nothing(pair):
    report = diagnose_batch(row(), 2, error_text=TEXT.format(*pair))
    assert statuses(report) == []
    assert not any(f.status == "confirmed" for f in report.findings)


@pytest.mark.parametrize("cp, tp", [(2, 4), (4, 2), (3, 5), (8, 8), (2, 3)])
def test_missing_splits_against_the_hand_arithmetic(cp, tp):
    total = 2 * cp * tp * 7
    full = total // (cp * tp)
    cp_missing = [(m.missing, m.tp) for m in missing_splits(total // tp, full, total, cp)]
    sp_missing = [(m.missing, m.tp) for m in missing_splits(full, total // cp, total, cp)]
    assert ("CP", tp) in cp_missing and ("SP", tp) in sp_missing
    assert (("SP", tp) in cp_missing) == (cp == tp) and (("CP", tp) in sp_missing) == (cp == tp)
    assert ParallelSizes(total, cp, tp).sizes() == {"full row": total, "CP split only": total // cp,
                                                    "SP split only": total // tp, "CP and SP split": full}


def test_alignment_is_two_cp_tp_with_sequence_parallelism():
    assert alignment(2, 4, True) == 16 and alignment(2, 4, False) == 4 and alignment(1, 1) == 1
    assert alignment(1, 4, True) == 4 and alignment(8, 2, True) == 32


def test_simulate_with_sequence_parallelism_pads_to_two_cp_tp(tmp_path):
    import json

    from typer.testing import CliRunner

    from cpinspect.cli.app import app

    ids = torch.full((1, 36), 100)
    ids[0, 3:9] = 151655
    torch.save({"input_ids": ids, "cu_seqlens": torch.tensor([0, 12, 36], dtype=torch.int32)}, tmp_path / "b.pt")
    runner = CliRunner()
    refused = runner.invoke(app, ["simulate", str(tmp_path / "b.pt"), "--cp", "2", "--tp", "4", "--sequence-parallel"])
    assert refused.exit_code == 2 and "cannot scatter over tp = 4" in " ".join(refused.output.split())
    padded = runner.invoke(app, ["simulate", str(tmp_path / "b.pt"), "--cp", "2", "--tp", "4", "--sequence-parallel",
                                 "--pad", "--json"])
    assert padded.exit_code == 0, padded.output
    doc = json.loads(padded.output)
    assert doc["tokens"] == 16 + 32  # 12 -> 16 and 24 -> 32: multiples of 2*cp*tp = 16
    assert doc["tp"] == 4 and doc["sequence_parallel"] is True and doc["tokens_per_tp_rank"] == 48 // 2 // 4
    assert all(r["ok"] for r in doc["ranks"])


def test_given_tp_keeps_the_explanation_with_that_tp():
    report = diagnose_batch(row(), 2, error_text=TEXT.format(3072, 1536), tp=4, sequence_parallel=True)
    assert statuses(report) == [("CP_SPLIT_MISSING", "confirmed")]
    message = next(f.message for f in report.findings if f.code == "CP_SPLIT_MISSING")
    assert "tp = 4 (given with --tp)" in message


def test_given_tp_that_the_numbers_do_not_fit_confirms_nothing():
    # 3072 vs 1536 on 12,288 tokens at cp 2 needs tp 4 (12288 / 3072); a run with tp 2 cannot have made them
    assert statuses(diagnose_batch(row(), 2, error_text=TEXT.format(3072, 1536))) == [("CP_SPLIT_MISSING",
                                                                                       "confirmed")]
    report = diagnose_batch(row(), 2, error_text=TEXT.format(3072, 1536), tp=2)
    assert statuses(report) == []
    assert not any(f.status == "confirmed" for f in report.findings)


def test_given_tp_equal_to_cp_still_leaves_both_possible_and_another_tp_neither():
    both = diagnose_batch(row(), 2, error_text=TEXT.format(6144, 3072), tp=2)
    assert statuses(both) == [("CP_SPLIT_MISSING", "possible"), ("SP_SPLIT_MISSING", "possible")]
    assert statuses(diagnose_batch(row(), 2, error_text=TEXT.format(6144, 3072), tp=4)) == []


def test_without_sequence_parallelism_no_split_over_tp_explains_the_numbers():
    report = diagnose_batch(row(), 2, error_text=TEXT.format(3072, 1536), tp=4, sequence_parallel=False)
    assert statuses(report) == []


def test_diagnose_cli_takes_tp_and_sequence_parallelism(tmp_path):
    import json

    from typer.testing import CliRunner

    from cpinspect.cli.app import app

    ids = torch.full((1, 12288), 100)
    ids[0, 10:50] = 151655
    torch.save({"input_ids": ids, "cu_seqlens": torch.tensor([0, 4096, 12288], dtype=torch.int32)}, tmp_path / "b.pt")
    runner = CliRunner()
    args = ["diagnose", str(tmp_path / "b.pt"), "--cp", "2", "--error", TEXT.format(3072, 1536), "--json"]
    given = json.loads(runner.invoke(app, [*args, "--tp", "4", "--sequence-parallel"]).output)
    assert [(f["code"], f["status"]) for f in given["findings"] if f["code"].endswith("_SPLIT_MISSING")] == \
        [("CP_SPLIT_MISSING", "confirmed")]
    other = json.loads(runner.invoke(app, [*args, "--tp", "2"]).output)
    assert not [f for f in other["findings"] if f["code"].endswith("_SPLIT_MISSING")]
    off = json.loads(runner.invoke(app, [*args, "--no-sequence-parallel"]).output)
    assert not [f for f in off["findings"] if f["code"].endswith("_SPLIT_MISSING")]


def layout_json(*args):
    import json

    from typer.testing import CliRunner

    from cpinspect.cli.app import app

    result = CliRunner().invoke(app, ["layout", *map(str, args)])
    assert result.exit_code == 0, result.output
    return json.loads(result.output) if "--json" in args else result.output


def runs_of(values):
    out = []
    for v in values:
        if out and v == out[-1][1] + 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return out


def test_layout_tp_pads_to_two_cp_tp_and_lists_every_sp_share():
    from tests.literal import zigzag_indices

    doc = layout_json("--seqlens", "12,24", "--cp", 2, "--tp", 4, "--sequence-parallel", "--pad", "--json")
    assert [s["length"] for s in doc["segments"]] == [16, 32]  # 12 -> 16, 24 -> 32: multiples of 2*2*4
    assert doc["alignment"] == [16] and doc["misaligned_segments"] == [] and doc["tokens_per_tp_rank"] == 6
    held = zigzag_indices([0, 16, 48], 2)  # each rank's 24 tokens, cut into 4 contiguous SP shares of 6
    for rank, shares in enumerate(doc["sp_shares"]):
        assert [s["local"] for s in shares] == [[0, 6], [6, 12], [12, 18], [18, 24]]
        assert [s["global_ranges"] for s in shares] == [runs_of(held[rank][t * 6:(t + 1) * 6]) for t in range(4)]
    assert doc["sp_shares"][0][1]["global_ranges"] == [[14, 19]]  # rank 0: the end of s0 chunk 3, s1 chunk 0


def test_layout_tp_names_the_segments_that_miss_the_alignment():
    doc = layout_json("--seqlens", "8,28", "--cp", 2, "--tp", 3, "--sequence-parallel", "--json")
    assert doc["alignment"] == [12] and doc["misaligned_segments"] == [0, 1]  # 8 and 28 are not multiples of 12
    text = " ".join(layout_json("--seqlens", "8,28", "--cp", 2, "--tp", 3, "--sequence-parallel",
                                "--no-color").split())
    assert "✗ 2 segment(s) are not multiples of 2·cp·tp = 12 (segment 0, 1)" in text
    assert "cp 0 · tp 0: local 0-5 = global 0-1, 6-9" in text  # rank 0: s0 chunks 0 and 3 (2 each), then s1 chunk 0


def test_layout_tp_without_sequence_parallelism_keeps_whole_local_rows():
    doc = layout_json("--seqlens", "12,24", "--cp", 2, "--tp", 4, "--json")
    assert doc["alignment"] == [4] and doc["tokens_per_tp_rank"] == 18 and "sp_shares" not in doc
