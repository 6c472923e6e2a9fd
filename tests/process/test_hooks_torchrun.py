"""capture_hf under real torchrun with gloo: every rank's file holds its zigzag share, and analyze reads them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cpinspect.cli.app import app
from cpinspect.jobs import capture
from tests import literal

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "torchrun_capture_hf.py"
IMG, VS, VE = 151655, 151652, 151653


def test_capture_hf_records_every_rank_under_torchrun_gloo_and_analyze_names_the_wrong_rows(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLE),
               "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    ids = [1000, 1001, VS] + [IMG] * 4 + [VE] + [1002] * 4 + [VS] + [IMG] * 8 + [VE] + [1003] * 3
    ids += [1004] * ((-len(ids)) % 8)
    mask = [t == IMG for t in ids]
    for rank, held in enumerate(literal.zigzag_indices([0, len(ids)], 2)):
        got = capture.read(tmp_path / capture.file_name(0, rank))
        assert got.tensors["input_ids"].reshape(-1).tolist() == [ids[g] for g in held]
        assert got.tensors["vision_mask"].tolist() == [mask[g] for g in held]
        assert got.metadata["backend"] == "gloo" and int(got.metadata["cp_size"]) == 2
    result = CliRunner().invoke(app, ["analyze", str(tmp_path), "--json"])
    doc = json.loads(result.stdout)
    assert result.exit_code == 1 and doc["ok"] is False  # HF's first-rows scatter is wrong on rank 1 at cp 2
    captured = [f for step in doc["steps"] for f in step["captured"]]
    assert captured and all(f["rank"] == 1 for f in captured)
