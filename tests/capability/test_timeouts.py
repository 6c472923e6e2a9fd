"""The collective timeout is progress-based (issue 19.2), invalid timeouts and thread limits are
refused with exit 2 (19.6), and call sites skip torch's wrappers (19.7).

Every rank that is kept waiting here waits on an Event the test sets afterwards, and every test
checks that no rank thread is left behind.
"""

import math
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from cpinspect.cli.app import app
from cpinspect.core.errors import InputError
from cpinspect.groups import callsite
from cpinspect.groups import coordinator as coordinator_module
from cpinspect.groups.simulated import execute_spmd, run_spmd
from cpinspect.simulation.checks import spmd_finding

runner = CliRunner()
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "qwen3vl_packed.pt"


def rank_threads():
    return [t for t in threading.enumerate() if t.name.startswith("cpinspect-rank")]


@pytest.fixture(autouse=True)
def no_thread_left_behind():
    yield
    deadline = time.monotonic() + 30.0
    while rank_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rank_threads() == []


def test_cp64_compute_longer_than_the_timeout_before_each_collective_passes():
    """Each rank computes 1.5 s (> the 1 s timeout) before each of 3 collectives; no wait is that long."""
    def program(group):
        total = torch.tensor([group.rank()])
        for _ in range(3):
            time.sleep(1.5)
            dist.all_reduce(total, group=group)
            dist.barrier(group=group)
        return int(total)

    start = time.monotonic()
    values = run_spmd(64, program, timeout=1.0)
    assert time.monotonic() - start > 4.5  # the run took longer than the timeout many times over
    # after k all-reduces every rank holds sum(range(64)) * 64**(k-1)
    assert values == [sum(range(64)) * 64 ** 2] * 64


def test_ranks_arriving_one_by_one_reset_the_wait():
    """Rank r arrives 1 s after rank r-1: the first rank waits 5 s in all, but never 2 s without progress."""
    def staggered(group):
        time.sleep(1.0 * group.rank())
        dist.barrier(group=group)
        return group.rank()

    assert run_spmd(6, staggered, timeout=2.0) == list(range(6))


def test_a_rank_computing_past_the_timeout_while_others_wait_is_called_slow_not_diverged():
    release = threading.Event()

    def rank1_computes(group):
        if group.rank() == 1:
            release.wait(60.0)  # "compute" far longer than the timeout
        dist.barrier(group=group)

    start = time.monotonic()
    states, failure = execute_spmd(3, rank1_computes, timeout=0.5)
    elapsed = time.monotonic() - start
    release.set()
    assert elapsed < 20.0
    assert failure is not None and failure.kind == "timeout"
    assert failure.slow_ranks == [1]
    assert "barrier() #0" in str(failure) and "did not complete within 0.5 s of its latest arrival" in str(failure)
    assert "rank 1 is still running outside any collective after 0 collective(s)" in str(failure)
    assert "rank(s) 1 were still computing, so they are slow or stuck in their own code, not diverged" in str(failure)
    assert [s.status for s in states] == ["raised", "running", "raised"]
    assert spmd_finding(failure).code == "COLLECTIVE_TIMEOUT"


def test_ranks_stuck_in_their_own_code_with_nothing_pending_are_reported_after_the_stall_limit(monkeypatch):
    monkeypatch.setattr(coordinator_module, "STALL_MIN_S", 0.5)
    monkeypatch.setattr(coordinator_module, "STALL_FACTOR", 1.0)
    release = threading.Event()

    def rank0_stuck(group):
        if group.rank() == 0:
            release.wait(60.0)

    start = time.monotonic()
    states, failure = execute_spmd(2, rank0_stuck, timeout=0.2)
    elapsed = time.monotonic() - start
    release.set()
    assert elapsed < 20.0
    assert failure is not None and failure.kind == "timeout" and failure.slow_ranks == [0]
    assert str(failure) == ("ranks did not finish: no collective was pending and nothing progressed for 0.5 s: "
                            "rank 0 is still running outside any collective after 0 collective(s). These ranks are "
                            "stuck (or very slow) in their own code, not diverged")
    assert [s.status for s in states] == ["running", "returned"]


def test_a_real_divergence_is_still_a_divergence():
    def rank1_skips(group):
        if group.rank() != 1:
            dist.barrier(group=group)

    _, failure = execute_spmd(2, rank1_skips, timeout=30.0)
    assert failure is not None and failure.kind == "divergence"
    assert spmd_finding(failure).code == "COLLECTIVE_DIVERGENCE"


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, "soon"])
def test_a_timeout_that_is_not_a_positive_number_is_refused(bad):
    with pytest.raises(InputError) as info:
        execute_spmd(2, lambda group: None, timeout=bad)
    assert "Where: --timeout." in str(info.value)


@pytest.mark.parametrize("command", ["simulate", "diagnose"])
@pytest.mark.parametrize("bad", ["0", "-1", "nan"])
def test_cli_timeout_zero_negative_or_nan_exits_2(command, bad):
    result = runner.invoke(app, [command, "--cp", "2", "--timeout", bad, "--no-color", str(EXAMPLE)])
    assert result.exit_code == 2, result.output
    assert "--timeout" in result.output and "positive number of seconds" in result.output
    assert "\x1b[" not in result.output and "Traceback" not in result.output


def test_a_thread_that_cannot_be_started_is_a_clean_input_error(monkeypatch):
    real_start = threading.Thread.start
    started = []

    def limited_start(self):
        if self.name.startswith("cpinspect-rank") and len(started) >= 5:
            raise RuntimeError("can't start new thread")
        started.append(self)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", limited_start)

    def program(group):
        dist.barrier(group=group)

    with pytest.raises(InputError) as info:
        execute_spmd(16, program, timeout=30.0)
    text = str(info.value)
    assert text.startswith("the simulated group needs one thread per rank, but the system refused to start "
                           "thread 6 of 16 (can't start new thread).")
    assert "Where: --cp 16." in text and "ulimit -u" in text
    assert not any(t.is_alive() for t in started)  # the 5 started ranks were aborted out of their barrier


def test_cli_thread_limit_exits_2_with_the_paragraph(monkeypatch):
    real_start = threading.Thread.start

    def refuse(self):
        if self.name.startswith("cpinspect-rank") and self.name != "cpinspect-rank0":
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", refuse)
    result = runner.invoke(app, ["simulate", "--cp", "4", "--no-color"])
    assert result.exit_code == 2, result.output
    assert "refused to start thread 2 of 4" in result.output


def test_all_gather_into_tensor_divergence_points_at_the_users_line():
    def program(group):
        t = torch.zeros(group.rank() + 1)
        out = torch.empty(2 * (group.rank() + 1))
        dist.all_gather_into_tensor(out, t, group=group); return 0  # noqa: E702 - the line the report names

    with pytest.raises(Exception) as info:
        run_spmd(2, program, timeout=30.0)
    line = next(i for i, text in enumerate(open(__file__).read().splitlines(), 1)
                if "the line the report names" in text)
    text = str(info.value)
    assert f"all_gather_into_tensor([1] float32) #0 at tests/capability/test_timeouts.py:{line}" in text
    assert f"all_gather_into_tensor([2] float32) #0 at tests/capability/test_timeouts.py:{line}" in text
    assert "typing_extensions" not in text and "c10d_logger" not in text


def test_the_frame_finder_skips_torch_its_wrappers_and_the_standard_library():
    import contextlib
    import functools
    import warnings

    import torch.distributed.c10d_logger as c10d_logger
    import typing_extensions

    for module in (torch, c10d_logger, typing_extensions, functools, contextlib, warnings):
        assert not callsite.is_user_path(module.__file__), module.__name__
    assert callsite.is_user_path(__file__)
    assert not callsite.is_user_path("<frozen importlib._bootstrap>")


def test_cp512_on_a_valid_batch_passes_with_the_default_timeout():
    from cpinspect.core import synth
    from cpinspect.core.loading import load_batch
    from cpinspect.simulation import run as simulation

    raw = synth.random_batch(512, 512, max_segments=2, max_chunk=1)
    result = simulation.simulate(load_batch(raw), 512)  # the default timeout
    assert result.spmd_error is None
    assert result.ok, result.findings


@pytest.mark.parametrize("bad", ["0", "-1", "nan"])
def test_check_timeout_zero_negative_or_nan_exits_2(bad):
    impl = Path(__file__).resolve().parents[2] / "examples" / "impls" / "correct.py"
    result = runner.invoke(app, ["check", f"{impl}:select_rows", "--cp", "2", "--cases", "1", "--timeout", bad,
                                 "--no-color"])
    assert result.exit_code == 2, result.output
    assert "Where: --timeout." in result.output and "positive number of seconds" in result.output
