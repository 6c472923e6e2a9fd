"""Issue 19.1: every "✓" line of `cpinspect diagnose` is an equality that holds, never a printed pair.

The numbers each line states are re-read from the line and compared here; what the batch holds is
counted directly from its tensors (ids == placeholder id, grids' t·h·w/4), never by cpinspect.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cpinspect.cli.app import app
from cpinspect.core import synth
from cpinspect.core.tokens import IMAGE_PAD, VIDEO_PAD
from cpinspect.diagnose.api import diagnose_batch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "qwen3vl_packed.pt"
runner = CliRunner()


def _example() -> dict:
    return torch.load(EXAMPLE, weights_only=True)


def _ids_mask(batch: dict) -> torch.Tensor:
    ids = batch["input_ids"]
    return (ids == IMAGE_PAD) | (ids == VIDEO_PAD)


def _with_mask(extra_marked: int | None, drop_count: bool = False) -> dict:
    """The bundled example with an explicit vision_mask: ``extra_marked`` text tokens marked too (None: all)."""
    batch = _example()
    mask = _ids_mask(batch)
    if extra_marked is None:
        mask = torch.ones_like(mask)
    else:
        text = torch.nonzero(~mask.view(-1)).view(-1)[:extra_marked]
        mask.view(-1)[text] = True
    batch["vision_mask"] = mask
    if drop_count:
        batch.pop("vision_embed_count")
    return batch


EQUALITIES = [
    (re.compile(r"embedding rows: (\d+) = the (\d+) placeholders"), lambda a, b: a == b),
    (re.compile(r"= (\d+) = the (\d+) placeholder ids"), lambda a, b: a == b),
]
PRODUCT = re.compile(r"cu_seqlens ends at (\d+) = (\d+) x (\d+)")


def assert_every_check_mark_holds(report) -> None:
    for finding in report.findings:
        if finding.code != "CONSISTENT":
            continue
        for pattern, holds in EQUALITIES:
            for a, b in pattern.findall(finding.message):
                assert holds(int(a), int(b)), finding.message
        for total, cp, n in PRODUCT.findall(finding.message):
            assert int(total) == int(cp) * int(n), finding.message


def test_the_issue_batch_129_marked_against_124_rows_is_a_confirmed_mismatch():
    batch = _with_mask(5)
    assert int(batch["vision_mask"].sum()) == 129 and int(batch["vision_embed_count"]) == 124
    report = diagnose_batch(batch, 2)
    assert report.exit_code == 1
    cause = next(f for f in report.findings if f.code == "EMBED_COUNT_MISMATCH")
    assert cause.status == "confirmed"
    assert "marks 129 tokens" in cause.message and "hold 124" in cause.message
    # the first marked token that is not a placeholder, counted directly
    first = int(torch.nonzero(batch["vision_mask"].view(-1) & ~_ids_mask(batch).view(-1))[0])
    assert f"first at global token {first}" in cause.message
    assert not any("124 = the 129" in f.message for f in report.findings)
    assert_every_check_mark_holds(report)


def test_an_all_true_mask_is_a_confirmed_mismatch_through_the_cli(tmp_path):
    path = tmp_path / "all_true.pt"
    torch.save(_with_mask(None), path)
    result = runner.invoke(app, ["diagnose", str(path), "--cp", "2"])
    assert result.exit_code == 1, result.output
    assert "nothing wrong found" not in result.output
    assert "124 = the 336" not in result.output and "marks 336 tokens" in result.output


def test_without_vision_embed_count_the_grids_are_the_rows_and_the_mask_still_disagrees():
    report = diagnose_batch(_with_mask(5, drop_count=True), 2)
    assert report.exit_code == 1
    assert "EMBED_COUNT_MISMATCH" in [f.code for f in report.causes]


def test_diagnose_and_simulate_agree_on_the_mask_batch(tmp_path):
    path = tmp_path / "mask129.pt"
    torch.save(_with_mask(5), path)
    simulated = runner.invoke(app, ["simulate", str(path), "--cp", "2", "--json"])
    diagnosed = runner.invoke(app, ["diagnose", str(path), "--cp", "2", "--json"])
    assert simulated.exit_code == diagnosed.exit_code == 1
    assert "EMBED_COUNT_MISMATCH" in {f["code"] for f in json.loads(simulated.stdout)["findings"]}
    assert "EMBED_COUNT_MISMATCH" in {f["code"] for f in json.loads(diagnosed.stdout)["findings"]}


def test_embeds_that_differ_from_the_placeholders_never_print_an_equality():
    batch = _example()
    report = diagnose_batch(batch, 2, embeds=120)
    assert report.exit_code == 1
    assert not any(f.code == "CONSISTENT" and f.message.startswith("embedding rows") for f in report.findings)


def test_the_correct_example_still_passes_and_its_check_marks_hold():
    batch = _example()
    report = diagnose_batch(batch, 2)
    assert report.exit_code == 0
    held = int(_ids_mask(batch).sum())
    assert any(f.message == f"embedding rows: {held} = the {held} placeholders" for f in report.findings)
    assert_every_check_mark_holds(report)


@pytest.mark.parametrize("layout", ["zigzag", "sequence-zigzag", "contiguous", "head-tail", "per-document-head-tail"])
def test_the_split_line_names_what_was_split(layout):
    """Class 9: sequence-zigzag cuts the row, not every segment: never claim segments split evenly."""
    segments = [[("text", 5), ("image", (1, 4, 4)), ("text", 3)], [("text", 7)]]  # lengths 14 and 7
    batch = synth.build_batch(segments)
    cu = batch["cu_seqlens"].tolist()
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    total = cu[-1]
    pad = -total % 4
    if pad:  # pad the last segment so that the row (not every segment) divides 2·cp = 4
        batch = synth.build_batch(segments, [lengths[0], lengths[1] + pad])
        total += pad
    report = diagnose_batch(batch, 2, layout=layout)
    lines = [f.message for f in report.findings if f.code == "CONSISTENT"]
    if layout in ("zigzag", "per-document-head-tail"):  # both cut every segment into 2·cp chunks
        assert not any("equal pieces" in line for line in lines)  # 14 + 10: segments do not divide 4
        assert report.exit_code == 1
        (bad,) = [f for f in report.causes if f.code == "SEGMENT_NOT_DIVISIBLE"]
        assert bad.message.startswith("segment 0 has physical length 14, which 2·cp = 4 does not divide")
    else:
        pieces = {"sequence-zigzag": 4, "head-tail": 4, "contiguous": 2}[layout]  # head-tail: 2·cp row chunks
        assert f"row: the {total} tokens split into {pieces} equal pieces of {total // pieces}" in "\n".join(lines)
        assert not any(line.startswith("segments: all") for line in lines)


def test_presharded_rows_whose_spans_break_under_every_layout_never_claim_they_reassemble():
    full = torch.load(ROOT / "examples" / "broken" / "grid_token_mismatch" / "batch.pt", weights_only=True)
    report = diagnose_batch(synth.shard_batch(full, 2), 2)
    assert "GRID_TOKEN_MISMATCH" in [f.code for f in report.causes]
    assert not any(f.message.startswith("layout: the rank files reassemble") for f in report.findings)
    intact = diagnose_batch(synth.shard_batch(_example(), 2), 2)
    assert any(f.message.startswith("layout: the rank files reassemble") for f in intact.findings)
    assert_every_check_mark_holds(intact)


def test_a_text_only_batch_says_it_has_no_vision_spans_instead_of_all_zero_match():
    report = diagnose_batch(synth.build_batch([[("text", 8)], [("text", 12)]]), 2)
    lines = [f.message for f in report.findings if f.code == "CONSISTENT"]
    assert "vision spans: none: no vision placeholder in the row and no grid row in the batch (text only)" in lines
    assert not any(line.startswith("vision spans: all 0") for line in lines)


def _class8_forms():
    from tests.unit.test_errortext_forms import FORMS

    return [text for text, _, _ in FORMS]


@pytest.mark.parametrize("text", _class8_forms())
def test_a_recognised_error_on_a_batch_that_does_not_show_it_is_never_nothing_wrong(text):
    """Issue 14 acceptance: every class-8 text on the correct example exits 1 and never prints a ✓ verdict."""
    result = runner.invoke(app, ["diagnose", str(EXAMPLE), "--cp", "2", "--error", text, "--no-color"])
    assert result.exit_code == 1, result.output
    assert "nothing wrong found" not in result.output
    doc = json.loads(runner.invoke(app, ["diagnose", str(EXAMPLE), "--cp", "2", "--error", text, "--json"]).stdout)
    codes = {f["code"]: f for f in doc["findings"]}
    assert not doc["ok"] and "ERROR_NOT_RECOGNISED" not in codes
    said = [f for code, f in codes.items() if code in ("ERROR_RECOGNISED", "UNEXPLAINED")]
    assert said or any(f["status"] == "confirmed" for f in doc["findings"])
    assert all(f["hint"] for f in said)  # what input (file, key, command) would show the cause
