"""N simulated world ranks with subgroups: a DP x CP or TP x CP mesh, or any ``dist.new_group(ranks)``.

A :class:`SimulatedWorld` owns one coordinator per group (the world and each subgroup), sharing
one lock; when one fails, all fail, so no rank waits on in another group. Inside a rank thread,
``dist.get_rank(group)``, ``dist.get_world_size(group)`` and ``dist.new_group(ranks)`` answer for
that rank (torch's own versions need a default group that one process cannot hold per thread);
``dist.get_global_rank`` and ``get_group_rank`` work through torch's own registry, filled with
each subgroup's global ranks. Outside rank threads torch's
functions run unchanged. Failures in a subgroup name the group and its global ranks.
``execute_mesh(..., backend="gloo")`` runs the same mesh on real processes
(:func:`cpinspect.groups.gloo.execute_gloo_mesh`), with the same reports.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from cpinspect.core.errors import InputError
from cpinspect.groups.callsite import error_site
from cpinspect.groups.collectives import NotSimulatedError
from cpinspect.groups.coordinator import CollectiveAbort, Coordinator, RankState, SpmdError, stall_limit
from cpinspect.groups.p2p import PointToPoint
from cpinspect.groups.simulated import SimulatedProcessGroup

_UNWIND_S = 2.0
_current = threading.local()  # .world and .rank inside a rank thread


class SimulatedWorld:
    """The groups of one simulated run: the world group and every subgroup created in it."""

    def __init__(self, size: int, timeout: float) -> None:
        self.size = size
        self.timeout = timeout
        self.cond = threading.Condition()
        self.coordinators: list[Coordinator] = []
        self.world = self._coordinator(list(range(size)), "")
        self.world_groups = self._groups(self.world, "world")
        self._subgroups: dict[tuple[tuple[int, ...], int], list[SimulatedProcessGroup]] = {}
        self._made = [0] * size

    def _coordinator(self, ranks: list[int], label: str) -> Coordinator:
        coordinator = Coordinator(len(ranks), self.timeout, cond=self.cond, label=label, global_ranks=ranks,
                                  linked=self.coordinators)
        self.coordinators.append(coordinator)
        return coordinator

    def _groups(self, coordinator: Coordinator, label: str) -> list[SimulatedProcessGroup]:
        mailbox = PointToPoint(coordinator)
        groups = [SimulatedProcessGroup(coordinator, r, coordinator.size, name=label, mailbox=mailbox)
                  for r in range(coordinator.size)]
        for group in groups:  # torch translates global src=/dst= ranks through this registry
            c10d._world.pg_group_ranks[group] = {g: r for r, g in enumerate(coordinator.global_ranks)}
        return groups

    def new_group(self, rank: int, ranks: Sequence[int] | None, label: str = "", local_sync: bool = False) -> Any:
        """``rank``'s handle on the group of ``ranks`` (every rank makes the same calls in the same order).

        As in torch, every rank of the world takes part (members or not), so the call is matched as a
        world collective first: a rank that skips it, or makes another, is a divergence named here,
        where torch would hang in ``new_group``'s barrier. With ``use_local_synchronization=True``
        only the members synchronise in torch, and nothing is matched.
        """
        members = sorted({int(r) for r in ranks}) if ranks is not None else list(range(self.size))
        if not members or members[0] < 0 or members[-1] >= self.size:
            raise ValueError(f"new_group({members}): ranks must lie in 0..{self.size - 1}")
        if not local_sync:
            self.world_groups[rank].enter_new_group(members)
        with self.cond:
            key = (tuple(members), self._made[rank])
            self._made[rank] += 1
            if key not in self._subgroups:
                name = label or f"new_group({members})"
                self._subgroups[key] = self._groups(self._coordinator(members, name), name)
            groups = self._subgroups[key]
        return groups[members.index(rank)] if rank in members else dist.GroupMember.NON_GROUP_MEMBER

    def finish(self, rank: int, value: Any = None, error: BaseException | None = None, site: str = "") -> None:
        for coordinator in list(self.coordinators):
            if rank in coordinator.global_ranks:
                coordinator.finish(coordinator.global_ranks.index(rank), value, error, site)

    def release(self) -> None:
        for groups in [self.world_groups, *self._subgroups.values()]:
            for group in groups:
                c10d._world.pg_group_ranks.pop(group, None)

    def wait(self, limit: float) -> None:
        """Until every rank finished or a group failed; fail if all live ranks stalled in their own code."""
        states = self.world.states
        with self.cond:
            while self.world.failure is None and any(s.status in ("running", "waiting") for s in states):
                progress = max(c.progress for c in self.coordinators)
                busy = any(c.pending for c in self.coordinators)
                computing = [s for s in states if s.computing and not self._waiting_elsewhere(s.rank)]
                if not busy and computing and time.monotonic() - progress >= limit:
                    self.world.fail_stall(limit)
                    break
                self.cond.wait(max(0.05, min(1.0, progress + limit - time.monotonic())))

    def _waiting_elsewhere(self, rank: int) -> bool:
        return any(c.states[c.global_ranks.index(rank)].status == "waiting"
                   for c in self.coordinators[1:] if rank in c.global_ranks)


def mesh_ranks(dims: dict[str, int]) -> dict[str, list[list[int]]]:
    """For each named dimension, the rank groups along it: row-major, the last dimension fastest (as
    ``torch.distributed.device_mesh`` lays out ``init_device_mesh``)."""
    names, sizes = list(dims), [int(v) for v in dims.values()]
    if not sizes or any(s < 1 for s in sizes):
        raise InputError(f"mesh dimensions {dims} must each be at least 1", where="mesh", fix="pass e.g. dp=2, cp=4")
    strides = [1] * len(sizes)
    for i in range(len(sizes) - 2, -1, -1):
        strides[i] = strides[i + 1] * sizes[i + 1]
    out: dict[str, list[list[int]]] = {}
    for d, name in enumerate(names):
        others = [range(s) if i != d else range(1) for i, s in enumerate(sizes)]
        out[name] = [[sum(c * st for c, st in zip(coords, strides)) + k * strides[d] for k in range(sizes[d])]
                     for coords in itertools.product(*others)]
    return out


@dataclass
class RankMesh:
    """What one rank's function receives from :func:`execute_mesh`: its rank, the world and named groups."""

    rank: int
    size: int
    world: dist.ProcessGroup
    groups: dict[str, Any]

    def group(self, name: str) -> Any:
        return self.groups[name]


def execute_world(size: int, fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], timeout: float,
                  dims: dict[str, int] | None = None) -> tuple[list[RankState], SpmdError | None]:
    """Run ``fn`` on ``size`` rank threads: ``fn(world_group, ...)``, or ``fn(RankMesh, ...)`` with ``dims``."""
    if size < 1:
        raise ValueError(f"cp must be at least 1, got {size}")
    world = SimulatedWorld(size, timeout)
    layout = mesh_ranks(dims) if dims else {}
    per_rank: list[dict[str, Any]] = [{} for _ in range(size)]
    for name, blocks in layout.items():
        for block in blocks:
            label = f"{name}{block}"
            groups = world._groups(world._coordinator(block, label), label)  # noqa: SLF001
            for index, global_rank in enumerate(block):
                per_rank[global_rank][name] = groups[index]

    def body(rank: int) -> None:
        _current.world, _current.rank = world, rank
        try:
            first = RankMesh(rank, size, world.world_groups[rank], per_rank[rank]) if dims else world.world_groups[rank]
            value = fn(first, *args, **kwargs)
        except (CollectiveAbort, NotSimulatedError) as exc:  # not the user's line: no site
            world.finish(rank, error=exc)
        except BaseException as exc:  # noqa: BLE001 - reported per rank, never swallowed silently
            world.finish(rank, error=exc, site=error_site(exc))
        else:
            world.finish(rank, value=value)
        finally:
            del _current.world, _current.rank

    threads = [threading.Thread(target=body, args=(r,), name=f"cpinspect-rank{r}", daemon=True) for r in range(size)]
    with _patched():
        try:
            _start_all(threads, world.world)
            world.wait(stall_limit(world.world.timeout))
            grace = time.monotonic() + _UNWIND_S  # ranks aborted out of a collective unwind at once
            for thread in threads:
                thread.join(max(0.0, grace - time.monotonic()))
            with world.cond:
                return list(world.world.states), _outcome(world)
        finally:
            world.release()


def _outcome(world: SimulatedWorld) -> SpmdError | None:
    return world.world.failure if world.world.failure is not None else world.world.outcome()


def _start_all(threads: list[threading.Thread], coordinator: Coordinator) -> None:
    """Start every rank thread; if the system refuses one, abort those started and say so (exit 2)."""
    for index, thread in enumerate(threads):
        try:
            thread.start()
        except RuntimeError as exc:  # "can't start new thread": the per-user thread limit or memory
            coordinator.fail("exception", f"only {index} of {len(threads)} rank threads could be started")
            for started in threads[:index]:
                started.join(_UNWIND_S)
            raise InputError(
                f"the simulated group needs one thread per rank, but the system refused to start thread "
                f"{index + 1} of {len(threads)} ({exc})", where=f"--cp {len(threads)}",
                fix="use a smaller --cp, or raise the limit on threads/processes (ulimit -u) and the memory "
                    "available to this process") from None


# --- torch.distributed functions that must answer per rank thread -------------------------------

_ORIGINALS: dict[str, Callable[..., Any]] = {}
_patch_lock = threading.Lock()
_patch_users = 0


def _world_here() -> SimulatedWorld | None:
    return getattr(_current, "world", None)


def _get_rank(group: Any = None) -> int:
    world = _world_here()
    if world is None:
        return _ORIGINALS["get_rank"](group)
    if group is None or group is dist.GroupMember.WORLD:
        return int(_current.rank)
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        return -1
    return int(group.rank())


def _get_world_size(group: Any = None) -> int:
    world = _world_here()
    if world is None:
        return _ORIGINALS["get_world_size"](group)
    if group is None or group is dist.GroupMember.WORLD:
        return world.size
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        return -1
    return int(group.size())


def _new_group(ranks: Sequence[int] | None = None, *args: Any, **kwargs: Any) -> Any:
    world = _world_here()
    if world is None:
        return _ORIGINALS["new_group"](ranks, *args, **kwargs)
    return world.new_group(int(_current.rank), ranks, str(kwargs.get("group_desc") or ""),
                           local_sync=bool(new_group_option(args, kwargs, "use_local_synchronization")))


_NEW_GROUP_ARGS = ("timeout", "backend", "pg_options", "use_local_synchronization", "group_desc", "device_id")


def new_group_option(args: Sequence[Any], kwargs: dict[str, Any], name: str) -> Any:
    """One of ``dist.new_group``'s options after ``ranks``, given by keyword or by position."""
    if name in kwargs:
        return kwargs[name]
    index = _NEW_GROUP_ARGS.index(name)
    return args[index] if index < len(args) else None


_PATCHES = {"get_rank": _get_rank, "get_world_size": _get_world_size, "new_group": _new_group}


class _patched:  # noqa: N801 - used as a context manager
    """Install the per-thread versions while any simulated run is active (reference-counted)."""

    def __enter__(self) -> None:
        global _patch_users
        with _patch_lock:
            if _patch_users == 0:
                for name, replacement in _PATCHES.items():
                    _ORIGINALS.setdefault(name, getattr(c10d, name))
                    setattr(c10d, name, replacement)
                    setattr(dist, name, replacement)
            _patch_users += 1

    def __exit__(self, *exc: object) -> None:
        global _patch_users
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                for name, original in _ORIGINALS.items():
                    setattr(c10d, name, original)
                    setattr(dist, name, original)


def execute_mesh(dims: dict[str, int], fn: Callable[..., Any], *args: Any, timeout: float = 10.0,
                 backend: str = "threads", **kwargs: Any) -> tuple[list[RankState], SpmdError | None]:
    """Run ``fn(mesh, *args, **kwargs)`` on every rank of a mesh such as ``{"dp": 2, "cp": 4}``.

    ``mesh.group("cp")`` is the rank's CP group (a real ``ProcessGroup``), ``mesh.world`` its world
    group; ``dist.new_group`` works too. The contract is :func:`~cpinspect.groups.simulated.execute_spmd`'s.
    ``backend="gloo"`` runs it on real processes (:func:`~cpinspect.groups.gloo.execute_gloo_mesh`).
    """
    if backend == "gloo":
        from cpinspect.groups.gloo import execute_gloo_mesh  # gloo builds on this module

        return execute_gloo_mesh(dims, fn, *args, timeout=timeout, **kwargs)
    if backend != "threads":
        raise InputError(f"unknown backend {backend!r}", where="backend", fix="use threads or gloo")
    size = 1
    for value in dims.values():
        size *= int(value)
    return execute_world(size, fn, args, kwargs, timeout, dims)


def run_mesh(dims: dict[str, int], fn: Callable[..., Any], *args: Any, timeout: float = 10.0,
             backend: str = "threads", **kwargs: Any) -> list[Any]:
    """:func:`execute_mesh`, returning every world rank's result or raising its :class:`SpmdError`."""
    states, failure = execute_mesh(dims, fn, *args, timeout=timeout, backend=backend, **kwargs)
    if failure is not None:
        raise failure
    return [s.value for s in states]
