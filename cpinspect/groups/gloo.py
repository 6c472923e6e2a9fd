"""Run one function on N real processes over torch.distributed's gloo backend, never hanging.

The same contract as :func:`cpinspect.groups.simulated.execute_spmd`, with real transport: each rank is a
process started by ``torch.multiprocessing`` (spawn), joined into a gloo group on ``127.0.0.1``
through a TCPStore that this process serves on a free port. The function receives a
:class:`~cpinspect.groups.recording.RecordingGroup`, a ``ProcessGroup`` that forwards every
collective and send/receive to the real gloo group after this process has checked what every
rank is about to call (op, shapes, dtypes, call site; see that module). Subgroups are real gloo
groups, recorded the same way (:class:`RankGroups`): a mesh's (:func:`execute_gloo_mesh`, the
simulated :func:`~cpinspect.groups.mesh.execute_mesh`'s contract) and each ``dist.new_group``.

This process is the watchdog (:mod:`cpinspect.groups.watchdog`). It feeds every rank's entries,
exits and results into the same coordinator the thread backend uses, so a divergence (different
collectives, or a rank that returns or raises while others wait) is reported with the same words,
as soon as it is visible, and every wait has a deadline. Then every rank process is released or
terminated, and reaped: none outlives the call. A rank process also exits on its own if this
process dies.
"""

from __future__ import annotations

import math
import os
import pickle
import socket
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from cpinspect.groups.callsite import error_site
from cpinspect.groups.coordinator import (
    DEFAULT_TIMEOUT_S,
    CollectiveAbort,
    RankState,
    SpmdError,
    stall_limit,
    validate_timeout,
)
from cpinspect.groups.mesh import RankMesh, mesh_ranks, new_group_option
from cpinspect.groups.recording import Ask, GlooLimitError, RecordingGroup, Report
from cpinspect.groups.simulated import _completed_work
from cpinspect.groups.watchdog import RankProcesses, Watchdog, supervise

DEFAULT_START_TIMEOUT_S = 120.0
_GRACE_S = 3.0


def _exit_with_parent(parent_pid: int) -> None:
    """Leave at once if the watchdog process dies, even while blocked inside gloo."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.2)
        os._exit(3)

    threading.Thread(target=watch, name="cpinspect-parent-watch", daemon=True).start()


def _loopback_interface() -> str | None:
    """Name of the loopback interface (``lo`` on Linux, ``lo0`` on macOS), so gloo binds 127.0.0.1."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in names if n in ("lo", "lo0")), next((n for n in names if n.startswith("lo")), None))


def _gloo_timeout(timeout: float, start_timeout: float) -> timedelta:
    # The watchdog enforces `timeout` (progress-based, from a collective's latest arrival); gloo's own
    # deadline counts from each rank's entry, so it is set beyond anything the watchdog allows.
    return timedelta(seconds=max(start_timeout, stall_limit(timeout) + timeout))


def _join_gloo(rank: int, cp: int, port: int, start_timeout: float, timeout: float) -> dist.ProcessGroup:
    loopback = _loopback_interface()
    if loopback:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=start_timeout))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=cp,
                            timeout=_gloo_timeout(timeout, start_timeout))
    world = dist.group.WORLD
    assert world is not None  # init_process_group just created it
    return world


class RankGroups:
    """One rank process's recording groups: the world, a mesh's subgroups, each ``dist.new_group`` of the function.

    Every subgroup is a real gloo group (``new_group`` on every process, in the same order: gloo's
    rule), wrapped in a :class:`RecordingGroup` that names it to the watchdog and registered with
    torch, so ``dist.get_rank(group)``, ``get_world_size`` and ``get_global_rank`` answer for it.
    While the function runs, ``dist.new_group`` is this object's (the process is this rank's alone).
    """

    def __init__(self, inner: dist.ProcessGroup, report: Report, ask: Ask, timeout: timedelta) -> None:
        self._report, self._ask, self._timeout = report, ask, timeout
        self._made = 0
        self._original = c10d.new_group
        self.all: list[RecordingGroup] = []
        self.world = self._wrap(inner, None, list(range(inner.size())), "")
        c10d.new_group = dist.new_group = self.new_group  # type: ignore[assignment]

    def _wrap(self, inner: dist.ProcessGroup, gid: Any, members: list[int], label: str) -> RecordingGroup:
        group = RecordingGroup(inner, self._report, self._ask, gid, label)
        world = c10d._world
        world.pg_map[group] = world.pg_map[inner]
        world.pg_group_ranks[group] = dict(world.pg_group_ranks.get(inner) or {g: r for r, g in enumerate(members)})
        self.all.append(group)
        if gid is not None:
            self._report(("group", gid, members, label))
        return group

    def new_group(self, ranks: Sequence[int] | None = None, *args: Any, **kwargs: Any) -> Any:
        """torch's ``new_group``, recorded: the simulated group's key and name (``new_group([0, 2])``)."""
        members = sorted({int(r) for r in ranks}) if ranks is not None else list(range(self.world.size()))
        gid = ("new_group", tuple(members), self._made)
        self._made += 1
        if not args:
            kwargs.setdefault("timeout", self._timeout)
        if new_group_option(args, kwargs, "use_local_synchronization"):  # only the members synchronise
            inner = self._original(ranks, *args, **kwargs)
        else:  # a world collective in torch: matched by the watchdog first, as the simulated world does
            made: list[Any] = []

            def start() -> dist.Work:
                made.append(self._original(ranks, *args, **kwargs))
                return _completed_work()

            self.world._run("new_group", [], f"ranks={members}", start)
            inner = made[0]
        if inner is dist.GroupMember.NON_GROUP_MEMBER or self.world.rank() not in members:
            return inner
        return self._wrap(inner, gid, members, str(kwargs.get("group_desc") or "") or f"new_group({members})")

    def mesh(self, dims: dict[str, int]) -> dict[str, RecordingGroup]:
        """This rank's group along each mesh dimension, named as the simulated mesh names it (``cp[0, 1]``)."""
        mine: dict[str, RecordingGroup] = {}
        for name, blocks in mesh_ranks(dims).items():
            for block in blocks:
                inner = self._original(block, timeout=self._timeout)
                if self.world.rank() in block:
                    mine[name] = self._wrap(inner, ("mesh", name, tuple(block)), block, f"{name}{block}")
        return mine

    @property
    def released(self) -> bool:
        return any(group.released for group in self.all)

    def close(self) -> None:
        c10d.new_group = dist.new_group = self._original  # type: ignore[assignment]
        for group in self.all:
            c10d._world.pg_map.pop(group, None)
            c10d._world.pg_group_ranks.pop(group, None)


def _raised_event(exc: BaseException) -> tuple[Any, ...]:
    if isinstance(exc, (CollectiveAbort, GlooLimitError)):  # the watchdog stopped the run, or gloo's limit
        return ("raised", type(exc).__name__, str(exc), None, "")
    blob: bytes | None
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
        blob = data
    except Exception:  # noqa: BLE001 - an exception type that does not survive pickling
        blob = None
    return ("raised", type(exc).__name__, str(exc), blob, error_site(exc))


def _message(conn: Connection, timeout: float | None) -> bytes | None:
    """The watchdog's next word (``go`` or ``exit``), or None if it is gone or silent too long."""
    try:
        return conn.recv_bytes() if conn.poll(timeout) else None
    except (EOFError, OSError):
        return None


def rank_main(rank: int, cp: int, port: int, timeout: float, start_timeout: float, payload: bytes,
              conn: Connection, parent_pid: int) -> None:
    """Entry point of one rank process (module-level so spawn can find it)."""
    _exit_with_parent(parent_pid)
    os.dup2(2, 1)  # rank output goes to stderr: the watchdog's stdout may carry --json
    torch.set_num_threads(1)

    def report(event: tuple[Any, ...]) -> None:
        conn.send_bytes(pickle.dumps(event))

    def ask(event: tuple[Any, ...]) -> bytes | None:
        report(event)
        return _message(conn, None)

    try:
        fn, args, kwargs, dims = pickle.loads(payload)
        inner = _join_gloo(rank, cp, port, start_timeout, timeout)
        groups = RankGroups(inner, report, ask, _gloo_timeout(timeout, start_timeout))
        first = RankMesh(rank, cp, groups.world, groups.mesh(dims)) if dims else groups.world
    except BaseException as exc:  # noqa: BLE001 - sent to the watchdog, which reports it
        report(_raised_event(exc))
        return
    report(("ready", os.getpid()))
    if _message(conn, None) == b"go":
        try:
            value = fn(first, *args, **kwargs)
            event: tuple[Any, ...] = ("returned", pickle.dumps(value))
        except BaseException as exc:  # noqa: BLE001 - reported per rank, never swallowed silently
            event = _raised_event(exc)
        report(event)
        if not groups.released:
            _message(conn, None)  # stay in the group until the watchdog says all are done (or is gone)
    groups.close()
    dist.destroy_process_group()


def execute_gloo(cp: int, fn: Callable[..., Any], *args: Any, timeout: float = DEFAULT_TIMEOUT_S,
                 start_timeout: float = DEFAULT_START_TIMEOUT_S,
                 **kwargs: Any) -> tuple[list[RankState], SpmdError | None]:
    """Run ``fn(group, *args, **kwargs)`` on ``cp`` gloo processes; return every rank's state and any failure.

    ``fn`` must be importable by name (module-level) and ``args``/``kwargs`` picklable: each
    process unpickles its own copy. ``start_timeout`` bounds process start-up and the gloo
    rendezvous; ``timeout`` bounds each collective and the run, as in
    :func:`cpinspect.groups.simulated.execute_spmd`. Never raises for what the ranks do; every rank
    process has ended when this returns. ``dist.new_group`` inside ``fn`` makes a recorded
    gloo subgroup (every rank must call it for every subgroup, in the same order).
    """
    return _execute(cp, None, fn, args, kwargs, timeout, start_timeout)


def execute_gloo_mesh(dims: dict[str, int], fn: Callable[..., Any], *args: Any, timeout: float = DEFAULT_TIMEOUT_S,
                      start_timeout: float = DEFAULT_START_TIMEOUT_S,
                      **kwargs: Any) -> tuple[list[RankState], SpmdError | None]:
    """:func:`~cpinspect.groups.mesh.execute_mesh` on real gloo processes: ``fn(mesh, *args, **kwargs)``.

    ``mesh`` is a :class:`~cpinspect.groups.mesh.RankMesh` whose groups are real gloo subgroups
    (made on every process before ``fn`` starts), each recorded; the contract is :func:`execute_gloo`'s.
    """
    size = math.prod(int(v) for v in dims.values())
    mesh_ranks(dims)  # bad dimensions: the InputError here, not in every process
    return _execute(size, dict(dims), fn, args, kwargs, timeout, start_timeout)


def _execute(cp: int, dims: dict[str, int] | None, fn: Callable[..., Any], args: tuple[Any, ...],
             kwargs: dict[str, Any], timeout: float,
             start_timeout: float) -> tuple[list[RankState], SpmdError | None]:
    if cp < 1:
        raise ValueError(f"cp must be at least 1, got {cp}")
    timeout = validate_timeout(timeout)
    try:
        payload = pickle.dumps((fn, args, kwargs, dims))
    except Exception as exc:  # noqa: BLE001 - say what the process backend needs
        raise TypeError(
            f"the gloo backend sends {getattr(fn, '__qualname__', fn)!r} and its arguments to {cp} new processes, "
            f"but they cannot be pickled ({exc}); pass a module-level function and tensors/plain values"
        ) from exc
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=start_timeout))
    watchdog = Watchdog(cp, timeout)
    ranks = RankProcesses(rank_main, cp, payload, store.port, timeout, start_timeout)
    try:
        supervise(ranks, watchdog, start_timeout)
    finally:
        # After a failure some ranks sit in a collective that can never complete: do not wait long.
        ranks.stop(_GRACE_S if watchdog.failure is None else 0.5)
        del store
    return list(watchdog.states), watchdog.outcome()
