"""Run one function on N simulated ranks in one process, over a real ``torch.distributed`` group.

Each rank is a thread holding a :class:`SimulatedProcessGroup`, a Python subclass of
``torch.distributed.ProcessGroup``. Unmodified code that calls ``dist.all_gather(out, t,
group=group)``, ``all_gather_into_tensor``, ``all_reduce``, ``broadcast`` or ``barrier`` reaches
the methods below through torch's own dispatch; no ``init_process_group`` is needed.

Before any data moves, every rank's call is fingerprinted (op, shapes, dtypes, root, reduce op)
and compared, the way ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` and the flight recorder do across real
processes. Because all ranks live here, a rank that returns, raises or calls a different
collective while others wait is reported at once, and every wait has a deadline: nothing hangs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from cpinspect.groups.callsite import call_site, error_site

DEFAULT_TIMEOUT_S = 10.0


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
        extra = f", {self.detail}" if self.detail else ""
        return f"{self.op}({shapes}{extra}) #{self.seq} at {self.call_site}"


@dataclass
class RankState:
    """Where one simulated rank stands: running, waiting in a collective, returned or raised."""

    rank: int
    status: str = "running"
    calls: list[CollectiveCall] = field(default_factory=list)
    error: BaseException | None = None
    error_site: str = ""
    value: Any = None

    def describe(self) -> str:
        done = len(self.calls)
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


class SpmdError(RuntimeError):
    """The simulated ranks did not run the same program to completion.

    ``kind`` is ``"divergence"`` (different collectives, or a rank left while others waited),
    ``"timeout"`` (a rank never arrived within the deadline) or ``"exception"`` (ranks raised
    without a collective mismatch). ``ranks`` holds every rank's final :class:`RankState`.
    """

    def __init__(self, kind: str, message: str, ranks: list[RankState]) -> None:
        self.kind = kind
        self.ranks = ranks
        super().__init__(message)

    @property
    def raised_ranks(self) -> list[int]:
        return [s.rank for s in self.ranks if s.status == "raised"]


class _CollectiveAbort(Exception):
    """Raised inside a waiting rank when the collective it waits in can never complete."""






class _Coordinator:
    """Shared meeting point of one simulated group: matches calls by sequence number."""

    def __init__(self, size: int, timeout: float) -> None:
        self.size = size
        self.timeout = timeout
        self.cond = threading.Condition()
        self.states = [RankState(r) for r in range(size)]
        self.pending: dict[int, dict[int, tuple[CollectiveCall, Any]]] = {}
        self.completed: set[int] = set()
        self.failure: SpmdError | None = None
        self._fingerprints: dict[int, tuple[Any, ...]] = {}  # seq -> what the first arrival called
        self._departed: list[RankState] = []  # ranks that returned or raised, in order

    def collective(self, rank: int, call: CollectiveCall, payload: Any, move: Callable[[list[Any]], None]) -> None:
        deadline = time.monotonic() + self.timeout
        with self.cond:
            if self.failure is not None:
                raise _CollectiveAbort(str(self.failure))
            state = self.states[rank]
            state.calls.append(call)
            state.status = "waiting"
            arrivals = self.pending.setdefault(call.seq, {})
            arrivals[rank] = (call, payload)
            self._check(call.seq)
            if self.failure is None and len(arrivals) == self.size:
                try:
                    move([arrivals[r][1] for r in range(self.size)])
                except Exception as exc:  # a data-movement error is a mismatch the fingerprint missed
                    self._fail("divergence", f"{call.op} #{call.seq} could not move data: {exc}")
                else:
                    self.completed.add(call.seq)
                    del self.pending[call.seq]
                    self._fingerprints.pop(call.seq, None)
                self.cond.notify_all()
            while self.failure is None and call.seq not in self.completed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._fail_timeout(call)
                    break
                self.cond.wait(remaining)
            if self.failure is not None and call.seq not in self.completed:
                raise _CollectiveAbort(str(self.failure))
            state.status = "running"

    def finish(self, rank: int, value: Any = None, error: BaseException | None = None, site: str = "") -> None:
        with self.cond:
            state = self.states[rank]
            state.value = value
            state.error = error
            state.error_site = site
            state.status = "raised" if error is not None else "returned"
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
                self._fail("divergence", f"ranks called different collectives at position #{seq}: " + "; ".join(lines))
                return
        gone = [s for s in self._departed if len(s.calls) <= seq]
        if arrivals and gone:
            calls = sorted((r, c) for r, (c, _) in arrivals.items())
            waiting = "; ".join(f"rank {r} entered {c.describe()}" for r, c in calls)
            left = "; ".join(s.describe() for s in gone)
            self._fail(
                "divergence",
                f"collective #{seq} can never complete: {waiting}; but {left}. In a real job the waiting "
                "ranks would hang until the NCCL/gloo timeout",
            )

    def _fail_timeout(self, call: CollectiveCall) -> None:
        absent = [s for s in self.states if len(s.calls) <= call.seq]
        lines = "; ".join(s.describe() for s in absent)
        self._fail(
            "timeout",
            f"{call.describe()} did not complete within {self.timeout:g} s: {lines}",
        )

    def _fail(self, kind: str, message: str) -> None:
        self.failure = SpmdError(kind, message, self.states)
        self.cond.notify_all()


def _completed_work(value: Any = None) -> dist.Work:
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(value)
    return torch._C._distributed_c10d._create_work_from_future(future)


def _copy_all(outputs: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``out.copy_(src)`` pairwise; one fused call where torch has it (2.5x faster at cp 256)."""
    foreach_copy = getattr(torch, "_foreach_copy_", None)
    if foreach_copy is not None and all(o.device == s.device for o, s in zip(outputs, sources)):
        foreach_copy(outputs, sources)
        return
    for out, src in zip(outputs, sources):
        out.copy_(src)


def _describe_tensors(tensors: Sequence[torch.Tensor]) -> tuple[tuple[tuple[int, ...], ...], tuple[str, ...]]:
    return tuple(tuple(t.shape) for t in tensors), tuple(str(t.dtype).removeprefix("torch.") for t in tensors)


_REDUCERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "SUM": lambda s: s.sum(0),
    "AVG": lambda s: s.float().mean(0) if not s.is_floating_point() else s.mean(0),
    "PRODUCT": lambda s: s.prod(0),
    "MIN": lambda s: s.min(0).values,
    "MAX": lambda s: s.max(0).values,
    "BAND": lambda s: _fold(s, torch.bitwise_and),
    "BOR": lambda s: _fold(s, torch.bitwise_or),
    "BXOR": lambda s: _fold(s, torch.bitwise_xor),
}


def _fold(stacked: torch.Tensor, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    out = stacked[0].clone()
    for t in stacked[1:]:
        out = op(out, t)
    return out


def _reduce_op_name(opts: Any) -> str:
    op = getattr(opts, "reduceOp", None)
    name = getattr(op, "op", op)
    return str(getattr(name, "name", name)).split(".")[-1].upper()


class SimulatedProcessGroup(dist.ProcessGroup):
    """One rank's view of a simulated CP group; collectives meet in a shared coordinator."""

    def __init__(self, coordinator: _Coordinator, rank: int, size: int, name: str = "cp") -> None:
        super().__init__(rank, size)
        self._coordinator = coordinator
        self._group_label = name
        self._seq = 0

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return "cpinspect-simulated"

    @property
    def group_name(self) -> str:
        return f"cpinspect-{self._group_label}-{id(self._coordinator):x}"

    def _enter(self, op: str, tensors: Sequence[torch.Tensor], detail: str, payload: Any,
               move: Callable[[list[Any]], None], key: tuple[Any, ...] = ()) -> dist.Work:
        shapes, dtypes = _describe_tensors(tensors)
        call = CollectiveCall(self._seq, op, shapes, dtypes, detail, call_site(3), key)
        self._seq += 1
        self._coordinator.collective(self.rank(), call, payload, move)
        return _completed_work()

    def allgather(self, output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor],
                  opts: Any = None) -> dist.Work:
        outputs, (tensor,) = output_tensors[0], input_tensors
        if len(outputs) != self.size():
            raise ValueError(
                f"all_gather on rank {self.rank()}: output list has {len(outputs)} tensors, but the group has "
                f"{self.size()} ranks"
            )

        slot = outputs[self.rank()]
        if slot.shape != tensor.shape:
            raise ValueError(
                f"all_gather on rank {self.rank()}: input has shape {list(tensor.shape)} but its own output slot "
                f"has shape {list(slot.shape)}"
            )
        out_shapes, out_dtypes = _describe_tensors(outputs)
        uneven = any(shape != tuple(tensor.shape) for shape in out_shapes)
        detail = f"out={[list(s) for s in out_shapes]}" if uneven else ""

        def move(payloads: list[Any]) -> None:
            sources = [src for _, src in payloads]
            for outs, _ in payloads:  # cp x cp copies: one fused call per receiving rank
                _copy_all(outs, sources)

        # Ranks may send different row counts (uneven all-gather, as NCCL allows); what they must
        # agree on is the list of output buffers.
        return self._enter("all_gather", [tensor], detail, (outputs, tensor), move, key=(out_shapes, out_dtypes))

    def all_gather_single(self, output: torch.Tensor, tensor: torch.Tensor, opts: Any = None) -> dist.Work:
        if output.numel() != tensor.numel() * self.size():
            raise ValueError(
                f"all_gather_into_tensor on rank {self.rank()}: output has {output.numel()} elements, but "
                f"{self.size()} ranks x {tensor.numel()} input elements = {tensor.numel() * self.size()}"
            )

        def move(payloads: list[Any]) -> None:
            gathered = torch.cat([src.reshape(-1) for _, src in payloads])
            for out, _ in payloads:
                out.view(-1).copy_(gathered)

        return self._enter("all_gather_into_tensor", [tensor], "", (output, tensor), move)

    _allgather_base = all_gather_single

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        (tensor,) = tensors
        op = _reduce_op_name(opts)
        if op not in _REDUCERS:
            raise NotImplementedError(f"all_reduce with {op} is not simulated by cpinspect")

        def move(payloads: list[Any]) -> None:
            reduced = _REDUCERS[op](torch.stack(payloads)).to(payloads[0].dtype)
            for t in payloads:
                t.copy_(reduced)

        return self._enter("all_reduce", [tensor], f"op={op}", tensor, move)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        (tensor,) = tensors
        root = int(getattr(opts, "rootRank", 0))

        def move(payloads: list[Any]) -> None:
            source = payloads[root].clone()
            for t in payloads:
                t.copy_(source)

        return self._enter("broadcast", [tensor], f"src={root}", tensor, move)

    def barrier(self, opts: Any = None) -> dist.Work:
        return self._enter("barrier", [], "", None, lambda payloads: None)

    def __repr__(self) -> str:
        return f"SimulatedProcessGroup(rank={self.rank()}, size={self.size()})"


@dataclass
class SpmdRun:
    """Per-rank return values and collective logs of a completed :func:`run_spmd`."""

    values: list[Any]
    calls: list[list[CollectiveCall]]


def execute_spmd(cp: int, fn: Callable[..., Any], *args: Any, timeout: float = DEFAULT_TIMEOUT_S,
                 **kwargs: Any) -> tuple[list[RankState], SpmdError | None]:
    """Run ``fn(group, *args, **kwargs)`` on ``cp`` threads; return every rank's state and any failure.

    Never raises for what the ranks do and never waits past ``timeout`` (plus a short grace for
    threads to unwind): a rank still stuck in user code after that is reported and left behind as
    a daemon thread.
    """
    if cp < 1:
        raise ValueError(f"cp must be at least 1, got {cp}")
    coordinator = _Coordinator(cp, timeout)
    groups = [SimulatedProcessGroup(coordinator, r, cp) for r in range(cp)]
    registry = dist.distributed_c10d._world.pg_group_ranks
    for group in groups:  # lets torch translate src=/dst= ranks (identity: the CP group is the world)
        registry[group] = {r: r for r in range(cp)}

    def body(rank: int) -> None:
        try:
            value = fn(groups[rank], *args, **kwargs)
        except _CollectiveAbort as exc:
            coordinator.finish(rank, error=exc)
        except BaseException as exc:  # noqa: BLE001 - reported per rank, never swallowed silently
            coordinator.finish(rank, error=exc, site=error_site(exc))
        else:
            coordinator.finish(rank, value=value)

    threads = [threading.Thread(target=body, args=(r,), name=f"cpinspect-rank{r}", daemon=True) for r in range(cp)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout + 1.0
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with coordinator.cond:
            if any(t.is_alive() for t in threads) and coordinator.failure is None:
                stuck = "; ".join(s.describe() for s in coordinator.states if s.status == "running")
                coordinator._fail("timeout", f"ranks did not finish within {timeout:g} s: {stuck}")
            failure = coordinator.failure
            if failure is None:
                failure = _exception_failure(coordinator.states)
            return list(coordinator.states), failure
    finally:
        for group in groups:
            registry.pop(group, None)


def _exception_failure(states: list[RankState]) -> SpmdError | None:
    raised = [s for s in states if s.status == "raised"]
    if not raised:
        return None
    together = len(raised) == len(states)
    lines = "; ".join(s.describe() for s in raised)
    scope = "all ranks raised" if together else (
        f"only rank(s) {', '.join(str(s.rank) for s in raised)} of {len(states)} raised: in a real job the "
        "others would hang at their next collective"
    )
    return SpmdError("exception", f"{scope}: {lines}", states)




def run_spmd(cp: int, fn: Callable[..., Any], *args: Any, timeout: float = DEFAULT_TIMEOUT_S,
             **kwargs: Any) -> list[Any]:
    """Run ``fn(group, *args, **kwargs)`` on ``cp`` simulated ranks and return each rank's result.

    Raises :class:`SpmdError` naming every rank's state and call site if the ranks diverge,
    time out, or raise.
    """
    states, failure = execute_spmd(cp, fn, *args, timeout=timeout, **kwargs)
    if failure is not None:
        raise failure
    return [s.value for s in states]
