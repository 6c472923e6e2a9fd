"""The watchdog side of the gloo backend: the rank processes, their events, the deadlines.

:func:`supervise` starts the rank processes of :func:`cpinspect.groups.gloo.execute_gloo`, waits
until all joined the gloo group, releases them, and feeds every event they send (entered a
collective, left it, returned, raised, died) into a :class:`Watchdog`: the coordinator the thread
backend uses, so a divergence is reported with the same words as soon as it is visible.
"""

from __future__ import annotations

import os
import pickle
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from cpinspect.groups.coordinator import CollectiveCall, Coordinator


class RankProcessError(RuntimeError):
    """A rank's process died, or its exception could not be sent back as it was."""


class Watchdog(Coordinator):
    """The thread backend's coordinator, fed by events from rank processes instead of threads."""

    def __init__(self, size: int, timeout: float) -> None:
        super().__init__(size, timeout)
        self.first_entry: dict[int, tuple[float, CollectiveCall]] = {}

    def enter(self, rank: int, call: CollectiveCall) -> None:
        with self.cond:
            if self.failure is not None:
                return
            self.first_entry.setdefault(call.seq, (time.monotonic(), call))
            if self.arrive(rank, call, None):
                self.complete(call.seq)

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
                    self.fail_timeout(call)
            if now >= run_deadline:
                self.fail_overrun(("running", "waiting"))

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


class RankProcesses:
    """The rank processes of one run, their pipes, and the events they send."""

    def __init__(self, target: Callable[..., None], cp: int, payload: bytes, port: int, timeout: float,
                 start_timeout: float) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.processes = []
        self.ended: set[int] = set()
        for rank in range(cp):
            parent_end, child_end = ctx.Pipe(duplex=True)
            process = ctx.Process(
                target=target, name=f"cpinspect-gloo-rank{rank}", daemon=True,
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


def supervise(ranks: RankProcesses, watchdog: Watchdog, start_timeout: float) -> None:
    """Start the ranks, wait until all joined the group, release them, then feed their events to the
    watchdog until every rank finished or it recorded a failure (the caller stops the processes)."""
    ranks.start()
    if _start(ranks, watchdog, watchdog.size, start_timeout):
        ranks.send_all(b"go")
        _watch(ranks, watchdog, time.monotonic() + watchdog.timeout + 1.0)


def _start(ranks: RankProcesses, watchdog: Watchdog, cp: int, start_timeout: float) -> bool:
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


def _apply(watchdog: Watchdog, ranks: RankProcesses, rank: int, event: tuple[Any, ...] | None) -> None:
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


def _watch(ranks: RankProcesses, watchdog: Watchdog, run_deadline: float) -> None:
    """Feed rank events to the watchdog until all ranks finished or it recorded a failure."""
    while watchdog.failure is None and not watchdog.finished:
        for rank, event in ranks.poll(watchdog.next_deadline(run_deadline)):
            _apply(watchdog, ranks, rank, event)
            if watchdog.failure is not None:
                return
        watchdog.expire(run_deadline)
