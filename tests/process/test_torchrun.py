"""examples/torchrun_capture.py under real torchrun: capture, in-job verify, and analyze on the result.

CI runs it on CPU with gloo; the NCCL variant runs only where two CUDA devices exist.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cpinspect.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "torchrun_capture.py"


def torchrun(out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLE),
               "--out", str(out), "--repeats", "5", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def check_run(out: Path, backend: str) -> None:
    """Files, in-job verify outcomes on both ranks, and the analysis of the capture."""
    names = sorted(p.name for p in out.glob("step*"))
    assert names == [f"step00000{s}-rank0000{r}.safetensors" for s in range(3) for r in range(2)]
    outcomes = [json.loads((out / f"verify-rank{r}.json").read_text()) for r in range(2)]
    for rank, steps in enumerate(outcomes):
        assert [s["ok"] for s in steps] == [True, True, False]
        assert steps[2]["codes"] == ["ROWS_MISMATCH"] and steps[2]["ranks"] == [1] and steps[2]["cp_rank"] == rank
    run = json.loads((out / "run.json").read_text())
    assert run["backend"] == backend and run["world_size"] == 2 and run["torch"] == torch.__version__
    demo, large = run["verify_cost"]["demo"], run["verify_cost"]["large"]
    assert (demo["segments"], demo["local_tokens"], large["segments"]) == (4, 168, 256)
    assert all(cost[name]["median_us"] > 0 for cost in (demo, large) for name in ("verify", "selection"))
    result = CliRunner().invoke(app, ["analyze", str(out), "--json"])
    assert result.exit_code == 1, result.output
    steps = json.loads(result.output)["steps"]
    assert [s["ok"] for s in steps] == [True, True, False]
    assert [(f["code"], f["rank"]) for f in steps[2]["captured"]] == [("ROWS_MISMATCH", 1)]


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="process checks read /proc")
def test_gloo_job_captures_verifies_on_every_rank_and_analyzes(tmp_path):
    out = tmp_path / "capture"
    done = torchrun(out, "--backend", "gloo", "--steps", "3", "--bug-step", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[rank 0] step 2: verify raised ['ROWS_MISMATCH'] (ranks [1])" in done.stdout
    assert "[rank 1] step 2: verify raised ['ROWS_MISMATCH'] (ranks [1])" in done.stdout
    check_run(out, "gloo")
    assert processes_mentioning(str(out)) == []


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_nccl_job_on_two_gpus(tmp_path):
    out = tmp_path / "capture"
    done = torchrun(out, "--backend", "nccl", "--steps", "3", "--bug-step", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    check_run(out, "nccl")
    run = json.loads((out / "run.json").read_text())
    assert run["gpu"] and run["nccl"]
