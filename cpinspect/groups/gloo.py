"""Run one function on N real processes over torch.distributed's gloo backend, never hanging.

The same contract as :func:`cpinspect.groups.simulated.execute_spmd`, with real transport: each rank is a
process started by ``torch.multiprocessing`` (spawn), joined into a gloo group on ``127.0.0.1``
through a TCPStore that this process serves on a free port. The function receives a
:class:`RecordingGroup`, a ``ProcessGroup`` that forwards every collective to the real gloo
group after telling this process what it is about to call (op, shapes, dtypes, call site).

This process is the watchdog. It feeds every rank's entries, exits and results into the same
coordinator the thread backend uses, so a divergence (different collectives, or a rank that
returns or raises while others wait) is reported with the same words, as soon as it is visible,
and every wait has a deadline. Then every rank process is released or terminated, and reaped:
none outlives the call. A rank process also exits on its own if this process dies.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist

from cpinspect.groups.callsite import call_site, error_site
from cpinspect.groups.simulated import (
    DEFAULT_TIMEOUT_S,
    CollectiveCall,
    RankState,
    SpmdError,
    _Coordinator,
    _describe_tensors,
    _exception_failure,
    _reduce_op_name,
)

DEFAULT_START_TIMEOUT_S = 120.0
_GRACE_S = 3.0


class RankProcessError(RuntimeError):
    """A rank's process died, or its exception could not be sent back as it was."""


# ---------------------------------------------------------------------------------------------
# Inside a rank process
# ---------------------------------------------------------------------------------------------


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
        shapes, dtypes = _describe_tensors(tensors)
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
        return self._run("all_reduce", tensors, f"op={_reduce_op_name(opts)}",
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
    # The watchdog enforces `timeout`; gloo's own deadline only backs it up if the watchdog is gone.
    dist.init_process_group("gloo", store=store, rank=rank, world_size=cp,
                            timeout=timedelta(seconds=max(start_timeout, timeout + 10.0)))
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


def _rank_main(rank: int, cp: int, port: int, timeout: float, start_timeout: float, payload: bytes,
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
        _message(conn, timeout + start_timeout)  # stay in the group until the watchdog says all are done
    world.pg_map.pop(group, None)
    world.pg_group_ranks.pop(group, None)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# In the watchdog process
# ---------------------------------------------------------------------------------------------


class _Watchdog(_Coordinator):
    """The thread backend's coordinator, fed by events from rank processes instead of threads."""

    def __init__(self, size: int, timeout: float) -> None:
        super().__init__(size, timeout)
        self.first_entry: dict[int, tuple[float, CollectiveCall]] = {}

    def enter(self, rank: int, call: CollectiveCall) -> None:
        with self.cond:
            if self.failure is not None:
                return
            state = self.states[rank]
            state.calls.append(call)
            state.status = "waiting"
            arrivals = self.pending.setdefault(call.seq, {})
            arrivals[rank] = (call, None)
            self.first_entry.setdefault(call.seq, (time.monotonic(), call))
            self._check(call.seq)
            if self.failure is None and len(arrivals) == self.size:
                self.completed.add(call.seq)
                del self.pending[call.seq]

    def left(self, rank: int) -> None:
        with self.cond:
            if self.failure is None:
                self.states[rank].status = "running"

    def expire(self, run_deadline: float) -> None:
        """Fail a collective that waited ``timeout`` seconds, or ranks that ran past the deadline."""
        now = time.monotonic()
        with self.cond:
            for seq in sorted(self.pending):
                started, call = self.first_entry[seq]
                if self.failure is None and now - started >= self.timeout:
                    self._fail_timeout(call)
            if self.failure is None and now >= run_deadline:
                stuck = "; ".join(s.describe() for s in self.states if s.status in ("running", "waiting"))
                self._fail("timeout", f"ranks did not finish within {self.timeout:g} s: {stuck}")

    def fail(self, kind: str, message: str) -> None:
        with self.cond:
            if self.failure is None:
                self._fail(kind, message)

    def next_deadline(self, run_deadline: float) -> float:
        starts = [self.first_entry[seq][0] + self.timeout for seq in self.pending]
        return min([run_deadline, *starts])

    @property
    def finished(self) -> bool:
        return all(s.status in ("returned", "raised") for s in self.states)


def _remote_error(name: str, message: str, blob: bytes | None) -> BaseException:
    """The rank's exception as it was raised, or a stand-in of the same class name."""
    if blob is not None:
        try:
            return pickle.loads(blob)
        except Exception:  # noqa: BLE001 - fall back to a stand-in
            pass
    return type(name, (RankProcessError,), {"__module__": __name__})(message)


class _Ranks:
    """The rank processes of one run, their pipes, and the events they send."""

    def __init__(self, cp: int, payload: bytes, port: int, timeout: float, start_timeout: float) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.processes = []
        self.ended: set[int] = set()
        for rank in range(cp):
            parent_end, child_end = ctx.Pipe(duplex=True)
            process = ctx.Process(
                target=_rank_main, name=f"cpinspect-gloo-rank{rank}", daemon=True,
                args=(rank, cp, port, timeout, start_timeout, payload, child_end, os.getpid()),
            )
            self.conns.append(parent_end)
            self.processes.append((process, child_end))

    def start(self) -> None:
        for process, child_end in self.processes:
            process.start()
            child_end.close()

    def poll(self, until: float) -> list[tuple[int, tuple[Any, ...] | None]]:
        """Events that arrived before ``until``; ``(rank, None)`` once when a rank's process ended."""
        live = [p.sentinel for r, (p, _) in enumerate(self.processes) if r not in self.ended]
        handles: list[Any] = [c for c in self.conns if not c.closed] + live
        wait(handles, timeout=max(0.0, until - time.monotonic()))
        events: list[tuple[int, tuple[Any, ...] | None]] = []
        for rank, (process, _) in enumerate(self.processes):
            ended = rank not in self.ended and process.exitcode is not None
            events.extend((rank, event) for event in self._drain(rank))  # everything sent before it ended
            if ended:
                self.ended.add(rank)
                events.append((rank, None))
        return events

    def _drain(self, rank: int) -> list[tuple[Any, ...]]:
        conn, events = self.conns[rank], []
        try:
            while not conn.closed and conn.poll(0):
                events.append(pickle.loads(conn.recv_bytes()))
        except (EOFError, OSError):
            conn.close()
        return events

    def send_all(self, message: bytes) -> None:
        for conn in self.conns:
            try:
                conn.send_bytes(message)
            except (OSError, ValueError):
                pass

    def exit_code(self, rank: int) -> int | None:
        return self.processes[rank][0].exitcode

    def stop(self, grace: float) -> None:
        """Release every rank, give them ``grace`` seconds, then terminate and kill the rest; reap all."""
        self.send_all(b"exit")
        deadline = time.monotonic() + grace
        started = [p for p, _ in self.processes if p.pid is not None]
        for process in started:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in started:
            if process.is_alive():
                process.terminate()
        for process in started:
            process.join(1.0)
            if process.is_alive():
                process.kill()
                process.join(5.0)
        for conn in self.conns:
            conn.close()


def _died(rank: int, code: int | None) -> RankProcessError:
    if code is not None and code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with code {code}"
    return RankProcessError(f"the process of rank {rank} {how} before reporting a result")


def _start(ranks: _Ranks, watchdog: _Watchdog, cp: int, start_timeout: float) -> bool:
    """Wait until every rank joined the gloo group; on failure record it and return False."""
    deadline = time.monotonic() + start_timeout
    ready: set[int] = set()
    while len(ready) < cp:
        if time.monotonic() >= deadline:
            missing = ", ".join(str(r) for r in range(cp) if r not in ready)
            watchdog.fail("timeout", f"rank(s) {missing} did not join the gloo group within {start_timeout:g} s "
                                      "(process start, import torch, rendezvous on 127.0.0.1)")
            return False
        for rank, event in ranks.poll(deadline):
            if event is None and rank not in ready:
                watchdog.finish(rank, error=_died(rank, ranks.exit_code(rank)))
            elif event is not None and event[0] == "ready":
                ready.add(rank)
            elif event is not None and event[0] == "raised":
                watchdog.finish(rank, error=_remote_error(*event[1:4]), site=event[4])
        failed = [s for s in watchdog.states if s.status == "raised"]
        if failed:
            lines = "; ".join(s.describe() for s in failed)
            watchdog.fail("exception", f"rank process(es) failed before the group was formed: {lines}")
            return False
    return True


def _apply(watchdog: _Watchdog, ranks: _Ranks, rank: int, event: tuple[Any, ...] | None) -> None:
    if event is None:
        if watchdog.states[rank].status not in ("returned", "raised"):
            watchdog.finish(rank, error=_died(rank, ranks.exit_code(rank)))
        return
    kind = event[0]
    if kind == "enter":
        watchdog.enter(rank, event[1])
    elif kind == "left":
        watchdog.left(rank)
    elif kind == "returned":
        watchdog.finish(rank, value=pickle.loads(event[1]))
    elif kind == "raised":
        watchdog.finish(rank, error=_remote_error(*event[1:4]), site=event[4])


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
    try:
        payload = pickle.dumps((fn, args, kwargs))
    except Exception as exc:  # noqa: BLE001 - say what the process backend needs
        raise TypeError(
            f"the gloo backend sends {getattr(fn, '__qualname__', fn)!r} and its arguments to {cp} new processes, "
            f"but they cannot be pickled ({exc}); pass a module-level function and tensors/plain values"
        ) from exc
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=start_timeout))
    watchdog = _Watchdog(cp, timeout)
    ranks = _Ranks(cp, payload, store.port, timeout, start_timeout)
    try:
        ranks.start()
        if _start(ranks, watchdog, cp, start_timeout):
            ranks.send_all(b"go")
            _watch(ranks, watchdog, time.monotonic() + timeout + 1.0)
    finally:
        # After a failure some ranks sit in a collective that can never complete: do not wait long.
        ranks.stop(_GRACE_S if watchdog.failure is None else 0.5)
        del store
    failure = watchdog.failure if watchdog.failure is not None else _exception_failure(watchdog.states)
    return list(watchdog.states), failure


def _watch(ranks: _Ranks, watchdog: _Watchdog, run_deadline: float) -> None:
    """Feed rank events to the watchdog until all ranks finished or it recorded a failure."""
    while watchdog.failure is None and not watchdog.finished:
        for rank, event in ranks.poll(watchdog.next_deadline(run_deadline)):
            _apply(watchdog, ranks, rank, event)
            if watchdog.failure is not None:
                return
        watchdog.expire(run_deadline)
