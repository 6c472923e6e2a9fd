"""Subgroups and meshes in the simulated world: DP x CP and TP x CP layouts checked against the
rank arithmetic written out by hand, torch's rank queries inside the ranks, and failures that
name the group and its global ranks. No rank thread is left behind."""

import time

import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from cpinspect.groups.mesh import execute_mesh, mesh_ranks, run_mesh
from cpinspect.groups.simulated import run_spmd

TORCH_GET_RANK = c10d.get_rank


pytestmark = pytest.mark.usefixtures("no_rank_thread_left")  # tests/conftest.py


def test_mesh_ranks_are_row_major_like_init_device_mesh():
    assert mesh_ranks({"dp": 2, "cp": 4}) == {"dp": [[0, 4], [1, 5], [2, 6], [3, 7]],
                                              "cp": [[0, 1, 2, 3], [4, 5, 6, 7]]}
    assert mesh_ranks({"tp": 2, "cp": 2, "dp": 2})["cp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_dp_x_cp_mesh_rank_queries_and_cp_all_reduce():
    def program(mesh):
        cp_group = mesh.group("cp")
        total = torch.tensor([mesh.rank])
        dist.all_reduce(total, group=cp_group)
        return (dist.get_rank(), dist.get_world_size(), dist.get_rank(cp_group), dist.get_world_size(cp_group),
                dist.get_global_rank(cp_group, 0), dist.get_rank(mesh.group("dp")), int(total))

    values = run_mesh({"dp": 2, "cp": 4}, program, timeout=60.0)
    for g in range(8):
        dp, cp = divmod(g, 4)
        block = [4 * dp + k for k in range(4)]
        assert values[g] == (g, 8, cp, 4, block[0], dp, sum(block))


def test_new_group_pattern_megatron_style_builds_tp_x_cp_groups():
    tp, cp = 2, 3

    def program(world):
        mine = None
        for t in range(tp):  # every rank creates every CP group, in the same order, like Megatron
            ranks = [t + tp * c for c in range(cp)]
            group = dist.new_group(ranks)
            if dist.get_rank() in ranks:
                mine = group
        gathered = [torch.empty(1, dtype=torch.long) for _ in range(cp)]
        dist.all_gather(gathered, torch.tensor([dist.get_rank()]), group=mine)
        peer = torch.empty(1, dtype=torch.long)
        me = dist.get_rank(mine)
        # send to the next CP rank, by global rank as torch expects
        nxt, prv = dist.get_global_rank(mine, (me + 1) % cp), dist.get_global_rank(mine, (me - 1) % cp)
        works = [dist.isend(torch.tensor([dist.get_rank()]), nxt, group=mine), dist.irecv(peer, prv, group=mine)]
        for w in works:
            w.wait()
        return [int(x) for x in gathered], int(peer), dist.get_world_size(mine)

    values = run_spmd(tp * cp, program, timeout=60.0)
    for g in range(tp * cp):
        t, c = g % tp, g // tp
        ranks = [t + tp * k for k in range(cp)]
        assert values[g] == (ranks, ranks[(c - 1) % cp], cp)


def test_a_divergence_in_a_subgroup_names_the_group_and_its_global_ranks():
    def program(mesh):
        size = 2 if mesh.rank == 5 else 1  # global rank 5 is CP rank 1 of the second CP group
        dist.all_reduce(torch.zeros(size), group=mesh.group("cp"))

    states, failure = execute_mesh({"dp": 2, "cp": 4}, program, timeout=30.0)
    assert failure is not None and failure.kind == "divergence"
    text = str(failure)
    assert text.startswith("in group cp[4, 5, 6, 7] (its ranks 0..3 are global ranks [4, 5, 6, 7]): "
                           "ranks called different collectives at position #0")
    assert "rank 1 called all_reduce([2] float32, op=SUM) #0 at tests/capability/test_mesh.py:" in text
    assert len(states) == 8


def test_a_rank_that_leaves_its_cp_group_is_named_with_the_groups_global_ranks():
    def program(mesh):
        if mesh.rank == 2:  # CP rank 0 of the second CP group leaves; the first CP group waits in a barrier
            return None
        dist.barrier(group=mesh.group("cp"))
        dist.barrier(group=mesh.group("cp"))

    start = time.monotonic()
    _, failure = execute_mesh({"dp": 2, "cp": 2}, program, timeout=60.0)
    assert time.monotonic() - start < 30.0  # at once, not after the 60 s timeout
    assert failure is not None and failure.kind == "divergence"
    assert str(failure).startswith("in group cp[2, 3] (its ranks 0..1 are global ranks [2, 3]): collective #0")


def test_torchs_own_functions_are_back_after_a_run():
    assert run_spmd(3, lambda group: (dist.get_rank(group), dist.get_world_size(group), dist.get_rank()),
                    timeout=60.0) == [(r, 3, r) for r in range(3)]
    assert dist.get_rank is TORCH_GET_RANK and c10d.get_rank is TORCH_GET_RANK


def test_a_rank_that_skips_new_group_is_a_divergence_naming_it_not_a_silent_pass():
    """torch's new_group is a world collective (every rank calls it, members or not): a rank that skips it
    hangs the others in its barrier. It used to pass here, each rank keeping its own count of groups."""
    def program(world):
        if dist.get_rank() != 1:
            dist.new_group([0, 2])
        dist.all_reduce(torch.zeros(1), group=world)

    states, failure = execute_mesh({"cp": 4}, lambda mesh: program(mesh.world), timeout=30.0)
    assert failure is not None and failure.kind == "divergence"
    line = program.__code__.co_firstlineno
    text = str(failure)
    assert text.startswith("ranks called different collectives at position #0: ")
    assert f"rank 1 called all_reduce([1] float32, op=SUM) #0 at tests/capability/test_mesh.py:{line + 3}" in text
    assert f"called new_group(ranks=[0, 2]) #0 at tests/capability/test_mesh.py:{line + 2}" in text


def test_new_group_with_local_synchronization_is_called_by_its_members_only():
    def program(world):
        if dist.get_rank() in (0, 2):
            group = dist.new_group([0, 2], use_local_synchronization=True)
            total = torch.tensor([dist.get_rank()])
            dist.all_reduce(total, group=group)
            return int(total)
        return None

    assert run_spmd(4, program, timeout=30.0) == [2, None, 2, None]
