"""Run one function on N real processes over torch.distributed's gloo backend, never hanging.

The same contract as :func:`cpinspect.groups.simulated.execute_spmd`, with real transport: each rank is a
process started by ``torch.multiprocessing`` (spawn), joined into a gloo group on ``127.0.0.1``
through a TCPStore that this process serves on a free port. The function receives a
:class:`RecordingGroup`, a ``ProcessGroup`` that forwards every collective to the real gloo
group after telling this process what it is about to call (op, shapes, dtypes, call site).

This process is the watchdog (:mod:`cpinspect.groups.watchdog`). It feeds every rank's entries,
exits and results into the same coordinator the thread backend uses, so a divergence (different
collectives, or a rank that returns or raises while others wait) is reported with the same words,
as soon as it is visible, and every wait has a deadline. Then every rank process is released or
terminated, and reaped: none outlives the call. A rank process also exits on its own if this
process dies.
"""

from __future__ import annotations

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

from cpinspect.groups.callsite import call_site, error_site
from cpinspect.groups.coordinator import (
    DEFAULT_TIMEOUT_S,
    CollectiveCall,
    RankState,
    SpmdError,
    describe_tensors,
    reduce_op_name,
    stall_limit,
    validate_timeout,
)
from cpinspect.groups.watchdog import RankProcesses, Watchdog, supervise

DEFAULT_START_TIMEOUT_S = 120.0
_GRACE_S = 3.0


class RecordingGroup(dist.ProcessGroup):
    """A real gloo group that reports each collective to the watchdog before it runs.

    ``all_gather``, ``all_gather_into_tensor``, ``all_reduce``, ``broadcast`` and ``barrier`` are
    fingerprinted (the ops the thread backend simulates); any other op still runs on the real
    gloo backend, unrecorded.
    """

    def __init__(self, inner: dist.ProcessGroup, report: Callable[[tuple[Any, ...]], None]) -> None:
        super().__init__(inner.rank(), inner.size())
        self._inner = inner
        self._report = report
        self._seq = 0
        cpu = torch.device("cpu")
        self._register_backend(cpu, dist.ProcessGroup.BackendType.GLOO, inner._get_backend(cpu))
        self._set_default_backend(dist.ProcessGroup.BackendType.GLOO)

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return "gloo"

    def _run(self, op: str, tensors: Sequence[torch.Tensor], detail: str, start: Callable[[], dist.Work]) -> dist.Work:
        shapes, dtypes = describe_tensors(tensors)
        call = CollectiveCall(self._seq, op, shapes, dtypes, detail, call_site(3))
        self._seq += 1
        self._report(("enter", call))
        work = start()
        work.wait()
        self._report(("left", call.seq))
        return work

    def allgather(self, output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor],
                  opts: Any = None) -> dist.Work:
        opts = opts if opts is not None else dist.AllgatherOptions()
        return self._run("all_gather", input_tensors, "",
                         lambda: self._inner.allgather(output_tensors, input_tensors, opts))

    def all_gather_single(self, output: torch.Tensor, tensor: torch.Tensor, opts: Any = None) -> dist.Work:
        opts = opts if opts is not None else dist.AllgatherOptions()
        inner = getattr(self._inner, "all_gather_single", None) or self._inner._allgather_base  # older torch
        return self._run("all_gather_into_tensor", [tensor], "", lambda: inner(output, tensor, opts))

    _allgather_base = all_gather_single

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        opts = opts if opts is not None else dist.AllreduceOptions()
        return self._run("all_reduce", tensors, f"op={reduce_op_name(opts)}",
                         lambda: self._inner.allreduce(tensors, opts))

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        opts = opts if opts is not None else dist.BroadcastOptions()
        return self._run("broadcast", tensors, f"src={int(opts.rootRank)}",
                         lambda: self._inner.broadcast(tensors, opts))

    def barrier(self, opts: Any = None) -> dist.Work:
        opts = opts if opts is not None else dist.BarrierOptions()
        return self._run("barrier", [], "", lambda: self._inner.barrier(opts))

    def __repr__(self) -> str:
        return f"RecordingGroup(gloo, rank={self.rank()}, size={self.size()})"


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


def _join_gloo(rank: int, cp: int, port: int, start_timeout: float, timeout: float) -> dist.ProcessGroup:
    loopback = _loopback_interface()
    if loopback:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=start_timeout))
    # The watchdog enforces `timeout` (progress-based, from a collective's latest arrival); gloo's own
    # deadline counts from each rank's entry, so it is set beyond anything the watchdog allows.
    dist.init_process_group("gloo", store=store, rank=rank, world_size=cp,
                            timeout=timedelta(seconds=max(start_timeout, stall_limit(timeout) + timeout)))
    world = dist.group.WORLD
    assert world is not None  # init_process_group just created it
    return world


def _raised_event(exc: BaseException) -> tuple[Any, ...]:
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

    try:
        fn, args, kwargs = pickle.loads(payload)
        inner = _join_gloo(rank, cp, port, start_timeout, timeout)
    except BaseException as exc:  # noqa: BLE001 - sent to the watchdog, which reports it
        report(_raised_event(exc))
        return
    group = RecordingGroup(inner, report)
    world = dist.distributed_c10d._world
    world.pg_map[group] = world.pg_map[inner]
    world.pg_group_ranks[group] = {r: r for r in range(cp)}
    report(("ready", os.getpid()))
    if _message(conn, None) == b"go":
        try:
            value = fn(group, *args, **kwargs)
            event: tuple[Any, ...] = ("returned", pickle.dumps(value))
        except BaseException as exc:  # noqa: BLE001 - reported per rank, never swallowed silently
            event = _raised_event(exc)
        report(event)
        _message(conn, None)  # stay in the group until the watchdog says all are done (or is gone)
    world.pg_map.pop(group, None)
    world.pg_group_ranks.pop(group, None)
    dist.destroy_process_group()


def execute_gloo(cp: int, fn: Callable[..., Any], *args: Any, timeout: float = DEFAULT_TIMEOUT_S,
                 start_timeout: float = DEFAULT_START_TIMEOUT_S,
                 **kwargs: Any) -> tuple[list[RankState], SpmdError | None]:
    """Run ``fn(group, *args, **kwargs)`` on ``cp`` gloo processes; return every rank's state and any failure.

    ``fn`` must be importable by name (module-level) and ``args``/``kwargs`` picklable: each
    process unpickles its own copy. ``start_timeout`` bounds process start-up and the gloo
    rendezvous; ``timeout`` bounds each collective and the run, as in
    :func:`cpinspect.groups.simulated.execute_spmd`. Never raises for what the ranks do; every rank
    process has ended when this returns.
    """
    if cp < 1:
        raise ValueError(f"cp must be at least 1, got {cp}")
    timeout = validate_timeout(timeout)
    try:
        payload = pickle.dumps((fn, args, kwargs))
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
