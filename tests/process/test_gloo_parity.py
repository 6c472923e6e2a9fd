"""gloo parity: every collective and point-to-point op gives the same results under ``execute_gloo`` (real
processes, real gloo transport) as under the simulated group, both equal to values computed by hand from
the rank numbers, with the same call records; and every divergence kind is reported in the same words.

Real processes are slow to start on a small machine, so one run per cp executes every op (each op is
then its own test, reading that run), and each divergence is one run.
"""

import time

import pytest
import torch
import torch.distributed as dist

from cpinspect.groups.gloo import execute_gloo
from cpinspect.groups.simulated import execute_spmd

HERE = "tests/process/test_gloo_parity.py:"


def every_op(group):
    """Each op of the simulated group once, with values that say who sent what."""
    r, cp = group.rank(), group.size()
    got = {}
    outs = [torch.empty(1, dtype=torch.long) for _ in range(cp)]
    dist.all_to_all(outs, [torch.tensor([10 * r + j]) for j in range(cp)], group=group)
    got["all_to_all"] = [int(o) for o in outs]
    even = torch.empty(2 * cp, dtype=torch.long)
    dist.all_to_all_single(even, torch.tensor([100 * r + j for j in range(cp) for _ in range(2)]), group=group)
    got["all_to_all_single_even"] = even.tolist()
    sends, receives = [r + j + 1 for j in range(cp)], [s + r + 1 for s in range(cp)]
    uneven = torch.full((sum(receives), 2), -1)
    dist.all_to_all_single(uneven, torch.tensor([[r, j] for j in range(cp) for _ in range(sends[j])]), receives, sends,
                           group=group)
    got["all_to_all_single_uneven"] = uneven.tolist()
    out = torch.empty(2, dtype=torch.long)
    dist.reduce_scatter(out, [torch.tensor([r * 10 + j, 1]) for j in range(cp)], group=group)
    got["reduce_scatter"] = out.tolist()
    single = torch.empty(3, dtype=torch.long)
    dist.reduce_scatter_tensor(single, torch.tensor([r * 10 + j for j in range(cp) for _ in range(3)]), group=group)
    biggest = torch.empty(3, dtype=torch.long)
    dist.reduce_scatter_tensor(biggest, torch.tensor([r * 10 + j for j in range(cp) for _ in range(3)]),
                               op=dist.ReduceOp.MAX, group=group)
    got["reduce_scatter_tensor"] = single.tolist(), biggest.tolist()
    root = cp - 1
    slots = [torch.empty(1, dtype=torch.long) for _ in range(cp)] if r == root else None
    dist.gather(torch.tensor([r * r]), slots, dst=root, group=group)
    got["gather"] = [int(s) for s in slots] if slots else None
    piece = torch.empty(1, dtype=torch.long)
    dist.scatter(piece, [torch.tensor([7 * j]) for j in range(cp)] if r == root else None, src=root, group=group)
    got["scatter"] = int(piece)
    total = torch.tensor([r + 1])
    dist.reduce(total, dst=root, group=group)
    got["reduce"] = int(total) if r == root else None  # torch leaves the other ranks' buffers unspecified (gloo
    # overwrites them, the simulated group does not)
    objects = [None] * cp
    dist.all_gather_object(objects, {"rank": r, "name": "x" * r}, group=group)
    got["all_gather_object"] = objects
    box = [("from", r)]
    dist.broadcast_object_list(box, src=0, group=group)
    got["broadcast_object_list"] = box
    got["send_recv"] = _tagged_send_recv(group)
    value, ring = torch.tensor([r * 10, r]), torch.empty(2, dtype=torch.long)
    works = [dist.isend(value, (r + 1) % cp, group=group), dist.irecv(ring, (r - 1) % cp, group=group)]
    for work in works:
        work.wait()
    got["isend_irecv"] = ring.tolist()
    rotated = torch.tensor([float(r)])
    for _ in range(2):
        incoming = torch.empty(1)
        ops = [dist.P2POp(dist.isend, rotated, (r + 1) % cp, group=group),
               dist.P2POp(dist.irecv, incoming, (r - 1) % cp, group=group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        rotated = incoming
    got["batch_isend_irecv"] = float(rotated)
    got["async_op"] = _async_ops(group)
    return got


def _tagged_send_recv(group):
    """Rank 0 sends two tensors to rank 1 with tags 7 and 8; rank 1 receives them in the other order."""
    if group.rank() == 0:
        dist.send(torch.tensor([1]), 1, group=group, tag=7)
        dist.send(torch.tensor([2]), 1, group=group, tag=8)
        return None
    if group.rank() != 1:
        return None
    a, b = torch.empty(1, dtype=torch.long), torch.empty(1, dtype=torch.long)
    second = dist.irecv(b, 0, group=group, tag=8)
    dist.recv(a, 0, group=group, tag=7)
    second.wait()
    return int(a), int(b)


def _async_ops(group):
    r, cp = group.rank(), group.size()
    t = torch.tensor([r + 1])
    works = [dist.all_reduce(t, group=group, async_op=True)]
    out = torch.empty(cp, dtype=torch.long)
    works.append(dist.all_gather_into_tensor(out, torch.tensor([r]), group=group, async_op=True))
    single = torch.empty(1, dtype=torch.long)
    works.append(dist.reduce_scatter_tensor(single, torch.ones(cp, dtype=torch.long), group=group, async_op=True))
    a2a = torch.empty(cp, dtype=torch.long)
    works.append(dist.all_to_all_single(a2a, torch.full((cp,), r), group=group, async_op=True))
    return [bool(w.wait()) for w in works], int(t), out.tolist(), int(single), a2a.tolist()


def by_hand(cp):
    """What ``every_op`` returns on each rank, computed from the definitions of the ops."""
    root = cp - 1
    ranks = []
    for j in range(cp):
        ranks.append({
            "all_to_all": [10 * s + j for s in range(cp)],
            "all_to_all_single_even": [100 * s + j for s in range(cp) for _ in range(2)],
            "all_to_all_single_uneven": [[s, j] for s in range(cp) for _ in range(s + j + 1)],
            "reduce_scatter": [sum(s * 10 + j for s in range(cp)), cp],
            "reduce_scatter_tensor": ([sum(s * 10 + j for s in range(cp))] * 3, [(cp - 1) * 10 + j] * 3),
            "gather": [s * s for s in range(cp)] if j == root else None,
            "scatter": 7 * j,
            "reduce": cp * (cp + 1) // 2 if j == root else None,
            "all_gather_object": [{"rank": s, "name": "x" * s} for s in range(cp)],
            "broadcast_object_list": [("from", 0)],
            "send_recv": (1, 2) if j == 1 else None,
            "isend_irecv": [((j - 1) % cp) * 10, (j - 1) % cp],
            "batch_isend_irecv": float((j - 2) % cp),
            "async_op": ([True] * 4, cp * (cp + 1) // 2, list(range(cp)), cp, list(range(cp))),
        })
    return ranks


OPS = list(by_hand(2)[0])
_runs: dict[int, tuple] = {}


def both_backends(cp):
    """(gloo states, simulated states) of ``every_op`` at ``cp``; run once per cp for all the op tests."""
    if cp not in _runs:
        gloo, gloo_failure = execute_gloo(cp, every_op, timeout=60.0)
        threads, thread_failure = execute_spmd(cp, every_op, timeout=60.0)
        assert gloo_failure is None, str(gloo_failure)
        assert thread_failure is None, str(thread_failure)
        _runs[cp] = gloo, threads
    return _runs[cp]


@pytest.mark.parametrize("cp", [2, 3])
@pytest.mark.parametrize("op", OPS)
def test_every_op_gives_the_same_values_under_gloo_as_simulated_and_as_computed_by_hand(op, cp):
    gloo, threads = both_backends(cp)
    expected = [rank[op] for rank in by_hand(cp)]
    assert [s.value[op] for s in threads] == expected
    assert [s.value[op] for s in gloo] == expected


@pytest.mark.parametrize("cp", [2, 3])
def test_both_backends_record_the_same_collectives_with_the_same_call_sites(cp):
    gloo, threads = both_backends(cp)
    assert [[c.describe() for c in s.calls] for s in gloo] == [[c.describe() for c in s.calls] for s in threads]
    ops = {c.op for c in gloo[0].calls}
    assert ops >= {"all_to_all", "all_to_all_single", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter",
                   "reduce", "all_gather", "broadcast", "all_reduce", "all_gather_into_tensor"}
    splits = ", ".join(str(j + 1) for j in range(cp))  # rank 0 sends j + 1 rows to rank j
    assert gloo[0].calls[2].describe().startswith(f"all_to_all_single([{sum(range(1, cp + 1))}, 2] int64, "
                                                  f"in_splits=[{splits}]")


# --- divergences: one program each, the same words under both backends --------------------------------------
# (a dtype mismatch takes the path of a shape mismatch, in collectives and point-to-point alike: the simulated
# tests cover it, and it costs no process run here)


def split_disagreement(group):
    receives = [1, 3] if group.rank() == 1 else [2, 2]  # rank 1 expects 1 row from rank 0, which sends it 2
    dist.all_to_all_single(torch.zeros(4), torch.zeros(4), receives, [2, 2], group=group)


def reduce_scatter_shapes(group):
    n = 2 + group.rank()
    dist.reduce_scatter_tensor(torch.empty(n), torch.zeros(2 * n), group=group)


def gather_roots(group):
    dist.gather(torch.zeros(1), [torch.empty(1) for _ in range(group.size())], dst=group.rank(), group=group)


def send_without_receive(group):
    if group.rank() == 0:
        dist.send(torch.zeros(3), 1, group=group)


def mismatched_sizes(group):
    if group.rank() == 0:
        dist.send(torch.zeros(4), 1, group=group)
    else:
        dist.recv(torch.zeros(3), 0, group=group)


def blocking_ring(group):
    r, cp = group.rank(), group.size()
    dist.send(torch.tensor([r]), (r + 1) % cp, group=group)
    dist.recv(torch.empty(1, dtype=torch.long), (r - 1) % cp, group=group)


DIVERGENCES = {
    "all-to-all splits": (split_disagreement, 2, "divergence", [
        "all_to_all_single #0 could not move data: rank 0 sends 2 row(s) to rank 1, which expects 1 from it"]),
    "shape": (reduce_scatter_shapes, 2, "divergence", [
        f"rank 0 called reduce_scatter_tensor([2] float32, [4] float32, op=SUM) #0 at {HERE}",
        f"rank 1 called reduce_scatter_tensor([3] float32, [6] float32, op=SUM) #0 at {HERE}"]),
    "root": (gather_roots, 2, "divergence", ["gather([1] float32, dst=0)", "gather([1] float32, dst=1)"]),
    "missing receive": (send_without_receive, 2, "divergence", [
        f"rank 0 is blocked in send to rank 1 (tag 0, [3] float32) at {HERE}",
        "which can never complete: rank 1 returned after 0 collective(s)"]),
    "p2p sizes": (mismatched_sizes, 2, "divergence", [
        f"point-to-point mismatch: rank 0 sends [4] float32 to rank 1 (tag 0) at {HERE}",
        f"but rank 1 receives [3] float32 from rank 0 at {HERE}"]),
    "blocking ring": (blocking_ring, 3, "timeout", [
        *(f"rank {r} is blocked in send to rank {(r + 1) % 3} (tag 0, [1] int64) at {HERE}" for r in range(3)),
        "Every rank is blocked in a blocking send and none has posted its receive"]),
}


def _parts(text):
    """A message's clauses, order aside (ranks arrive at the watchdog in any order)."""
    return sorted(text.replace(": ", "; ").replace(". ", "; ").split("; "))


@pytest.mark.usefixtures("no_rank_thread_left")
@pytest.mark.parametrize("kind", list(DIVERGENCES))
def test_each_divergence_is_reported_in_the_same_words_under_gloo_within_the_timeout(kind):
    program, cp, expected_kind, fragments = DIVERGENCES[kind]
    timeout = 1.0 if expected_kind == "timeout" else 60.0
    start = time.monotonic()
    _, gloo = execute_gloo(cp, program, timeout=timeout)
    assert time.monotonic() - start < 40.0  # found when visible (or 1 s after the last progress), not at 60 s
    _, threads = execute_spmd(cp, program, timeout=timeout)
    assert gloo is not None and threads is not None
    assert gloo.kind == threads.kind == expected_kind, str(gloo)
    for fragment in fragments:
        assert fragment in str(gloo), str(gloo)
    if expected_kind == "timeout":  # the unmatched list follows posting order, which differs between backends
        assert _parts(str(gloo)) == _parts(str(threads))
    else:
        assert str(gloo) == str(threads)
