"""Every simulated collective beyond all-gather/all-reduce/broadcast against results computed by hand
from the rank numbers, at cp 1-8, and their divergence reports. No rank thread is left behind."""


import pytest
import torch
import torch.distributed as dist

from cpinspect.groups.simulated import execute_spmd, run_spmd

CPS = [1, 2, 3, 5, 8]


pytestmark = pytest.mark.usefixtures("no_rank_thread_left")  # tests/conftest.py


@pytest.mark.parametrize("cp", CPS)
def test_all_to_all_single_even(cp):
    def program(group):
        r = group.rank()
        inp = torch.tensor([100 * r + j for j in range(cp) for _ in range(2)])  # 2 rows for each destination
        out = torch.empty(2 * cp, dtype=torch.long)
        dist.all_to_all_single(out, inp, group=group)
        return out.tolist()

    # rank j receives, from each rank r in order, the two rows r addressed to j: 100*r + j
    assert run_spmd(cp, program, timeout=60.0) == [[100 * r + j for r in range(cp) for _ in range(2)]
                                                   for j in range(cp)]


@pytest.mark.parametrize("cp", CPS)
def test_all_to_all_single_uneven(cp):
    # rank r sends r + j + 1 rows to rank j, each row [r, j]
    def program(group):
        r = group.rank()
        sends = [r + j + 1 for j in range(cp)]
        receives = [s + r + 1 for s in range(cp)]
        inp = torch.tensor([[r, j] for j in range(cp) for _ in range(sends[j])])
        out = torch.full((sum(receives), 2), -1)
        dist.all_to_all_single(out, inp, receives, sends, group=group)
        return out.tolist()

    assert run_spmd(cp, program, timeout=60.0) == [[[s, j] for s in range(cp) for _ in range(s + j + 1)]
                                                   for j in range(cp)]


@pytest.mark.parametrize("cp", CPS)
def test_all_to_all_list(cp):
    def program(group):
        r = group.rank()
        ins = [torch.tensor([10 * r + j]) for j in range(cp)]
        outs = [torch.empty(1, dtype=torch.long) for _ in range(cp)]
        dist.all_to_all(outs, ins, group=group)
        return [int(o) for o in outs]

    assert run_spmd(cp, program, timeout=60.0) == [[10 * s + j for s in range(cp)] for j in range(cp)]


@pytest.mark.parametrize("cp", CPS)
def test_reduce_scatter_list_and_tensor(cp):
    def program(group):
        r = group.rank()
        ins = [torch.tensor([r * 10 + j, 1]) for j in range(cp)]
        out = torch.empty(2, dtype=torch.long)
        dist.reduce_scatter(out, ins, group=group)
        flat = torch.tensor([r * 10 + j for j in range(cp) for _ in range(3)])
        single = torch.empty(3, dtype=torch.long)
        dist.reduce_scatter_tensor(single, flat, group=group)
        biggest = torch.empty(3, dtype=torch.long)
        dist.reduce_scatter_tensor(biggest, flat, op=dist.ReduceOp.MAX, group=group)
        return out.tolist(), single.tolist(), biggest.tolist()

    expected = [([sum(r * 10 + j for r in range(cp)), cp], [sum(r * 10 + j for r in range(cp))] * 3,
                 [(cp - 1) * 10 + j] * 3) for j in range(cp)]
    assert run_spmd(cp, program, timeout=60.0) == expected


@pytest.mark.parametrize("cp", CPS)
def test_gather_scatter_and_reduce_to_a_root(cp):
    root = cp - 1

    def program(group):
        r = group.rank()
        mine = torch.tensor([r * r])
        slots = [torch.empty(1, dtype=torch.long) for _ in range(cp)] if r == root else None
        dist.gather(mine, slots, dst=root, group=group)
        got = torch.empty(1, dtype=torch.long)
        pieces = [torch.tensor([7 * j]) for j in range(cp)] if r == root else None
        dist.scatter(got, pieces, src=root, group=group)
        total = torch.tensor([r + 1])
        dist.reduce(total, dst=root, group=group)
        return ([int(s) for s in slots] if slots else None), int(got), int(total)

    values = run_spmd(cp, program, timeout=60.0)
    assert [v[1] for v in values] == [7 * j for j in range(cp)]
    assert values[root][0] == [r * r for r in range(cp)]
    assert values[root][2] == cp * (cp + 1) // 2
    assert all(v[0] is None and v[2] == r + 1 for r, v in enumerate(values) if r != root)


@pytest.mark.parametrize("cp", CPS)
def test_object_collectives(cp):
    def program(group):
        r = group.rank()
        objects = [None] * cp
        dist.all_gather_object(objects, {"rank": r, "name": "x" * r}, group=group)
        box = [("from", r)]
        dist.broadcast_object_list(box, src=0, group=group)
        return objects, box

    assert run_spmd(cp, program, timeout=60.0) == [([{"rank": s, "name": "x" * s} for s in range(cp)],
                                                    [("from", 0)])] * cp


@pytest.mark.parametrize("cp", [2, 4])
def test_async_op_returns_a_work_whose_wait_completes_it(cp):
    def program(group):
        t = torch.tensor([group.rank() + 1])
        works = [dist.all_reduce(t, group=group, async_op=True)]
        out = torch.empty(cp, dtype=torch.long)
        works.append(dist.all_gather_into_tensor(out, torch.tensor([group.rank()]), group=group, async_op=True))
        single = torch.empty(1, dtype=torch.long)
        works.append(dist.reduce_scatter_tensor(single, torch.ones(cp, dtype=torch.long), group=group,
                                                async_op=True))
        a2a = torch.empty(cp, dtype=torch.long)
        works.append(dist.all_to_all_single(a2a, torch.full((cp,), group.rank()), group=group, async_op=True))
        for work in works:
            assert work.wait()
        return int(t), out.tolist(), int(single), a2a.tolist()

    assert run_spmd(cp, program, timeout=60.0) == [(cp * (cp + 1) // 2, list(range(cp)), cp, list(range(cp)))] * cp


def test_all_to_all_split_disagreement_names_both_ranks():
    def program(group):
        r = group.rank()
        inp = torch.zeros(4)
        out = torch.zeros(4)
        sends = [2, 2]
        receives = [1, 3] if r == 1 else [2, 2]  # rank 1 expects 1 row from rank 0, which sends it 2
        dist.all_to_all_single(out, inp, receives, sends, group=group)

    _, failure = execute_spmd(2, program, timeout=30.0)
    assert failure is not None and failure.kind == "divergence"
    assert "all_to_all_single #0 could not move data: rank 0 sends 2 row(s) to rank 1, which expects 1 from it" \
        in str(failure)


def test_reduce_scatter_with_different_shapes_is_a_divergence_naming_the_call_sites():
    def program(group):
        n = 2 + group.rank()
        dist.reduce_scatter_tensor(torch.empty(n), torch.zeros(2 * n), group=group)

    _, failure = execute_spmd(2, program, timeout=30.0)
    assert failure is not None and failure.kind == "divergence"
    text = str(failure)
    assert "rank 0 called reduce_scatter_tensor([2] float32, [4] float32, op=SUM) #0 at tests/capability/" in text
    assert "rank 1 called reduce_scatter_tensor([3] float32, [6] float32, op=SUM) #0 at tests/capability/" in text


def test_gather_to_different_roots_is_a_divergence():
    def program(group):
        r = group.rank()
        slots = [torch.empty(1) for _ in range(2)]
        dst = r  # each rank names itself as the root
        dist.gather(torch.zeros(1), slots, dst=dst, group=group)

    _, failure = execute_spmd(2, program, timeout=30.0)
    assert failure is not None and failure.kind == "divergence"
    assert "gather([1] float32, dst=0)" in str(failure) and "gather([1] float32, dst=1)" in str(failure)


def test_an_op_that_is_not_simulated_says_so_and_blames_no_user_line():
    def program(group):
        dist.all_reduce_coalesced([torch.zeros(1)], group=group)

    _, failure = execute_spmd(2, program, timeout=30.0)
    assert failure is not None and failure.kind == "exception"
    text = str(failure)
    assert "all_reduce_coalesced is not simulated by cpinspect's group" in text
    assert "test_collectives.py" not in text


@pytest.mark.parametrize("op", ["all_to_all_single", "all_gather_into_tensor", "reduce_scatter_tensor"])
def test_a_non_contiguous_output_buffer_is_refused_at_the_users_line(op):
    # gloo fills such a buffer as if it were contiguous (wrong values, no error), NCCL refuses it
    def program(group):
        out = torch.empty(4, 2, dtype=torch.long).t()  # [2, 4], strides [1, 2]
        if op == "all_to_all_single":
            dist.all_to_all_single(out, torch.zeros(2, 4, dtype=torch.long), group=group)
        elif op == "all_gather_into_tensor":
            dist.all_gather_into_tensor(out, torch.zeros(1, 4, dtype=torch.long), group=group)
        else:
            dist.reduce_scatter_tensor(out, torch.zeros(4, 4, dtype=torch.long), group=group)

    _, failure = execute_spmd(2, program, timeout=30.0)
    assert failure is not None and failure.kind == "exception"
    text = str(failure)
    assert f"{op} on rank 0: the output tensor (shape [2, 4], strides [1, 2]) is not contiguous" in text
    assert "at tests/capability/test_collectives.py:" in text
