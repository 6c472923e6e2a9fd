"""Hybrid CP through the commands: simulate --json indices equal the literal definition, rows the literal oracle;
layout draws it; the batch's local_cp_size (a key or a PackedSeqParams field) does what --cp-per-segment does."""

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from cpinspect.cli.app import app
from cpinspect.core import synth
from cpinspect.core.errors import InputError
from tests.literal import expected_rows, hybrid_indices, layout_indices
from tests.unit.test_hybrid import balanced_mix, cu_of

runner = CliRunner()
TOKENS = synth.token_config()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def batch_of(lengths, seed):
    """A full packed row with runs of image and video placeholders among text."""
    rng = random.Random(seed)
    total = sum(lengths)
    ids, token = [], 100
    while len(ids) < total:
        token = rng.choice([100, 100, TOKENS.image_token_id, TOKENS.video_token_id])
        ids += [token] * rng.randint(1, 5)
    row = torch.tensor(ids[:total], dtype=torch.long).view(1, -1)
    return {"input_ids": row, "cu_seqlens": torch.tensor(cu_of(lengths), dtype=torch.int32)}


def vision_mask(batch):
    return [i in (TOKENS.image_token_id, TOKENS.video_token_id) for i in batch["input_ids"].view(-1).tolist()]


@pytest.mark.parametrize("cp", range(1, 9))
@pytest.mark.parametrize("seed", range(2))
def test_simulate_json_holds_the_literal_hybrid_indices_and_rows(tmp_path, cp, seed):
    lengths, sizes = balanced_mix(random.Random(100 + seed * 10 + cp), cp)
    if not sum(lengths):
        lengths[0], sizes[0] = 2 * cp, cp  # a row of at least one token per rank
    batch = batch_of(lengths, seed)
    torch.save(batch, tmp_path / "batch.pt")
    result = run("simulate", tmp_path / "batch.pt", "--cp", cp, "--cp-per-segment", ",".join(map(str, sizes)),
                 "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    held = hybrid_indices(batch["cu_seqlens"].tolist(), cp, sizes)
    assert doc["layout"] == "hybrid" and doc["ok"] is True
    assert [r["global_indices"] for r in doc["ranks"]] == held
    assert [r["selected_rows"] for r in doc["ranks"]] == [expected_rows(vision_mask(batch), h) for h in held]


@pytest.mark.parametrize("where", ["key", "packed_seq_params"])
def test_a_per_segment_local_cp_size_in_the_batch_is_hybrid_cp(tmp_path, where):
    batch = batch_of([16, 8, 8, 16], 3)
    sizes = torch.tensor([2, 1, 1, 4], dtype=torch.int32)
    if where == "key":
        batch["local_cp_size"] = sizes
    else:
        batch["packed_seq_params"] = {"cu_seqlens_q": batch.pop("cu_seqlens"), "local_cp_size": sizes}
    torch.save(batch, tmp_path / "batch.pt")
    result = run("simulate", tmp_path / "batch.pt", "--cp", 4, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["layout"] == "hybrid"
    assert [r["global_indices"] for r in doc["ranks"]] == hybrid_indices([0, 16, 24, 32, 48], 4, [2, 1, 1, 4])
    # the layout by hand: segment 0 on ranks 0-1 (chunks 0|3 and 1|2 of 4), segments 1 and 2 whole on ranks 2 and 3
    assert doc["ranks"][0]["global_indices"] == [0, 1, 2, 3, 12, 13, 14, 15, 32, 33, 46, 47]
    assert doc["ranks"][2]["global_indices"] == [*range(16, 24), 36, 37, 42, 43]


def test_a_scalar_local_cp_size_is_the_micro_batch_on_its_subgroup(tmp_path):
    batch = batch_of([16, 32], 5)
    batch["local_cp_size"] = 4
    torch.save(batch, tmp_path / "batch.pt")
    result = run("simulate", tmp_path / "batch.pt", "--cp", 4, "--json")
    assert result.exit_code == 0, result.output
    zigzag = run("simulate", tmp_path / "batch.pt", "--cp", 4, "--json", "--cp-per-segment", "4,4")
    assert [r["global_indices"] for r in json.loads(result.output)["ranks"]] == \
        [r["global_indices"] for r in json.loads(zigzag.output)["ranks"]]
    refused = run("simulate", tmp_path / "batch.pt", "--cp", 8)
    assert refused.exit_code == 2 and "pass --cp 4" in " ".join(refused.output.split())


def test_layout_draws_hybrid_cp_with_each_segments_block():
    result = run("layout", "--seqlens", "16,8,8,16", "--cp", 4, "--cp-per-segment", "2,1,1,4", "--no-color")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "hybrid layout · cp 4" in text
    assert "segment 0 · tokens 0-15 · 16 tokens · cp 2 on ranks 0..1 = 4 chunks of 4" in text
    assert "segment 1 · tokens 16-23 · 8 tokens · cp 1 on rank 2 (not split)" in text
    assert "hybrid *" in text  # its balance column, beside the three framework cuts


def test_layout_json_names_each_segments_local_cp_and_chunks():
    result = run("layout", "--seqlens", "16,8,8,16", "--cp", 4, "--cp-per-segment", "2,1,1,4", "--json")
    doc = json.loads(result.output)
    assert [s["local_cp"] for s in doc["segments"]] == [2, 1, 1, 4]
    assert [s["chunk_len"] for s in doc["segments"]] == [4, 8, 8, 2]
    assert [c["rank"] for c in doc["segments"][3]["chunks"]] == [0, 1, 2, 3, 3, 2, 1, 0]
    assert [r["global_indices"] for r in doc["ranks"]] == hybrid_indices([0, 16, 24, 32, 48], 4, [2, 1, 1, 4])


def test_pad_pads_each_segment_to_twice_its_own_cp(tmp_path):
    batch = batch_of([13, 7, 7], 2)
    torch.save(batch, tmp_path / "batch.pt")
    result = run("simulate", tmp_path / "batch.pt", "--cp", 2, "--cp-per-segment", "2,1,1", "--pad", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    # 13 -> 16 (a multiple of 2*2); the cp-1 segments of 7 stay, one on each rank: 8 + 7 tokens per rank
    assert doc["ok"] is True and doc["tokens"] == 30 and doc["local_cp_size"] == [2, 1, 1]
    assert [r["global_indices"] for r in doc["ranks"]] == hybrid_indices([0, 16, 23, 30], 2, [2, 1, 1])


@pytest.mark.parametrize(("option", "words"), [
    ("2,3,1,1", "segment 1 has local CP size 3, which does not divide the CP group size --cp 4"),
    ("2,2", "gives 2 CP size(s), but the row has 4 segment(s)"),
    ("4,4,4,x", "entry 3 is 'x'"),
    ("1,1,1,1", "unequal shares"),
    ("2,1,4,1", "segment 2 has physical length 12 and local CP size 4, so it is cut into 2*4 = 8 chunks"),
])
def test_bad_cp_per_segment_exits_2_with_one_paragraph(tmp_path, option, words):
    torch.save(batch_of([16, 8, 12, 12], 1), tmp_path / "batch.pt")
    result = run("simulate", tmp_path / "batch.pt", "--cp", 4, "--cp-per-segment", option)
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_diagnose_reads_the_batchs_local_cp_size_and_finds_the_rank_by_its_hybrid_share(tmp_path):
    from cpinspect.diagnose.api import diagnose_batch

    batch = batch_of([16, 8, 8, 16], 3)
    batch["local_cp_size"] = torch.tensor([2, 1, 1, 4], dtype=torch.int32)
    mask = vision_mask(batch)
    held = [sum(mask[g] for g in h) for h in hybrid_indices([0, 16, 24, 32, 48], 4, [2, 1, 1, 4])]
    zigzag = [sum(mask[g] for g in h) for h in layout_indices("zigzag", [0, 16, 24, 32, 48], 4)]
    rank = next(r for r in range(4) if held[r] != zigzag[r] and held.count(held[r]) == 1)
    error = f"Image features and image tokens do not match: tokens: {held[rank]}, features: {sum(mask)}"
    report = diagnose_batch(batch, 4, error_text=error)
    found = [f for f in report.findings if f.code == "PRESHARDED_ROWS_NOT_SELECTED"]
    assert report.layout == "hybrid" and report.findings
    assert [(f.status, f.rank) for f in found] == [("confirmed", rank)]


def test_diagnose_takes_a_hybrid_segment_that_only_its_own_cp_divides(tmp_path):
    from cpinspect.diagnose.api import diagnose_batch

    batch = batch_of([16, 7, 7], 3)  # 7 is no multiple of 2*cp = 4, but its local cp is 1
    batch["local_cp_size"] = torch.tensor([2, 1, 1], dtype=torch.int32)
    report = diagnose_batch(batch, 2)
    assert report.exit_code == 0 and not [f for f in report.findings if f.is_problem]
    assert any("2·c equal chunks for their own local cp" in f.message for f in report.findings)
    batch["local_cp_size"] = torch.tensor([2, 2, 1], dtype=torch.int32)
    with pytest.raises(InputError, match="segment 1 has physical length 7 and local CP size 2"):
        diagnose_batch(batch, 2)


def test_presharded_rank_files_cut_by_hybrid_cp_select_the_literal_rows(tmp_path):
    batch = batch_of([16, 8, 8, 16], 4)
    held = hybrid_indices([0, 16, 24, 32, 48], 4, [2, 1, 1, 4])
    for rank, positions in enumerate(held):
        torch.save({"input_ids": batch["input_ids"][0][positions].view(1, -1), "cu_seqlens": batch["cu_seqlens"],
                    "local_cp_size": torch.tensor([2, 1, 1, 4])}, tmp_path / f"rank{rank}.pt")
    result = run("simulate", tmp_path, "--cp", 4, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["input"] == "presharded" and doc["layout"] == "hybrid"
    assert [r["selected_rows"] for r in doc["ranks"]] == [expected_rows(vision_mask(batch), h) for h in held]


def test_positions_of_hybrid_rank_files_are_checked_under_the_hybrid_layout(tmp_path):
    cu = [0, 16, 24, 32, 48]
    within = [g - max(c for c in cu[:-1] if c <= g) for g in range(48)]  # text only: mRoPE t = h = w = offset
    for rank, positions in enumerate(hybrid_indices(cu, 4, [2, 1, 1, 4])):
        local = torch.tensor([within[g] for g in positions]).expand(3, 1, -1).clone()
        torch.save({"input_ids": torch.full((1, 12), 100), "cu_seqlens": torch.tensor(cu),
                    "local_cp_size": torch.tensor([2, 1, 1, 4]), "position_ids": local}, tmp_path / f"rank{rank}.pt")
    result = run("simulate", tmp_path, "--cp", 4, "--positions", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ok"] is True
    (tmp_path / "rank1.pt").write_bytes((tmp_path / "rank0.pt").read_bytes())  # rank 1 given rank 0's positions
    assert run("simulate", tmp_path, "--cp", 4, "--positions", "--json").exit_code == 1


def test_diagnose_checks_the_position_ids_of_hybrid_rank_files(tmp_path):
    from cpinspect.diagnose.api import diagnose_batch

    cu = [0, 16, 24, 32, 48]
    for rank in range(4):  # zeros: every token after a segment's first has the wrong position
        zeros = torch.zeros(3, 1, 12, dtype=torch.long)
        torch.save({"input_ids": torch.full((1, 12), 100), "cu_seqlens": torch.tensor(cu),
                    "local_cp_size": torch.tensor([2, 1, 1, 4]), "position_ids": zeros}, tmp_path / f"rank{rank}.pt")
    report = diagnose_batch(tmp_path, 4)
    assert report.layout == "hybrid"
    assert sorted(f.rank for f in report.findings if f.code == "MROPE_MISMATCH" and f.status == "confirmed") == \
        [0, 1, 2, 3]
    assert not [f for f in report.findings if f.code == "SKIPPED"]


def test_pad_appends_a_pad_sequence_to_each_short_rank(tmp_path):
    from tests.literal import hybrid_rank_padding

    batch = batch_of([16, 8, 12, 12], 6)  # one rank each: 16, 8, 12, 12 tokens
    torch.save(batch, tmp_path / "batch.pt")
    refused = run("simulate", tmp_path / "batch.pt", "--cp", 4, "--cp-per-segment", "1,1,1,1")
    assert refused.exit_code == 2 and "unequal shares (rank 0: 16, rank 1: 8, rank 2: 12, rank 3: 12" in \
        " ".join(refused.output.split())
    result = run("simulate", tmp_path / "batch.pt", "--cp", 4, "--cp-per-segment", "1,1,1,1", "--pad", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    cu, sizes = hybrid_rank_padding([0, 16, 24, 36, 48], 4, [1, 1, 1, 1])
    assert cu == [0, 16, 24, 36, 48, 56, 60, 64] and doc["local_cp_size"] == sizes  # gaps 8, 4, 4 by hand
    held = hybrid_indices(cu, 4, sizes)
    mask = vision_mask(batch) + [False] * 16
    assert [r["global_indices"] for r in doc["ranks"]] == held
    assert [r["selected_rows"] for r in doc["ranks"]] == [expected_rows(mask, h) for h in held] and doc["ok"]


def test_explain_names_each_hybrid_piece_by_segment_and_never_an_empty_filler_as_a_chunk(tmp_path):
    """Chunk numbers restart per segment with each segment's own cp; the filler pieces that keep every rank's count
    tensor one shape are not chunks (they printed as "c-1" and "chunks -1, 0, 2, 5")."""
    batch = batch_of([16, 8, 8, 16], 3)
    batch["local_cp_size"] = torch.tensor([2, 1, 1, 4], dtype=torch.int32)
    torch.save(batch, tmp_path / "batch.pt")
    result = run("simulate", tmp_path / "batch.pt", "--cp", 4, "--explain", "--rank", 2, "--no-color")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    held = hybrid_indices([0, 16, 24, 32, 48], 4, [2, 1, 1, 4])  # literal: rank 2 holds segment 1, chunks 2, 5 of 3
    assert held[2] == [*range(16, 24), 36, 37, 42, 43]
    assert "chunks s1 c0, s3 c2, s3 c5, (empty)." in text
    assert "rank 2 sent [" in text and "(chunks s1 c0, s3 c2, s3 c5)" in text
    assert "(chunks s0 c0, s0 c3, s3 c0, s3 c7)" in text  # rank 0: chunks 0|3 of segment 0's 4, 0|7 of segment 3's 8
    assert "c-1" not in text and "-1," not in text
