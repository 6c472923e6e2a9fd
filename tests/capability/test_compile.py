"""``torch.compile(fullgraph=True)`` of the training-path selection, against eager and the literal oracle.

``fullgraph=True`` turns any graph break into an error, so a passing call is a single graph. Two
patterns, as the README documents them:

* the whole ``local_vision_row_map`` compiled, the all-gather inside: dynamo turns it into the
  functional collective, which needs a registered group, so these tests run real gloo groups as
  threads (``tests/threaded_gloo.py``);
* the collective outside: ``local_vision_counts`` and ``LocalCounts.row_map`` compiled, the
  all-gather eager in between, which works with any group (here the simulated one).

On the CPU, host and device ``cu_seqlens`` are the same thing (the mask lives on the host); the
CUDA forms are in ``tests/process/test_gpu_sync.py``. Backend ``aot_eager``: dynamo and AOT autograd,
no code generation, so the tests take seconds.
"""

import pytest
import torch

from cpinspect.core.selection import LocalCounts, local_vision_counts, local_vision_row_map, local_vision_rows
from cpinspect.groups.simulated import run_spmd
from tests.threaded_gloo import run_gloo_threads
from tests.unit.test_row_map import literal_case


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled(fn):
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("cp", [2, 3])
def test_compiled_row_map_with_the_collective_inside_matches_eager_and_the_oracle(cp):
    row_map = compiled(local_vision_row_map)
    for seed in range(2):
        cu, masks, expected, _ = literal_case(seed * 5 + cp, cp)

        def program(group, masks=masks, cu=cu):
            mask = masks[group.rank()]
            got = row_map(mask, cu, cp_group=group)
            eager = local_vision_row_map(mask, cu, cp_group=group)
            return got.row_of_position, eager.row_of_position, got.rows(int(mask.sum())), got.vision_total

        for rank, (got, eager, rows, total) in enumerate(run_gloo_threads(cp, program)):
            mask = masks[rank]
            assert torch.equal(got, eager)
            assert got[mask].tolist() == expected[rank] == rows.tolist()
            assert (got[~mask] == -1).all()
            assert int(total) == sum(len(e) for e in expected)


def test_compiled_host_checks_still_refuse_bad_cu_seqlens():
    row_map = compiled(local_vision_row_map)
    masks = [torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)]

    def program(group, cu):
        return row_map(masks[group.rank()], cu, cp_group=group).row_of_position

    assert [r.tolist() for r in run_gloo_threads(2, lambda g: program(g, torch.tensor([0, 8])))] == [[-1] * 4] * 2
    with pytest.raises(RuntimeError, match="cu_seqlens\\[-1\\] differs from cp x the local vision mask's length"):
        run_gloo_threads(2, lambda g: program(g, torch.tensor([0, 12])))
    with pytest.raises(RuntimeError, match="not a multiple of 2\\*cp"):
        run_gloo_threads(2, lambda g: program(g, torch.tensor([0, 2, 8])))


@pytest.mark.parametrize("cp", [3])
def test_compiled_stages_with_the_collective_outside_match_the_oracle_on_any_group(cp):
    counts_fn = compiled(local_vision_counts)
    finish_fn = compiled(LocalCounts.row_map)
    for seed in range(2):
        cu, masks, expected, _ = literal_case(seed * 3 + cp, cp)

        def program(group, masks=masks, cu=cu):
            counts = counts_fn(masks[group.rank()], cu, cp=group.size(), cp_rank=group.rank())
            gathered = counts.gather(group)  # eager: the simulated group is no registered c10d group
            return finish_fn(counts, gathered).row_of_position

        for rank, got in enumerate(run_spmd(cp, program, timeout=120.0)):
            assert got[masks[rank]].tolist() == expected[rank]
            assert (got[~masks[rank]] == -1).all()


def test_compiled_counted_rows_match_the_oracle():
    rows_fn = compiled(local_vision_rows)
    cu, masks, expected, _ = literal_case(9, 2)

    def program(group):
        rank = group.rank()
        return rows_fn(masks[rank], cu, cp_group=group, local_vision_count=len(expected[rank])).tolist()

    assert run_gloo_threads(2, program) == expected
