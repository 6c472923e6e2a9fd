"""cpinspect analyze: reassemble captured steps, the same findings as diagnose, captured rows vs oracle, gaps.

Captures are written by simulated ranks whose rows come from tests/literal.py (the definitions in
plain lists), so "right" and "wrong" are decided independently of cpinspect's selection.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cpinspect.cli.app import app
from cpinspect.core import synth
from cpinspect.groups.simulated import execute_spmd
from cpinspect.jobs import capture
from tests import literal

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


def step_batch(step: int) -> dict:
    return synth.demo_batch_dict() if step == 0 else synth.random_batch(step, 2, max_segments=5)


def rank_view(raw: dict, cp: int, rank: int) -> dict:
    """What rank ``rank`` holds, by the literal definition: local ids and mask, rows, global cu."""
    cu = raw.get("cu_seqlens_padded", raw["cu_seqlens"])
    ids = raw["input_ids"].reshape(-1).tolist()
    mask = [i in (151655, 151656) for i in ids]
    held = literal.zigzag_indices(cu.tolist(), cp)[rank]
    return {
        "input_ids": torch.tensor([ids[g] for g in held]).view(1, -1),
        "cu_seqlens": cu,
        "vision_mask": torch.tensor([mask[g] for g in held]),
        "vision_embed_count": int(raw["vision_embed_count"]) if "vision_embed_count" in raw else sum(mask),
        "selected_rows": torch.tensor(literal.expected_rows(mask, held), dtype=torch.long),
    }


def job(group, directory, steps, wrong=None, embeds=None):
    """Each simulated rank records ``steps``; ``wrong=(step, rank)`` rolls that rank's rows by one."""
    for step in steps:
        view = rank_view(step_batch(step), group.size(), group.rank())
        if wrong == (step, group.rank()):
            view["selected_rows"] = torch.roll(view["selected_rows"], 1)
        if embeds is not None:
            view["vision_embed_count"] = embeds
        capture.record(directory, step=step, cp_group=group, enabled=True, **view)


def write_capture(directory, steps=(0, 1, 2), cp=2, **kwargs):
    states, failure = execute_spmd(cp, job, directory, list(steps), **kwargs)
    assert failure is None, str(failure)
    return directory


@pytest.fixture(scope="module")
def clean_capture(tmp_path_factory):
    """One clean three-step capture, shared by the tests that only read it."""
    return write_capture(tmp_path_factory.mktemp("capture"))


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_clean_capture_is_consistent_at_every_step(clean_capture):
    directory = clean_capture
    result = run("analyze", directory, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["ok"] is True and doc["files"] == 6 and doc["missing"] == []
    assert [(s["step"], s["group_ranks"], s["present"], s["ok"]) for s in doc["steps"]] == [
        (0, [0, 1], [0, 1], True), (1, [0, 1], [0, 1], True), (2, [0, 1], [0, 1], True)]
    assert all(s["captured"] == [] and s["diagnosis"]["input"] == "presharded" for s in doc["steps"])
    text = run("analyze", directory, "--no-color")
    assert text.exit_code == 0
    assert "✓ OK: every captured step of every CP group is consistent (3 analyzed)" in text.output


def test_findings_and_exit_code_equal_diagnose_on_the_same_rank_files(tmp_path):
    write_capture(tmp_path / "capture", steps=(0,), embeds=100)
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    for rank in range(2):
        view = rank_view(step_batch(0), 2, rank)
        view["vision_embed_count"] = torch.tensor(100)
        del view["selected_rows"]
        torch.save(view, ranks / f"rank{rank}.pt")
    analyzed = run("analyze", tmp_path / "capture", "--json")
    diagnosed = run("diagnose", ranks, "--cp", 2, "--json")
    assert analyzed.exit_code == diagnosed.exit_code == 1
    step = json.loads(analyzed.output)["steps"][0]
    assert step["diagnosis"]["findings"] == json.loads(diagnosed.output)["findings"]
    assert "EMBED_COUNT_MISMATCH" in [f["code"] for f in step["diagnosis"]["findings"]]
    assert step["captured"] == []  # the rows themselves were right


def test_rows_captured_wrong_on_one_rank_are_named_with_segment_and_chunk(tmp_path):
    write_capture(tmp_path, steps=(0, 1), wrong=(0, 1))
    result = run("analyze", tmp_path, "--json")
    assert result.exit_code == 1
    steps = json.loads(result.output)["steps"]
    assert steps[1]["ok"] is True and steps[0]["ok"] is False
    assert steps[0]["diagnosis"]["ok"] is True  # the batch is fine: the job selected the wrong rows
    (finding,) = steps[0]["captured"]
    raw = step_batch(0)
    cu = raw["cu_seqlens_padded"].tolist()
    mask = [i in (151655, 151656) for i in raw["input_ids"].reshape(-1).tolist()]
    held = literal.zigzag_indices(cu, 2)[1]
    first = next(g for g in held if mask[g])  # rolled rows differ from the first vision token on
    segment = next(s for s in range(len(cu) - 1) if cu[s] <= first < cu[s + 1])
    chunk = (first - cu[segment]) // ((cu[segment + 1] - cu[segment]) // 4)
    assert (finding["code"], finding["rank"], finding["segment"], finding["chunk"]) == ("ROWS_MISMATCH", 1, segment,
                                                                                        chunk)
    assert finding["message"].startswith("captured at step 0: rank 1 (global rank 1) selected rows that differ from "
                                         "the oracle at 93 of its 93 vision tokens")
    text = run("analyze", tmp_path, "--no-color")
    assert "ROWS_MISMATCH captured at step 0: rank 1 (global rank 1)" in " ".join(text.output.split())


def another_group(path: Path, group_ranks: list[int]) -> None:
    """Copy a capture file as if a second CP group (other global ranks) had written it."""
    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata())
    cp_rank = int(meta["cp_rank"])
    meta.update(group_ranks=json.dumps(group_ranks), global_rank=str(group_ranks[cp_rank]))
    target = path.with_name(capture.file_name(int(meta["step"]), group_ranks[cp_rank]))
    save_file(load_file(path), str(target), metadata=meta)


def test_missing_ranks_and_steps_are_named(tmp_path):
    write_capture(tmp_path)
    for step in (0, 1):
        for rank in (0, 1):
            another_group(tmp_path / capture.file_name(step, rank), [2, 3])
    (tmp_path / capture.file_name(1, 1)).unlink()
    result = run("analyze", tmp_path, "--json")
    assert result.exit_code == 1
    doc = json.loads(result.output)
    assert [(s["step"], s["group_ranks"], s["missing"], s["ok"]) for s in doc["steps"]] == [
        (0, [0, 1], [], True), (0, [2, 3], [], True), (1, [0, 1], [1], False), (1, [2, 3], [], True),
        (2, [0, 1], [], True)]
    messages = [m["message"] for m in doc["missing"]]
    assert messages == [
        "step 1 of the CP group of global ranks [0, 1] is missing CP rank 1 (global rank 1); that step was not "
        "analyzed",
        "the CP group of global ranks [2, 3] has no file for step(s) 2, which other groups captured",
    ]
    assert all(m["code"] == "CAPTURE_INCOMPLETE" for m in doc["missing"])
    text = run("analyze", tmp_path, "--no-color")
    assert "✗ incomplete: no file from CP rank(s) 1; not analyzed" in text.output


def test_step_option_selects_steps(clean_capture):
    result = run("analyze", clean_capture, "--step", 2, "--json")
    assert result.exit_code == 0
    assert [s["step"] for s in json.loads(result.output)["steps"]] == [2]


def garbage_file(directory: Path) -> Path:
    (directory / capture.file_name(0, 0)).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    return directory


@pytest.mark.parametrize("make, text", [
    (lambda d: d, "holds no capture files"),
    (lambda d: d / "missing", "is not a directory"),
    (garbage_file, "is not a readable cpinspect capture"),
])
def test_bad_capture_directories_exit_2_with_one_paragraph(tmp_path, make, text):
    result = run("analyze", make(tmp_path), "--no-color")
    assert result.exit_code == 2, result.output
    assert text in result.output and "Traceback" not in result.output


def test_two_files_claiming_one_rank_exit_2(tmp_path):
    write_capture(tmp_path, steps=(0,))
    path = tmp_path / capture.file_name(0, 1)
    (tmp_path / capture.file_name(0, 7)).write_bytes(path.read_bytes())
    result = run("analyze", tmp_path, "--no-color")
    assert result.exit_code == 2
    assert "two files claim CP rank 1 of step 0" in result.output


def test_unknown_step_exit_2(clean_capture):
    result = run("analyze", clean_capture, "--step", 9, "--no-color")
    assert result.exit_code == 2 and "step(s) 9 are not in the capture" in result.output


def test_analyze_help_does_not_import_torch():
    code = ("import sys\nfrom cpinspect.cli.app import app\ntry:\n    app(['analyze', '--help'])\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().endswith("ok"), out.stderr


def test_ranks_that_captured_different_cu_seqlens_exit_2_naming_the_step_and_files(tmp_path):
    write_capture(tmp_path, steps=(0, 1))
    step1 = tmp_path / capture.file_name(1, 1)
    with safe_open(str(step1), framework="pt") as handle:
        meta = dict(handle.metadata())
    tensors = load_file(step1)
    tensors["cu_seqlens"] = tensors["cu_seqlens"].clone()
    tensors["cu_seqlens"][1] += 2 * 2
    save_file(tensors, str(step1), metadata=meta)
    result = run("analyze", tmp_path, "--no-color")
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "disagree on cu_seqlens" in text
    assert "step 1 of the CP group of global ranks [0, 1] (step000001-rank00000.safetensors, " \
           "step000001-rank00001.safetensors)" in text
