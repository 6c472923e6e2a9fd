"""The simulated group's collectives beyond all-gather, all-reduce, broadcast and barrier.

All-to-all (list and single tensor, even and uneven splits), reduce-scatter (list and single
tensor), reduce, gather and scatter: each is fingerprinted like the others (op, shapes, dtypes,
root, reduce op) before any data moves, and where ranks may legitimately pass different shapes
(uneven all-to-all splits) they agree on what must match and the data movement names the pair of
ranks that disagree. ``all_gather_object`` and ``broadcast_object_list`` run through torch's own
code on top of ``all_gather`` and ``broadcast``. Ops the group does not simulate raise
:class:`NotSimulatedError`, which names the op and never the user's line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from cpinspect.groups.coordinator import reduce_op_name

Reducer = Callable[[torch.Tensor], torch.Tensor]
REDUCERS: dict[str, Reducer] = {
    "SUM": lambda s: s.sum(0),
    "AVG": lambda s: s.float().mean(0) if not s.is_floating_point() else s.mean(0),
    "PRODUCT": lambda s: s.prod(0),
    "MIN": lambda s: s.min(0).values,
    "MAX": lambda s: s.max(0).values,
    "BAND": lambda s: _fold(s, torch.bitwise_and),
    "BOR": lambda s: _fold(s, torch.bitwise_or),
    "BXOR": lambda s: _fold(s, torch.bitwise_xor),
}


class NotSimulatedError(NotImplementedError):
    """An op the simulated group does not implement: cpinspect's limit, not the user's bug."""

    def __init__(self, op: str) -> None:
        super().__init__(f"{op} is not simulated by cpinspect's group (a limit of the simulation, not an error in "
                         "your code); run it under --backend gloo, or ask for it to be simulated")


def _fold(stacked: torch.Tensor, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    out = stacked[0].clone()
    for t in stacked[1:]:
        out = op(out, t)
    return out


def reducer(opts: Any, op_name: str) -> tuple[str, Reducer]:
    op = reduce_op_name(opts)
    if op not in REDUCERS:
        raise NotSimulatedError(f"{op_name} with {op}")
    return op, REDUCERS[op]


def reduce_stack(tensors: Sequence[torch.Tensor], reduce: Reducer) -> torch.Tensor:
    return reduce(torch.stack(list(tensors))).to(tensors[0].dtype)


def _splits(sizes: Sequence[int], rows: int, size: int, what: str) -> list[int]:
    """The row counts per rank: the given split sizes, or ``rows / size`` each when none are given."""
    if sizes:
        return [int(s) for s in sizes]
    if rows % size:
        raise ValueError(f"{what} has {rows} rows, which do not split evenly over {size} ranks")
    return [rows // size] * size


def require_contiguous(op: str, rank: int, **tensors: torch.Tensor) -> None:
    """A single-tensor collective's buffers must be contiguous: NCCL refuses others ("Tensors must be
    contiguous") and gloo reads and writes them as if they were (wrong values, no error)."""
    for name, tensor in tensors.items():
        if not tensor.is_contiguous():
            raise ValueError(f"{op} on rank {rank}: the {name} tensor (shape {list(tensor.shape)}, strides "
                             f"{list(tensor.stride())}) is not contiguous; NCCL refuses it and gloo would fill it "
                             "as if it were (wrong values): allocate it with torch.empty(shape) or pass "
                             "x.contiguous()")


def check_splits(splits: Sequence[tuple[Sequence[int], Sequence[int]]]) -> None:
    """All-to-all split agreement: ``splits[r]`` is (rows rank r sends to each rank, rows it expects from each)."""
    for dst, (_, received) in enumerate(splits):
        for src, (sent, _) in enumerate(splits):
            if sent[dst] != received[src]:
                raise ValueError(f"rank {src} sends {sent[dst]} row(s) to rank {dst}, which expects "
                                 f"{received[src]} from it")


def check_slots(shapes: Sequence[tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]]]) -> None:
    """List all-to-all agreement: ``shapes[r]`` is (rank r's output slot shapes, its input shapes)."""
    for dst, (outs, _) in enumerate(shapes):
        for src, (_, ins) in enumerate(shapes):
            if list(outs[src]) != list(ins[dst]):
                raise ValueError(f"rank {src} sends {list(ins[dst])} to rank {dst}, whose slot for it "
                                 f"is {list(outs[src])}")


def check_root_count(noun: str, counts: Sequence[tuple[int, int]]) -> None:
    """Gather/scatter: ``counts[r]`` is (the root rank r names, how many tensors r passed); the root's must fit."""
    root = counts[0][0]
    if counts[root][1] != len(counts):
        raise ValueError(f"the root rank {root} passed {counts[root][1]} {noun} for {len(counts)} ranks")


DATA_CHECKS: dict[str, Callable[[Sequence[Any]], None]] = {
    "all_to_all_single": check_splits,
    "all_to_all": check_slots,
    "gather": lambda counts: check_root_count("gather slot(s)", counts),
    "scatter": lambda counts: check_root_count("scatter input(s)", counts),
}
"""What each op's ranks must agree on beyond the fingerprint, from what every rank passed (its ``meta``)."""


class ExtraCollectives:
    """Mixed into :class:`~cpinspect.groups.simulated.SimulatedProcessGroup` (which provides ``_enter``)."""

    _enter: Callable[..., dist.Work]
    rank: Callable[[], int]
    size: Callable[[], int]

    def alltoall_base(self, output: torch.Tensor, tensor: torch.Tensor, output_split_sizes: list[int],
                      input_split_sizes: list[int], opts: Any = None) -> dist.Work:
        size = self.size()
        require_contiguous("all_to_all_single", self.rank(), output=output, input=tensor)
        sends = _splits(input_split_sizes, tensor.shape[0] if tensor.dim() else 0, size, "the input")
        receives = _splits(output_split_sizes, output.shape[0] if output.dim() else 0, size, "the output")

        def move(payloads: list[Any]) -> None:
            check_splits([(sent, received) for _, _, sent, received in payloads])
            chunks = [src.split(sent) for _, src, sent, _ in payloads]
            for dst, (out, _, _, _) in enumerate(payloads):
                out.copy_(torch.cat([chunks[src][dst] for src in range(size)]))

        detail = f"in_splits={sends}, out_splits={receives}" if input_split_sizes or output_split_sizes else ""
        key = (tuple(tensor.shape[1:]), tensor.dtype, tuple(output.shape[1:]), output.dtype)
        return self._enter("all_to_all_single", [tensor], detail, (output, tensor, sends, receives), move, key=key)

    def alltoall(self, output_tensors: list[torch.Tensor], input_tensors: list[torch.Tensor],
                 opts: Any = None) -> dist.Work:
        def move(payloads: list[Any]) -> None:
            check_slots([([o.shape for o in outs], [i.shape for i in ins]) for outs, ins in payloads])
            for dst, (outs, _) in enumerate(payloads):
                for src, (_, ins) in enumerate(payloads):
                    outs[src].copy_(ins[dst])

        key = (len(input_tensors), len(output_tensors), tuple(str(t.dtype) for t in input_tensors))
        return self._enter("all_to_all", input_tensors, "", (output_tensors, input_tensors), move, key=key)

    def reduce_scatter(self, output_tensors: list[torch.Tensor], input_tensors: list[list[torch.Tensor]],
                       opts: Any = None) -> dist.Work:
        (output,), (inputs,) = output_tensors, input_tensors
        op, reduce = reducer(opts, "reduce_scatter")

        def move(payloads: list[Any]) -> None:
            for dst, (out, _) in enumerate(payloads):
                out.copy_(reduce_stack([ins[dst] for _, ins in payloads], reduce))

        return self._enter("reduce_scatter", [output, *inputs], f"op={op}", (output, inputs), move)

    def reduce_scatter_single(self, output: torch.Tensor, tensor: torch.Tensor, opts: Any = None) -> dist.Work:
        size = self.size()
        require_contiguous("reduce_scatter_tensor", self.rank(), output=output, input=tensor)
        if tensor.numel() != output.numel() * size:
            raise ValueError(f"reduce_scatter_tensor on rank {self.rank()}: input has {tensor.numel()} elements, but "
                             f"{size} ranks x {output.numel()} output elements = {output.numel() * size}")
        op, reduce = reducer(opts, "reduce_scatter_tensor")

        def move(payloads: list[Any]) -> None:
            reduced = reduce_stack([src.reshape(size, -1) for _, src in payloads], reduce)
            for dst, (out, _) in enumerate(payloads):
                out.view(-1).copy_(reduced[dst])

        return self._enter("reduce_scatter_tensor", [output, tensor], f"op={op}", (output, tensor), move)

    _reduce_scatter_base = reduce_scatter_single

    def reduce(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        (tensor,) = tensors
        root = int(getattr(opts, "rootRank", 0))
        op, reduce = reducer(opts, "reduce")

        def move(payloads: list[Any]) -> None:
            payloads[root].copy_(reduce_stack(payloads, reduce))

        return self._enter("reduce", [tensor], f"dst={root}, op={op}", tensor, move)

    def gather(self, output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor],
               opts: Any = None) -> dist.Work:
        (tensor,) = input_tensors
        root = int(getattr(opts, "rootRank", 0))
        outputs = output_tensors[0] if output_tensors else []

        def move(payloads: list[Any]) -> None:
            check_root_count("gather slot(s)", [(root, len(slots)) for slots, _ in payloads])
            slots = payloads[root][0]
            for slot, (_, src) in zip(slots, payloads):
                slot.copy_(src)

        return self._enter("gather", [tensor], f"dst={root}", (outputs, tensor), move)

    def scatter(self, output_tensors: list[torch.Tensor], input_tensors: list[list[torch.Tensor]],
                opts: Any = None) -> dist.Work:
        (output,) = output_tensors
        root = int(getattr(opts, "rootRank", 0))
        inputs = input_tensors[0] if input_tensors else []

        def move(payloads: list[Any]) -> None:
            check_root_count("scatter input(s)", [(root, len(pieces)) for _, pieces in payloads])
            pieces = payloads[root][1]
            for (out, _), piece in zip(payloads, pieces):
                out.copy_(piece)

        return self._enter("scatter", [output], f"src={root}", (output, inputs), move)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        raise NotSimulatedError("all_reduce_coalesced")

    def allgather_coalesced(self, output_lists: Any, input_list: Any, opts: Any = None) -> dist.Work:
        raise NotSimulatedError("all_gather_coalesced")

    def monitored_barrier(self, *args: Any, **kwargs: Any) -> None:
        raise NotSimulatedError("monitored_barrier")

    def recv_anysource(self, *args: Any, **kwargs: Any) -> dist.Work:
        raise NotSimulatedError("recv from any source")
