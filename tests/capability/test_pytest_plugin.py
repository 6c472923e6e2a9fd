"""The pytest plugin, run through pytest's own ``pytester``: passing and failing rank-dependent tests."""

import importlib.metadata
from pathlib import Path

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]

BODY = '''
import pytest
import torch
import torch.distributed as dist


@pytest.mark.cp(4)
def test_gathers_every_rank(cp_group):
    rank = dist.get_rank(cp_group)
    out = [torch.empty(1, dtype=torch.long) for _ in range(4)]
    dist.all_gather(out, torch.tensor([rank * 3]), group=cp_group)
    assert [int(x) for x in out] == [0, 3, 6, 9]


@pytest.mark.cp(4)
def test_fails_on_odd_ranks(cp_group):
    rank = dist.get_rank(cp_group)
    assert rank % 2 == 0, f"odd rank {rank}"


@pytest.mark.cp(2, timeout=1)
def test_rank1_skips_the_barrier(cp_group):
    if dist.get_rank(cp_group) == 0:
        dist.barrier(group=cp_group)


@pytest.mark.cp(dp=2, cp=2)
def test_mesh_cp_group(cp_group, cp_mesh):
    assert dist.get_world_size(cp_group) == 2
    assert dist.get_global_rank(cp_group, 0) == 2 * (cp_mesh.rank // 2)


def test_cp_ranks_fixture(cp_ranks):
    def fn(group, scale):
        total = torch.tensor([group.rank() + 1])
        dist.all_reduce(total, group=group)
        return int(total) * scale
    assert cp_ranks(3, fn, 10) == [60, 60, 60]
'''


def test_marker_and_fixtures_pass_and_fail_with_the_rank_named(pytester):
    pytester.makepyfile(test_ranks=BODY)
    # installed, the pytest11 entry point loads the plugin; from a bare checkout, name it
    installed = any(e.name == "cpinspect" for e in importlib.metadata.entry_points(group="pytest11"))
    load = [] if installed else ["-p", "cpinspect.pytest_plugin"]
    result = pytester.runpytest_subprocess(*load, "-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=2)
    out = result.stdout.str()
    assert "2 of 4 simulated rank(s) failed (2 passed)" in out
    assert "rank 1 of 4: AssertionError: odd rank 1" in out
    assert "rank 3 of 4: AssertionError: odd rank 3" in out
    assert "rank 0 of 4:" not in out and "rank 2 of 4:" not in out
    assert "the 2 simulated ranks did not run the same program (divergence)" in out
    assert "rank 1 returned after 0 collective(s)" in out


def test_the_plugin_is_registered_as_a_pytest11_entry_point():
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.entry-points.pytest11]\n", 1)[1].split("\n[", 1)[0]
    assert section.splitlines()[0].split("#")[0].strip() == 'cpinspect = "cpinspect.pytest_plugin"'
    import importlib

    assert callable(importlib.import_module("cpinspect.pytest_plugin").pytest_pyfunc_call)
