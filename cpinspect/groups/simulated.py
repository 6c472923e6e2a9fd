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

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from cpinspect.groups.callsite import call_site
from cpinspect.groups.collectives import ExtraCollectives, reduce_stack, reducer, require_contiguous
from cpinspect.groups.coordinator import (
    DEFAULT_TIMEOUT_S,
    CollectiveCall,
    Coordinator,
    RankState,
    SpmdError,
    describe_tensors,
)
from cpinspect.groups.p2p import P2POp, P2PWork, PointToPoint

# the coordinator's types are part of this module's API: execute_spmd returns them
__all__ = ["DEFAULT_TIMEOUT_S", "CollectiveCall", "RankState", "SimulatedProcessGroup", "SpmdError", "execute_spmd",
           "run_spmd"]


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


class SimulatedProcessGroup(ExtraCollectives, dist.ProcessGroup):  # type: ignore[misc]  # torch overloads
    """One rank's view of a simulated CP group; collectives meet in a shared coordinator."""

    def __init__(self, coordinator: Coordinator, rank: int, size: int, name: str = "cp",
                 mailbox: PointToPoint | None = None) -> None:
        super().__init__(rank, size)
        self._coordinator = coordinator
        self._mailbox = mailbox if mailbox is not None else PointToPoint(coordinator)
        self._group_label = name
        self._seq = 0

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return "cpinspect-simulated"

    @property
    def group_name(self) -> str:
        return f"cpinspect-{self._group_label}-{id(self._coordinator):x}"

    def _enter(self, op: str, tensors: Sequence[torch.Tensor], detail: str, payload: Any,
               move: Callable[[list[Any]], None], key: tuple[Any, ...] = ()) -> dist.Work:
        shapes, dtypes = describe_tensors(tensors)
        call = CollectiveCall(self._seq, op, shapes, dtypes, detail, call_site(3), key)
        self._seq += 1
        self._coordinator.collective(self.rank(), call, payload, move)
        return _completed_work()

    def enter_new_group(self, members: list[int]) -> None:
        """``dist.new_group(members)`` as the world collective it is in torch (every rank calls it, in order)."""
        self._enter("new_group", [], f"ranks={members}", None, lambda payloads: None)

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
        out_shapes, out_dtypes = describe_tensors(outputs)
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
        require_contiguous("all_gather_into_tensor", self.rank(), output=output, input=tensor)
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
        op, reduce = reducer(opts, "all_reduce")

        def move(payloads: list[Any]) -> None:
            reduced = reduce_stack(payloads, reduce)
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

    def _post(self, kind: str, tensors: list[torch.Tensor], peer: int, tag: int) -> dist.Work:
        (tensor,) = tensors
        op = P2POp(kind, self.rank(), int(peer), int(tag), tensor, call_site(3))
        self._mailbox.post(op)
        return P2PWork(self._mailbox, op)

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> dist.Work:
        return self._post("send", tensors, dst, tag)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> dist.Work:
        return self._post("recv", tensors, src, tag)

    def __repr__(self) -> str:
        return f"SimulatedProcessGroup(rank={self.rank()}, size={self.size()})"


def execute_spmd(cp: int, fn: Callable[..., Any], *args: Any, timeout: float = DEFAULT_TIMEOUT_S,
                 **kwargs: Any) -> tuple[list[RankState], SpmdError | None]:
    """Run ``fn(group, *args, **kwargs)`` on ``cp`` threads; return every rank's state and any failure.

    Never raises for what the ranks do. ``timeout`` bounds each wait inside a collective, counted
    from the latest rank's arrival there (progress-based): ranks that are slow in their own code
    between collectives are never a failure. Only when no collective is pending and nothing has
    progressed for :func:`~cpinspect.groups.coordinator.stall_limit` seconds are the ranks still
    running reported (stuck in their own code) and left behind as daemon threads. An invalid
    ``timeout`` or threads that cannot be started raise :class:`~cpinspect.core.errors.InputError`.
    """
    from cpinspect.groups.mesh import execute_world  # mesh builds on this module's group

    return execute_world(cp, fn, args, kwargs, timeout)


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
