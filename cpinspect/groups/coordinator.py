"""The meeting point every process-group backend shares: per-rank state, collective fingerprints,
and the rules that turn "the ranks did not run the same program" into one message.

The thread backend (:mod:`cpinspect.groups.simulated`) calls :meth:`Coordinator.collective` from
each rank thread; the gloo backend (:mod:`cpinspect.groups.gloo`) feeds the same coordinator with
events from rank processes. Either way a divergence is reported with the same words, as soon as
it is visible, and every wait has a deadline.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cpinspect.core.errors import InputError

DEFAULT_TIMEOUT_S = 10.0
STALL_FACTOR, STALL_MIN_S = 10.0, 60.0


def validate_timeout(timeout: float) -> float:
    """``timeout`` as a float when it is a positive, finite number of seconds; else an exit-2 InputError."""
    try:
        value = float(timeout)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"--timeout is {timeout!r}: the seconds a collective may wait must be a positive number",
                         where="--timeout", fix="pass a positive number of seconds, e.g. --timeout 10")
    return value


def stall_limit(timeout: float) -> float:
    """How long every unfinished rank may run its own code with no collective pending and no progress.

    No collective is waiting then, so this is not the collective ``timeout``: slow compute must not
    be called a divergence. The bound only keeps a function stuck in its own code from hanging forever.
    """
    return max(STALL_MIN_S, STALL_FACTOR * timeout)


@dataclass(frozen=True)
class CollectiveCall:
    """One rank's entry into one collective: what it asked for and from where."""

    seq: int
    op: str
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    detail: str
    call_site: str
    key: tuple[Any, ...] = ()

    def fingerprint(self) -> tuple[Any, ...]:
        """What every rank must agree on; ``key`` replaces shapes where inputs may differ (uneven gathers)."""
        return (self.op, self.key) if self.key else (self.op, self.shapes, self.dtypes, self.detail)

    def describe(self) -> str:
        shapes = ", ".join(f"{list(s)} {d}" for s, d in zip(self.shapes, self.dtypes))
        inside = ", ".join(part for part in (shapes, self.detail) if part)
        return f"{self.op}({inside}) #{self.seq} at {self.call_site}"


@dataclass
class RankState:
    """Where one simulated rank stands: running, waiting in a collective, returned or raised."""

    rank: int
    status: str = "running"
    calls: list[CollectiveCall] = field(default_factory=list)
    error: BaseException | None = None
    error_site: str = ""
    value: Any = None
    died: str = ""  # how its process ended ("was killed by SIGKILL") when it died without a result
    blocked: str = ""  # the send or receive it is blocked in, described

    def describe(self) -> str:
        done = len(self.calls)
        if self.died:
            last = f"; its last collective was {self.calls[-1].describe()}" if self.calls else ""
            return f"rank {self.rank} died: its process {self.died} after {done} collective(s){last}"
        if self.status == "waiting" and self.blocked:
            return f"rank {self.rank} is blocked in {self.blocked}"
        if self.status == "waiting":
            return f"rank {self.rank} is waiting in {self.calls[-1].describe()}"
        if self.status == "returned":
            return f"rank {self.rank} returned after {done} collective(s)"
        if self.status == "raised":
            where = f" at {self.error_site}" if self.error_site else ""
            return (
                f"rank {self.rank} raised {type(self.error).__name__}: {self.error}{where} "
                f"after {done} collective(s)"
            )
        last = f"; its last collective was {self.calls[-1].describe()}" if self.calls else ""
        return f"rank {self.rank} is still running outside any collective after {done} collective(s){last}"

    @property
    def computing(self) -> bool:
        """Running its own code (not waiting in a collective, not finished)."""
        return self.status == "running"


class SpmdError(RuntimeError):
    """The simulated ranks did not run the same program to completion.

    ``kind`` is ``"divergence"`` (different collectives, or a rank left while others waited),
    ``"timeout"`` (no rank arrived at a pending collective for ``timeout`` seconds), ``"died"``
    (a rank's process ended without a result: gloo only) or ``"exception"`` (ranks raised without
    a collective mismatch). ``ranks`` holds every rank's final :class:`RankState`; for a timeout,
    ``slow_ranks`` are the absent ranks that were running their own code (slow, or stuck, but not
    seen in another collective) rather than waiting elsewhere.
    """

    def __init__(self, kind: str, message: str, ranks: list[RankState], slow_ranks: Sequence[int] = ()) -> None:
        self.kind = kind
        self.ranks = ranks
        self.slow_ranks = list(slow_ranks)
        super().__init__(message)

    @property
    def raised_ranks(self) -> list[int]:
        return [s.rank for s in self.ranks if s.status == "raised"]


class CollectiveAbort(Exception):
    """Raised inside a waiting rank when the collective it waits in can never complete."""


class Coordinator:
    """Shared meeting point of one simulated group: matches calls by sequence number."""

    def __init__(self, size: int, timeout: float, *, cond: threading.Condition | None = None,
                 label: str = "", global_ranks: Sequence[int] | None = None,
                 linked: list[Coordinator] | None = None) -> None:
        self.size = size
        self.timeout = validate_timeout(timeout)
        self.cond = cond if cond is not None else threading.Condition()  # re-entrant: fail() may hold it
        self.label = label  # a subgroup's name; "" for a group that is the whole world
        self.global_ranks = list(global_ranks) if global_ranks is not None else list(range(size))
        self.linked = linked if linked is not None else [self]  # every group of one run: they fail together
        self.states = [RankState(r) for r in range(size)]
        self.pending: dict[int, dict[int, tuple[CollectiveCall, Any]]] = {}
        self.last_arrival: dict[int, float] = {}  # seq -> when the latest rank arrived (progress)
        self.progress = time.monotonic()  # when any rank last arrived, completed or finished
        self.completed: set[int] = set()
        self.failure: SpmdError | None = None
        self._fingerprints: dict[int, tuple[Any, ...]] = {}  # seq -> what the first arrival called
        self._departed: list[RankState] = []  # ranks that returned or raised, in order

    def arrive(self, rank: int, call: CollectiveCall, payload: Any) -> bool:
        """Record ``rank``'s entry into ``call`` and compare it (hold ``cond``); True once all arrived, unfailed."""
        state = self.states[rank]
        state.calls.append(call)
        state.status = "waiting"
        arrivals = self.pending.setdefault(call.seq, {})
        arrivals[rank] = (call, payload)
        self.progress = self.last_arrival[call.seq] = time.monotonic()
        self._check(call.seq)
        return self.failure is None and len(arrivals) == self.size

    def complete(self, seq: int) -> None:
        """Collective ``seq`` ran on every rank (hold ``cond``)."""
        self.completed.add(seq)
        del self.pending[seq]
        self.last_arrival.pop(seq, None)
        self._fingerprints.pop(seq, None)
        self.progress = time.monotonic()

    def wait_deadline(self, seq: int) -> float:
        """When pending collective ``seq`` times out: ``timeout`` after its latest arrival (progress-based).

        A collective fails only when no further rank arrived at it for ``timeout`` seconds, so ranks
        arriving one by one (GIL-bound compute at high cp) never add up to a timeout.
        """
        return self.last_arrival.get(seq, time.monotonic()) + self.timeout

    def collective(self, rank: int, call: CollectiveCall, payload: Any, move: Callable[[list[Any]], None]) -> None:
        """A rank thread's collective: wait for every rank, then ``move`` the payloads; the wait has a deadline."""
        with self.cond:
            if self.failure is not None:
                raise CollectiveAbort(str(self.failure))
            state = self.states[rank]
            if self.arrive(rank, call, payload):
                try:
                    move([self.pending[call.seq][r][1] for r in range(self.size)])
                except Exception as exc:  # a data-movement error is a mismatch the fingerprint missed
                    self.fail("divergence", f"{call.op} #{call.seq} could not move data: {exc}")
                else:
                    self.complete(call.seq)
                self.cond.notify_all()
            while self.failure is None and call.seq not in self.completed:
                remaining = self.wait_deadline(call.seq) - time.monotonic()
                if remaining <= 0:
                    self.fail_timeout(call)
                    break
                self.cond.wait(remaining)
            if self.failure is not None and call.seq not in self.completed:
                raise CollectiveAbort(str(self.failure))
            state.status = "running"

    def finish(self, rank: int, value: Any = None, error: BaseException | None = None, site: str = "") -> None:
        with self.cond:
            state = self.states[rank]
            state.value = value
            state.error = error
            state.error_site = site
            state.status = "raised" if error is not None else "returned"
            self.progress = time.monotonic()
            self._departed.append(state)
            for seq in list(self.pending):
                self._check(seq)
            self.cond.notify_all()

    def _check(self, seq: int) -> None:
        """Fail the group if calls at ``seq`` disagree or a rank left without making call ``seq``.

        Called right after each arrival, so only the newest call is compared, with the first one
        at ``seq`` (all earlier arrivals agreed with it), and only departed ranks are scanned:
        constant work per arrival, where comparing all arrivals would make every collective
        quadratic in cp. The full picture is assembled only for the message of a failure.
        """
        if self.failure is not None:
            return
        arrivals = self.pending.get(seq, {})
        if arrivals:
            newest = next(reversed(arrivals.values()))[0].fingerprint()
            if newest != self._fingerprints.setdefault(seq, newest):
                calls = sorted((r, c) for r, (c, _) in arrivals.items())
                lines = [f"rank {r} called {c.describe()}" for r, c in calls]
                self.fail("divergence", f"ranks called different collectives at position #{seq}: " + "; ".join(lines))
                return
        gone = [s for s in self._departed if len(s.calls) <= seq]
        dead = [s for s in gone if s.died]
        if arrivals and dead:
            calls = sorted((r, c) for r, (c, _) in arrivals.items())
            waiting = "; ".join(f"rank {r} entered {c.describe()}" for r, c in calls)
            self.fail("died", f"{'; '.join(s.describe() for s in dead)}. Collective #{seq} can never complete: "
                              f"{waiting}. This is not a divergence: the process ended (out of memory, a signal "
                              "from outside, or a crash in native code)")
            return
        if arrivals and gone:
            calls = sorted((r, c) for r, (c, _) in arrivals.items())
            waiting = "; ".join(f"rank {r} entered {c.describe()}" for r, c in calls)
            left = "; ".join(s.describe() for s in gone)
            self.fail(
                "divergence",
                f"collective #{seq} can never complete: {waiting}; but {left}. In a real job the waiting "
                "ranks would hang until the NCCL/gloo timeout",
            )

    def fail_timeout(self, call: CollectiveCall) -> None:
        """``call`` waited ``timeout`` seconds after its latest arrival for the ranks that never arrived.

        The message says which it was: absent ranks running their own code are slow (or stuck in it),
        absent ranks waiting in another collective are a divergence across groups.
        """
        absent = [s for s in self.states if len(s.calls) <= call.seq]
        lines = "; ".join(s.describe() for s in absent)
        slow = [s.rank for s in absent if s.computing]
        verdict = ""
        if slow and len(slow) == len(absent):
            verdict = (f". No rank waiting here was blocked by another collective: rank(s) {_ranks(slow)} were still "
                       "computing, so they are slow or stuck in their own code, not diverged; if they are merely "
                       "slow, raise --timeout")
        self.fail("timeout", f"{call.describe()} did not complete within {self.timeout:g} s of its latest "
                             f"arrival: {lines}{verdict}", slow)

    def fail_stall(self, limit: float) -> None:
        """Every unfinished rank ran its own code for ``limit`` seconds with no collective pending."""
        stuck = [s for s in self.states if s.computing]
        lines = "; ".join(s.describe() for s in stuck)
        self.fail("timeout", f"ranks did not finish: no collective was pending and nothing progressed for "
                             f"{limit:g} s: {lines}. These ranks are stuck (or very slow) in their own code, "
                             "not diverged", [s.rank for s in stuck])

    def stalled(self, limit: float) -> bool:
        """No collective pending, no progress for ``limit`` seconds, and some rank still computing (hold ``cond``)."""
        return (not self.pending and any(s.computing for s in self.states)
                and time.monotonic() - self.progress >= limit)

    def fail(self, kind: str, message: str, slow_ranks: Sequence[int] = ()) -> None:
        """Record the group's first failure and wake every waiting rank; later ones are ignored."""
        with self.cond:
            if self.failure is None:
                if self.label:
                    message = (f"in group {self.label} (its ranks 0..{self.size - 1} are global ranks "
                               f"{self.global_ranks}): {message}")
                self.failure = SpmdError(kind, message, self.states, [self.global_ranks[r] for r in slow_ranks])
                for other in self.linked:  # ranks waiting in the run's other groups must not wait on
                    if other.failure is None:
                        other.failure = self.failure
                        other.cond.notify_all()
            self.cond.notify_all()

    def outcome(self) -> SpmdError | None:
        """The failure, else the ranks' exceptions as one (None when every rank returned)."""
        return self.failure if self.failure is not None else exception_failure(self.states)


def _ranks(ranks: Sequence[int]) -> str:
    return ", ".join(str(r) for r in ranks)


def only_some_raised(raised: Sequence[int], size: int, waiting: Sequence[str] | None = None) -> str:
    """The sentence for an exception on some ranks only: in a real job the others would hang.

    Without ``waiting`` (the group's message, followed by every raised rank's state) the others
    hang "at their next collective"; with it, the collectives they wait in are named.
    """
    head = f"only rank(s) {', '.join(str(r) for r in raised)} of {size} raised"
    if waiting is None:
        return f"{head}: in a real job the others would hang at their next collective"
    return f"{head}; in a real job the others would hang: {'; '.join(waiting) or 'the others at their next collective'}"


def exception_failure(states: list[RankState]) -> SpmdError | None:
    """The ``exception`` failure of ranks that raised without a collective mismatch (None if none raised)."""
    raised = [s for s in states if s.status == "raised"]
    if not raised:
        return None
    lines = "; ".join(s.describe() for s in raised)
    scope = "all ranks raised" if len(raised) == len(states) else only_some_raised(
        [s.rank for s in raised], len(states))
    return SpmdError("exception", f"{scope}: {lines}", states)


def describe_tensors(tensors: Sequence[torch.Tensor]) -> tuple[tuple[tuple[int, ...], ...], tuple[str, ...]]:
    """Shapes and dtype names (``int64``) of a collective's tensors, for its fingerprint."""
    return tuple(tuple(t.shape) for t in tensors), tuple(str(t.dtype).removeprefix("torch.") for t in tensors)


def reduce_op_name(opts: Any) -> str:
    """``SUM``, ``MAX``, ... of an ``AllreduceOptions`` (torch wraps the op differently across versions)."""
    op = getattr(opts, "reduceOp", None)
    name = getattr(op, "op", op)
    return str(getattr(name, "name", name)).split(".")[-1].upper()
