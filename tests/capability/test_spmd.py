"""The simulated process group: real torch.distributed calls, divergence caught, never a hang."""

import time

import pytest
import torch
import torch.distributed as dist

from cpinspect.groups.simulated import SpmdError, execute_spmd, run_spmd


def test_unmodified_collectives_move_real_data():
    def program(group):
        r = group.rank()
        t = torch.tensor([r, 10 * r])
        out = [torch.empty_like(t) for _ in range(group.size())]
        dist.all_gather(out, t, group=group)
        stacked = torch.empty(group.size(), 2, dtype=torch.long)
        dist.all_gather_into_tensor(stacked, t, group=group)
        total = torch.tensor([r + 1])
        dist.all_reduce(total, group=group)
        biggest = torch.tensor([r])
        dist.all_reduce(biggest, op=dist.ReduceOp.MAX, group=group)
        value = torch.tensor([100 + r])
        dist.broadcast(value, src=2, group=group)
        dist.barrier(group=group)
        return [x.tolist() for x in out], stacked.tolist(), int(total), int(biggest), int(value)

    results = run_spmd(3, program)
    for out, stacked, total, biggest, value in results:
        assert out == [[0, 0], [1, 10], [2, 20]]
        assert stacked == [[0, 0], [1, 10], [2, 20]]
        assert (total, biggest, value) == (6, 2, 102)


def test_rank_that_skips_the_all_gather_is_reported_not_waited_on():
    def early_return(group):
        if group.rank() == 1:
            return None
        t = torch.zeros(2)
        dist.all_gather([torch.empty_like(t) for _ in range(group.size())], t, group=group)

    start = time.monotonic()
    with pytest.raises(SpmdError) as info:
        run_spmd(2, early_return, timeout=5.0)
    assert time.monotonic() - start < 2.0
    message = str(info.value)
    assert info.value.kind == "divergence"
    assert "rank 0 entered all_gather([2] float32) #0 at tests/capability/test_spmd.py:" in message
    assert "rank 1 returned after 0 collective(s)" in message


def test_different_shapes_name_both_ranks_and_call_sites():
    def uneven(group):
        t = torch.zeros(group.rank() + 2)
        dist.all_gather([torch.empty_like(t) for _ in range(group.size())], t, group=group)

    pattern = r"rank 0 called all_gather\(\[2\] float32\).*rank 1 called all_gather\(\[3\] float32\)"
    with pytest.raises(SpmdError, match=pattern):
        run_spmd(2, uneven)


def test_different_ops_are_divergence():
    def mixed(group):
        t = torch.zeros(1)
        if group.rank() == 0:
            dist.all_reduce(t, group=group)
        else:
            dist.broadcast(t, src=0, group=group)

    with pytest.raises(SpmdError, match="ranks called different collectives at position #0"):
        run_spmd(2, mixed)


def test_slow_rank_times_out_within_the_deadline():
    def slow(group):
        if group.rank() == 1:
            time.sleep(8.0)
        dist.barrier(group=group)

    start = time.monotonic()
    with pytest.raises(SpmdError) as info:
        run_spmd(2, slow, timeout=0.3)
    assert info.value.kind == "timeout"
    assert "did not complete within 0.3 s" in str(info.value)
    assert "rank 1 is still running outside any collective" in str(info.value)
    assert time.monotonic() - start < 5.0  # the deadline plus grace, not the 8 s sleep


def test_exception_on_some_ranks_says_the_others_would_hang():
    def fails_on_rank0(group):
        if group.rank() == 0:
            raise ValueError("bad local mask")
        return group.rank()

    states, failure = execute_spmd(3, fails_on_rank0)
    assert failure is not None and failure.kind == "exception"
    assert "only rank(s) 0 of 3 raised" in str(failure)
    assert [s.status for s in states] == ["raised", "returned", "returned"]


def test_cp64_completes_without_deadlock():
    def program(group):
        t = torch.tensor([group.rank()])
        out = [torch.empty_like(t) for _ in range(group.size())]
        for _ in range(3):
            dist.all_gather(out, t, group=group)
        return sum(int(x) for x in out)

    start = time.monotonic()
    assert run_spmd(64, program) == [sum(range(64))] * 64
    assert time.monotonic() - start < 10.0


def test_collective_log_records_each_call():
    def program(group):
        t = torch.zeros(2, 2, dtype=torch.long)
        dist.all_gather([torch.empty_like(t) for _ in range(group.size())], t, group=group)
        dist.barrier(group=group)

    states, failure = execute_spmd(2, program)
    assert failure is None
    assert [c.op for c in states[0].calls] == ["all_gather", "barrier"]
    assert states[1].calls[0].shapes == ((2, 2),) and states[1].calls[0].dtypes == ("int64",)


def test_uneven_all_gather_with_agreeing_buffers_is_allowed():
    sizes = [2, 0, 3]

    def program(group):
        t = torch.full((sizes[group.rank()],), float(group.rank()))
        out = [torch.empty(n) for n in sizes]
        dist.all_gather(out, t, group=group)
        return [x.tolist() for x in out]

    assert run_spmd(3, program) == [[[0.0, 0.0], [], [2.0, 2.0, 2.0]]] * 3


def test_uneven_all_gather_with_disagreeing_buffers_is_divergence():
    def program(group):
        expected = [2, 3] if group.rank() == 0 else [2, 2]
        t = torch.zeros(expected[group.rank()])
        dist.all_gather([torch.empty(n) for n in expected], t, group=group)

    with pytest.raises(SpmdError, match="ranks called different collectives"):
        run_spmd(2, program)


def test_exception_message_gives_the_scope_then_each_raised_rank():
    def fails_on_rank0(group):
        if group.rank() == 0:
            raise ValueError("bad local mask")
        return group.rank()

    def fails_everywhere(group):
        raise ValueError(f"rank {group.rank()}")

    some = f"tests/capability/test_spmd.py:{fails_on_rank0.__code__.co_firstlineno + 2}"
    every = f"tests/capability/test_spmd.py:{fails_everywhere.__code__.co_firstlineno + 1}"
    assert str(execute_spmd(2, fails_on_rank0)[1]) == (
        "only rank(s) 0 of 2 raised: in a real job the others would hang at their next collective: "
        f"rank 0 raised ValueError: bad local mask at {some} after 0 collective(s)")
    assert str(execute_spmd(2, fails_everywhere)[1]) == (
        f"all ranks raised: rank 0 raised ValueError: rank 0 at {every} after 0 collective(s); "
        f"rank 1 raised ValueError: rank 1 at {every} after 0 collective(s)")


def test_a_rank_slow_in_its_own_code_with_no_collective_pending_is_not_a_failure():
    def sleeps_on_rank1(group):
        if group.rank() == 1:
            time.sleep(1.5)  # no collective is pending: nobody waits for it, so the timeout does not apply
        return group.rank()

    states, failure = execute_spmd(2, sleeps_on_rank1, timeout=0.3)
    assert failure is None
    assert [s.value for s in states] == [0, 1]
