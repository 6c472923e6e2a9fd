"""Meshes and subgroups under gloo: a DP x CP mesh (world 4 = dp 2 x cp 2) gives the same results on real
gloo processes as in the simulated world, both equal to values computed by hand from the rank numbers, and a
divergence inside one CP group is reported in the same words, naming the group and its global ranks.

One run per backend for the results and one for the divergence: 4 processes start in 7 s or more here.
"""

import time

import pytest
import torch
import torch.distributed as dist

from cpinspect.groups.coordinator import CollectiveCall
from cpinspect.groups.mesh import execute_mesh
from cpinspect.groups.watchdog import Watchdog

DIMS = {"dp": 2, "cp": 2}  # row-major: CP groups [0, 1] and [2, 3], DP groups [0, 2] and [1, 3]
HERE = "tests/process/test_gloo_mesh.py:"


def dp_cp_step(mesh):
    """A CP all-gather of each rank's shard inside its CP group, an all-reduce of the result across DP, a ring
    inside the CP group by global ranks, and two ``dist.new_group`` groups made by every rank, Megatron style."""
    cp_group, dp_group = mesh.group("cp"), mesh.group("dp")
    shard = torch.tensor([10 * mesh.rank + k for k in range(3)])
    pieces = [torch.empty(3, dtype=torch.long) for _ in range(dist.get_world_size(cp_group))]
    dist.all_gather(pieces, shard, group=cp_group)
    flat = torch.empty(3 * dist.get_world_size(cp_group), dtype=torch.long)
    dist.all_gather_into_tensor(flat, shard, group=cp_group)
    summed = flat.clone()
    dist.all_reduce(summed, group=dp_group)
    me, size = dist.get_rank(cp_group), dist.get_world_size(cp_group)
    incoming = torch.empty(1, dtype=torch.long)
    works = [dist.isend(torch.tensor([mesh.rank]), dist.get_global_rank(cp_group, (me + 1) % size), group=cp_group),
             dist.irecv(incoming, dist.get_global_rank(cp_group, (me - 1) % size), group=cp_group)]
    for work in works:
        work.wait()
    crossed = None
    for ranks in ([0, 3], [1, 2]):
        group = dist.new_group(ranks)
        if mesh.rank in ranks:
            crossed = torch.tensor([mesh.rank + 1])
            dist.all_reduce(crossed, op=dist.ReduceOp.MAX, group=group)
            crossed = (int(crossed), dist.get_rank(group), dist.get_global_rank(group, 0))
    return {"ranks": (dist.get_rank(), dist.get_world_size(), me, size, dist.get_global_rank(cp_group, 0),
                      dist.get_rank(dp_group), dist.get_global_rank(dp_group, 1)),
            "cp_all_gather": [p.tolist() for p in pieces], "cp_all_gather_into_tensor": flat.tolist(),
            "dp_all_reduce": summed.tolist(), "cp_ring": int(incoming), "new_group": crossed}


def by_hand(g):
    """What ``dp_cp_step`` returns on global rank ``g``, from the mesh's definition (rank = 2 * dp + cp)."""
    dp, cp = divmod(g, 2)
    cp_block, dp_block = [2 * dp, 2 * dp + 1], [cp, 2 + cp]
    shards = [[10 * m + k for k in range(3)] for m in cp_block]
    summed = [sum(10 * (2 * d + c) + k for d in range(2)) for c in range(2) for k in range(3)]
    partner = {0: 3, 3: 0, 1: 2, 2: 1}[g]
    return {"ranks": (g, 4, cp, 2, cp_block[0], dp, dp_block[1]), "cp_all_gather": shards,
            "cp_all_gather_into_tensor": shards[0] + shards[1], "dp_all_reduce": summed,
            "cp_ring": cp_block[1 - cp], "new_group": (max(g, partner) + 1, int(g > partner), min(g, partner))}


def one_cp_rank_diverges(mesh):
    """Global rank 3 (CP rank 1 of CP group [2, 3]) calls an all-reduce where its CP peer all-gathers."""
    cp_group = mesh.group("cp")
    if mesh.rank == 3:
        dist.all_reduce(torch.zeros(2), group=cp_group)
    else:
        dist.all_gather_into_tensor(torch.empty(2), torch.zeros(1), group=cp_group)
    dist.all_reduce(torch.zeros(1), group=mesh.group("dp"))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch renames all_gather_into_tensor
def test_a_dp_x_cp_mesh_gives_the_hand_computed_results_under_gloo_and_simulated():
    for backend in ("gloo", "threads"):
        states, failure = execute_mesh(DIMS, dp_cp_step, timeout=60.0, backend=backend)
        assert failure is None, f"{backend}: {failure}"
        for g, state in enumerate(states):
            assert state.value == by_hand(g), f"{backend}, global rank {g}"


@pytest.mark.usefixtures("no_rank_thread_left")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_divergence_in_one_cp_group_is_reported_in_the_same_words_under_gloo():
    start = time.monotonic()
    _, gloo = execute_mesh(DIMS, one_cp_rank_diverges, timeout=120.0, backend="gloo")
    assert time.monotonic() - start < 100.0  # found when rank 3 arrives, not at the 120 s timeout (start-up included)
    _, threads = execute_mesh(DIMS, one_cp_rank_diverges, timeout=60.0)
    assert gloo is not None and threads is not None
    assert gloo.kind == threads.kind == "divergence"
    line = one_cp_rank_diverges.__code__.co_firstlineno
    assert str(gloo) == (
        "in group cp[2, 3] (its ranks 0..1 are global ranks [2, 3]): ranks called different collectives at "
        f"position #0: rank 0 called all_gather_into_tensor([1] float32) #0 at {HERE}{line + 6}; "
        f"rank 1 called all_reduce([2] float32, op=SUM) #0 at {HERE}{line + 4}")
    assert str(threads) == str(gloo)


def test_a_rank_process_that_dies_while_its_cp_peer_waits_is_named_in_the_cp_group():
    """The watchdog alone (no processes: their events fed by hand): global rank 3 dies while global rank 2
    waits in their CP group's all-reduce; the report names the group, its global ranks and the signal."""
    watchdog = Watchdog(4, timeout=60.0)
    words = []
    watchdog.reply = lambda rank, word: words.append((rank, word))
    watchdog.add_group(("mesh", "cp", (2, 3)), [2, 3], "cp[2, 3]")
    call = CollectiveCall(0, "all_reduce", ((1,),), ("float32",), "op=SUM", "train.py:7")
    for rank in (0, 1):
        watchdog.finish(rank, value=None)
    group, member = watchdog.member(("mesh", "cp", (2, 3)), 2)
    group.enter(member, call)
    assert words == [] and watchdog.failure is None  # rank 3 has not arrived: nobody is released
    watchdog.died(3, -9)
    assert watchdog.failure is not None and watchdog.failure.kind == "died"
    assert str(watchdog.failure) == (
        "in group cp[2, 3] (its ranks 0..1 are global ranks [2, 3]): rank 1 died: its process was killed by SIGKILL "
        "after 0 collective(s). Collective #0 can never complete: rank 0 entered all_reduce([1] float32, op=SUM) #0 "
        "at train.py:7. This is not a divergence: the process ended (out of memory, a signal from outside, or a "
        "crash in native code)")


def test_the_watchdog_releases_a_subgroups_members_by_their_global_ranks():
    watchdog = Watchdog(4, timeout=60.0)
    words = []
    watchdog.reply = lambda rank, word: words.append((rank, word))
    watchdog.add_group("dp", [1, 3], "dp[1, 3]")
    call = CollectiveCall(0, "barrier", (), (), "", "train.py:9")
    for rank in (3, 1):
        group, member = watchdog.member("dp", rank)
        group.enter(member, call)
    assert sorted(words) == [(1, b"go"), (3, b"go")]
    assert watchdog.failure is None and [s.status for s in watchdog.states] == ["running"] * 4


def skips_a_new_group(mesh):
    """Global rank 1 skips the new_group every other rank makes, then all meet in a world all-reduce."""
    if mesh.rank != 1:
        dist.new_group([0, 2])
    dist.all_reduce(torch.zeros(1), group=mesh.world)


@pytest.mark.usefixtures("no_rank_thread_left")
def test_a_skipped_new_group_is_named_under_gloo_as_in_the_simulated_world():
    """Under gloo the others used to block in new_group's barrier until the stall limit (92 s at timeout 3)."""
    start = time.monotonic()
    _, gloo = execute_mesh({"cp": 4}, skips_a_new_group, timeout=60.0, backend="gloo")
    assert time.monotonic() - start < 50.0  # when rank 1 arrives elsewhere, not at a timeout (start-up included)
    _, threads = execute_mesh({"cp": 4}, skips_a_new_group, timeout=60.0)
    line = skips_a_new_group.__code__.co_firstlineno
    for failure in (gloo, threads):
        assert failure is not None and failure.kind == "divergence"
        assert f"rank 1 called all_reduce([1] float32, op=SUM) #0 at {HERE}{line + 4}" in str(failure)
        assert f"called new_group(ranks=[0, 2]) #0 at {HERE}{line + 3}" in str(failure)
