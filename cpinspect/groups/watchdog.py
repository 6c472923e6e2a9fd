"""The watchdog side of the gloo backend: the rank processes, their events, the deadlines.

:func:`supervise` starts the rank processes of :func:`cpinspect.groups.gloo.execute_gloo`, waits
until all joined the gloo group, releases them, and feeds every event they send (made a subgroup,
entered a collective, left it, posted a send or receive, blocked in it, returned, raised, died)
into a :class:`Watchdog`: one coordinator per group, the thread backend's, so a divergence is
reported with the same words as soon as it is visible.
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

from cpinspect.groups.collectives import DATA_CHECKS
from cpinspect.groups.coordinator import CollectiveAbort, CollectiveCall, Coordinator, SpmdError, stall_limit
from cpinspect.groups.p2p import P2POp, PointToPoint


class RankProcessError(RuntimeError):
    """A rank's process died, or its exception could not be sent back as it was."""


class GroupWatchdog(Coordinator):
    """One group's coordinator (the world or a subgroup), fed by events from rank processes instead of threads.

    A rank waits for the watchdog's word (``reply``, by this group's rank) at each collective, sent
    once every member entered it and what they passed fits, and at each send/receive it posts, sent
    once the mailbox (the thread backend's :class:`~cpinspect.groups.p2p.PointToPoint`, holding meta
    tensors of the same shapes and dtypes) has checked it against its peer's.
    """

    def __init__(self, size: int, timeout: float, **group: Any) -> None:
        super().__init__(size, timeout, **group)
        self.reply: Callable[[int, bytes], None] = lambda rank, word: None
        self.mailbox = PointToPoint(self)
        self.posted: dict[tuple[int, int], P2POp] = {}
        self.blocked_in: dict[int, P2POp] = {}  # rank -> the send/receive it waits in

    def enter(self, rank: int, call: CollectiveCall, meta: Any = None) -> None:
        with self.cond:
            if self.failure is not None:
                return
            if self.arrive(rank, call, meta):
                check = DATA_CHECKS.get(call.op)
                try:
                    if check is not None:
                        check([self.pending[call.seq][r][1] for r in range(self.size)])
                except ValueError as exc:  # the words of the thread backend's data movement
                    self.fail("divergence", f"{call.op} #{call.seq} could not move data: {exc}")
                    return
                self.complete(call.seq)
                for r in range(self.size):
                    self.reply(r, b"go")

    def post(self, rank: int, op_id: int, kind: str, peer: int, tag: int, shape: tuple[int, ...],
             dtype: torch.dtype, site: str) -> None:
        """A send or receive ``rank`` is about to hand to gloo: match it, then let the rank go on."""
        op = P2POp(kind, rank, peer, tag, torch.empty(shape, dtype=dtype, device="meta"), site)
        with self.cond:
            if self.failure is not None:
                return
            try:
                self.mailbox.post(op)
            except CollectiveAbort:  # a mismatch, recorded as the failure
                return
            except ValueError as exc:  # a peer outside the group: the user's error, raised at their line
                self.reply(rank, b"err:" + str(exc).encode())
                return
            self.posted[(rank, op_id)] = op
            self.reply(rank, b"ok")

    def p2p_wait(self, rank: int, op_id: int) -> None:
        with self.cond:
            op = self.posted.get((rank, op_id))
            if self.failure is None and op is not None:
                self.states[rank].status, self.states[rank].blocked = "waiting", op.describe()
                self.blocked_in[rank] = op
                self.mailbox.peer_gone(op)

    def p2p_done(self, rank: int, op_id: int) -> None:
        with self.cond:
            self.posted.pop((rank, op_id), None)
            self.blocked_in.pop(rank, None)
            if self.failure is None:
                self.states[rank].status, self.states[rank].blocked = "running", ""

    def finish(self, rank: int, value: Any = None, error: BaseException | None = None, site: str = "") -> None:
        super().finish(rank, value, error, site)
        if self.states[rank].died:  # reported as RANK_DIED, naming where the others wait
            return
        with self.cond:
            for op in list(self.blocked_in.values()):
                if self.failure is None:
                    self.mailbox.peer_gone(op)

    def unmatched_waits(self) -> bool:
        """Some rank waits in a send/receive not yet matched (a matched one is gloo moving data: no deadline)."""
        return any(not op.done for op in self.blocked_in.values())

    def left(self, rank: int, seq: int = -1) -> None:
        with self.cond:
            if self.failure is None:
                self.states[rank].status = "running"

    def expire(self, now: float) -> None:
        """Fail a collective that no member arrived at for ``timeout`` seconds, or an unmatched send/receive."""
        for seq in sorted(self.pending):
            if self.failure is None and now >= self.wait_deadline(seq):
                first = min(self.pending[seq].items())[1][0]
                self.fail_timeout(first)
        if self.failure is None and self.unmatched_waits() and now >= self.progress + self.timeout:
            self.mailbox.fail_timeout()

    def deadlines(self) -> list[float]:
        return [self.wait_deadline(seq) for seq in self.pending] + (
            [self.progress + self.timeout] if self.unmatched_waits() else [])


class Watchdog:
    """Every group of one gloo run (the world first, then each subgroup as its members announce it),
    sharing one lock and failing together, as :class:`~cpinspect.groups.mesh.SimulatedWorld` does
    for threads. Events name the group (``None``: the world) and the rank's global rank; a
    subgroup's failure names the group and its global ranks with the simulated group's words.
    """

    def __init__(self, size: int, timeout: float) -> None:
        self.world = GroupWatchdog(size, timeout)
        self.size, self.timeout, self.cond, self.states = size, self.world.timeout, self.world.cond, self.world.states
        self.groups: dict[Any, GroupWatchdog] = {None: self.world}
        self.reply: Callable[[int, bytes], None] = lambda rank, word: None  # by global rank
        self.world.reply = lambda rank, word: self.reply(rank, word)

    @property
    def failure(self) -> SpmdError | None:
        return self.world.failure

    def fail(self, kind: str, message: str) -> None:
        self.world.fail(kind, message)

    def outcome(self) -> SpmdError | None:
        return self.world.outcome()

    def add_group(self, gid: Any, members: list[int], label: str) -> None:
        """The subgroup ``gid`` of global ranks ``members`` (announced by each member; made once)."""
        with self.cond:
            if gid in self.groups:
                return
            group = GroupWatchdog(len(members), self.timeout, cond=self.cond, label=label, global_ranks=members,
                                  linked=self.world.linked)
            group.reply = lambda rank, word: self.reply(members[rank], word)
            self.world.linked.append(group)
            self.groups[gid] = group

    def member(self, gid: Any, rank: int) -> tuple[GroupWatchdog, int]:
        group = self.groups[gid]
        return group, group.global_ranks.index(rank)

    def start_clock(self) -> None:
        with self.cond:
            for group in self.groups.values():
                group.progress = time.monotonic()

    def finish(self, rank: int, value: Any = None, error: BaseException | None = None, site: str = "") -> None:
        for group in list(self.groups.values()):  # the world first, then subgroups: the simulated order
            if rank in group.global_ranks:
                group.finish(group.global_ranks.index(rank), value, error, site)

    def died(self, rank: int, code: int | None) -> None:
        """``rank``'s process ended without a result: ``RANK_DIED``, naming the signal and where the others wait."""
        with self.cond:
            for group in self.groups.values():
                if rank in group.global_ranks:
                    group.states[group.global_ranks.index(rank)].died = _how(code)
            self.finish(rank, error=_died(rank, code))
            others = "; ".join(self.where(s.rank) for s in self.states if s.rank != rank) or "no other rank"
            self.fail("died", f"{self.states[rank].describe()}. The other ranks: {others}. This is not a divergence: "
                              "the process ended (out of memory, a signal from outside, or a crash in native code)")

    def where(self, rank: int) -> str:
        """``rank``'s state, from the subgroup it waits in if it waits in one."""
        for group in list(self.groups.values())[1:]:
            if rank in group.global_ranks:
                state = group.states[group.global_ranks.index(rank)]
                if state.status == "waiting":
                    return f"in group {group.label} (global rank {rank}): {state.describe()}"
        return self.states[rank].describe()

    def _stalled(self, now: float, limit: float) -> bool:
        """No collective or unmatched send/receive pending in any group, some rank in its own code, for ``limit`` s."""
        groups = list(self.groups.values())
        waiting = {g.global_ranks[s.rank] for g in groups for s in g.states if s.status == "waiting"}
        return (not any(g.pending or g.unmatched_waits() for g in groups)
                and any(s.computing and s.rank not in waiting for s in self.states)
                and now - max(g.progress for g in groups) >= limit)

    def expire(self) -> None:
        """Fail a collective that no rank arrived at for ``timeout`` seconds, or ranks stalled in their own code."""
        now = time.monotonic()
        with self.cond:
            for group in list(self.groups.values()):
                if self.failure is None:
                    group.expire(now)
            if self.failure is None and self._stalled(now, stall_limit(self.timeout)):
                self.world.fail_stall(stall_limit(self.timeout))

    def next_deadline(self) -> float:
        progress = max(g.progress for g in self.groups.values())
        deadlines = [d for g in self.groups.values() for d in g.deadlines()]
        return min([progress + stall_limit(self.timeout), time.monotonic() + 1.0, *deadlines])

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

    def send(self, rank: int, message: bytes) -> None:
        try:
            self.conns[rank].send_bytes(message)
        except (OSError, ValueError):
            pass

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


def _how(code: int | None) -> str:
    """How a process ended, from its exit code: ``was killed by SIGKILL`` or ``exited with code 3``."""
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _died(rank: int, code: int | None) -> RankProcessError:
    return RankProcessError(f"the process of rank {rank} {_how(code)} before reporting a result")


def supervise(ranks: RankProcesses, watchdog: Watchdog, start_timeout: float) -> None:
    """Start the ranks, wait until all joined the group, release them, then feed their events to the
    watchdog until every rank finished or it recorded a failure (the caller stops the processes)."""
    ranks.start()
    watchdog.reply = ranks.send
    if _start(ranks, watchdog, watchdog.size, start_timeout):
        ranks.send_all(b"go")
        watchdog.start_clock()
        _watch(ranks, watchdog)


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
            elif event is not None and event[0] == "group":  # a mesh's subgroup, made before the run starts
                watchdog.add_group(*event[1:])
            elif event is not None and event[0] == "raised":
                watchdog.finish(rank, error=_remote_error(*event[1:4]), site=event[4])
        failed = [s for s in watchdog.states if s.status == "raised"]
        if failed:
            lines = "; ".join(s.describe() for s in failed)
            watchdog.fail("exception", f"rank process(es) failed before the group was formed: {lines}")
            return False
    return True


_GROUP_EVENTS = {"enter": "enter", "post": "post", "wait": "p2p_wait", "done": "p2p_done", "left": "left"}


def _apply(watchdog: Watchdog, ranks: RankProcesses, rank: int, event: tuple[Any, ...] | None) -> None:
    if event is None:
        if watchdog.states[rank].status not in ("returned", "raised"):
            watchdog.died(rank, ranks.exit_code(rank))
        return
    kind = event[0]
    if kind == "group":
        watchdog.add_group(*event[1:])
    elif kind in _GROUP_EVENTS:  # (kind, group key, ...): for the group's coordinator, by its rank
        group, member = watchdog.member(event[1], rank)
        getattr(group, _GROUP_EVENTS[kind])(member, *event[2:])
    elif kind == "returned":
        watchdog.finish(rank, value=pickle.loads(event[1]))
    elif kind == "raised":
        watchdog.finish(rank, error=_remote_error(*event[1:4]), site=event[4])


def _watch(ranks: RankProcesses, watchdog: Watchdog) -> None:
    """Feed rank events to the watchdog until all ranks finished or it recorded a failure."""
    while watchdog.failure is None and not watchdog.finished:
        for rank, event in ranks.poll(watchdog.next_deadline()):
            _apply(watchdog, ranks, rank, event)
            if watchdog.failure is not None:
                return
        watchdog.expire()
