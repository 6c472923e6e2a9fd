"""The gloo backend: real processes and collectives, the same output as threads, divergence and no orphans.

Rank programs are module-level so spawned processes can import them by name. Each writes its pid
to a directory, so the tests can check that every rank process is gone when the call returns.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from cpinspect.cli.app import app
from cpinspect.groups.gloo import execute_gloo
from cpinspect.groups.simulated import execute_spmd
from tests import literal

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def note_pid(pid_dir: str, rank: int) -> None:
    Path(pid_dir, f"rank{rank}.pid").write_text(str(os.getpid()))


def returns_early_on_rank1(group, pid_dir):
    note_pid(pid_dir, group.rank())
    if group.rank() == 1:
        return None
    t = torch.zeros(2)
    dist.all_gather([torch.empty_like(t) for _ in range(group.size())], t, group=group)


def stuck_in_user_code(group, pid_dir, stuck_rank):
    note_pid(pid_dir, group.rank())
    if group.rank() == stuck_rank:
        time.sleep(600)
    t = torch.tensor([group.rank()])
    dist.all_gather([torch.empty_like(t) for _ in range(group.size())], t, group=group)


def killed_after_one_gather(group, pid_dir):
    note_pid(pid_dir, group.rank())
    t = torch.tensor([group.rank()])
    dist.all_gather([torch.empty_like(t) for _ in range(group.size())], t, group=group)
    if group.rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.all_gather([torch.empty_like(t) for _ in range(group.size())], t, group=group)


def gathers_ranks(group):
    t = torch.tensor([group.rank(), 10 * group.rank()])
    out = [torch.empty_like(t) for _ in range(group.size())]
    dist.all_gather(out, t, group=group)
    flat = torch.empty(2 * group.size(), dtype=torch.long)
    dist.all_gather_into_tensor(flat, t, group=group)
    total = torch.tensor([group.rank() + 1])
    dist.all_reduce(total, group=group)
    biggest = torch.tensor([group.rank()])
    dist.all_reduce(biggest, op=dist.ReduceOp.MAX, group=group)
    value = torch.tensor([100 + group.rank()])
    dist.broadcast(value, src=1, group=group)
    dist.barrier(group=group)
    return [x.tolist() for x in out], flat.tolist(), int(total), int(biggest), int(value)


def pids(pid_dir: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(pid_dir.glob("rank*.pid"))]


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (an exited child nobody reaped is not running code)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def child_processes() -> list[int]:
    """Live children of this process, except multiprocessing's resource tracker (shared, long-lived)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and b"resource_tracker" not in cmdline:
            found.append(int(stat.parent.name))
    return found


linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process checks read /proc")


@pytest.mark.parametrize("cp", [2, 4])
def test_simulate_json_is_identical_to_the_thread_backend_and_matches_the_literal_oracle(cp):
    args = ["simulate", "--cp", str(cp), str(EXAMPLES / "qwen3vl_packed.pt"), "--json"]
    gloo = runner.invoke(app, [*args, "--backend", "gloo"])
    threads = runner.invoke(app, args)
    assert gloo.exit_code == threads.exit_code == 0, gloo.output
    assert gloo.output == threads.output
    doc = json.loads(gloo.output)
    raw = torch.load(EXAMPLES / "qwen3vl_packed.pt", weights_only=True)
    ids = raw["input_ids"].reshape(-1).tolist()
    mask = [i in (151655, 151656) for i in ids]
    held = literal.zigzag_indices(raw["cu_seqlens_padded"].tolist(), cp)
    assert [r["selected_rows"] for r in doc["ranks"]] == [literal.expected_rows(mask, h) for h in held]


def test_simulate_text_view_is_identical_to_the_thread_backend():
    args = ["simulate", "--cp", "2", str(EXAMPLES / "presharded_cp2"), "--no-color"]
    gloo = runner.invoke(app, [*args, "--backend", "gloo"])
    threads = runner.invoke(app, args)
    assert gloo.exit_code == 0, gloo.output
    assert gloo.output == threads.output
    assert "✓ OK: all 2 rank(s)" in gloo.output
    assert "0-8, 57-75, 120-122" in gloo.output  # rank 0's rows, as in the README


def test_collectives_move_real_data_between_processes():
    states, failure = execute_gloo(2, gathers_ranks, timeout=20.0)
    assert failure is None
    assert [s.status for s in states] == ["returned"] * 2
    assert [s.value for s in states] == [([[0, 0], [1, 10]], [0, 0, 1, 10], 3, 1, 101)] * 2
    assert [[c.describe().split(" at ")[0] for c in s.calls] for s in states] == [[
        "all_gather([2] int64) #0", "all_gather_into_tensor([2] int64) #1", "all_reduce([1] int64, op=SUM) #2",
        "all_reduce([1] int64, op=MAX) #3", "broadcast([1] int64, src=1) #4", "barrier() #5"]] * 2


@linux_only
def test_rank_that_returns_early_is_reported_like_threads_at_once_and_no_process_is_left(tmp_path):
    before = set(child_processes())
    start = time.monotonic()
    states, failure = execute_gloo(2, returns_early_on_rank1, str(tmp_path), timeout=120.0)
    elapsed = time.monotonic() - start
    assert elapsed < 60.0  # found when rank 1 returned, not after the 120 s timeout
    assert failure is not None and failure.kind == "divergence"
    (tmp_path / "threads").mkdir()
    _, threaded = execute_spmd(2, returns_early_on_rank1, str(tmp_path / "threads"), timeout=5.0)
    assert str(failure) == str(threaded)
    assert "rank 0 entered all_gather([2] float32) #0 at tests/process/test_gloo.py:" in str(failure)
    assert "rank 1 returned after 0 collective(s)" in str(failure)
    assert [s.status for s in states] == ["waiting", "returned"]
    assert len(pids(tmp_path)) == 2
    assert not any(alive(pid) for pid in pids(tmp_path))
    assert set(child_processes()) <= before  # no new child of this process is left


@linux_only
def test_cp4_rank_stuck_outside_collectives_times_out_within_the_bound(tmp_path):
    before = set(child_processes())
    start = time.monotonic()
    states, failure = execute_gloo(4, stuck_in_user_code, str(tmp_path), 2, timeout=2.0)
    elapsed = time.monotonic() - start
    assert failure is not None and failure.kind == "timeout"
    assert "did not complete within 2 s" in str(failure)
    assert "rank 2 is still running outside any collective after 0 collective(s)" in str(failure)
    assert [s.status for s in states] == ["waiting", "waiting", "running", "waiting"]
    assert elapsed < 90.0  # start-up of 4 processes on a busy 2-core machine + 2 s, not the 600 s sleep
    assert len(pids(tmp_path)) == 4
    assert not any(alive(pid) for pid in pids(tmp_path))
    assert set(child_processes()) <= before  # no new child of this process is left


@linux_only
def test_a_rank_killed_by_sigkill_is_rank_died_not_a_divergence(tmp_path):
    from cpinspect.simulation.checks import spmd_finding

    before = set(child_processes())
    states, failure = execute_gloo(2, killed_after_one_gather, str(tmp_path), timeout=120.0)
    assert failure is not None and failure.kind == "died", str(failure)
    text = str(failure)
    assert text.startswith("rank 1 died: its process was killed by SIGKILL after 1 collective(s); its last "
                           "collective was all_gather([1] int64) #0 at tests/process/test_gloo.py:")
    assert ("Collective #1 can never complete: rank 0 entered all_gather([1] int64) #1 at "
            "tests/process/test_gloo.py:") in text
    assert "This is not a divergence" in text
    assert spmd_finding(failure).code == "RANK_DIED"
    assert states[1].status == "raised" and states[0].status in ("waiting", "raised")  # gloo may see the peer go
    assert not any(alive(pid) for pid in pids(tmp_path))
    assert set(child_processes()) <= before


WATCHDOG_SCRIPT = """
import sys
from cpinspect.groups.gloo import execute_gloo
from tests.process.test_gloo import stuck_in_user_code
if __name__ == "__main__":
    execute_gloo(2, stuck_in_user_code, sys.argv[1], 1, timeout=600.0)
"""


@linux_only
def test_rank_processes_exit_when_the_watchdog_process_is_killed(tmp_path):
    script = tmp_path / "watchdog.py"
    script.write_text(WATCHDOG_SCRIPT)
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    watchdog = subprocess.Popen([sys.executable, str(script), str(pid_dir)], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 120.0
        while len(pids(pid_dir)) < 2 and time.monotonic() < deadline and watchdog.poll() is None:
            time.sleep(0.2)
        assert len(pids(pid_dir)) == 2
    finally:
        watchdog.send_signal(signal.SIGKILL)
        watchdog.wait(10)
    deadline = time.monotonic() + 10.0
    while any(alive(pid) for pid in pids(pid_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids(pid_dir))


def test_a_function_that_cannot_be_pickled_is_refused_before_any_process_starts():
    with pytest.raises(TypeError, match="module-level function"):
        execute_gloo(2, lambda group: None)


def test_a_rank_that_cannot_start_is_reported_without_waiting_for_the_start_timeout(tmp_path, monkeypatch):
    module = tmp_path / "vanishing_program.py"
    module.write_text("def program(group):\n    return group.rank()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from vanishing_program import program  # importable here, gone by the time the ranks import it

    module.unlink()
    start = time.monotonic()
    states, failure = execute_gloo(2, program, timeout=5.0, start_timeout=300.0)
    assert time.monotonic() - start < 120.0
    assert failure is not None and failure.kind == "exception"
    assert str(failure).startswith("rank process(es) failed before the group was formed: rank ")
    assert "ModuleNotFoundError: No module named 'vanishing_program'" in str(failure)
