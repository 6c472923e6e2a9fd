"""examples/torchrun_hang.py under real torchrun with gloo, then ``analyze --flight-recorder`` on its dumps.

Each step of the example issues three collectives on its CP group, in this order: the count
all-gather (cpinspect.local_vision_rows), the vision rows' all-gather (forward of its autograd
Function) and the gradient all-reduce (its backward). So the collective rank 1 breaks at step ``s``
is number ``3 s + 1`` (skip: the count all-gather) or ``3 s + 2`` (shape, dtype: the rows' gather).
What each rank recorded is also matched with torch's own flight-recorder matcher (``Op.match``).
"""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from cpinspect.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "torchrun_hang.py"
BUG_STEP = 1


def start(out: Path, mismatch: str, bug_step: int = BUG_STEP) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLE),
               "--out", str(out), "--steps", "2", "--bug-step", str(bug_step), "--mismatch", mismatch,
               "--timeout", "8"]  # 3 s failed once at load 11 (a rank slow to start can miss a deadline)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(job: subprocess.Popen) -> str:
    try:
        output, _ = job.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        job.kill()
        output, _ = job.communicate()
        raise AssertionError(f"torchrun did not end: {output[-2000:]}") from None
    assert job.returncode == 0, output[-3000:]
    return output


def analyze(out: Path, exit_code: int = 1) -> dict:
    result = CliRunner().invoke(app, ["analyze", "--flight-recorder", str(out), "--json"])
    assert result.exit_code == exit_code, result.output
    return json.loads(result.output)


def raw_entry(out: Path, rank: int, group: str, seq: int) -> dict:
    dump = pickle.loads((out / f"fr_trace_rank_{rank}").read_bytes())
    return next(e for e in dump["entries"] if e["process_group"][0] == group and e["collective_seq_id"] == seq)


def test_a_skipped_count_all_gather_names_the_collective_and_the_missing_rank(tmp_path):
    finish(start(tmp_path, "skip"))
    report = analyze(tmp_path)
    first = report["divergences"][0]
    assert report["missing_ranks"] == [1] and len(report["divergences"]) == 1
    assert (first["kind"], first["seq"], first["global_ranks"]) == ("missing_ranks", 3 * BUG_STEP + 1, [0, 1])
    waiting = first["ranks"]["0"]
    assert waiting["op"] == "all_gather" and waiting["cp_site"]["site"] == "the count all-gather"
    assert waiting["call_site"].endswith("cpinspect/core/selection.py:" + str(gather_line()))
    assert "cpinspect check" in waiting["cp_site"]["finding"]
    ranks = {r["rank"]: r for r in report["ranks"]}
    assert ranks[1]["last_entered"]["seq"] == 3 * BUG_STEP
    assert ranks[1]["last_entered"]["cp_site"]["site"] == "the backward all-reduce"
    # torch's text for it: the entry rank 0 holds and rank 1 lacks
    assert raw_entry(tmp_path, 0, first["group"], first["seq"])["profiling_name"] == "gloo:all_gather"


def test_shape_and_dtype_mismatches_are_found_at_the_rows_all_gather_and_a_correct_job_has_none(tmp_path):
    from torch.distributed.flight_recorder.components.types import Op

    jobs = {kind: start(tmp_path / kind, kind) for kind in ("shape", "dtype")}  # concurrently: each waits on imports
    clean = start(tmp_path / "clean", "shape", bug_step=99)  # no step is the bug step: a correct job
    outputs = {kind: finish(job) for kind, job in jobs.items()}
    finish(clean)
    correct = analyze(tmp_path / "clean", exit_code=0)  # a correct job's dumps: no divergence, no missing rank
    assert correct["divergences"] == [] and correct["missing_ranks"] == []
    torch_kind = {"shape": "SIZE_OR_SYNTAX_MISMATCH", "dtype": "COLLECTIVE_DTYPE_MISMATCH"}
    for kind, out in ((k, tmp_path / k) for k in jobs):
        report = analyze(out)
        first = report["divergences"][0]
        assert report["missing_ranks"] == [], outputs[kind]
        assert (first["kind"], first["seq"], first["differing_ranks"]) == (kind, 3 * BUG_STEP + 2, [1])
        assert first["ranks"]["1"]["cp_site"]["site"] == "the vision-DP all-gather"
        assert "COLLECTIVE_DIVERGENCE" in first["ranks"]["1"]["cp_site"]["finding"]
        a, b = (raw_entry(out, r, first["group"], first["seq"]) for r in (0, 1))
        members = {"g": {0, 1}}
        assert Op(a, members, "g").match(Op(b, members, "g")).state.name == torch_kind[kind]
    assert first["ranks"]["0"]["input_dtypes"] == ["BFloat16"] and first["ranks"]["1"]["input_dtypes"] == ["Half"]


def gather_line() -> int:
    """The line of ``_ALL_GATHER_FLAT(...)`` in LocalCounts.gather_flat: where the count all-gather is issued."""
    lines = (ROOT / "cpinspect" / "core" / "selection.py").read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if "_ALL_GATHER_FLAT(gathered" in line)
