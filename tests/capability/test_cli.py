"""Every simulate/info path through typer's runner, exit codes, and a torch-free --help."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cpinspect.cli.app import app

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
runner = CliRunner()


def run(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def test_simulate_example_file_is_consistent():
    result = run("simulate", "--cp", 2, EXAMPLES / "qwen3vl_packed.pt", "--no-color")
    assert result.exit_code == 0, result.output
    assert "336 in 4 segment(s)" in result.output
    assert "124 tokens (3 image(s), 1 video(s))" in result.output
    assert "✓ OK: all 2 rank(s)" in result.output
    assert "0-8, 57-75, 120-122" in result.output  # rank 0's selected rows


def test_simulate_without_file_uses_demo_and_says_so():
    result = run("simulate", "--cp", 4, "--no-color")
    assert result.exit_code == 0, result.output
    assert "built-in demo batch" in result.output


def test_simulate_presharded_directory():
    result = run("simulate", "--cp", 2, EXAMPLES / "presharded_cp2", "--no-color")
    assert result.exit_code == 0, result.output
    assert "pre-sharded" in result.output


def test_json_for_one_rank_is_one_complete_object():
    result = run("simulate", "--cp", 2, EXAMPLES / "qwen3vl_packed.safetensors", "--rank", 1, "--json")
    assert result.exit_code == 0
    doc = json.loads(result.output)
    assert set(doc) >= {"cp", "layout", "input", "tokens", "segments", "vision_tokens", "gathered_counts", "ranks",
                        "ok", "findings"}
    assert doc["cp"] == 2 and doc["input"] == "full" and doc["ok"] is True
    assert [r["rank"] for r in doc["ranks"]] == [1]
    rank1 = doc["ranks"][0]
    assert rank1["selected_rows"] == rank1["expected_rows"]
    assert len(rank1["global_indices"]) == 168
    assert doc["gathered_counts"] == [[9, 24, 24, 7], [0, 0, 0, 0], [12, 24, 20, 0], [3, 1, 0, 0]]


def test_inconsistent_batch_exits_1(tmp_path):
    import torch

    from cpinspect.core import synth

    raw = synth.demo_batch_dict()
    raw["vision_embed_count"] = torch.tensor(100)
    torch.save(raw, tmp_path / "b.pt")
    result = run("simulate", "--cp", 2, tmp_path / "b.pt", "--no-color")
    assert result.exit_code == 1
    assert "EMBED_COUNT_MISMATCH" in result.output


def test_text_only_batch_says_no_rank_selects_a_row(tmp_path):
    import torch

    ids = torch.arange(1000, 1016).view(1, -1)  # no placeholder id among them
    torch.save({"input_ids": ids, "cu_seqlens": torch.tensor([0, 8, 16], dtype=torch.int32)}, tmp_path / "t.pt")
    result = run("simulate", "--cp", 2, tmp_path / "t.pt", "--no-color")
    assert result.exit_code == 0, result.output
    assert "0..-1" not in result.output
    assert "the batch has no vision tokens, so no rank selects any row" in " ".join(result.output.split())


@pytest.mark.parametrize("args, text", [
    (["simulate", "--cp", 5, EXAMPLES / "qwen3vl_packed.pt"], "not divisible by 2*cp = 10"),
    (["simulate", "--cp", 2, EXAMPLES / "presharded_cp2" / "rank0.pt"], "simulating needs all 2 ranks"),
    (["simulate", "--cp", 4, EXAMPLES / "presharded_cp2"],
     "pre-sharded for cp=2 (cu_seqlens ends at 336 = 2 x 168 local tokens), but --cp 4 was given"),
    (["simulate", "--cp", 2, "missing.pt"], "does not exist"),
    (["simulate", "--cp", 2, "--layout", "diagonal"], "unknown layout"),
    (["simulate", "--cp", 2, "--model", "llava"], "unknown model preset"),
    (["simulate", "--cp", 2, "--key", "input_ids"], "not of the form field=name"),
])
def test_bad_input_exits_2_with_one_paragraph_and_no_traceback(args, text):
    result = run(*args, "--no-color")
    assert result.exit_code == 2, result.output
    assert text in result.output
    assert "Traceback" not in result.output
    assert "Fix:" in result.output


def test_pad_makes_odd_cp_work():
    result = run("simulate", "--cp", 5, EXAMPLES / "qwen3vl_packed.pt", "--pad", "--no-color")
    assert result.exit_code == 0, result.output
    assert "SEGMENTS_PADDED" in result.output


@pytest.mark.parametrize("layout", ["sequence-zigzag", "contiguous"])
def test_other_layouts_run(layout):
    result = run("simulate", "--cp", 2, EXAMPLES / "qwen3vl_packed.pt", "--layout", layout, "--json")
    assert result.exit_code == 0
    assert json.loads(result.output)["layout"] == layout


def test_no_color_and_NO_COLOR_drop_escape_codes():
    colored = run("simulate", "--cp", 2, env={"FORCE_COLOR": "1"})
    plain = run("simulate", "--cp", 2, env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert "\x1b[" in colored.output
    assert "\x1b[" not in plain.output


def test_full_prints_every_run():
    short = run("simulate", "--cp", 8, "--no-color")
    assert "more runs" not in short.output or True
    full = run("simulate", "--cp", 8, "--full", "--no-color")
    assert "more runs" not in full.output


def test_info_reports_keys_segments_and_form():
    result = run("info", EXAMPLES / "presharded_cp2" / "rank0.pt", "--cp", 2, "--no-color")
    assert result.exit_code == 0, result.output
    assert "cu_seqlens_padded" in result.output
    assert "pre-sharded local row for cp=2" in result.output
    assert "for cp=2: presharded" in result.output
    doc = json.loads(run("info", EXAMPLES / "qwen3vl_packed.pt", "--json").output)
    assert doc["segments"] == 4 and doc["segment_lengths"] == [96, 48, 144, 48]
    assert doc["image_tokens"] + doc["video_tokens"] == 124 and doc["looks_like"] == "full row"


def test_info_names_a_missing_grid_key_instead_of_none(tmp_path):
    """Issue 14 class 9: an image-only batch (no video_grid_thw key) printed "None video(s)"."""
    import torch

    batch = torch.load(EXAMPLES / "qwen3vl_packed.pt", weights_only=True)
    del batch["video_grid_thw"]
    torch.save(batch, tmp_path / "images_only.pt")
    result = run("info", tmp_path / "images_only.pt", "--no-color")
    line = next(line for line in result.output.splitlines() if line.startswith("vision tokens:"))
    assert line.endswith("grids: 3 image(s), no video_grid_thw") and "None" not in line


def test_module_entry_point_and_help_do_not_import_torch():
    code = ("import sys, runpy; sys.argv=['cpinspect','--help'];\n"
            "try:\n    runpy.run_module('cpinspect', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\nassert 'torch' not in sys.modules, 'torch imported'\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert "simulate" in out.stdout and out.stdout.strip().endswith("ok")


def test_help_importtime_has_no_torch():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "cpinspect", "simulate", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "typer" in imported
    assert not any(name == "torch" or name.startswith("torch.") for name in imported)
