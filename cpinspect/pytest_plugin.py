"""A pytest plugin (entry point ``pytest11``) that runs a test body on N simulated CP ranks.

Two ways in, both over cpinspect's simulated group (threads, real ``torch.distributed`` calls,
every collective fingerprinted, every wait with a deadline)::

    @pytest.mark.cp(4)                      # the body runs once per rank; `cp_group` is its group
    def test_selection(cp_group):
        rank = dist.get_rank(cp_group)
        ...

    def test_counts(cp_ranks):              # call it with a rank function; get each rank's result
        assert cp_ranks(4, my_rank_fn, batch) == [...]

``@pytest.mark.cp(4, timeout=30)`` sets the collective timeout; ``@pytest.mark.cp(dp=2, cp=4)``
runs on a mesh and ``cp_group`` is the rank's CP group (``cp_mesh`` its whole
:class:`~cpinspect.groups.mesh.RankMesh`). A failure on any rank fails the test with every failed
rank named (``rank 2 of 4: AssertionError: ...``), chained to the first rank's own exception;
ranks that diverge or hang fail it with the group's report. This replaces monkeypatching
``torch.distributed.all_gather`` with a stand-in group.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

DEFAULT_TEST_TIMEOUT_S = 60.0  # generous: test machines are often loaded


class CpRankFailure(AssertionError):
    """One or more simulated ranks failed the test body; the message names each rank."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cp(n, timeout=60, **mesh): run the test body on n simulated CP ranks "
                                       "(cpinspect); the body receives its rank's group as `cp_group`")


@pytest.fixture
def cp_group() -> Any:
    """The rank's CP group inside a ``@pytest.mark.cp`` test (filled in per rank by the plugin)."""
    return None


@pytest.fixture
def cp_mesh() -> Any:
    """The rank's :class:`~cpinspect.groups.mesh.RankMesh` inside ``@pytest.mark.cp(dp=.., cp=..)``."""
    return None


@pytest.fixture
def cp_ranks() -> Callable[..., list[Any]]:
    """``cp_ranks(n, fn, *args, timeout=60, **kwargs)``: ``fn(group, *args, **kwargs)`` on n ranks, each result."""

    def run(n: int, fn: Callable[..., Any], *args: Any, timeout: float = DEFAULT_TEST_TIMEOUT_S,
            **kwargs: Any) -> list[Any]:
        from cpinspect.groups.simulated import execute_spmd

        states, failure = execute_spmd(n, fn, *args, timeout=timeout, **kwargs)
        _raise_for(states, failure, n)
        return [s.value for s in states]

    return run


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    marker = pyfuncitem.get_closest_marker("cp")
    if marker is None:
        return None
    from cpinspect.groups.mesh import execute_mesh
    from cpinspect.groups.simulated import execute_spmd

    options = dict(marker.kwargs)
    timeout = float(options.pop("timeout", DEFAULT_TEST_TIMEOUT_S))
    test = pyfuncitem.obj
    names = set(inspect.signature(test).parameters)
    base = {name: pyfuncitem.funcargs[name] for name in names if name in pyfuncitem.funcargs}

    if options:  # a mesh: cp=..., dp=..., tp=...
        def on_mesh(mesh: Any) -> Any:
            return test(**_with(base, names, cp_group=mesh.groups.get("cp", mesh.world), cp_mesh=mesh))

        states, failure = execute_mesh({k: int(v) for k, v in options.items()}, on_mesh, timeout=timeout)
        size = len(states)
    else:
        size = int(marker.args[0]) if marker.args else 2

        def on_rank(group: Any) -> Any:
            return test(**_with(base, names, cp_group=group))

        states, failure = execute_spmd(size, on_rank, timeout=timeout)
    __tracebackhide__ = True
    _raise_for(states, failure, size)
    return True


def _with(base: dict[str, Any], names: set[str], **per_rank: Any) -> dict[str, Any]:
    return {**base, **{k: v for k, v in per_rank.items() if k in names}}


def _raise_for(states: list[Any], failure: Any, size: int) -> None:
    """Fail with every failed rank named; chained to the first rank's own exception."""
    __tracebackhide__ = True
    if failure is None:
        return
    raised = [s for s in states if s.status == "raised" and s.error is not None and not s.died]
    own = [s for s in raised if type(s.error).__name__ != "CollectiveAbort"]
    if failure.kind == "exception" and own:
        lines = [f"rank {s.rank} of {size}: {type(s.error).__name__}: {s.error}"
                 + (f" (at {s.error_site})" if s.error_site else "") for s in own]
        passed = size - len(own)
        head = f"{len(own)} of {size} simulated rank(s) failed ({passed} passed)"
        raise CpRankFailure(head + "\n" + "\n".join(lines)) from own[0].error
    raise CpRankFailure(f"the {size} simulated ranks did not run the same program ({failure.kind}): {failure}") \
        from failure
