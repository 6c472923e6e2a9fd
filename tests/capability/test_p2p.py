"""Point-to-point in the simulated group: data checked by hand at cp 1-8, and each way it goes wrong
named within the timeout with every rank's state and file:line. No rank thread is left behind."""

import time

import pytest
import torch
import torch.distributed as dist

from cpinspect.groups.simulated import execute_spmd, run_spmd

CPS = [2, 3, 5, 8]
HERE = "tests/capability/test_p2p.py:"


pytestmark = pytest.mark.usefixtures("no_rank_thread_left")  # tests/conftest.py


@pytest.mark.parametrize("cp", CPS)
def test_ring_with_isend_irecv_passes_each_rank_its_left_neighbours_value(cp):
    def ring(group):
        r = group.rank()
        out = torch.tensor([r * 10, r])
        got = torch.empty(2, dtype=torch.long)
        works = [dist.isend(out, (r + 1) % cp, group=group), dist.irecv(got, (r - 1) % cp, group=group)]
        for work in works:
            work.wait()
        return got.tolist()

    assert run_spmd(cp, ring, timeout=60.0) == [[((r - 1) % cp) * 10, (r - 1) % cp] for r in range(cp)]


@pytest.mark.parametrize("cp", CPS)
def test_batch_isend_irecv_rotates_twice(cp):
    def rotate(group):
        r = group.rank()
        value = torch.tensor([float(r)])
        for _ in range(2):
            got = torch.empty(1)
            ops = [dist.P2POp(dist.isend, value, (r + 1) % cp, group=group),
                   dist.P2POp(dist.irecv, got, (r - 1) % cp, group=group)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            value = got
        return float(value)

    assert run_spmd(cp, rotate, timeout=60.0) == [float((r - 2) % cp) for r in range(cp)]


def test_blocking_send_and_recv_with_tags_match_by_tag_not_order():
    def program(group):
        if group.rank() == 0:
            dist.send(torch.tensor([1]), 1, group=group, tag=7)
            dist.send(torch.tensor([2]), 1, group=group, tag=8)
            return None
        a, b = torch.empty(1, dtype=torch.long), torch.empty(1, dtype=torch.long)
        second = dist.irecv(b, 0, group=group, tag=8)
        dist.recv(a, 0, group=group, tag=7)
        second.wait()
        return int(a), int(b)

    assert run_spmd(2, program, timeout=60.0) == [None, (1, 2)]


def test_a_send_without_a_receive_is_named_when_the_receiver_returns():
    def program(group):
        if group.rank() == 0:
            dist.send(torch.zeros(3), 1, group=group)

    start = time.monotonic()
    _, failure = execute_spmd(2, program, timeout=60.0)
    assert time.monotonic() - start < 30.0  # at once, not after the timeout
    assert failure is not None and failure.kind == "divergence"
    assert str(failure).startswith(f"rank 0 is blocked in send to rank 1 (tag 0, [3] float32) at {HERE}")
    assert "which can never complete: rank 1 returned after 0 collective(s)" in str(failure)


def test_mismatched_sizes_name_both_ranks_and_sites():
    def program(group):
        if group.rank() == 0:
            dist.send(torch.zeros(4), 1, group=group)
        else:
            dist.recv(torch.zeros(3), 0, group=group)

    _, failure = execute_spmd(2, program, timeout=60.0)
    assert failure is not None and failure.kind == "divergence"
    text = str(failure)
    assert text.startswith("point-to-point mismatch: rank 0 sends [4] float32 to rank 1 (tag 0) at " + HERE)
    assert "but rank 1 receives [3] float32 from rank 0 at " + HERE in text


def test_mismatched_dtypes_are_a_divergence():
    def program(group):
        if group.rank() == 0:
            dist.send(torch.zeros(2, dtype=torch.int64), 1, group=group)
        else:
            dist.recv(torch.zeros(2), 0, group=group)

    _, failure = execute_spmd(2, program, timeout=60.0)
    assert failure is not None and "sends [2] int64" in str(failure) and "receives [2] float32" in str(failure)


@pytest.mark.parametrize("cp", [2, 4])
def test_a_ring_where_every_rank_blocks_in_send_first_is_named_within_the_timeout(cp):
    def deadlock(group):
        r = group.rank()
        dist.send(torch.tensor([r]), (r + 1) % cp, group=group)
        dist.recv(torch.empty(1, dtype=torch.long), (r - 1) % cp, group=group)

    start = time.monotonic()
    states, failure = execute_spmd(cp, deadlock, timeout=0.5)
    assert time.monotonic() - start < 20.0
    assert failure is not None and failure.kind == "timeout"
    text = str(failure)
    for r in range(cp):
        assert f"rank {r} is blocked in send to rank {(r + 1) % cp} (tag 0, [1] int64) at {HERE}" in text
    assert "Every rank is blocked in a blocking send and none has posted its receive" in text
    assert failure.slow_ranks == []
    assert all(s.status == "raised" for s in states)


def test_a_recv_from_a_rank_waiting_in_a_collective_names_both():
    def program(group):
        if group.rank() == 0:
            dist.recv(torch.empty(1), 1, group=group)
        dist.barrier(group=group)

    _, failure = execute_spmd(2, program, timeout=0.5)
    assert failure is not None and failure.kind == "timeout"
    text = str(failure)
    assert "rank 0 is blocked in recv from rank 1 (tag 0, [1] float32)" in text
    assert "barrier() #0" in text
