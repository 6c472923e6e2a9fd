"""`cpinspect diagnose`: each hypothesis is confirmed by the numbers it predicts, and only by them.

The expected numbers come from outside cpinspect: the published vectors of the reference (§1.6,
§3.5), the literal list-based layouts of ``tests/literal.py``, and hand arithmetic over grids.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cpinspect.cli.app import app
from cpinspect.core import synth
from cpinspect.core.findings import Finding
from cpinspect.core.tokens import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, token_config
from cpinspect.diagnose.api import CAUSE_CODES, EXTRA_CHECKS, INFO_CODES, diagnose_batch
from cpinspect.diagnose.errortext import parse_error_text
from tests import literal

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
runner = CliRunner()
TEXT = 1000


def confirmed(report):
    return [f.code for f in report.findings if f.status == "confirmed"]


def finding(report, code, status="confirmed"):
    return next(f for f in report.findings if f.code == code and f.status == status)


def reference_vision_row():
    """Reference §3.5: cu [0, 8, 24], image tokens at global 2-5 and 10-17 (12 rows)."""
    ids = [TEXT + i for i in range(24)]
    for g in [*range(2, 6), *range(10, 18)]:
        ids[g] = IMAGE_PAD
    return {"input_ids": torch.tensor(ids), "cu_seqlens": torch.tensor([0, 8, 24], dtype=torch.int32)}


def literal_held(ids, cu, cp, indices=None):
    """Vision tokens per rank, by the literal list-based layout (never cpinspect's)."""
    mask = [i == IMAGE_PAD for i in ids]
    ranks = indices or literal.zigzag_indices(cu, cp)
    return [sum(mask[g] for g in held) for held in ranks]


def scatter(rows, tokens, rank=None):
    prefix = f"[rank{rank}]: " if rank is not None else ""
    return (f"{prefix}RuntimeError: shape mismatch: value tensor of shape [{rows}, 2048] cannot be broadcast to "
            f"indexing result of shape [{tokens}, 2048]")


# --------------------------------------------------------------------------- rows not selected, layout, cp


def test_reference_naive_scatter_is_rows_not_selected_on_rank_0():
    batch = reference_vision_row()
    held = literal_held(batch["input_ids"].tolist(), [0, 8, 24], 2)
    assert held == [2, 10]  # the reference's r0 / r1 vision counts
    report = diagnose_batch(batch, 2, error_text=scatter(12, 2))
    assert confirmed(report) == ["PRESHARDED_ROWS_NOT_SELECTED"]
    cause = finding(report, "PRESHARDED_ROWS_NOT_SELECTED")
    assert cause.rank == 0 and "rank 0 holds 2 vision tokens" in cause.message and "all 12" in cause.message
    assert "4-5" in cause.message  # rank 0's own rows, reference §3.5: [4, 5]
    assert report.exit_code == 1


def test_rows_not_selected_for_the_rank_the_log_names():
    batch = reference_vision_row()
    report = diagnose_batch(batch, 2, error_text=scatter(12, 10, rank=1))
    cause = finding(report, "PRESHARDED_ROWS_NOT_SELECTED")
    assert cause.rank == 1 and "rank 1 holds 10 vision tokens" in cause.message


def test_numbers_of_another_rank_are_only_possible():
    report = diagnose_batch(reference_vision_row(), 2, error_text=scatter(12, 2), rank=1)
    assert confirmed(report) == []
    assert finding(report, "PRESHARDED_ROWS_NOT_SELECTED", "possible").rank == 0
    assert report.exit_code == 0


def test_per_sequence_rows_on_a_per_document_mask_is_layout_mismatch():
    batch = reference_vision_row()
    ids = batch["input_ids"].tolist()
    per_document = literal_held(ids, [0, 8, 24], 2)
    per_sequence = literal_held(ids, [0, 24], 2)  # §1.6: the 24 tokens as ONE sequence
    assert (per_document[0], per_sequence[0]) == (2, 4)
    report = diagnose_batch(batch, 2, error_text=scatter(per_sequence[0], per_document[0], rank=0))
    assert confirmed(report) == ["LAYOUT_MISMATCH"]
    cause = finding(report, "LAYOUT_MISMATCH")
    assert cause.rank == 0 and "per-sequence" in cause.message and "per-document" in cause.message


def test_counts_of_another_cp_are_cp_size_mismatch():
    batch = reference_vision_row()
    ids = batch["input_ids"].tolist()
    at_cp4 = literal_held(ids, [0, 8, 24], 4)
    at_cp2 = literal_held(ids, [0, 8, 24], 2)
    rank = next(r for r, c in enumerate(at_cp4) if c not in at_cp2 and c not in (0, 12))
    report = diagnose_batch(batch, 2, error_text=scatter(12, at_cp4[rank], rank=rank))
    assert confirmed(report) == ["CP_SIZE_MISMATCH"]
    cause = finding(report, "CP_SIZE_MISMATCH")
    assert cause.rank == rank and "fit cp=4" in cause.message


def test_full_and_local_lengths_are_cp_size_mismatch():
    report = diagnose_batch(reference_vision_row(), 2, error_text="RuntimeError: Sizes of tensors must match except "
                            "in dimension 0. Expected size 24 but got size 12 for tensor number 1 in the list.")
    assert confirmed(report) == ["CP_SIZE_MISMATCH"]
    assert "24 = the full packed row and 12 = 24 / cp 2" in finding(report, "CP_SIZE_MISMATCH").message


def test_presharded_rows_cut_for_another_cp_are_diagnosed_not_refused():
    result = runner.invoke(app, ["diagnose", str(EXAMPLES / "presharded_cp2"), "--cp", "4", "--json"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    assert doc["cp"] == 2 and doc["findings"][0]["code"] == "CP_SIZE_MISMATCH"
    assert "cut for cp=2, not cp=4" in doc["findings"][0]["message"]
    assert any(f["code"] == "CONSISTENT" and f["message"].startswith("vision spans") for f in doc["findings"])


def test_presharded_rows_cut_per_sequence_are_layout_mismatch_without_an_error():
    full = synth.demo_batch_dict()
    report = diagnose_batch(synth.shard_batch(full, 2, layout="sequence-zigzag"), 2)
    assert confirmed(report) == ["LAYOUT_MISMATCH"]
    assert report.summary["data_layout"] == "sequence-zigzag"
    assert "only under per-sequence zigzag" in finding(report, "LAYOUT_MISMATCH").message


def test_one_rank_file_is_enough_for_rows_not_selected():
    full = synth.demo_batch_dict()
    ids, cu = full["input_ids"].reshape(-1).tolist(), full["cu_seqlens_padded"].tolist()
    mask = [i in (IMAGE_PAD, VIDEO_PAD) for i in ids]
    held = [sum(mask[g] for g in rank) for rank in literal.zigzag_indices(cu, 2)]
    report = diagnose_batch(EXAMPLES / "presharded_cp2" / "rank1.pt", 2, error_text=scatter(124, held[1]), rank=1)
    assert report.form == "one rank"
    assert confirmed(report) == ["PRESHARDED_ROWS_NOT_SELECTED"]
    assert finding(report, "PRESHARDED_ROWS_NOT_SELECTED").rank == 1


def test_unexplained_numbers_say_so_and_exit_1():
    """Issue 14 acceptance: a recognised error the batch does not explain is a failure, never "nothing wrong"."""
    report = diagnose_batch(reference_vision_row(), 2, error_text=scatter(12, 7))
    assert confirmed(report) == []
    assert finding(report, "PRESHARDED_ROWS_NOT_SELECTED", "possible")
    unexplained = finding(report, "UNEXPLAINED", "info")
    assert "rank 0: 2, rank 1: 10" in unexplained.message
    assert report.exit_code == 1 and not report.causes


# --------------------------------------------------------------------------- boundaries and segments


def logical_batch():
    """Physical [0, 8, 16], logical [0, 6, 14]; vision at 2-3 (segment 0) and 9-13 (segment 1)."""
    ids = [TEXT + i for i in range(16)]
    for g in (2, 3, 9, 10, 11, 12, 13):
        ids[g] = IMAGE_PAD
    return {"input_ids": torch.tensor(ids), "cu_seqlens_padded": torch.tensor([0, 8, 16], dtype=torch.int32),
            "cu_seqlens": torch.tensor([0, 6, 14], dtype=torch.int32)}


def literal_logical_counts(ids, physical, logical, cp):
    """Per rank: vision tokens inside the local chunks the logical boundaries define (plain lists)."""
    out = []
    for held in literal.zigzag_indices(physical, cp):
        local = [ids[g] == IMAGE_PAD for g in held]
        total = 0
        for s in range(len(logical) - 1):
            start, chunk = logical[s] // cp, (logical[s + 1] - logical[s]) // (2 * cp)
            total += sum(local[start:start + 2 * chunk])
        out.append(total)
    return out


def test_selection_with_logical_boundaries_is_logical_cu_as_physical():
    batch = logical_batch()
    counted = literal_logical_counts(batch["input_ids"].tolist(), [0, 8, 16], [0, 6, 14], 2)
    assert sum(counted) != 7  # the 7 vision tokens the rows really hold
    error = (f"ValueError: Packed CP ranks contain {sum(counted)} vision tokens, but the vision encoder produced 7 "
             "embeddings.")
    report = diagnose_batch(batch, 2, error_text=error)
    assert confirmed(report) == ["LOGICAL_CU_AS_PHYSICAL"]
    assert finding(report, "LOGICAL_CU_AS_PHYSICAL").segment == 0


def test_presharded_rows_with_only_logical_boundaries_are_found_without_an_error():
    full = logical_batch()
    shards = synth.shard_batch(full, 2)
    for shard in shards:
        del shard["cu_seqlens_padded"]
    report = diagnose_batch(shards, 2)
    cause = finding(report, "LOGICAL_CU_AS_PHYSICAL")
    assert "cu_seqlens ends at 14" in cause.message and "end at exactly 16" in cause.message
    assert report.form == "presharded"


def test_segment_not_divisible_by_2cp_is_found_in_the_batch():
    batch = synth.build_batch([[("text", 10), ("image", (1, 8, 8)), ("text", 8)], [("text", 30)]])
    report = diagnose_batch(batch, 2)
    cause = finding(report, "SEGMENT_NOT_DIVISIBLE")
    assert cause.segment == 1 and "physical length 30" in cause.message and "30 mod 4 = 2" in cause.message
    assert "30 -> 32" in cause.hint


def test_slime_cp1_length_error_names_the_row_and_the_cp1_cause():
    batch = synth.build_batch([[("text", 20)], [("text", 13)]])
    report = diagnose_batch(batch, 1, error_text="ValueError: Packed sequence length 33 must be divisible by 2 * CP "
                            "size 1")
    cause = finding(report, "SEGMENT_NOT_DIVISIBLE")
    assert "the packed row has 33 tokens" in cause.message and "slime#2376" in cause.message
    assert "skip the CP mapping when cp == 1" in cause.hint


# --------------------------------------------------------------------------- spans, ids, embeddings


def truncated_video_batch():
    """Qwen2-VL: a 4x16x16 video (256 tokens) cut at cutoff 160 after 20 text + vision_start + 139 tokens."""
    tokens = token_config("qwen2-vl")
    whole = synth.build_batch([[("text", 20), ("video", (4, 16, 16)), ("text", 30)]], tokens=tokens)
    ids = whole["input_ids"].reshape(-1)[:160]
    return {"input_ids": ids, "cu_seqlens": torch.tensor([0, 160]), "video_grid_thw": whole["video_grid_thw"]}, tokens


def test_truncated_video_span_found_in_the_batch():
    batch, tokens = truncated_video_batch()
    report = diagnose_batch(batch, 1, tokens=tokens)
    cause = finding(report, "TRUNCATED_VISION_SPAN")
    assert cause.segment == 0
    assert "4·16·16/4 = 256" in cause.message and "only 139" in cause.message and "117 row(s)" in cause.message


def test_truncated_span_explains_position_lengths():
    batch, tokens = truncated_video_batch()
    untruncated = 160 + (4 * 16 * 16 // 4 - 139)
    error = (f"shape mismatch: value tensor of shape [3, {untruncated}] cannot be broadcast to indexing result of "
             "shape [3, 160]")
    report = diagnose_batch(batch, 1, tokens=tokens, error_text=error)
    assert confirmed(report) == ["TRUNCATED_VISION_SPAN"]
    assert f"{untruncated} = 160 tokens of segment 0 + the 117" in finding(report, "TRUNCATED_VISION_SPAN").message


def image_batch(grid_fix=None, ids_fix=None):
    """Segment 0: 6 text, a 1x8x16 image (32 tokens); segment 1 (starts at 68): 30 text, a 1x16x16 image (64)."""
    batch = synth.build_batch([[("text", 6), ("image", (1, 8, 16)), ("text", 25)],
                               [("text", 30), ("image", (1, 16, 16)), ("text", 28)]], [68, 128])
    if grid_fix:
        grid_fix(batch)
    if ids_fix:
        ids_fix(batch)
    return batch


def test_grid_from_another_resize_is_grid_token_mismatch():
    def bigger(batch):
        batch["image_grid_thw"] = torch.tensor([[1, 8, 16], [1, 16, 20]])
    report = diagnose_batch(image_batch(bigger), 2)
    cause = finding(report, "GRID_TOKEN_MISMATCH")
    assert "1·16·20/4 = 80" in cause.message and "has 64" in cause.message and cause.segment == 1
    start = 68 + 30 + 1  # the run's first placeholder
    owner = next(r for r, held in enumerate(literal.zigzag_indices([0, 68, 196], 2)) if start in held)
    assert (cause.rank, cause.chunk) == (owner, (start - 68) // (128 // 4))


def test_placeholders_without_grid_rows_are_grid_token_mismatch():
    def one_grid(batch):
        batch["image_grid_thw"] = batch["image_grid_thw"][:1]
    report = diagnose_batch(image_batch(one_grid), 2)
    assert "2 image placeholder run(s) but only 1 image grid row(s)" in finding(report, "GRID_TOKEN_MISMATCH").message


def test_foreign_placeholder_id_is_token_id_mismatch():
    def llava(batch):
        ids = batch["input_ids"].clone()
        ids[ids == IMAGE_PAD] = 32000
        batch["input_ids"] = ids
    report = diagnose_batch(image_batch(ids_fix=llava), 2)
    cause = finding(report, "TOKEN_ID_MISMATCH")
    assert "id 32000" in cause.message and "LLaVA" in cause.message and "[32, 64]" in cause.message
    assert "--image-token-id 32000" in cause.hint
    assert confirmed(report) == ["TOKEN_ID_MISMATCH"]


def test_encoder_rows_short_by_one_item_is_embed_count_mismatch():
    # the demo's segment 3 holds image 2 of grid (1, 4, 4): 4 tokens (synth.DEMO_SEGMENTS)
    assert synth.DEMO_SEGMENTS[3][1] == ("image", (1, 4, 4))
    report = diagnose_batch(synth.demo_batch_dict(), 2, embeds=120)
    cause = finding(report, "EMBED_COUNT_MISMATCH")
    assert "124 - 120 = 4 = the tokens of image 2 (grid [1, 4, 4]) in segment 3" in cause.message
    assert cause.segment == 3 and report.observed["embeds"] == 120


def test_gathered_count_of_the_placeholders_with_fewer_rows_is_embed_count_mismatch():
    error = "ValueError: Packed CP ranks contain 124 vision tokens, but the vision encoder produced 120 embeddings."
    report = diagnose_batch(synth.demo_batch_dict(), 2, error_text=error)
    assert confirmed(report) == ["EMBED_COUNT_MISMATCH"]


def test_stacked_rows_are_batch_not_flat():
    packed = synth.build_batch([[("text", 40)], [("text", 40)], [("text", 40)]])
    packed["input_ids"] = packed["input_ids"].view(3, 40)
    report = diagnose_batch(packed, 2)
    cause = finding(report, "BATCH_NOT_FLAT")
    assert "shape [3, 40]" in cause.message and "120 = 3 x 40" in cause.message
    sized = diagnose_batch(packed, 2, error_text="Sizes of tensors must match except in dimension 1. Expected size 120 "
                           "but got size 40 for tensor number 1 in the list.")
    assert confirmed(sized) == ["BATCH_NOT_FLAT"] and "120 = cu_seqlens[-1] = 3 x 40" in sized.findings[0].message


def test_apply_kwarg_needs_only_the_text():
    report = diagnose_batch(synth.demo_batch_dict(), 2, error_text="TypeError: apply() takes no keyword arguments")
    assert confirmed(report) == ["APPLY_KWARG"] and "positionally" in report.findings[0].hint


# --------------------------------------------------------------------------- audit, report, API


def test_audit_of_a_consistent_batch_says_what_is_consistent():
    report = diagnose_batch(synth.demo_batch_dict(), 2)
    assert report.exit_code == 0 and report.ok
    lines = [f.message for f in report.findings if f.code == "CONSISTENT"]
    assert any(line.startswith("segments: all 4") for line in lines)
    assert any(line.startswith("vision spans: all 5") and "= 124" in line for line in lines)
    assert any("selection" in line and "31, 93" in line for line in lines)  # literal per-rank counts below
    full = synth.demo_batch_dict()
    ids, cu = full["input_ids"].reshape(-1).tolist(), full["cu_seqlens_padded"].tolist()
    mask = [i in (IMAGE_PAD, VIDEO_PAD) for i in ids]
    assert [sum(mask[g] for g in held) for held in literal.zigzag_indices(cu, 2)] == [31, 93]


def test_unrecognised_error_text_is_noted_and_the_batch_still_audited():
    report = diagnose_batch(synth.demo_batch_dict(), 2, error_text="CUDA out of memory")
    assert report.findings[0].code == "ERROR_NOT_RECOGNISED" and report.exit_code == 0
    assert any(f.code == "CONSISTENT" for f in report.findings)


def test_parsed_observation_is_accepted_as_is():
    observed = parse_error_text(scatter(12, 2))
    report = diagnose_batch(reference_vision_row(), 2, error_text=observed)
    assert confirmed(report) == ["PRESHARDED_ROWS_NOT_SELECTED"] and report.observed["tokens"] == 2


def test_callers_tensors_are_never_modified():
    batch = synth.demo_batch_dict()
    batch["input_ids"] = batch["input_ids"].view(2, 168)
    before = {k: v.clone() for k, v in batch.items()}
    diagnose_batch(batch, 2, error_text=scatter(124, 31))
    assert all(torch.equal(before[k], batch[k]) and before[k].shape == batch[k].shape for k in before)


def test_extra_checks_are_appended_and_their_problems_confirmed():
    def fake_mrope(batch, cp, *, layout, tokens):
        return [Finding("MROPE_MISMATCH", "error", f"checked {batch.row_tokens} tokens at cp={cp} ({layout})")]

    EXTRA_CHECKS.append(fake_mrope)
    try:
        report = diagnose_batch(synth.demo_batch_dict(), 2)
    finally:
        EXTRA_CHECKS.remove(fake_mrope)
    cause = finding(report, "MROPE_MISMATCH")
    assert cause.message == "checked 336 tokens at cp=2 (zigzag)" and report.exit_code == 1


def test_json_document_and_exit_codes_through_the_cli():
    result = runner.invoke(app, ["diagnose", str(EXAMPLES / "qwen3vl_packed.pt"), "--cp", "2", "--json",
                                 "--error", scatter(124, 93, rank=1)])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert set(doc) >= {"ok", "observed", "findings"} and doc["ok"] is False
    assert doc["observed"]["tokens"] == 93 and doc["observed"]["rows"] == 124 and doc["observed"]["rank"] == 1
    first = doc["findings"][0]
    assert set(first) == {"code", "status", "severity", "message", "rank", "segment", "chunk", "hint"}
    assert (first["code"], first["status"], first["rank"]) == ("PRESHARDED_ROWS_NOT_SELECTED", "confirmed", 1)
    clean = runner.invoke(app, ["diagnose", str(EXAMPLES / "qwen3vl_packed.pt"), "--cp", "2", "--json"])
    assert clean.exit_code == 0 and json.loads(clean.stdout)["ok"] is True


def test_view_shows_the_cause_its_place_and_the_fix():
    result = runner.invoke(app, ["diagnose", str(EXAMPLES / "presharded_cp2"), "--no-color", "--error",
                                 scatter(124, 93, rank=1)], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "✗ PRESHARDED_ROWS_NOT_SELECTED confirmed (rank 1)" in result.output
    assert "fix: select this rank's rows" in result.output
    assert "cause confirmed: PRESHARDED_ROWS_NOT_SELECTED" in result.output


def test_log_without_a_known_error_audits_and_says_so(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("step 1\nstep 2\n")
    result = runner.invoke(app, ["diagnose", str(EXAMPLES / "qwen3vl_packed.pt"), "--cp", "2", "--json",
                                 "--error-file", str(log)])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["findings"][0]["code"] == "ERROR_NOT_RECOGNISED"


def test_every_code_is_documented_in_the_readme_findings_table():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Findings"):readme.index("<!-- section: more findings -->")]
    for code in (*CAUSE_CODES, *INFO_CODES):
        assert f"| `{code}` |" in table, code


def test_diagnose_help_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, runpy; sys.argv=['cpinspect','diagnose','--help'];\n"
            "try:\n    runpy.run_module('cpinspect', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\nassert 'torch' not in sys.modules, 'torch imported'\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--error-file" in out.stdout and out.stdout.strip().endswith("ok")


# --------------------------------------------------------------------------- examples/broken


def _broken_generator():
    spec = importlib.util.spec_from_file_location("make_broken", EXAMPLES / "make_broken.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BROKEN = _broken_generator()


@pytest.mark.parametrize("name", sorted(BROKEN.example_files()))
def test_committed_broken_file_equals_generator_output(name):
    expected = BROKEN.example_files()[name]
    path = EXAMPLES / "broken" / name
    if isinstance(expected, str):
        assert path.read_text(encoding="utf-8") == expected
        return
    committed = torch.load(path, weights_only=True)
    assert sorted(committed) == sorted(expected)
    for key, value in expected.items():
        assert committed[key].dtype == value.dtype and torch.equal(committed[key], value), key


@pytest.mark.parametrize("case", sorted(BROKEN.CASES))
def test_each_broken_example_is_diagnosed_as_its_code_confirmed(case):
    directory = EXAMPLES / "broken" / case
    spec = json.loads((directory / "case.json").read_text())
    batch = directory / "batch.pt" if (directory / "batch.pt").exists() else directory
    result = runner.invoke(app, ["diagnose", str(batch), "--cp", str(spec["cp"]), "--error-file",
                                 str(directory / spec["error_file"]), *spec["args"], "--json"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    causes = [f["code"] for f in doc["findings"] if f["status"] == "confirmed"]
    assert causes == [spec["code"]], causes
    assert directory.name.startswith(spec["code"].lower())


def test_broken_examples_cover_every_cause_code():
    codes = {json.loads((EXAMPLES / "broken" / case / "case.json").read_text())["code"] for case in BROKEN.CASES}
    assert codes == set(CAUSE_CODES)


def test_slime_1379_reproduction_names_rank_1_and_both_counts():
    directory = EXAMPLES / "broken" / "presharded_rows_not_selected"
    result = runner.invoke(app, ["diagnose", str(directory), "--error-file", str(directory / "train.log"),
                                 "--model", "qwen2.5-vl", "--json"])
    doc = json.loads(result.stdout)
    assert doc["observed"]["rank"] == 1 and doc["observed"]["line_number"] == 6
    cause = doc["findings"][0]
    assert cause["rank"] == 1 and "rank 1 holds 2174 vision tokens" in cause["message"]
    assert "all 6175 embedding rows" in cause["message"]
    # 13 images of grid [1, 38, 50]: 13 * 38 * 50 / 4 = 6175 rows; rank 1 holds chunks 1 and 2 of each segment
    shards = [torch.load(directory / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert int((shards[0]["image_grid_thw"].prod(dim=1) // 4).sum()) == 13 * 38 * 50 // 4 == 6175
    assert [int((s["input_ids"] == IMAGE_PAD).sum()) for s in shards] == [4001, 2174]


def test_llamafactory_truncation_reproduction_names_the_cut_video():
    directory = EXAMPLES / "broken" / "truncated_vision_span"
    result = runner.invoke(app, ["diagnose", str(directory / "batch.pt"), "--cp", "1", "--model", "qwen2-vl",
                                 "--error-file", str(directory / "error.txt"), "--json"])
    cause = json.loads(result.stdout)["findings"][0]
    assert cause["code"] == "TRUNCATED_VISION_SPAN" and cause["segment"] == 0
    assert "video 0 (grid [4, 16, 16])" in cause["message"] and "139 = the video placeholder tokens" in cause["message"]
    ids = torch.load(directory / "batch.pt", weights_only=True)["input_ids"].reshape(-1)
    assert ids[20].item() == VISION_START and VISION_END not in ids[:160].tolist()



def test_an_extra_check_that_cannot_run_is_skipped_not_fatal():
    from cpinspect.core.errors import InputError

    def needs_every_rank(batch, cp, *, layout, tokens):
        raise InputError("needs every rank's file")

    EXTRA_CHECKS.append(needs_every_rank)
    try:
        report = diagnose_batch(EXAMPLES / "presharded_cp2" / "rank0.pt", 2)
    finally:
        EXTRA_CHECKS.remove(needs_every_rank)
    skipped = finding(report, "SKIPPED", "info")
    assert skipped.message == "needs_every_rank could not run on this input: needs every rank's file"


def test_presharded_rows_with_an_indivisible_segment_still_explain_the_scatter():
    full = synth.build_batch([[("text", 22), ("image", (1, 8, 8))], [("text", 18)]])
    ids, grid = full["input_ids"].reshape(-1), full["image_grid_thw"]
    cu = torch.tensor([0, 40, 58])  # 18 is not a multiple of 2 * cp = 4
    shards = [{"input_ids": ids[:29], "cu_seqlens": cu, "image_grid_thw": grid},
              {"input_ids": ids[29:], "cu_seqlens": cu, "image_grid_thw": grid}]
    held = [int((s["input_ids"] == IMAGE_PAD).sum()) for s in shards]
    assert held == [6, 10]  # the image (global 23-38) straddles the two local rows
    report = diagnose_batch(shards, 2, error_text=scatter(16, 10, rank=1))
    assert set(confirmed(report)) == {"SEGMENT_NOT_DIVISIBLE", "PRESHARDED_ROWS_NOT_SELECTED"}
    assert finding(report, "PRESHARDED_ROWS_NOT_SELECTED").rank == 1


def test_without_cp_a_count_mismatch_is_the_grids_not_the_selection():
    def bigger(batch):
        batch["image_grid_thw"] = torch.tensor([[1, 8, 16], [1, 16, 20]])
    batch = image_batch(bigger)
    report = diagnose_batch(batch, 1, error_text="ValueError: Image features and image tokens do not match: "
                            f"tokens: {32 + 64}, features {32 + 80}")
    assert confirmed(report) == ["GRID_TOKEN_MISMATCH"]


@pytest.mark.parametrize("seed, cp", [(seed, cp) for seed in range(6) for cp in (2, 3, 4)])
def test_rows_not_selected_is_found_on_random_batches(seed, cp):
    batch = synth.random_batch(seed, cp)
    ids, cu = batch["input_ids"].reshape(-1).tolist(), batch["cu_seqlens"].tolist()
    mask = [i in (IMAGE_PAD, VIDEO_PAD) for i in ids]
    held = [sum(mask[g] for g in rank) for rank in literal.zigzag_indices(cu, cp)]
    total = sum(mask)
    candidates = [r for r, count in enumerate(held) if count not in (total,)]
    if not candidates:
        pytest.skip("one rank holds every vision token")
    rank = candidates[-1]
    report = diagnose_batch(batch, cp, error_text=scatter(total, held[rank], rank=rank))
    assert confirmed(report) == ["PRESHARDED_ROWS_NOT_SELECTED"]
    assert finding(report, "PRESHARDED_ROWS_NOT_SELECTED").rank == rank


@pytest.mark.parametrize("name, code", [
    ("mrope_not_per_segment.pt", "MROPE_NOT_PER_SEGMENT"),
    ("mrope_wrong_slice", "MROPE_WRONG_SLICE"),
    ("mrope_mismatch.pt", "MROPE_MISMATCH"),
])
def test_diagnose_checks_the_batchs_own_position_ids(name, code):
    from cpinspect.diagnose.api import diagnose_batch

    report = diagnose_batch(Path(__file__).resolve().parents[2] / "examples" / "pipeline" / name, 2)
    confirmed = [f.code for f in report.findings if f.status == "confirmed"]
    assert confirmed == [code]
    assert report.exit_code == 1


def test_bracketed_text_in_error_messages_survives_rich_markup():
    from typer.testing import CliRunner

    from cpinspect.cli.app import app

    result = CliRunner().invoke(app, ["simulate", "--cp", "2", "--key", "[weird]", "--no-color"])
    assert result.exit_code == 2
    assert "'[weird]'" in result.output
